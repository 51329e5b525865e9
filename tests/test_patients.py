"""Patients by codes: code matrices against brute force, the code-aware DiffKG, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.dataset import VisitFeatures
from diffkg_fast.data.errors import DataError
from diffkg_fast.eval.medication import (
    default_k,
    medication_metrics,
    predict_topk,
    visit_med_matrix,
)
from diffkg_fast.model import DiffKG, PairBatch, Patients
from diffkg_fast.model.patients import (
    codes_to_entities,
    patient_code_matrix,
    visit_code_matrix,
)
from diffkg_fast.ops.graph import torch_csr
from diffkg_fast.train import train
from diffkg_fast.train.config import make_config
from diffkg_fast.train.evaluation import evaluate_split


def _ptr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    sizes = [len(x) for x in lists]
    return (np.concatenate(([0], np.cumsum(sizes))).astype(np.int64),
            np.asarray([c for x in lists for c in x], dtype=np.int64))


def _visits(patient, split, diag, proc, med) -> VisitFeatures:
    dp, d = _ptr(diag)
    pp, p = _ptr(proc)
    mp, m = _ptr(med)
    return VisitFeatures(np.asarray(patient, np.int64), np.asarray(split, np.int8),
                         dp, d, pp, p, mp, m)


# Patient 0: visits 0, 1 (train); patient 1: visits 2, 3, 4 (test); patient 2: visit 5 (valid).
DIAG = [[5, 6], [6, 7], [8], [8, 9], [5], [7]]
PROC = [[10], [], [11, 11], [], [10], []]
VISITS = _visits([0, 0, 1, 1, 1, 2], [0, 0, 2, 2, 2, 1], DIAG, PROC, [[0], [1], [0, 2], [2], [1],
                                                                      [0]])


def _mean_rows(sets: list[set[int]], n: int) -> np.ndarray:
    out = np.zeros((len(sets), n), np.float32)
    for r, s in enumerate(sets):
        for c in s:
            out[r, c] = 1.0 / len(s)
    return out


def test_patient_code_matrix_is_the_mean_of_unique_codes_of_chosen_splits() -> None:
    codes = [set(DIAG[v]) | set(PROC[v]) for v in range(6)]
    train_only = patient_code_matrix(VISITS, 4, 12, (0,)).toarray()
    np.testing.assert_allclose(train_only, _mean_rows([codes[0] | codes[1], set(), set(), set()],
                                                      12))
    with_test = patient_code_matrix(VISITS, 4, 12, (0, 2)).toarray()
    np.testing.assert_allclose(
        with_test, _mean_rows([codes[0] | codes[1], codes[2] | codes[3] | codes[4], set(), set()],
                              12))


def test_visit_code_matrix_holds_each_visit_and_its_history() -> None:
    codes = [set(DIAG[v]) | set(PROC[v]) for v in range(6)]
    m, vids = visit_code_matrix(VISITS, 12, 2)
    np.testing.assert_array_equal(vids, [2, 3, 4])
    expect = [codes[2], codes[2] | codes[3], codes[2] | codes[3] | codes[4]]
    np.testing.assert_allclose(m.toarray(), _mean_rows(expect, 12))
    m, vids = visit_code_matrix(VISITS, 12, 0)
    np.testing.assert_allclose(m.toarray(), _mean_rows([codes[0], codes[0] | codes[1]], 12))


def test_codes_to_entities_accepts_plain_and_prefixed_and_names_every_unknown() -> None:
    vocab = ["ATC3:A01", "ICD9DX:4019", "DX:DX_000001", "ICD9PX:3893"]
    np.testing.assert_array_equal(codes_to_entities(vocab, ["4019", "DX_000001"], ["3893"]),
                                  [1, 2, 3])
    np.testing.assert_array_equal(codes_to_entities(vocab, ["ICD9DX:4019"]), [1])
    with pytest.raises(DataError, match=r"diagnosis '9999'.*procedure '4019'"):
        codes_to_entities(vocab, ["4019", "9999"], ["4019"])


# ---------------------------------------------------------------------- the model
def _toy_model(codes: bool = True) -> DiffKG:
    n_users, n_items, n_ent = 4, 3, 12
    train_m = sp.csr_matrix(np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 1]], np.float32))
    kg = np.array([[0, 0, 5], [1, 0, 6], [2, 1, 7], [0, 1, 10]])
    c = patient_code_matrix(VISITS, n_users, n_ent, (0,)) if codes else None
    # triplet_num -1: the sampled KG is the whole (tiny) KG.
    return DiffKG(n_users, n_items, n_ent, 2, train_m, kg, c, latdim=8, dims=[16],
                  triplet_num=-1, seed=1)


def test_code_users_are_masked_id_plus_mean_code_embedding() -> None:
    model = _toy_model()
    model.eval()
    e = model.encoder(model.views()[0])
    codes = patient_code_matrix(VISITS, 4, 12, (0, 2))
    has_train = torch.tensor([1.0, 0.0, 0.0, 1.0]).unsqueeze(1)  # users 1, 2 have no items
    expect = e.u_prop * has_train + torch.from_numpy(codes.toarray()) @ e.ent
    got = model.score_patients(Patients(torch.arange(4), torch_csr(codes)))
    torch.testing.assert_close(got, expect @ e.items.T)
    only = model.score_patients(Patients(codes=torch_csr(codes)))
    torch.testing.assert_close(only, (torch.from_numpy(codes.toarray()) @ e.ent) @ e.items.T)
    # The training forward uses the training codes only (patient 1's test visits are unseen).
    train_codes = torch.from_numpy(patient_code_matrix(VISITS, 4, 12, (0,)).toarray())
    torch.testing.assert_close(e.users, e.u_prop * has_train + train_codes @ e.ent)


def test_code_loss_trains_the_code_entities() -> None:
    model = _toy_model()
    model.reg = 0.0  # L2 would touch every row
    batch = PairBatch(torch.tensor([0, 3]), torch.tensor([0, 2]), torch.tensor([2, 1]))
    loss, parts = model(batch)
    assert "code_bpr" in parts and np.isfinite(float(parts["code_bpr"]))
    loss.backward()
    # Entity 11 (a procedure of patient 1 only, untrained, no KG edge) gets no gradient;
    # entity 9 neither; patient 0's codes 5, 6, 7, 10 do (through the code term).
    g = model.encoder.entity.grad.abs().sum(1)
    assert (g[[5, 6, 7, 10]] > 0).all()
    assert g[11] == 0 and g[9] == 0
    _, parts = _toy_model(codes=False)(batch)
    assert "code_bpr" not in parts


# ---------------------------------------------------------------------- evaluation, end to end
@pytest.fixture(scope="module")
def visit_ds():
    return build_dataset("synthetic", n_patients=300, n_diag=200, n_proc=100, n_med=40, seed=2,
                         split="visit")


def test_visit_split_medication_metrics_match_a_direct_computation(visit_ds) -> None:
    ds = visit_ds
    res = train(ds, make_config(epoch=1, latdim=8, dims=[32], seed=0), log=lambda _: None)
    assert res.model.patient_inputs == {"codes"} and res.model.scores_unseen
    got = evaluate_split(res.model, ds, "test")
    codes, vids = visit_code_matrix(ds.visits, ds.n_entities, 2)
    patients = torch.from_numpy(ds.visits.patient[vids].astype(np.int64))
    scores = res.model.score_patients(Patients(patients, torch_csr(codes))).numpy()
    sizes = np.diff(ds.visits.med_ptr)[ds.visits.split == 0]
    expect = medication_metrics(predict_topk(scores, default_k(sizes)),
                                visit_med_matrix(ds.visits, ds.n_items, 2),
                                ds.triplets_of("ddi"), scores=scores, n_meds=ds.n_items)
    for k, v in expect.items():
        assert got[f"med_{k}"] == pytest.approx(v), k
    # The trainer's single test evaluation is this one, its set metrics on the chosen rule.
    chosen = evaluate_split(res.model, ds, "test", sets=res.sets)
    assert {k: v for k, v in chosen.items() if not k.startswith(("med_", "safe_"))} == {
        k: v for k, v in got.items() if not k.startswith("med_")}
    assert chosen == res.test
    assert got["med_n_visits"] == int((ds.visits.split == 2).sum())


def test_held_out_patients_are_ranked_from_their_codes(visit_ds) -> None:
    ds = visit_ds
    res = train(ds, make_config(epoch=1, latdim=8, dims=[32], seed=0), log=lambda _: None)
    held = int(np.flatnonzero(ds.visits.split == 2)[0])
    p = int(ds.visits.patient[held])
    assert ds.train[p].nnz == 0  # a held-out patient: its ID embedding is never trained
    ids = codes_to_entities(ds.entity_codes,
                            [ds.entity_codes[e].split(":", 1)[1] for e in
                             ds.visits.diag[ds.visits.diag_ptr[held]:ds.visits.diag_ptr[held + 1]]])
    one = torch_csr(sp.csr_matrix((np.full(len(ids), 1 / len(ids), np.float32),
                                   (np.zeros(len(ids), int), ids)), shape=(1, ds.n_entities)))
    a = res.model.score_patients(Patients(torch.tensor([p]), one))
    b = res.model.score_patients(Patients(codes=one))  # the ID part of a held-out patient is masked
    torch.testing.assert_close(a, b)
    other = torch_csr(sp.csr_matrix(([1.0], ([0], [ds.n_items + 1])), shape=(1, ds.n_entities),
                                    dtype=np.float32))
    assert not torch.equal(a, res.model.score_patients(Patients(codes=other)))


def test_interaction_split_has_no_medication_metrics() -> None:
    ds = build_dataset("synthetic", n_patients=120, n_diag=80, n_proc=40, n_med=20, seed=1)
    res = train(ds, make_config(epoch=1, latdim=8, dims=[16], seed=0), log=lambda _: None)
    assert not any(k.startswith("med_") for k in res.test)
    assert res.model.patient_inputs == {"codes"}  # every visit is a training visit
