"""The medication KG builder against brute-force references: splits, co-occurrence, DDI, ATC."""

from __future__ import annotations

import csv
import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest

from diffkg_fast.data.codes import atc_names, bundled_path, ddi_pairs, icd9_titles
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.medkg import (
    build_medication_dataset,
    split_interactions,
    split_patients_safedrug,
)
from diffkg_fast.data.records import MedicalRecords

from helpers import DIAGS, MEDS, PROCS, random_records


def brute_force_cooc(rec: MedicalRecords, ds, kind: str, min_count: int, min_lift: float,
                     top_k: int, top_k_code: int) -> set[tuple[int, int]]:
    """Pure-Python edges from training entries only (the spec of the module docstring)."""
    train = {(int(u), int(i)) for u, i in zip(*ds.train.nonzero(), strict=True)}
    nested = rec.to_nested()
    k = {"diag": 0, "proc": 1}[kind]
    visits = []
    for p, pv in enumerate(nested):
        for v_idx, visit in enumerate(pv):
            v = rec.visit_ptr[p] + v_idx
            if ds.split == "visit" and ds.visits.split[v] != 0:
                continue  # held-out visits do not count at all
            meds = [m for m in visit[2] if ds.split == "visit" or (p, m) in train]
            visits.append((meds, visit[k]))
    n = len(visits)
    med_f, code_f, pair_f = Counter(), Counter(), Counter()
    for meds, cs in visits:
        med_f.update(meds)
        code_f.update(cs)
        pair_f.update(itertools.product(meds, cs))
    per_med, per_code = defaultdict(list), defaultdict(list)
    for (m, c), cnt in pair_f.items():
        lift = cnt * n / (med_f[m] * code_f[c])
        if cnt >= min_count and lift >= min_lift:
            per_med[m].append((-lift, -cnt, c))
            per_code[c].append((-lift, -cnt, m))
    by_med = {(m, c) for m, lst in per_med.items() for _, _, c in sorted(lst)[:top_k]}
    by_code = {(m, c) for c, lst in per_code.items() for _, _, m in sorted(lst)[:top_k_code]}
    return by_med | by_code


@pytest.mark.parametrize("split", ["interaction", "visit"])
@pytest.mark.parametrize("opts", [(2, 1.0, 100, 0), (3, 1.5, 4, 0), (3, 1.5, 2, 3), (1, 0.5, 0, 2)])
def test_cooccurrence_matches_brute_force(split, opts):
    rec = random_records(150, seed=1)
    min_count, min_lift, top_k, top_k_code = opts
    ds = build_medication_dataset(rec, split=split, seed=3, cooc_min_count=min_count,
                                  cooc_min_lift=min_lift, cooc_top_k=top_k,
                                  cooc_top_k_code=top_k_code)
    n_med, n_diag = len(MEDS), len(DIAGS)
    for rel, kind, off in (("med_diagnosis", "diag", n_med), ("med_procedure", "proc",
                                                              n_med + n_diag)):
        got = {(int(h), int(t) - off) for h, t in ds.triplets_of(rel)}
        want = brute_force_cooc(rec, ds, kind, min_count, min_lift, top_k, top_k_code)
        assert want, "the reference found no edge: the test would prove nothing"
        assert got == want


