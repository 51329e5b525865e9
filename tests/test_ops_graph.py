"""Graph preparation: inverse relations, CSR, neighbour sampling, normalised adjacency."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.ops.graph import KGCSR, is_symmetric, kg_with_inverses, norm_adjacency


def diffkg_edges(kg: np.ndarray, n_rel: int) -> np.ndarray:
    """DiffKG's own loop: unique sorted triplets, then their inverses, first (h, t) wins."""
    can = np.unique(kg, axis=0)
    inv = can[:, [2, 1, 0]].copy()
    inv[:, 1] += n_rel
    seen, out = set(), []
    for h, r, t in np.concatenate((can, inv)):
        if (h, t) not in seen:
            seen.add((h, t))
            out.append((h, r, t))
    out.sort(key=lambda x: (x[0], x[2]))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def random_kg(rng: np.random.Generator, n_ent: int, n_rel: int, n: int) -> np.ndarray:
    kg = np.stack([rng.integers(0, n_ent, n), rng.integers(0, n_rel, n),
                   rng.integers(0, n_ent, n)], 1)
    kg[:5, 2] = kg[:5, 0]  # self loops
    return np.concatenate((kg, kg[:20]))  # duplicate triplets


@pytest.mark.parametrize("n_ent,n_rel,n", [(13, 3, 60), (97, 5, 400), (31, 1, 200)])
def test_kg_with_inverses_matches_diffkg_loop(n_ent, n_rel, n):
    rng = np.random.default_rng(n)
    kg = random_kg(rng, n_ent, n_rel, n)
    got = kg_with_inverses(kg, n_rel)
    np.testing.assert_array_equal(got, diffkg_edges(kg, n_rel))
    assert got.dtype == np.int64
    keys = got[:, 0] * n_ent + got[:, 2]
    assert np.all(np.diff(keys) > 0)  # sorted by (h, t), one row per pair


def test_kg_with_inverses_huge_ids():
    # Entity ids near 2^40: the packed int64 sort key would overflow, the lexsort path runs.
    rng = np.random.default_rng(5)
    kg = random_kg(rng, 9, 3, 40)
    big = kg.copy()
    big[:, [0, 2]] += 2**40
    want = diffkg_edges(kg, 3)
    want[:, [0, 2]] += 2**40
    np.testing.assert_array_equal(kg_with_inverses(big, 3), want)


def test_kg_with_inverses_rules():
    kg = np.array([[0, 1, 1], [0, 0, 1], [1, 0, 0], [2, 1, 2], [0, 1, 1]])
    got = kg_with_inverses(kg, 2)
    # (0,1): relations 1, 0 and inverse 0+2 -> 0; (1,0): 0 and inverses 3, 2 -> 0;
    # self loop (2,1,2) kept with its stored id, not the inverse 3.
    np.testing.assert_array_equal(got, [[0, 0, 1], [1, 0, 0], [2, 1, 2]])
    assert kg_with_inverses(np.zeros((0, 3), np.int64), 3).shape == (0, 3)
    with pytest.raises(ValueError, match="relation id"):
        kg_with_inverses(np.array([[0, 2, 1]]), 2)
    with pytest.raises(ValueError, match="shape"):
        kg_with_inverses(np.zeros((3, 2)), 2)


def test_csr_from_triplets():
    tri = np.array([[4, 1, 2], [0, 0, 3], [4, 0, 0], [2, 1, 1], [0, 1, 1]])
    g = KGCSR.from_triplets(tri, n_entities=6, n_relations=2)
    assert g.rowptr.tolist() == [0, 2, 2, 3, 3, 5, 5]  # rows 1, 3, 5 empty
    assert g.col.tolist() == [1, 3, 1, 0, 2]
    assert g.rel.tolist() == [1, 0, 1, 0, 1]
    assert g.row.tolist() == [0, 0, 2, 4, 4]
    assert g.degree.tolist() == [2, 0, 1, 0, 2, 0]
    np.testing.assert_array_equal(g.to_triplets(), tri[np.lexsort((tri[:, 2], tri[:, 0]))])
    with pytest.raises(ValueError, match="entity"):
        KGCSR.from_triplets(tri, n_entities=4, n_relations=2)
    with pytest.raises(ValueError, match="relation"):
        KGCSR.from_triplets(tri, n_entities=6, n_relations=1)
    empty = KGCSR.from_triplets(np.zeros((0, 3), np.int64), 3, 2)
    assert empty.rowptr.tolist() == [0, 0, 0, 0] and empty.n_edges == 0


