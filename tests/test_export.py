"""Exports: each format read back gives the same graph; the flattened view checks its ranges."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from diffkg_fast.data.dataset import SPLITS, KGDataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.export import FLAT_RANGE, export_dataset, load_recbole
from diffkg_fast.data.kgrec import load_diffkg, load_kgat
from diffkg_fast.data.medkg import build_medication_dataset
from diffkg_fast.data.records import MedicalRecords

from helpers import DIAGS, MEDS, PROCS, random_records


@pytest.fixture(scope="module")
def ds() -> KGDataset:
    return build_medication_dataset(random_records(70, seed=3), cooc_min_count=2, seed=1)


def assert_same_graph(a: KGDataset, b: KGDataset) -> None:
    """Same interactions per split and same triplets (relation by name)."""
    assert a.train.shape == b.train.shape
    for s in SPLITS:
        assert (getattr(a, s) != getattr(b, s)).nnz == 0, s
    names_a = np.asarray(a.relation_names, dtype=object)[a.kg[:, 1]]
    names_b = np.asarray(b.relation_names, dtype=object)[b.kg[:, 1]]
    ta = set(zip(a.kg[:, 0].tolist(), names_a.tolist(), a.kg[:, 2].tolist(), strict=True))
    tb = set(zip(b.kg[:, 0].tolist(), names_b.tolist(), b.kg[:, 2].tolist(), strict=True))
    assert ta == tb and len(ta) == a.n_triplets
    # Entities that are in no triplet and are no item cannot be told apart in these formats.
    assert b.n_entities == max(a.n_items, int(a.kg[:, [0, 2]].max()) + 1)


def relabel(ds: KGDataset) -> KGDataset:
    """The relation names these formats keep (ids only): r0, r1, …"""
    import dataclasses

    return dataclasses.replace(ds, relation_names=[f"r{i}" for i in range(ds.n_relations)])


def test_diffkg_round_trip(ds, tmp_path):
    files = export_dataset(ds, "diffkg", tmp_path)
    assert sorted(f.name for f in files) == ["kg.txt", "trnMat.pkl", "tstMat.pkl", "valMat.pkl"]
    with open(tmp_path / "trnMat.pkl", "rb") as f:
        trn = pickle.load(f)  # DiffKG's own loader: a plain pickle of a scipy coo_matrix
    assert trn.format == "coo" and trn.shape == ds.train.shape
    assert_same_graph(relabel(ds), load_diffkg(tmp_path))


def test_kgat_round_trip(ds, tmp_path):
    export_dataset(ds, "kgat", tmp_path)
    first = (tmp_path / "train.txt").read_text().splitlines()[0].split()
    assert int(first[0]) == 0 and [int(x) for x in first[1:]] == ds.train[0].indices.tolist()
    assert_same_graph(relabel(ds), load_kgat(tmp_path))


def test_recbole_round_trip(ds, tmp_path):
    export_dataset(ds, "recbole", tmp_path)
    header = (tmp_path / f"{ds.name}.kg").read_text().splitlines()[0]
    assert header == "head_id:token\trelation_id:token\ttail_id:token"
    assert_same_graph(ds, load_recbole(tmp_path, ds.name))
    total = sum(1 for _ in open(tmp_path / f"{ds.name}.inter")) - 1
    assert total == ds.train.nnz + ds.valid.nnz + ds.test.nnz


def test_triplets_view(ds, tmp_path):
    export_dataset(ds, "triplets", tmp_path)
    pt = np.loadtxt(tmp_path / "patient_triplets.txt", dtype=np.int64, ndmin=2)
    n_med, n_diag = len(MEDS), len(DIAGS)
    # Brute force: codes of every visit, plus training medications only.
    want = set()
    v = ds.visits
    for visit in range(v.n_visits):
        p = int(v.patient[visit])
        for e in v.diag[v.diag_ptr[visit] : v.diag_ptr[visit + 1]]:
            want.add((p, int(e) - n_med))
        for e in v.proc[v.proc_ptr[visit] : v.proc_ptr[visit + 1]]:
            want.add((p, 3000 + int(e) - n_med - n_diag))
    for p, m in zip(*ds.train.nonzero(), strict=True):
        want.add((int(p), 6000 + int(m)))
    assert {(int(a), int(b)) for a, b, _ in pt} == want
    assert np.all(pt[:, 2] == 1)
    kt = np.loadtxt(tmp_path / "kg_triplets.txt", dtype=np.int64, ndmin=2)
    med_diag = ds.triplets_of("med_diagnosis")
    got = {(h - 6000, t + n_med) for h, r, t in kt.tolist() if r == ds.relation_id("med_diagnosis")}
    assert got == {tuple(x) for x in med_diag.tolist()}
    # Held-out medications never appear as a patient's triplet.
    for p, m in zip(*ds.test.nonzero(), strict=True):
        assert (int(p), 6000 + int(m)) not in want


def test_triplets_view_rejects_a_vocabulary_too_large(tmp_path):
    diags = [f"{i:05d}" for i in range(FLAT_RANGE + 1)]
    recs = [[[[i, (i + 1) % len(diags)], [0], [0, 1]]] for i in range(0, len(diags), 2)]
    rec = MedicalRecords.from_nested(recs, diags, PROCS[:1], MEDS[:2])
    ds = build_medication_dataset(rec, cooc_min_count=1)
    with pytest.raises(DataError, match=r"3001 diagnosis codes do not fit.*0–2999"):
        export_dataset(ds, "triplets", tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_format(ds, tmp_path):
    with pytest.raises(DataError, match="format"):
        export_dataset(ds, "csv", tmp_path)