@pytest.mark.parametrize("split", ["interaction", "visit"])
def test_no_relation_from_held_out_data(split):
    """A diagnosis seen with a medication only in held-out data never gets an edge to it."""
    rec = random_records(120, seed=2)
    ds0 = build_medication_dataset(rec, split=split, seed=5, cooc_min_count=1, cooc_min_lift=0.0,
                                   cooc_top_k=10**6)
    # A new diagnosis code placed only in visits whose medication M is held out.
    nested = rec.to_nested()
    med = 0
    held = []
    for p, pv in enumerate(nested):
        for j, visit in enumerate(pv):
            v = rec.visit_ptr[p] + j
            held_out = (ds0.visits.split[v] != 0) if split == "visit" else (
                ds0.test[p, med] or ds0.valid[p, med])
            if med in visit[2] and held_out:
                visit[0] = [*visit[0], len(DIAGS)]
                held.append(v)
    assert held, "no held-out visit with the medication: the test would prove nothing"
    rec2 = MedicalRecords.from_nested(nested, [*DIAGS, "V7281"], PROCS, MEDS)
    ds = build_medication_dataset(rec2, split=split, seed=5, cooc_min_count=1, cooc_min_lift=0.0,
                                  cooc_top_k=10**6)
    assert (ds.train != ds0.train).nnz == 0 and (ds.test != ds0.test).nnz == 0
    new_entity = len(MEDS) + len(DIAGS)
    edges = {tuple(x) for x in ds.triplets_of("med_diagnosis").tolist()}
    assert (med, new_entity) not in edges
    # Control: the same code in the medication's *training* visits does give the edge.
    for p, pv in enumerate(nested):
        for j, visit in enumerate(pv):
            v = rec.visit_ptr[p] + j
            if med in visit[2] and v not in held and len(DIAGS) not in visit[0]:
                visit[0] = [*visit[0], len(DIAGS)]
    ds3 = build_medication_dataset(MedicalRecords.from_nested(nested, [*DIAGS, "V7281"], PROCS,
                                                              MEDS),
                                   split=split, seed=5, cooc_min_count=1, cooc_min_lift=0.0,
                                   cooc_top_k=10**6)
    assert (med, new_entity) in {tuple(x) for x in ds3.triplets_of("med_diagnosis").tolist()}


