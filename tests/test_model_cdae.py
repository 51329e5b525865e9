"""CDAE against a literal per-user, per-item reference: the corrupted reconstruction loss (BCE
and MSE) with RecBole's regulariser, the scores with and without the user node, the trainer
(seeded, resumable) and the visit split's unseen patients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from trainer_checks import assert_learns_and_is_seeded, assert_resumes_exactly, quiet

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model import CDAE, MODELS, Patients, UserBatch
from diffkg_fast.ops.graph import torch_csr
from diffkg_fast.train import train
from diffkg_fast.train.config import make_config

U, N_ITEMS, D = 6, 5, 3
ACT = {"sigmoid": lambda v: 1 / (1 + math.exp(-v)), "relu": lambda v: max(v, 0.0),
       "tanh": math.tanh}




def _toy_train() -> sp.csr_matrix:
    dense = np.array([[0, 0, 0, 0, 0],   # user 0: no training interactions
                      [1, 0, 0, 1, 1],
                      [0, 1, 0, 0, 0],
                      [1, 1, 1, 0, 0],
                      [0, 0, 1, 0, 1],
                      [0, 1, 0, 1, 0]], np.float32)
    return sp.csr_matrix(dense)


def _model(**kw) -> CDAE:
    return CDAE(U, N_ITEMS, _toy_train(), **{"embedding_size": D, "seed": 5, **kw})


def _batch(users: list[int]) -> UserBatch:
    return UserBatch(torch.tensor(users), torch.from_numpy(_toy_train()[users].toarray()))


def _params(m: CDAE):
    v = m.h_user.weight.detach().double()
    w, b = m.h_item.weight.detach().double(), m.h_item.bias.detach().double()
    w2, b2 = m.out_layer.weight.detach().double(), m.out_layer.bias.detach().double()
    return v, w, b, w2, b2


def _outputs(m: CDAE, x: list[float], node: list[float], hid: str) -> list[float]:
    """``o = W' g(W x + b + node) + b'`` written out, item by item."""
    _, w, b, w2, b2 = _params(m)
    h = [ACT[hid](sum(float(w[j, i]) * x[i] for i in range(N_ITEMS)) + float(b[j]) + node[j])
         for j in range(D)]
    return [sum(float(w2[i, j]) * h[j] for j in range(D)) + float(b2[i]) for i in range(N_ITEMS)]


def _literal_loss(m: CDAE, users: list[int], q: float, gen_state, loss_type: str, hid: str,
                  out: str, r1: float, r2: float) -> tuple[float, float]:
    """(data loss, regulariser); the corruption redrawn from ``gen_state`` (None: none)."""
    v, w, *_ = _params(m)
    rows = _toy_train()[users].toarray()
    if gen_state is not None:
        g = torch.Generator().manual_seed(0)
        g.set_state(gen_state)
        keep = ((torch.rand(rows.shape, generator=g) >= q).double() / (1 - q)).numpy()
    else:
        keep = np.ones(rows.shape)
    data = 0.0
    for r, u in enumerate(users):
        x = [float(rows[r, i] * keep[r, i]) for i in range(N_ITEMS)]
        o = _outputs(m, x, [float(v[u, j]) for j in range(D)], hid)
        for i in range(N_ITEMS):
            y = float(rows[r, i])
            if loss_type == "BCE":
                p = 1 / (1 + math.exp(-o[i]))
                data -= y * math.log(p) + (1 - y) * math.log(1 - p)
            else:
                data += (ACT[out](o[i]) - y) ** 2
    l1 = sum(abs(float(t)) for t in v.flatten()) + sum(abs(float(t)) for t in w.flatten())
    l2 = (math.sqrt(sum(float(t) ** 2 for t in v.flatten()))
          + math.sqrt(sum(float(t) ** 2 for t in w.flatten())))
    return data, r1 * l1 + r2 * l2


# --------------------------------------------------------------------- options
def test_defaults_are_recbole_and_checked() -> None:
    opts = CDAE.options()
    recbole_yaml = {"loss_type": "BCE", "hid_activation": "relu", "out_activation": "sigmoid",
                    "corruption_ratio": 0.5, "embedding_size": 64, "reg_weight_1": 0.0,
                    "reg_weight_2": 0.01}
    assert {k: opts[k] for k in recbole_yaml} == recbole_yaml
    assert opts["seed"] == 421 and opts["device"] == "cpu"
    assert MODELS["cdae"] is CDAE and CDAE.batch_kind == "users"
    for bad, needle in (({"loss_type": "bce"}, "loss_type"),
                        ({"hid_activation": "gelu"}, "hid_activation"),
                        ({"out_activation": "tanh"}, "out_activation"),
                        ({"corruption_ratio": 1.0}, "corruption_ratio"),
                        ({"corruption_ratio": -0.5}, "corruption_ratio"),
                        ({"embedding_size": 0}, "embedding_size"),
                        ({"reg_weight_2": -1.0}, "reg_weight_2")):
        with pytest.raises(ValueError, match=needle):
            CDAE.check_options({**opts, **bad})
        with pytest.raises(ValueError, match=needle):
            _model(**bad)


# --------------------------------------------------------------------- the loss
@pytest.mark.parametrize("loss_type,hid,out,q,r1,r2", [
    ("BCE", "relu", "sigmoid", 0.5, 0.0, 0.01),     # RecBole's defaults
    ("BCE", "sigmoid", "relu", 0.3, 0.02, 0.05),    # f not applied under BCE
    ("MSE", "tanh", "sigmoid", 0.0, 0.0, 0.0),
    ("MSE", "relu", "relu", 0.5, 0.01, 0.0),
])
def test_loss_matches_the_literal_sum(loss_type, hid, out, q, r1, r2) -> None:
    m = _model(loss_type=loss_type, hid_activation=hid, out_activation=out,
               corruption_ratio=q, reg_weight_1=r1, reg_weight_2=r2)
    with torch.no_grad():  # nonzero biases, so that a missing bias shows
        m.h_item.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
        m.out_layer.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    m.train()
    users = [3, 1, 2, 5]
    state = m.generator.get_state()
    loss, parts = m(_batch(users))
    data, reg = _literal_loss(m, users, q, state if q > 0 else None, loss_type, hid, out,
                              r1, r2)
    assert parts[loss_type.lower()].item() == pytest.approx(data, rel=1e-5)
    assert parts["reg"].item() == pytest.approx(reg, rel=1e-5, abs=1e-9)
    assert loss.item() == pytest.approx(data + reg, rel=1e-5)


def test_gradient_reaches_the_batch_nodes_and_the_regularised_table() -> None:
    m = _model(reg_weight_2=0.0)
    m.train()
    loss, _ = m(_batch([1, 2]))
    loss.backward()
    grad = m.h_user.weight.grad
    assert grad is not None
    assert bool((grad[[1, 2]] != 0).any()) and bool((grad[[0, 3, 4, 5]] == 0).all())


# --------------------------------------------------------------------- scores
def _literal_scores(m: CDAE, rows: np.ndarray, nodes: list[int | None]) -> torch.Tensor:
    v, *_ = _params(m)
    out = []
    for x, u in zip(rows, nodes, strict=True):
        node = [0.0] * D if u is None else [float(v[u, j]) for j in range(D)]
        out.append([ACT[m.out_activation](o)
                    for o in _outputs(m, [float(t) for t in x], node, m.hid_activation)])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("out", ["sigmoid", "relu"])
def test_scores_use_the_node_of_trained_users_only(out: str) -> None:
    m = _model(out_activation=out, hid_activation="tanh")
    with torch.no_grad():
        m.h_item.bias.fill_(0.3)
    m.train()  # scoring ignores the mode: never corrupted, no draw
    state = m.generator.get_state()
    rows = _toy_train().toarray()
    got = m.score(torch.arange(U))
    # user 0 has no training interaction: scored with a zero node (its own is untrained)
    want = _literal_scores(m, rows, [None, 1, 2, 3, 4, 5])
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert torch.equal(m.generator.get_state(), state)
    # Known medications: the input; the node is added for users with training interactions.
    meds = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], bool)
    users = torch.tensor([2, 0, 4])
    known = m.score_patients(Patients(users, None, torch_csr(sp.csr_matrix(meds))))
    torch.testing.assert_close(known.double(), _literal_scores(m, meds, [2, None, 4]),
                               atol=1e-6, rtol=0)
    anonymous = m.score_patients(Patients(None, None, torch_csr(sp.csr_matrix(meds))))
    torch.testing.assert_close(anonymous.double(), _literal_scores(m, meds, [None] * 3),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(m.score_patients(Patients(torch.arange(U))), got)
    assert m.patient_inputs == frozenset({"meds"}) and m.scores_unseen


def test_state_dict_round_trip_scores_identically() -> None:
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    m.train()
    for _ in range(3):
        loss, _ = m(_batch([1, 2, 3, 4, 5]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    fresh = _model(seed=77)
    assert not torch.equal(fresh.score(torch.arange(U)), m.score(torch.arange(U)))
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.score(torch.arange(U)), m.score(torch.arange(U)))
    fresh.train()
    assert torch.equal(fresh(_batch([1, 2]))[0], m(_batch([1, 2]))[0])  # same corruption draw


# --------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=200, n_diag=120, n_proc=60, n_med=40, seed=0)


def _cfg(**kw):
    base = {"model": "cdae", "epoch": 4, "batch": 32, "lr": 1e-2, "seed": 7,
            "embedding_size": 16}
    return make_config(**{**base, **kw})


def test_trainer_learns_and_is_seeded(ds) -> None:
    assert_learns_and_is_seeded(ds, _cfg(), "bce", _cfg(seed=8))


def test_resume_is_bitwise_equal(ds, tmp_path) -> None:
    assert_resumes_exactly(ds, _cfg(), tmp_path)


def test_visit_split_ignores_the_untrained_nodes_of_held_out_patients() -> None:
    dsv = build_dataset("synthetic", n_patients=200, n_diag=120, n_proc=60, n_med=40, seed=0,
                        split="visit")
    res = train(dsv, _cfg(epoch=2), log=quiet)
    assert 0.0 < res.val["med_jaccard"] < 1.0
    m = res.model
    unseen = torch.from_numpy(np.flatnonzero(np.diff(dsv.train.indptr) == 0))
    assert unseen.numel() > 0
    meds = torch_csr(sp.csr_matrix(np.eye(unseen.numel(), dsv.n_items, dtype=np.float32)))
    before = m.score_patients(Patients(unseen, None, meds))
    with torch.no_grad():
        m.h_user.weight[unseen] += 10.0
    assert torch.equal(m.score_patients(Patients(unseen, None, meds)), before)
