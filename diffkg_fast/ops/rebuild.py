"""KG rebuild after diffusion: keep the original edges that the denoiser ranks highest.

Reference implementation (vectorized PyTorch, on the KG's device), the oracle of the kernels::

    C      = {(r_i, c) : c in topk_cols[i]} ∪ {(c, r_i) : c in topk_cols[i]}    (as a set)
    K      = C ∩ {(h, t) of the original KG}, each with its ORIGINAL relation
    output = {e in K : u_e < keep_rate},  u_e ~ U[0, 1) one per edge of K, in (h, t) order

Pairs are matched as sorted int64 keys ``h * n + t`` with ``torch.searchsorted``, so the
denoised KG is a subset of the original one. (DiffKG loops in Python over every candidate, with
a device sync each.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffkg_fast.ops.backend import register, resolve


@register("rebuild_kg", "reference")
def _rebuild_kg_reference(
    topk_cols: Tensor, kg_pairs: tuple[Tensor, Tensor, Tensor], keep_rate: float,
    generator: torch.Generator | None = None, rows: Tensor | None = None,
    n_entities: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    h0, t0, r0 = kg_pairs
    dev = h0.device
    topk_cols = topk_cols.to(dev)
    n_rows, k = topk_cols.shape
    rows = torch.arange(n_rows, device=dev) if rows is None else rows.to(dev)
    if n_entities is None:
        ids = [x.max().reshape(1) for x in (h0, t0, topk_cols, rows) if x.numel()]
        n_entities = int(torch.cat(ids).max()) + 1 if ids else 1
    n = n_entities

    # Candidates and their reverses, de-duplicated (sorted) as keys h * n + t.
    cand_h = rows.repeat_interleave(k)
    cand_t = topk_cols.reshape(-1)
    cand = torch.unique(torch.cat([cand_h * n + cand_t, cand_t * n + cand_h]))

    # Intersect with the original keys; a stable sort makes a duplicated (h, t) pair of the
    # original KG resolve to its first occurrence, i.e. its first relation (as DiffKG keeps).
    orig_keys, perm = torch.sort(h0 * n + t0, stable=True)
    pos = torch.searchsorted(orig_keys, cand)
    # pos == len(orig_keys) (past the end) lands on a -1 sentinel that no key equals.
    hit = torch.cat([orig_keys, orig_keys.new_full((1,), -1)])[pos] == cand
    kept, rel = cand[hit], r0[perm[pos[hit]]]

    # One Bernoulli(keep_rate) per kept edge, drawn on the generator's device so that a CPU
    # generator gives the same mask on every device.
    gdev = generator.device if generator is not None else dev
    u = torch.rand(kept.numel(), generator=generator, device=gdev, dtype=torch.float64).to(dev)
    keep = u < keep_rate
    kept, rel = kept[keep], rel[keep]
    return kept // n, kept % n, rel


def rebuild_kg(
    topk_cols: Tensor, kg_pairs: tuple[Tensor, Tensor, Tensor], keep_rate: float,
    generator: torch.Generator | None = None, *, rows: Tensor | None = None,
    n_entities: int | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """The denoised KG ``(h, t, rel)`` (each (m,) int64, sorted by ``(h, t)``).

    ``topk_cols`` (n_rows × k) int64: the top-k columns of every denoised entity row
    (row ``i`` is entity ``rows[i]``, default ``i``); ``kg_pairs = (h, t, rel)`` the original KG
    edges after inverses (each (E,) int64); ``keep_rate`` in [0, 1]: each edge that survives the
    intersection is kept with this probability, one Bernoulli per edge from ``generator``.
    ``n_entities`` (key base) defaults to 1 + the largest id seen.
    """
    if not 0.0 <= keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in [0, 1], got {keep_rate}")
    fn = resolve("rebuild_kg", backend, kg_pairs[0].device)
    return fn(topk_cols, kg_pairs, keep_rate, generator, rows, n_entities)
