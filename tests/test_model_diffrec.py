"""DiffRec (``diffkg_fast.model.diffrec``): its loss and scores against per-user literal forms
of DiffRec's code, its options, state, and training through the trainer (seeded, resumable)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from trainer_checks import assert_learns_and_is_seeded, assert_resumes_exactly

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model import DiffRec, Patients, UserBatch
from diffkg_fast.ops import backend as backend_mod
from diffkg_fast.ops.diffusion import time_embedding
from diffkg_fast.ops.diffusion_importance import ImportanceSampler
from diffkg_fast.ops.graph import torch_csr
from diffkg_fast.train.config import config_defaults, make_config


def toy_train() -> sp.csr_matrix:
    """6 users × 7 items; user 5 has no training interaction."""
    rows = [[0, 1, 4], [1, 2], [0, 3, 5, 6], [6], [2, 4, 5], []]
    dense = np.zeros((6, 7), np.float32)
    for u, items in enumerate(rows):
        dense[u, items] = 1
    return sp.csr_matrix(dense)


def toy(**kw) -> DiffRec:
    opts = {"dims": (5,), "emb_size": 4, "seed": 3}
    opts.update(kw)
    return DiffRec(6, 7, toy_train(), **opts)


def literal_dnn(model: DiffRec, x: torch.Tensor, t: int) -> torch.Tensor:
    """DiffRec's ``DNN.forward`` (no dropout): concat[x, emb_layer(sinusoid(t))] → tanh → out."""
    d = model.denoiser
    if d.norm:
        x = F.normalize(x, dim=-1)
    emb = d.emb_layer(time_embedding(torch.tensor([t]), d.emb_size, x.dtype))[0]
    return d.out_layer(torch.tanh(d.in_layer(torch.cat([x, emb]))))


def literal_coefs(model: DiffRec) -> tuple[list[float], list[float], list[float]]:
    """``(abar, posterior_mean_coef1, posterior_mean_coef2)`` from the betas, DiffRec's formulas."""
    abar, prev, c1, c2 = [], 1.0, [], []
    for beta in model.schedule.betas.tolist():
        a = prev * (1 - beta)
        c1.append(beta * math.sqrt(prev) / (1 - a))
        c2.append((1 - prev) * math.sqrt(1 - beta) / (1 - a))
        abar.append(a)
        prev = a
    return abar, c1, c2


def literal_loss(model: DiffRec, x0: torch.Tensor, t: torch.Tensor, pt: torch.Tensor,
                 noise: torch.Tensor) -> float:
    """DiffRec's ``training_losses`` (x0, reweight), one user at a time."""
    abar, _, _ = literal_coefs(model)
    snr = [a / (1 - a) for a in abar]
    total = 0.0
    for b in range(x0.shape[0]):
        tb = int(t[b])
        x_t = math.sqrt(abar[tb]) * x0[b] + math.sqrt(1 - abar[tb]) * noise[b]
        mse = float(((x0[b] - literal_dnn(model, x_t, tb)) ** 2).mean())
        weight = 1.0 if tb == 0 else (snr[tb - 1] - snr[tb] if model.reweight else 1.0)
        total += weight * mse / float(pt[b])
    return total / x0.shape[0]


def literal_scores(model: DiffRec, rows: torch.Tensor) -> torch.Tensor:
    """DiffRec's ``p_sample`` with ``sampling_steps=0``, ``sampling_noise=False``, per user."""
    _, c1, c2 = literal_coefs(model)
    out = []
    for x in rows:
        for t in range(len(c1) - 1, -1, -1):
            x = c1[t] * literal_dnn(model, x, t) + c2[t] * x
        out.append(x)
    return torch.stack(out)


def _draws(model: DiffRec, x0: torch.Tensor):
    """The (t, pt, noise) the next forward will draw: a copy of its sampler and stream."""
    sampler = ImportanceSampler(model.importance.steps, model.importance.per_step)
    sampler.load_state_dict(model.importance.state_dict())
    g = torch.Generator()
    g.set_state(model.generators["diffusion"].get_state())
    return sampler.draw(x0, g)


# --------------------------------------------------------------------- loss and scores
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kw", [{}, {"reweight": False, "noise_schedule": "linear-var",
                                      "noise_scale": 0.1, "noise_min": 1e-4, "noise_max": 0.02,
                                      "norm": True}])
def test_loss_against_diffrecs_per_user_loop(backend, kw, monkeypatch) -> None:
    if backend == "reference":
        monkeypatch.setitem(backend_mod._AUTO_IF, ("diffusion_loss", "cpu"), lambda: False)
    model = toy(denoiser_dropout=0.0, history_num_per_term=2, **kw).double()  # exact
    users = torch.tensor([0, 1, 2, 3, 4, 2])
    x0 = torch.from_numpy(toy_train()[users.numpy()].toarray()).double()
    weighted = 0
    while weighted < 2:  # uniform (pt = 1) at first, importance once every step holds 2 losses
        t, pt, noise = _draws(model, x0)
        with torch.no_grad():
            want = literal_loss(model, x0, t, pt, noise)
        loss, parts = model(UserBatch(users, x0))
        assert float(loss.detach()) == pytest.approx(want, rel=1e-10)
        assert float(parts["diff"]) == pytest.approx(want, rel=1e-10)
        weighted += not bool((pt == 1).all())


