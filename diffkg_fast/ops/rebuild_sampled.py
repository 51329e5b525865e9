"""The rebuild's top-k among each row's own edges and sampled competitor columns.

The exact rebuild (:func:`diffkg_fast.ops.diffusion.sample_topk`, then
:func:`~diffkg_fast.ops.rebuild.rebuild_kg`) denoises every KG row ``h`` into ``x̂_h`` over all E
columns and keeps an edge ``(h, t)`` when ``t`` is among the row's top ``k`` columns. Through
the hidden-space sampler (:mod:`diffkg_fast.ops.diffusion_sample_fused`) the reverse chain is
already cheap: its factors cost E·H² once per rebuild and each row O(steps·H² + deg·H). What
stays quadratic is the last product, ``x̂_h = c1_0 (W2 a_h + b2)`` at every column: E·H a row,
E²·H a rebuild.

Here the last product is taken only at the candidates: the row's distinct edge columns and
``n`` competitor columns drawn uniformly (with replacement) once per batch and shared by its
rows; a competitor that is an edge of the row counts once, as an edge. The top ``k`` of the
candidates replaces the top ``k`` of the row: O((deg + n)·H) a row.

What it changes: an edge's rank among fewer competitors can only improve, so every edge the
exact rule keeps is kept here too (tested), and more may be. An edge with ``r`` columns above
it in the exact row survives (k = 1) when none of them is drawn: probability
``(1 - r/E)^n`` for ``n`` draws with replacement, 1 for ``r = 0``. So it is not an estimator of
the exact rule but a different rule that approaches it as ``n/E`` grows; with every column as
a competitor (``competitors=arange(E)``) it is the exact top-k (tested). Whether the looser rule
moves accuracy is the parity question (docs/large-kg.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffkg_fast.ops.diffusion import Denoiser, DiffusionSchedule
from diffkg_fast.ops.diffusion_sample_fused import (
    SamplerFactors,
    _last_hidden,
    _sparse_start,
    distinct_entries,
)
from diffkg_fast.ops.diffusion_sampled import is_edge
from diffkg_fast.ops.rows import rows as take_rows

__all__ = ["sample_topk_candidates"]


@torch.no_grad()
def sample_topk_candidates(
    denoiser: Denoiser, rowptr: Tensor, col: Tensor, keys: Tensor, rows: Tensor,
    schedule: DiffusionSchedule, k: int, n_competitors: int, *, batch_size: int = 1024,
    generator: torch.Generator | None = None, competitors: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` of the denoised KG rows ``rows`` among their candidates (module docstring) →
    ``(values, columns)``, each (len(rows), k), for
    :func:`~diffkg_fast.ops.rebuild.rebuild_kg`. ``keys``: the KG's
    :func:`~diffkg_fast.ops.diffusion_sampled.edge_keys`. Competitors: ``n_competitors``
    columns per batch from ``generator`` (on the CPU), or the fixed ``competitors`` for every
    batch. No noise (``sampling_steps = 0``). A row with fewer than ``k`` finite candidates
    repeats its best column."""
    n_ent = denoiser.n_entities
    if k < 1 or k > n_competitors:
        raise ValueError(f"k={k} must be in [1, n_competitors={n_competitors}]")
    fac = SamplerFactors.build(denoiser, schedule)
    vals, cols = [], []
    for start in range(0, rows.numel(), batch_size):
        batch = rows[start:start + batch_size].to(rowptr.device)
        # The rows' distinct edges: the chain's start and the first candidates.
        edges = distinct_entries(rowptr, col, batch, n_ent)
        a = _last_hidden(fac, *_sparse_start(fac, *edges[1:]))
        comp = competitors if competitors is not None else torch.randint(
            n_ent, (n_competitors,), generator=generator).to(rowptr.device)
        v, c = _candidates(fac, a, edges, keys, batch, comp)
        top_v, j = torch.topk(v, k, dim=-1)
        top_c = c.gather(1, j)
        # Padding and masked competitors are -inf: never picked over a finite candidate.
        top_c = torch.where(top_v == -torch.inf, top_c[:, :1], top_c)
        vals.append(top_v)
        cols.append(top_c)
    if not vals:
        return torch.empty(0, k, dtype=fac.w2.dtype), torch.empty(0, k, dtype=torch.long)
    return torch.cat(vals), torch.cat(cols)


def _candidates(fac: SamplerFactors, a: Tensor, edges: tuple[Tensor, Tensor, Tensor],
                keys: Tensor, batch: Tensor, comp: Tensor) -> tuple[Tensor, Tensor]:
    """The candidates' denoised values and columns (B × (max degree + n)): each row's distinct
    ``edges`` (:func:`distinct_entries`; padded with -inf), then the competitors (-inf where
    one is an edge of the row)."""
    n_ent, c1 = fac.w2.shape[0], fac.c1[0]
    er, ec, ptr = edges
    width = int((ptr[1:] - ptr[:-1]).max()) if ec.numel() else 0
    slot = torch.arange(ec.numel(), device=ec.device) - ptr[er]
    ev = c1 * ((take_rows(a, er) * take_rows(fac.w2, ec)).sum(-1) + fac.b2[ec])
    edge_v = a.new_full((batch.numel(), width), -torch.inf)
    edge_c = torch.zeros((batch.numel(), width), dtype=torch.long, device=a.device)
    edge_v[er, slot], edge_c[er, slot] = ev, ec
    comp_v = c1 * torch.addmm(fac.b2[comp], a, take_rows(fac.w2, comp).T)
    comp_v.masked_fill_(is_edge(keys, n_ent, batch, comp), -torch.inf)
    return (torch.cat([edge_v, comp_v], 1),
            torch.cat([edge_c, comp.expand(batch.numel(), -1)], 1))
