"""Synthetic KGs of published shapes, shared by the benchmarks."""

from __future__ import annotations

import numpy as np

from diffkg_fast.ops.graph import KGCSR


def zipf_kg(n: int, nnz: int, n_rel: int, device: str) -> KGCSR:
    """A head-sorted KG of ``n`` entities and ``nnz`` edges with Zipf(0.8) head and tail
    degrees (ids permuted so the hubs are spread out), relations uniform; seed 0."""
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, n + 1) ** 0.8
    p /= p.sum()
    h = rng.permutation(n)[rng.choice(n, nnz, p=p)]
    t = rng.permutation(n)[rng.choice(n, nnz, p=p)]
    r = rng.integers(0, n_rel, nnz)
    return KGCSR.from_triplets(np.stack([h, r, t], 1), n, n_rel).to(device)