def test_dropout_comes_from_the_dropout_stream() -> None:
    a, b = toy(), toy()
    users = torch.tensor([0, 1, 2, 4])
    rows = torch.from_numpy(toy_train()[users.numpy()].toarray())
    torch.manual_seed(0)
    la, _ = a(UserBatch(users, rows))
    torch.manual_seed(1)  # the global generator plays no part
    lb, _ = b(UserBatch(users, rows))
    assert torch.equal(la, lb)
    c = toy()
    c.generators["dropout"].manual_seed(99)
    lc, _ = c(UserBatch(users, rows))
    assert not torch.equal(la, lc)


def test_scores_against_diffrecs_reverse_walk() -> None:
    model = toy(noise_schedule="linear-var", noise_scale=0.5, noise_min=1e-3, noise_max=0.05)
    model.eval()
    users = torch.tensor([4, 0, 5, 2])
    rows = torch.from_numpy(toy_train()[users.numpy()].toarray())
    with torch.no_grad():
        want = literal_scores(model, rows)
    torch.testing.assert_close(model.score(users), want, rtol=1e-5, atol=1e-6)
    # Patients by their medications alone: the same walk from the given rows.
    meds = sp.csr_matrix(np.array([[0, 1, 1, 0, 0, 0, 1], [0] * 7], np.float32))
    got = model.score_patients(Patients(None, None, torch_csr(meds)))
    with torch.no_grad():
        want = literal_scores(model, torch.from_numpy(meds.toarray()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Without meds, a patient is its training row.
    assert torch.equal(model.score_patients(Patients(users)), model.score(users))
    assert model.patient_inputs == {"meds"} and model.scores_unseen


def test_sampling_steps_start_from_a_noised_row_reproducibly() -> None:
    model = toy(sampling_steps=3)
    model.eval()
    users = torch.tensor([0, 2])
    a = model.score(users)
    state = model.generators["diffusion"].get_state()
    assert torch.equal(model.score(users), a)  # a fresh copy of the stream per call
    assert torch.equal(model.generators["diffusion"].get_state(), state)  # training's untouched
    assert not torch.equal(a, toy().eval().score(users))  # the noise changes the scores


# --------------------------------------------------------------------- options and state
def test_defaults_are_recboles_and_checked() -> None:
    opts = DiffRec.options()
    assert opts == {"dims": (300,), "emb_size": 10, "norm": False, "denoiser_dropout": 0.5,
                    "steps": 5, "noise_schedule": "linear", "noise_scale": 0.001,
                    "noise_min": 0.0005, "noise_max": 0.005, "beta_fixed": True,
                    "reweight": True, "sampling_steps": 0, "history_num_per_term": 10,
                    "seed": 421, "device": "cpu"}
    keys = config_defaults("diffrec")
    assert keys["lr"] == 1e-3 and keys["batch"] == 1024
    s = toy().schedule
    assert float(s.betas[0]) == 1e-5
    torch.testing.assert_close(s.betas[1:], torch.linspace(5e-7, 5e-6, 5,
                                                           dtype=torch.float64)[1:])
    for bad in ({"dims": [8, 8]}, {"dims": [0]}, {"steps": 0}, {"sampling_steps": 6},
                {"noise_schedule": "cosine"}, {"denoiser_dropout": 1.5},
                {"noise_scale": 0.0}, {"history_num_per_term": 0},
                {"noise_schedule": "linear-var", "noise_min": 0.01, "noise_max": 0.01}):
        with pytest.raises(ValueError):
            DiffRec.check_options(bad)
        with pytest.raises(ValueError):
            make_config(model="diffrec", **bad)
    DiffRec.check_options({"noise_schedule": "linear-var", "noise_min": 0.001})


def test_state_dict_round_trip_scores_and_trains_identically() -> None:
    a = toy(history_num_per_term=2)
    users = torch.tensor([0, 1, 2, 3, 4])
    rows = torch.from_numpy(toy_train()[users.numpy()].toarray())
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    for _ in range(3):
        loss, _ = a(UserBatch(users, rows))
        opt.zero_grad()
        loss.backward()
        opt.step()
    b = toy(seed=7, history_num_per_term=2)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a.score(users), b.score(users))
    assert torch.equal(a.importance.history, b.importance.history)
    a.train(), b.train()
    assert torch.equal(a(UserBatch(users, rows))[0], b(UserBatch(users, rows))[0])


# --------------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=150, n_diag=300, n_proc=150, n_med=60, seed=0)


def _cfg(**kw):
    base = {"model": "diffrec", "epoch": 3, "batch": 64, "seed": 5, "dims": [32],
            "history_num_per_term": 40}
    base.update(kw)
    return make_config(**base)


def test_training_improves_validation_and_is_seeded(ds) -> None:
    a = assert_learns_and_is_seeded(ds, _cfg(), "diff", _cfg(seed=6))
    # History 40 a step, 150 users an epoch: importance sampling starts in epoch 1.
    assert [h["info"]["importance"] for h in a.history] == [False, True, True]


def test_resume_is_bitwise_equal(ds, tmp_path) -> None:
    """Crashed in epoch 1 (the loss history part full) and resumed = the straight run."""
    assert_resumes_exactly(ds, _cfg(), tmp_path, crash_at=1)
