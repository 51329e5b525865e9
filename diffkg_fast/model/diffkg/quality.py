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
BLOCK_ELEMENTS = 2**25  # dense row elements a mask-recovery block holds (128 MB in float32)


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
        rows = self.rows
        if rows.numel() == 0:
            return {}
        was = denoiser.training
        denoiser.eval()
        # sampling_steps > 0 would draw noise: a fixed generator keeps the training streams apart.
        gen = torch.Generator().manual_seed(0)
        # Dense rows in blocks of at most BLOCK_ELEMENTS: a row's prediction does not depend on
        # the other rows (eval mode), and 1,024 whole rows of a million entities are several
        # 4-8 GB blocks. Below the bound (up to 32k entities) it is one block, as it always was.
        step = max(1, BLOCK_ELEMENTS // self.kg.n_entities)
        hits = torch.zeros(2, dtype=torch.float64)
        for start in range(0, rows.numel(), step):
            hits += self._block_hits(denoiser, schedule, sampling_steps, gen,
                                     slice(start, start + step))
        denoiser.train(was)
        # float32, as the mean of a 0/1 float32 tensor it once was: the logged values keep
        # their bits.
        rate = (hits.float() / rows.numel()).tolist()
        return {f"mask_recovery@{HITS_AT}": rate[0],
                f"mask_recovery_popularity@{HITS_AT}": rate[1]}

    def _block_hits(self, denoiser: Denoiser, schedule: DiffusionSchedule, sampling_steps: int,
                    gen: torch.Generator, part: slice) -> Tensor:
        """The hidden edges found in the top 10 by the denoiser and by in-degree, for the rows
        ``self.rows[part]``: two counts."""
        kg, hidden = self.kg, self.hidden[part]
        x = kg_rows(kg.rowptr, kg.col, self.rows[part], kg.n_entities)
        x[torch.arange(x.shape[0], device=x.device), hidden] = 0.0
        out = sample(denoiser, x, schedule, sampling_steps, generator=gen)
        out = out.masked_fill(x > 0, float("-inf"))  # visible edges are no prediction
        pop = self.popularity.expand_as(x).masked_fill(x > 0, float("-inf"))
        return torch.tensor([_hits(out, hidden), _hits(pop, hidden)], dtype=torch.float64)


def _hits(scores: Tensor, target: Tensor) -> float:
    """How many rows have their ``target`` column among their top ``HITS_AT`` scores."""
    top = scores.topk(min(HITS_AT, scores.shape[1]), dim=1).indices
    return float((top == target[:, None]).any(1).sum())