def test_interaction_split_ratios_and_determinism():
    rng = np.random.default_rng(0)
    n_pat = 500
    counts = rng.integers(0, 40, n_pat)
    patient = np.repeat(np.arange(n_pat), counts)
    med = np.concatenate([rng.permutation(60)[:c] for c in counts])
    a = split_interactions(patient, med, n_pat, np.random.default_rng(7))
    b = split_interactions(patient, med, n_pat, np.random.default_rng(7))
    c = split_interactions(patient, med, n_pat, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for p in range(n_pat):
        part = a[patient == p]
        n = counts[p]
        if n == 0:
            continue
        n_valid, n_test = int(np.floor(0.1 * n + 0.5)), int(np.floor(0.1 * n + 0.5))
        while n_valid + n_test > n - 1:
            if n_valid:
                n_valid -= 1
            else:
                n_test -= 1
        assert (part == 1).sum() == n_valid and (part == 2).sum() == n_test
        assert (part == 0).sum() >= 1
    shares = np.bincount(a, minlength=3) / len(a)
    assert abs(shares[0] - 0.8) < 0.03 and abs(shares[2] - 0.1) < 0.02


def test_visit_split_is_safedrugs():
    # SafeDrug: data[:int(2n/3)] train, next int((n - split)/2) test, the rest eval.
    for n in (1, 2, 5, 6, 7, 100, 6350):
        parts = split_patients_safedrug(n, None)
        sp_ = int(n * 2 / 3)
        eval_len = int(len(range(sp_, n)) / 2)
        want = [0] * sp_ + [2] * eval_len + [1] * (n - sp_ - eval_len)
        assert parts.tolist() == want
    shuffled = split_patients_safedrug(100, np.random.default_rng(0))
    assert sorted(shuffled.tolist()) == sorted(split_patients_safedrug(100, None).tolist())


def test_visit_split_holds_out_whole_patients():
    rec = random_records(60, seed=4)
    ds = build_medication_dataset(rec, split="visit")
    vp = ds.visits
    for p in range(rec.n_patients):
        s = set(vp.split[vp.patient == p].tolist())
        assert len(s) == 1
        part = s.pop()
        meds = set(vp.med[np.concatenate([np.arange(vp.med_ptr[v], vp.med_ptr[v + 1])
                                          for v in np.flatnonzero(vp.patient == p)])].tolist())
        mat = (ds.train, ds.valid, ds.test)[part]
        assert set(mat[p].indices.tolist()) == meds
        for other in {0, 1, 2} - {part}:
            assert (ds.train, ds.valid, ds.test)[other][p].nnz == 0


def safedrug_ddi_matrix(med_voc: list[str]) -> np.ndarray:
    """SafeDrug's get_ddi_matrix, transcribed loop for loop (matrix form)."""
    atc3_atc4 = defaultdict(set)
    for item in med_voc:
        atc3_atc4[item[:4]].add(item)
    cid2atc = defaultdict(set)
    with open(bundled_path("ddi", "drug-atc.csv")) as f:
        for line in f:
            ls = line.rstrip("\n").split(",")
            for atc in ls[1:]:
                if len(atc3_atc4[atc[:4]]) != 0:
                    cid2atc[ls[0]].add(atc[:4])
    w2i = {w: i for i, w in enumerate(med_voc)}
    adj = np.zeros((len(med_voc), len(med_voc)), dtype=int)
    with open(bundled_path("ddi", "drug-DDI-top40.csv")) as f:
        for row in csv.DictReader(f):
            for a in cid2atc[row["STITCH 1"]]:
                for b in cid2atc[row["STITCH 2"]]:
                    for i in atc3_atc4[a]:
                        for j in atc3_atc4[b]:
                            if w2i[i] != w2i[j]:
                                adj[w2i[i], w2i[j]] = adj[w2i[j], w2i[i]] = 1
    return adj


@pytest.mark.parametrize("level", [3, 4])
def test_ddi_rule_matches_safedrug(level):
    n = {3: 4, 4: 5}[level]
    voc = sorted(c for c in atc_names() if len(c) == n)
    adj = safedrug_ddi_matrix(voc)
    pairs = ddi_pairs(voc)
    assert adj.sum() > 0
    got = np.zeros_like(adj)
    got[pairs[:, 0], pairs[:, 1]] = 1
    got[pairs[:, 1], pairs[:, 0]] = 1
    assert np.array_equal(got, adj)
    assert np.all(pairs[:, 0] < pairs[:, 1])


def test_dataset_layout_and_names():
    rec = random_records(80, seed=6)
    ds = build_medication_dataset(rec, cooc_min_count=2)
    n_med = len(MEDS)
    assert ds.n_items == n_med and ds.train.shape == (80, n_med)
    assert ds.entity_codes[0] == f"ATC3:{MEDS[0]}" and ds.entity_names[0] == atc_names()[MEDS[0]]
    assert ds.entity_codes[n_med] == f"ICD9DX:{DIAGS[0]}"
    assert ds.entity_names[n_med] == icd9_titles("diag")[DIAGS[0]]
    # ATC hierarchy: every medication has exactly one level-2 parent, which has one level-1 parent.
    parents = ds.triplets_of("atc_parent")
    for i, code in enumerate(MEDS):
        par = parents[parents[:, 0] == i, 1]
        assert [ds.entity_codes[p] for p in par] == [f"ATC2:{code[:3]}"]
        grand = parents[parents[:, 0] == par[0], 1]
        assert [ds.entity_codes[g] for g in grand] == [f"ATC1:{code[0]}"]
    ddi = ds.triplets_of("ddi")
    assert np.array_equal(ddi, ddi_pairs(MEDS))


def test_bad_options():
    rec = random_records(10, seed=0)
    with pytest.raises(DataError, match="split"):
        build_medication_dataset(rec, split="random")
    with pytest.raises(DataError, match="cooc_top_k"):
        build_medication_dataset(rec, cooc_top_k=-1)
    with pytest.raises(DataError, match="cooc_min_count"):
        build_medication_dataset(rec, cooc_min_count=0)
