"""Synthetic KGs of published shapes, and the default cohort with its first BPR batch, shared
by the benchmarks."""

from __future__ import annotations

import functools

import numpy as np

from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.model.base import PairBatch
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.train.sampling import PairSampler


@functools.lru_cache(maxsize=1)
def default_cohort() -> KGDataset:
    """The default synthetic cohort (6,350 patients, 112 medications, 3,573 entities)."""
    return build_dataset("synthetic")


def first_pairs(batch: int = 1024, seed: int = 421) -> PairBatch:
    """The first BPR batch of the default cohort's first epoch."""
    sampler = PairSampler(default_cohort().train, batch, seed)
    return next(iter(sampler.batches(sampler.negatives(), 1)))


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
