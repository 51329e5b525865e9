"""Reference KG rebuild against a brute-force oracle in Python sets (DiffKG's loop semantics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffkg_fast.ops.rebuild import rebuild_kg


def rebuild_kg_bruteforce(topk_cols, h, t, rel, rows=None):
    """Candidates ∪ reverses, ∩ original pairs, original (first) relation; sorted by (h, t)."""
    rel_of: dict[tuple[int, int], int] = {}
    for a, b, r in zip(h.tolist(), t.tolist(), rel.tolist(), strict=True):
        rel_of.setdefault((a, b), r)
    rows = range(len(topk_cols)) if rows is None else rows.tolist()
    cand = set()
    for i, cols in zip(rows, topk_cols.tolist(), strict=True):
        for c in cols:
            cand |= {(i, c), (c, i)}
    return sorted((a, b, rel_of[(a, b)]) for a, b in cand if (a, b) in rel_of)


def random_kg(n: int, n_triplets: int, n_rel: int, seed: int):
    """Random (h, t, rel) with inverses (t, h, rel + n_rel), like the graph builder makes."""
    rng = np.random.default_rng(seed)
    h, t = rng.integers(0, n, n_triplets), rng.integers(0, n, n_triplets)
    r = rng.integers(0, n_rel, n_triplets)
    hh, tt, rr = np.r_[h, t], np.r_[t, h], np.r_[r, r + n_rel]
    return torch.from_numpy(hh), torch.from_numpy(tt), torch.from_numpy(rr)


def as_triples(out) -> list[tuple[int, int, int]]:
    return list(zip(*(x.tolist() for x in out), strict=True))


@pytest.mark.parametrize("k", [1, 3])
def test_equals_bruteforce_with_keep_rate_one(k: int) -> None:
    n = 83
    h, t, r = random_kg(n, 400, 5, seed=k)
    # Rows' top-k biased towards true neighbours so that the intersection is not empty.
    g = torch.Generator().manual_seed(k)
    topk = torch.randint(0, n, (n, k), generator=g)
    topk[h[:n] % n, 0] = t[:n]
    out = rebuild_kg(topk, (h, t, r), 1.0, torch.Generator().manual_seed(0))
    got = as_triples(out)
    assert got == rebuild_kg_bruteforce(topk, h, t, r)
    assert len(got) > 50
    assert all(x.dtype == torch.int64 for x in out)


def test_duplicates_in_candidates_and_in_kg() -> None:
    # Row 0 lists 1 twice, row 1 lists 0 (the reverse of a candidate), row 2 lists itself.
    topk = torch.tensor([[1, 1], [0, 2], [2, 0]])
    h = torch.tensor([0, 1, 0, 1, 2, 0, 2])
    t = torch.tensor([1, 0, 1, 2, 1, 2, 0])
    r = torch.tensor([7, 8, 9, 3, 4, 5, 6])  # (0, 1) twice: the first relation (7) wins
    got = as_triples(rebuild_kg(topk, (h, t, r), 1.0))
    assert got == rebuild_kg_bruteforce(topk, h, t, r)
    assert got == [(0, 1, 7), (0, 2, 5), (1, 0, 8), (1, 2, 3), (2, 0, 6), (2, 1, 4)]


def test_rows_subset_and_no_overlap() -> None:
    h, t, r = random_kg(40, 150, 3, seed=4)
    rows = torch.tensor([3, 17, 39])
    topk = torch.stack([t[h == i][:2] if (h == i).sum() >= 2 else torch.tensor([0, 1])
                        for i in rows.tolist()])
    got = as_triples(rebuild_kg(topk, (h, t, r), 1.0, rows=rows, n_entities=40))
    assert got == rebuild_kg_bruteforce(topk, h, t, r, rows=rows)
    # No candidate in the KG, and an empty KG: empty outputs.
    none = rebuild_kg(torch.full((40, 1), 39), (h[:0], t[:0], r[:0]), 1.0)
    assert all(x.numel() == 0 for x in none)


def test_keep_rate_fraction_and_subset() -> None:
    n = 2000
    h, t, r = random_kg(n, 20000, 4, seed=5)
    # Every original edge is a candidate: the top-k of row h holds t.
    order = torch.argsort(h, stable=True)
    counts = torch.bincount(h, minlength=n)
    k = int(counts.max())
    slot = torch.arange(h.numel()) - (torch.cumsum(counts, 0) - counts)[h[order]]
    topk = torch.zeros(n, k, dtype=torch.long)
    topk[:, :] = torch.arange(n)[:, None]  # padding: self pairs (in the KG or not)
    topk[h[order], slot] = t[order]
    full = set(as_triples(rebuild_kg(topk, (h, t, r), 1.0)))
    half = as_triples(rebuild_kg(topk, (h, t, r), 0.5, torch.Generator().manual_seed(1)))
    assert set(half) <= full
    m = len(full)
    assert abs(len(half) - m / 2) < 5 * math.sqrt(m / 4)
    assert as_triples(rebuild_kg(topk, (h, t, r), 0.0)) == []


def test_seeded_generator_is_deterministic() -> None:
    h, t, r = random_kg(200, 2000, 3, seed=6)
    topk = torch.randint(0, 200, (200, 4))
    runs = [as_triples(rebuild_kg(topk, (h, t, r), 0.5, torch.Generator().manual_seed(s)))
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_keep_rate_out_of_range() -> None:
    h, t, r = random_kg(10, 5, 1, seed=0)
    with pytest.raises(ValueError):
        rebuild_kg(torch.zeros(10, 1, dtype=torch.long), (h, t, r), 1.5)
