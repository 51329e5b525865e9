"""How good is the denoised KG? Two measures per epoch, logged with the epoch (``info``):

- ``rebuild_precision``: the share of the rebuild's picks (the top ``rebuild_k`` columns of
  every denoised row) that are edges of the original KG. Only those survive the intersection,
  so this is what decides the denoised KG's size before ``keepRate``.
- ``mask_recovery@10``: for a fixed sample of rows (drawn once, stream ``kg_quality``), one edge
  of each row is hidden from the denoiser's input; the hit rate of that edge among the 10
  highest denoised columns that are not visible in the input. The denoiser has seen these rows
  whole in training, so this measures reconstruction of a row from its other edges, not
  generalisation to unseen edges. ``mask_recovery_popularity@10``: the same hit rate when the
  columns are ranked by in-degree instead, the baseline a useful denoiser must beat.

Neither changes training: the sample comes from its own random stream, and the measures run
without gradient after the rebuild.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffkg_fast.ops.diffusion import Denoiser, DiffusionSchedule, kg_rows, sample
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.utils.seed import rng_stream

__all__ = ["KGQuality"]

HITS_AT = 10


class KGQuality:
    """The two measures of the module docstring for the KG ``kg`` (with inverses)."""

    def __init__(self, kg: KGCSR, seed: int, n_rows: int = 1024) -> None:
        self.kg = kg
        n = kg.n_entities
        # Sorted (h, t) keys of the KG, for membership tests of picks.
        self.keys = torch.sort(kg.row * n + kg.col).values
        deg = kg.degree.to(kg.rowptr.device)
        cand = torch.nonzero(deg >= 2).flatten()  # a row must keep a visible edge
        gen = rng_stream(seed, "kg_quality")
        pick = torch.randperm(cand.numel(), generator=gen)[:n_rows].to(cand.device)
        self.rows = cand[pick].sort().values
        offset = (torch.rand(self.rows.numel(), generator=gen).to(deg.device)
                  * deg[self.rows]).long()
        self.hidden = kg.col[kg.rowptr[self.rows] + offset]
        # In-degree, ties broken towards the lower id (a strict order: topk's ties are arbitrary).
        indeg = torch.bincount(kg.col, minlength=n).double()
        self.popularity = indeg * n - torch.arange(n, dtype=torch.float64, device=indeg.device)

    def precision(self, rows: Tensor, topk_cols: Tensor) -> float:
        """Share of ``(rows[i], topk_cols[i, j])`` picks that are KG edges."""
        n = self.kg.n_entities
        picks = (rows.to(topk_cols.device)[:, None] * n + topk_cols).flatten()
        if picks.numel() == 0:
            return float("nan")
        pos = torch.searchsorted(self.keys, picks).clamp_(max=self.keys.numel() - 1)
        return float((self.keys[pos] == picks).float().mean())

    @torch.no_grad()
    def mask_recovery(self, denoiser: Denoiser, schedule: DiffusionSchedule,
                      sampling_steps: int) -> dict[str, float]:
        """``mask_recovery@10`` and its in-degree baseline (module docstring)."""
        kg, rows = self.kg, self.rows
        if rows.numel() == 0:
            return {}
        x = kg_rows(kg.rowptr, kg.col, rows, kg.n_entities)
        at = torch.arange(rows.numel(), device=x.device)
        x[at, self.hidden] = 0.0
        was = denoiser.training
        denoiser.eval()
        # sampling_steps > 0 would draw noise: a fixed generator keeps the training streams apart.
        out = sample(denoiser, x, schedule, sampling_steps,
                     generator=torch.Generator().manual_seed(0))
        denoiser.train(was)
        out = out.masked_fill(x > 0, float("-inf"))  # visible edges are no prediction
        pop = self.popularity.expand_as(x).masked_fill(x > 0, float("-inf"))
        return {f"mask_recovery@{HITS_AT}": _hit_rate(out, self.hidden),
                f"mask_recovery_popularity@{HITS_AT}": _hit_rate(pop, self.hidden)}


def _hit_rate(scores: Tensor, target: Tensor) -> float:
    top = scores.topk(min(HITS_AT, scores.shape[1]), dim=1).indices
    return float((top == target[:, None]).any(1).float().mean())