def test_from_kg():
    rng = np.random.default_rng(1)
    kg = random_kg(rng, 23, 4, 80)
    g = KGCSR.from_kg(kg, 23, 4)
    assert g.n_relations == 8
    np.testing.assert_array_equal(g.to_triplets(), kg_with_inverses(kg, 4))


def test_sample_neighbours_counts_and_subset():
    rng = np.random.default_rng(2)
    kg = random_kg(rng, 41, 3, 500)
    g = KGCSR.from_kg(kg, 41, 3)
    assert g.sample_neighbours(-1) is g
    s = g.sample_neighbours(3, torch.Generator().manual_seed(0))
    assert torch.equal(s.degree, torch.clamp(g.degree, max=3))
    full = {tuple(x) for x in g.to_triplets().tolist()}
    got = s.to_triplets()
    assert {tuple(x) for x in got.tolist()} <= full
    keys = got[:, 0] * 41 + got[:, 2]
    assert np.all(np.diff(keys) > 0)  # still CSR-ordered
    again = g.sample_neighbours(3, torch.Generator().manual_seed(0))
    assert torch.equal(again.col, s.col) and torch.equal(again.rowptr, s.rowptr)
    other = g.sample_neighbours(3, torch.Generator().manual_seed(1))
    assert not torch.equal(other.col, s.col)
    assert g.sample_neighbours(0).n_edges == 0
    with pytest.raises(ValueError):
        g.sample_neighbours(-2)


def test_sample_neighbours_uniform():
    # 3000 heads with the same 10 tails, keep 3: each tail is kept with probability 0.3.
    n_heads, deg, k = 3000, 10, 3
    h = np.repeat(np.arange(n_heads), deg)
    t = n_heads + np.tile(np.arange(deg), n_heads)
    g = KGCSR.from_triplets(np.stack([h, np.zeros_like(h), t], 1), n_heads + deg, 1)
    s = g.sample_neighbours(k, torch.Generator().manual_seed(3))
    counts = torch.bincount(s.col - n_heads, minlength=deg).double()
    p = k / deg
    sd = (n_heads * p * (1 - p)) ** 0.5
    assert torch.all((counts - n_heads * p).abs() < 5 * sd), counts


def dense_norm(r: np.ndarray, self_loops: bool) -> np.ndarray:
    u, i = r.shape
    a = np.zeros((u + i, u + i))
    a[:u, u:] = r != 0
    a[u:, :u] = (r != 0).T
    if self_loops:
        a += np.eye(u + i)
        d = a.sum(1)
    else:
        d = a.sum(1) + 1e-10
    return a / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]


@pytest.mark.parametrize("self_loops", [True, False])
def test_norm_adjacency_dense_formula(self_loops):
    rng = np.random.default_rng(4)
    u, i = 17, 11
    r = (rng.random((u, i)) < 0.25) * rng.integers(1, 3, (u, i))  # non-binary counts
    r[3] = 0  # a user with no interaction
    r[:, 5] = 0  # an item with no interaction
    adj = norm_adjacency(sp.csr_matrix(r), u, i, self_loops=self_loops, dtype=torch.float64)
    assert adj.layout == torch.sparse_csr and adj.shape == (u + i, u + i)
    np.testing.assert_allclose(adj.to_dense().numpy(), dense_norm(r, self_loops), rtol=1e-12)
    assert is_symmetric(adj)
    f32 = norm_adjacency(sp.csr_matrix(r), u, i, self_loops=self_loops)
    assert f32.dtype == torch.float32 and is_symmetric(f32)
    with pytest.raises(ValueError, match="shape"):
        norm_adjacency(sp.csr_matrix(r), u, i + 1)


def test_is_symmetric_rejects():
    a = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).to_sparse_csr()
    assert not is_symmetric(a)
    b = torch.tensor([[0.0, 1.0], [1.5, 0.0]]).to_sparse_coo()
    assert not is_symmetric(b) and is_symmetric(b, atol=0.6)
    assert not is_symmetric(torch.zeros(2, 3).to_sparse_coo())
