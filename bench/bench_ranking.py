"""Benchmark: ranking a batch of users against every item (the evaluation's inner loop).

Run ``pytest bench/bench_ranking.py --benchmark-only`` (CPU, one thread: ``one_thread``).

The million-entity synthetic KG's shape (``bench/bench_large_kg_epoch.py``): 336,786 items,
``H = 64`` (``latdim``), a test batch of ``B = 1,024`` users, each with ~11 known items
excluded (the KG's training interactions per user), top 40 (the harness's largest K). Providers:

- ``reference``: ``topk_items(U_B @ Iᵀ, exclude, 40)`` on the whole ``B × n`` matrix (the dense
  mask, the ``-inf`` copy, ``topk``: what every non-embedding model still runs);
- ``blocked``: :func:`~diffkg_fast.eval.factored.topk_factored` at ``block`` items per block
  (``1024`` is the default; the others show the choice);
- ``product-only``: the blocked path's products alone (``B × 1,024`` blocks into one buffer, no
  selection): the floor of the blocked path on this CPU, beside the FLOP count.

``extra_info``: ``flop`` (the product's ``2·B·n·H``, the compulsory work: every score is read
once), ``bytes`` (the factors, the compulsory traffic; the reference also writes and re-reads
the 1.4 GB of scores). Both providers return the same ids (checked here on these float
factors, and in ``tests/test_eval_factored.py``). Figures: ``bench/results/cpu-ranking.txt``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.eval.factored import FactoredScores, topk_factored
from diffkg_fast.eval.topk import topk_items

B, N_ITEMS, H, K, KNOWN = 1024, 336_786, 64, 40, 11


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    scores = FactoredScores(torch.randn(B, H, generator=g) * 0.3,
                            torch.randn(N_ITEMS, H, generator=g) * 0.3)
    rng = np.random.default_rng(0)
    nnz = KNOWN * B
    exclude = sp.csr_matrix((np.ones(nnz, np.float32),
                             (rng.integers(0, B, nnz), rng.integers(0, N_ITEMS, nnz))),
                            shape=(B, N_ITEMS))
    return scores, exclude


@pytest.mark.parametrize("provider", ["reference", "blocked-512", "blocked-1024",
                                      "blocked-4096", "blocked-16384", "product-only"])
def test_rank_batch(benchmark, one_thread, batch, provider: str) -> None:
    scores, exclude = batch
    benchmark.group = "rank-1m-entities"
    benchmark.extra_info.update(flop=2 * B * N_ITEMS * H, bytes=4 * (B + N_ITEMS) * H)
    if provider == "product-only":
        buf = torch.empty(B, 1024)

        def products():
            for lo in range(0, N_ITEMS - 1024 + 1, 1024):
                torch.mm(scores.left, scores.right[lo:lo + 1024].T, out=buf)

        benchmark.pedantic(products, rounds=5, iterations=1, warmup_rounds=1)
        return
    if provider == "reference":
        def run():
            return topk_items(scores.dense(), exclude, K)
    else:
        block = int(provider.split("-")[1])

        def run():
            return topk_factored(scores, exclude, K, block=block)

    top = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.equal(top, topk_items(scores.dense(), exclude, K))
