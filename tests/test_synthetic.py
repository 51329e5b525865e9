"""The synthetic MIMIC-III-shaped cohort: determinism, shape statistics, real codes, DDI, signal."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from diffkg_fast.data import codes
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.records import KINDS, MedicalRecords
from diffkg_fast.data.synthetic import (
    PRESETS,
    synthetic_cohort,
    synthetic_records,
    synthetic_records_scaled,
)


@pytest.fixture(scope="module")
def cohort() -> tuple[MedicalRecords, dict[str, float]]:
    return synthetic_cohort()  # the default size, seed 0


def _arrays(rec: MedicalRecords) -> list[np.ndarray]:
    return [rec.visit_ptr] + [getattr(rec, f"{k}{s}") for k in KINDS for s in ("_ptr", "")]


def _visit_matrix(rec: MedicalRecords, kind: str) -> sp.csr_matrix:
    codes_ = getattr(rec, kind)
    shape = (rec.n_visits, len(rec.voc(kind)))
    return sp.csr_matrix((np.ones(len(codes_)), (rec.entry_visit(kind), codes_)), shape=shape)


def _near(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_arrays_other_seed_differs(cohort) -> None:
    rec, _ = cohort
    again = synthetic_records(seed=0)
    for a, b in zip(_arrays(rec), _arrays(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [rec.voc(k) for k in KINDS] == [again.voc(k) for k in KINDS]
    np.testing.assert_array_equal(rec.ddi_pairs, again.ddi_pairs)
    other = synthetic_records(seed=1)
    assert other.med_voc != rec.med_voc or not np.array_equal(other.med, rec.med)
    assert other.n_visits != rec.n_visits or not np.array_equal(other.diag, rec.diag)


def test_validates_and_identifies(cohort) -> None:
    rec, _ = cohort
    rec.validate()
    assert rec.source == "synthetic"
    assert rec.patient_ids[:2] == ["SYN000001", "SYN000002"]
    assert len(rec.patient_ids) == rec.n_patients == 6350
    np.testing.assert_array_equal(rec.ddi_pairs, codes.ddi_pairs(rec.med_voc))


# ----------------------------------------------------------------------------- MIMIC-III shape
def test_cohort_statistics_match_mimic3(cohort) -> None:
    """README "The full MIMIC-III cohort": counts within ~10%, medians within ~15%."""
    rec, _ = cohort
    V = rec.n_visits
    assert _near(V, 15_032, 0.05)
    per_patient = np.bincount(np.diff(rec.visit_ptr))
    for k, target in enumerate((908, 3792, 949, 373, 158), start=1):
        assert _near(per_patient[k], target, 0.15), (k, per_patient[k])
    assert 15 <= len(per_patient) - 1 <= 29  # the tail reaches into the 20s, never past 29
    assert _near(per_patient[6:].sum(), 170, 0.2)
    for kind, target in (("diag", 13.6), ("proc", 4.5), ("med", 19.6)):
        assert _near(len(getattr(rec, kind)) / V, target, 0.10), kind
    n_med = len(rec.med_voc)
    patient_med = np.unique(rec.visit_patient()[rec.entry_visit("med")] * n_med + rec.med)
    assert _near(len(patient_med), 175_089, 0.10)
    med_count = np.bincount(rec.med, minlength=n_med)
    assert _near(med_count.max(), 13_421, 0.10)
    assert _near(np.median(med_count), 1_000, 0.15)
    diag_count = np.bincount(rec.diag, minlength=len(rec.diag_voc))
    assert _near(diag_count.max(), 5_503, 0.15)
    assert _near(np.median(diag_count), 25, 0.15)
    # Every vocabulary code appears, so the vocabularies hold exactly the codes that appear.
    for kind, size in (("diag", 1958), ("proc", 1430), ("med", 112)):
        assert len(rec.voc(kind)) == size
        assert np.bincount(getattr(rec, kind), minlength=size).min() >= 1, kind


def test_codes_are_real(cohort) -> None:
    rec, _ = cohort
    assert set(rec.diag_voc) <= set(codes.icd9_titles("diag"))
    assert set(rec.proc_voc) <= set(codes.icd9_titles("proc"))
    names = codes.atc_names()
    assert all(len(c) == 4 and c in names for c in rec.med_voc)
    # Drug classes (ATC-2 parents) group several drugs, and the drugs interact.
    parents = np.unique([codes.atc_ancestors(c)[0] for c in rec.med_voc], return_counts=True)[1]
    assert parents.max() >= 3 and (parents >= 2).sum() >= 15
    assert len(rec.ddi_pairs) >= 200


# ----------------------------------------------------------------------------- interactions
def test_ddi_rate_near_mimic3(cohort) -> None:
    """Interacting share of the medication pairs of a visit, pooled over visits (SafeDrug)."""
    rec, info = cohort
    n_med = len(rec.med_voc)
    adj = np.zeros((n_med, n_med), dtype=np.float32)
    adj[rec.ddi_pairs[:, 0], rec.ddi_pairs[:, 1]] = 1.0
    adj += adj.T
    meds = _visit_matrix(rec, "med").toarray().astype(np.float32)
    interacting = float(((meds @ adj) * meds).sum()) / 2.0
    n = meds.sum(axis=1)
    rate = interacting / float((n * (n - 1) / 2).sum())
    assert abs(rate - 0.083) < 0.0083
    # Avoidance only removes interactions: the drawn prescriptions interacted at least as much.
    assert info["raw_ddi_rate"] >= rate - 1e-3
    assert 0.0 <= info["avoid_prob"] <= 1.0


# ----------------------------------------------------------------------------- signal
def _recall_at(scores: np.ndarray, truth: np.ndarray, k: int = 20) -> float:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(truth, top, axis=1).sum(axis=1)
    return float((hits / truth.sum(axis=1)).mean())


def test_medications_depend_on_diagnoses_and_procedures(cohort) -> None:
    """Held-out patients: ranking drugs by the best code-conditional co-occurrence P(m | code)
    (fitted on the other patients) beats ranking by popularity by a clear margin (measured at
    seed 0: recall@20 0.72 against 0.59)."""
    rec, _ = cohort
    codes_x = sp.hstack([_visit_matrix(rec, "diag"), _visit_matrix(rec, "proc")]).tocsr()
    meds = _visit_matrix(rec, "med")
    test = rec.visit_patient() % 5 == 0
    x_tr, m_tr = codes_x[~test], meds[~test]
    popularity = np.asarray(m_tr.sum(axis=0)).ravel() / m_tr.shape[0]
    alpha = 5.0  # smoothing toward popularity for rare codes
    code_n = np.asarray(x_tr.sum(axis=0)).ravel()
    cond = ((x_tr.T @ m_tr).toarray() + alpha * popularity) / (code_n[:, None] + alpha)
    x_te = codes_x[test].tocoo()
    # Score of drug m for a visit: max over its codes of P(m | code).
    scores = np.zeros((x_te.shape[0], meds.shape[1]))
    np.maximum.at(scores, x_te.row, cond[x_te.col])
    truth = meds[test].toarray()
    r_cond = _recall_at(scores, truth)
    r_pop = _recall_at(np.tile(popularity, (len(truth), 1)), truth)
    assert r_cond - r_pop >= 0.06, (r_cond, r_pop)


# ----------------------------------------------------------------------------- scaling
def test_beyond_real_dictionaries_uses_synthetic_codes() -> None:
    rec = synthetic_records(n_patients=400, n_diag=15_000, n_proc=4_000, n_med=300, seed=3)
    rec.validate()
    assert rec.n_patients == 400
    for kind, prefix, size in (("diag", "DX_", 15_000), ("proc", "PX_", 4_000),
                               ("med", "MED_", 300)):
        voc = rec.voc(kind)
        assert len(voc) == size and voc[0] == f"{prefix}000000"
        assert voc[-1] == f"{prefix}{size - 1:06d}"
        assert np.bincount(getattr(rec, kind), minlength=size).min() >= 1
    pairs = rec.ddi_pairs
    assert pairs.shape[1] == 2 and np.all(pairs[:, 0] < pairs[:, 1])
    assert 2.0 < 2 * len(pairs) / 300 < 12.0  # mean degree near the real vocabulary's 7.3
    again = synthetic_records(n_patients=400, n_diag=15_000, n_proc=4_000, n_med=300, seed=3)
    np.testing.assert_array_equal(rec.med, again.med)


def test_small_real_cohort_and_presets() -> None:
    rec = synthetic_records(n_patients=300, n_diag=200, n_proc=100, n_med=40, seed=5)
    rec.validate()
    assert len(rec.diag_voc) == 200 and len(rec.med_voc) == 40
    assert set(rec.diag_voc) <= set(codes.icd9_titles("diag"))
    assert set(PRESETS) == {"mimic3", "lastfm", "alibaba"}
    small = synthetic_records_scaled("lastfm", seed=0, n_patients=300, n_med=2_000)
    assert small.n_patients == 300 and small.med_voc[0] == "MED_000000"
    assert len(small.diag_voc) == PRESETS["lastfm"]["n_diag"]


def test_bad_arguments() -> None:
    with pytest.raises(DataError, match="unknown knob"):
        synthetic_records(n_patients=10, not_a_knob=1)
    with pytest.raises(DataError, match="n_med"):
        synthetic_records(n_med=0)
    with pytest.raises(DataError, match="preset"):
        synthetic_records_scaled("movielens")
