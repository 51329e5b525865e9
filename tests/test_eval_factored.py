"""Blocked top-k of factored scores: the same ids as ``topk_items`` of the whole matrix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.eval.factored import FactoredScores, topk_factored
from diffkg_fast.eval.ranking import ranking_metrics
from diffkg_fast.eval.topk import topk_items
from diffkg_fast.model.lightgcn import LightGCN


def integer_factors(rng, n_rows, n_items, h, spread):
    """Integer-valued factors: every product is exact in any summation order, so the blocked
    and the whole product agree bit for bit on any BLAS; a small ``spread`` makes many ties."""
    left = torch.from_numpy(rng.integers(-spread, spread + 1, (n_rows, h)).astype(np.float32))
    right = torch.from_numpy(rng.integers(-spread, spread + 1, (n_items, h)).astype(np.float32))
    return FactoredScores(left, right)


def random_exclude(rng, n_rows, n_items, density):
    """A CSR whose rows hold their columns in descending order, one column twice (a duplicate
    entry), and whose second row excludes everything."""
    rows = []
    for r in range(n_rows):
        cols = np.flatnonzero(rng.random(n_items) < density)
        if r == 1:
            cols = np.arange(n_items)
        if len(cols):
            cols = np.concatenate([cols[::-1], cols[:1]])
        rows.append(cols)
    indptr = np.concatenate([[0], np.cumsum([len(c) for c in rows])])
    indices = np.concatenate(rows).astype(np.int32)
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr),
                         shape=(n_rows, n_items))


@pytest.mark.parametrize("seed", range(12))
def test_same_ids_as_the_whole_matrix(seed):
    rng = np.random.default_rng(seed)
    n_rows, n_items = int(rng.integers(1, 40)), int(rng.integers(20, 90))
    block = int(rng.integers(3, 17))
    k = int(rng.integers(1, block))  # k + 1 <= block: the blocked path
    spread = int(rng.choice([1, 2, 50]))
    f = integer_factors(rng, n_rows, n_items, int(rng.integers(1, 9)), spread)
    excl = None if seed % 4 == 0 else random_exclude(rng, n_rows, n_items, 0.2)
    want = topk_items(f.dense(), excl, k)
    got = topk_factored(f, excl, k, block=block)
    assert torch.equal(got, want)


def test_ties_across_the_boundary_and_padding():
    # Every score equal: every row is tied at the boundary; the second row keeps 2 items.
    f = FactoredScores(torch.zeros(3, 2), torch.zeros(30, 2))
    excl = sp.csr_matrix(np.isin(np.arange(30), [5, 9], invert=True)[None].repeat(3, 0)
                         * np.array([[0], [1], [0]]))
    got = topk_factored(f, excl, 4, block=6)
    assert got.tolist() == [[0, 1, 2, 3], [5, 9, -1, -1], [0, 1, 2, 3]]
    assert torch.equal(got, topk_items(f.dense(), excl, 4))


def test_infinite_scores_rank_as_in_the_whole_matrix():
    rng = np.random.default_rng(3)
    f = integer_factors(rng, 6, 40, 3, 5)
    right = f.right.clone()
    right[7] = float("inf")  # +inf for positive left[:, 0], -inf and NaN-free otherwise
    left = f.left.clone()
    left[:, 1:] = left[:, 1:].abs() + 1
    left[:, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0, 1.0, 3.0])
    right[7, 1:] = 0
    f = FactoredScores(left, right)
    for k in (1, 3, 9):
        assert torch.equal(topk_factored(f, None, k, block=8), topk_items(f.dense(), None, k))


def test_nan_in_a_kept_item_raises_in_an_excluded_one_does_not():
    left = torch.ones(2, 1)
    right = torch.arange(30, dtype=torch.float32)[:, None]
    right[17] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk_factored(FactoredScores(left, right), None, 3, block=8)
    excl = sp.csr_matrix(([1, 1], ([0, 1], [17, 17])), shape=(2, 30))
    got = topk_factored(FactoredScores(left, right), excl, 3, block=8)
    assert got.tolist() == [[29, 28, 27]] * 2


def test_float64_and_small_shapes_take_a_path_with_the_same_ids():
    rng = np.random.default_rng(4)
    f = integer_factors(rng, 5, 25, 4, 3)
    f64 = FactoredScores(f.left.double(), f.right.double())
    assert torch.equal(topk_factored(f64, None, 4, block=6), topk_items(f64.dense(), None, 4))
    # n_items <= block, k + 1 > block, k >= n_items, no rows: the whole matrix.
    for k, block in ((4, 25), (7, 6), (30, 6)):
        assert torch.equal(topk_factored(f, None, k, block=block), topk_items(f.dense(), None, k))
    empty = FactoredScores(torch.zeros(0, 4), f.right)
    assert topk_factored(empty, None, 3, block=6).shape == (0, 3)


def test_bad_arguments():
    f = FactoredScores(torch.zeros(2, 2), torch.zeros(30, 2))
    with pytest.raises(ValueError, match="k must be"):
        topk_factored(f, None, 0)
    with pytest.raises(ValueError, match="block must be"):
        topk_factored(f, None, 3, block=0)
    with pytest.raises(ValueError, match="exclude has shape"):
        topk_factored(f, sp.csr_matrix((3, 30)), 3, block=8)
    bad = sp.csr_matrix((np.ones(1), np.array([30]), np.array([0, 1, 1])), shape=(2, 30))
    with pytest.raises(ValueError, match="column outside"):
        topk_factored(f, bad, 3, block=8)


def test_float_factors_same_ranking_metrics():
    """Float factors at a shape where BLAS blocks the items: the metrics of the factored
    scores equal those of the whole matrix (the same ids, at this H)."""
    rng = np.random.default_rng(5)
    n_users, n_items, h = 300, 5000, 64
    left = torch.from_numpy(rng.normal(size=(n_users, h)).astype(np.float32))
    right = torch.from_numpy(rng.normal(size=(n_items, h)).astype(np.float32))
    target = sp.random(n_users, n_items, density=0.003, format="csr", random_state=6)
    train = sp.random(n_users, n_items, density=0.01, format="csr", random_state=7)
    train = train - train.multiply(target > 0)
    train.eliminate_zeros()
    dense = ranking_metrics(lambda u: left[u] @ right.T, None, target, [train], batch_size=128)
    fact = ranking_metrics(lambda u: FactoredScores(left[u], right), None, target, [train],
                           batch_size=128)
    assert dense == fact
    assert dense["n_users"] > 0


def test_embedding_model_ranks_by_its_factors():
    train = sp.random(7, 40, density=0.2, format="csr", random_state=0)
    model = LightGCN(7, 40, train, latdim=8, seed=0)
    users = torch.tensor([0, 3, 5])
    fs = model.ranking_scores(users)
    assert isinstance(fs, FactoredScores)
    assert torch.equal(model.score(users), fs.dense())
