"""MultiVAE against a literal per-user reference: the annealed negative ELBO with its dropout and
noise draws, the scores, the annealing counter as state, and the trainer (seeded, resumable)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from trainer_checks import assert_learns_and_is_seeded, assert_resumes_exactly, quiet

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model import MODELS, MultiVAE, Patients, UserBatch
from diffkg_fast.ops.graph import torch_csr
from diffkg_fast.train import train
from diffkg_fast.train.config import make_config

U, N_ITEMS = 7, 5




def _toy_train() -> sp.csr_matrix:
    rng = np.random.default_rng(3)
    dense = rng.random((U, N_ITEMS)) < 0.45
    dense[0] = False  # a user without training interactions
    dense[1, :] = [1, 0, 0, 1, 1]
    return sp.csr_matrix(dense.astype(np.float32))


def _model(**kw) -> MultiVAE:
    kw = {"mlp_hidden_size": [4], "latent_dimension": 6, "seed": 5, **kw}
    return MultiVAE(U, N_ITEMS, _toy_train(), **kw)


def _batch(users: list[int]) -> UserBatch:
    u = torch.tensor(users)
    return UserBatch(u, torch.from_numpy(_toy_train()[users].toarray()))


def _linears(seq: torch.nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight.detach().double(), m.bias.detach().double())
            for m in seq if isinstance(m, torch.nn.Linear)]


def _mlp_literal(layers, v: torch.Tensor) -> torch.Tensor:
    """One vector through Linear layers, tanh between them, none after the last."""
    for j, (w, b) in enumerate(layers):
        v = w @ v + b
        if j < len(layers) - 1:
            v = torch.tanh(v)
    return v


def _literal(m: MultiVAE, rows: torch.Tensor, p: float, eps_std: float, beta: float,
             gen_state: torch.Tensor | None) -> tuple[float, float, float]:
    """(loss, ce, kl) written per user; the dropout and noise redrawn from ``gen_state`` in the
    model's order (uniforms for the mask, then normals); no draw when ``gen_state`` is None."""
    enc, dec = _linears(m.encoder), _linears(m.decoder)
    k = m.k
    b, n_items = rows.shape
    if gen_state is not None:
        g = torch.Generator().manual_seed(0)
        g.set_state(gen_state)
        keep = (torch.rand((b, n_items), generator=g) >= p).double() / (1 - p)
        eps = torch.randn((b, k), generator=g).double()
    else:
        keep, eps = torch.ones(b, n_items, dtype=torch.float64), torch.zeros(b, k)
    ces, kls = [], []
    for u in range(b):
        x = rows[u].double()
        norm = math.sqrt(sum(float(v) ** 2 for v in x))
        h = (x / norm if norm > 0 else x) * keep[u]
        out = _mlp_literal(enc, h)
        mu, lv = out[:k], out[k:]
        z = mu + eps[u].double() * eps_std * torch.exp(lv / 2)
        logits = _mlp_literal(dec, z)
        log_norm = math.log(sum(math.exp(float(v)) for v in logits))
        ces.append(-sum(float(x[i]) * (float(logits[i]) - log_norm) for i in range(n_items)))
        kls.append(-0.5 * sum(1 + float(lv[j]) - float(mu[j]) ** 2 - math.exp(float(lv[j]))
                              for j in range(k)))
    ce, kl = sum(ces) / b, sum(kls) / b
    return ce + beta * kl, ce, kl


# --------------------------------------------------------------------- options
def test_defaults_are_recbole_and_checked() -> None:
    opts = MultiVAE.options()
    recbole_yaml = {"mlp_hidden_size": (600,), "latent_dimension": 128, "dropout_prob": 0.5,
                    "anneal_cap": 0.2, "total_anneal_steps": 200000}
    assert {k: opts[k] for k in recbole_yaml} == recbole_yaml
    assert opts["epsilon_std"] == 0.01 and opts["seed"] == 421 and opts["device"] == "cpu"
    assert MODELS["multivae"] is MultiVAE and MultiVAE.batch_kind == "users"
    for bad, needle in (({"latent_dimension": 7}, "even"), ({"latent_dimension": 0}, "latent"),
                        ({"dropout_prob": 1.0}, "dropout_prob"),
                        ({"dropout_prob": -0.1}, "dropout_prob"),
                        ({"anneal_cap": -1.0}, "anneal_cap"),
                        ({"total_anneal_steps": -1}, "total_anneal_steps"),
                        ({"epsilon_std": float("nan")}, "epsilon_std"),
                        ({"mlp_hidden_size": [600, 0]}, "mlp_hidden_size")):
        with pytest.raises(ValueError, match=needle):
            MultiVAE.check_options({**opts, **bad})
        with pytest.raises(ValueError, match=needle):
            _model(**bad)
    m = MultiVAE(3, 4, sp.csr_matrix((3, 4)))  # RecBole's shapes: I -> 600 -> 128, 64 -> 600 -> I
    assert [tuple(p.shape) for p in m.parameters()] == [
        (600, 4), (600,), (128, 600), (128,), (600, 64), (600,), (4, 600), (4,)]


# --------------------------------------------------------------------- the loss
@pytest.mark.parametrize("p,eps_std", [(0.5, 0.01), (0.3, 1.0), (0.0, 0.0)])
def test_loss_matches_the_literal_elbo(p: float, eps_std: float) -> None:
    m = _model(dropout_prob=p, epsilon_std=eps_std, anneal_cap=0.3, total_anneal_steps=0)
    m.train()
    batch = _batch([0, 1, 2, 3, 4, 5, 6])
    state = m.generator.get_state()
    loss, parts = m(batch)
    draws = state if p > 0 or eps_std > 0 else None
    want, ce, kl = _literal(m, batch.rows, p, eps_std, 0.3, draws)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, abs=1e-5)
    if p == 0 and eps_std == 0:  # nothing random: the generator is untouched
        assert torch.equal(m.generator.get_state(), state)


def test_kl_is_annealed_step_by_step_and_the_counter_is_state() -> None:
    m = _model(anneal_cap=0.6, total_anneal_steps=4)
    m.train()
    batch = _batch([1, 2, 3])
    betas = []
    for _ in range(5):
        state = m.generator.get_state()
        loss, parts = m(batch)
        beta = (loss - parts["ce"]).item() / parts["kl"].item()
        betas.append(round(beta, 5))
        assert loss.item() == pytest.approx(_literal(m, batch.rows, 0.5, 0.01, m.anneal(),
                                                     state)[0], abs=1e-5)
    assert betas == [0.25, 0.5, 0.6, 0.6, 0.6]  # t / total from t = 1, capped
    assert m.epoch_info() == {"anneal": 0.6, "steps": 5}
    # A fresh model loaded with the state takes the same next step: counter and stream carried.
    m2 = _model(anneal_cap=0.9, total_anneal_steps=4)
    fresh = _model(anneal_cap=0.9, total_anneal_steps=4, seed=99)  # options are config
    m2.train()
    for _ in range(2):
        m2(batch)
    fresh.load_state_dict(m2.state_dict())
    fresh.train()
    assert fresh.update == 2
    a, b = m2(batch)[0], fresh(batch)[0]
    assert torch.equal(a, b) and fresh.anneal() == 0.75  # t = 3 of 4, below the cap


def test_eval_forward_neither_counts_nor_draws() -> None:
    m = _model(total_anneal_steps=10)
    m.eval()
    state = m.generator.get_state()
    batch = _batch([1, 2])
    loss, _ = m(batch)
    assert m.update == 0 and torch.equal(m.generator.get_state(), state)
    assert loss.item() == pytest.approx(_literal(m, batch.rows, 0.5, 0.01, 0.0, None)[0],
                                        abs=1e-5)


# --------------------------------------------------------------------- scores
def _literal_scores(m: MultiVAE, rows: torch.Tensor) -> torch.Tensor:
    enc, dec = _linears(m.encoder), _linears(m.decoder)
    out = []
    for x in rows.double():
        norm = math.sqrt(sum(float(v) ** 2 for v in x))
        mu = _mlp_literal(enc, x / norm if norm > 0 else x)[:m.k]
        out.append(_mlp_literal(dec, mu))
    return torch.stack(out)


def test_scores_are_the_decoded_mean_of_the_known_medications() -> None:
    m = _model()
    m.train()  # scoring ignores the mode: no dropout, z = mu, no draw
    state = m.generator.get_state()
    users = torch.arange(U)
    rows = torch.from_numpy(_toy_train().toarray())
    got = m.score(users)
    torch.testing.assert_close(got.double(), _literal_scores(m, rows), atol=1e-5, rtol=0)
    assert torch.equal(m.generator.get_state(), state) and m.training
    # meds given: they are the input (users ignored); none given: the training rows.
    meds = sp.csr_matrix(np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool))
    known = m.score_patients(Patients(torch.tensor([1, 0, 2]), None, torch_csr(meds)))
    torch.testing.assert_close(known.double(),
                               _literal_scores(m, torch.from_numpy(meds.toarray()).float()),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(m.score_patients(Patients(users)), got)
    assert m.patient_inputs == frozenset({"meds"}) and m.scores_unseen


def test_state_dict_round_trip_scores_identically() -> None:
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    m.train()
    for _ in range(3):
        loss, _ = m(_batch([1, 2, 3, 4]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    fresh = _model(seed=123)
    assert not torch.equal(fresh.score(torch.arange(U)), m.score(torch.arange(U)))
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.score(torch.arange(U)), m.score(torch.arange(U)))


# --------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=200, n_diag=120, n_proc=60, n_med=40, seed=0)


def _cfg(**kw):
    base = {"model": "multivae", "epoch": 4, "batch": 32, "lr": 1e-2, "seed": 7,
            "mlp_hidden_size": [32], "latent_dimension": 16, "total_anneal_steps": 10}
    return make_config(**{**base, **kw})


def test_trainer_learns_and_is_seeded(ds) -> None:
    a = assert_learns_and_is_seeded(ds, _cfg(), "ce", _cfg(seed=8))
    assert a.history[-1]["info"]["steps"] == 4 * -(-int((np.diff(ds.train.indptr) > 0).sum())
                                                   // 32)


def test_resume_is_bitwise_equal(ds, tmp_path) -> None:
    want, got = assert_resumes_exactly(ds, _cfg(), tmp_path)
    assert (want.model.state_dict()["_extra_state"]["update"]
            == got.model.state_dict()["_extra_state"]["update"])


def test_visit_split_scores_held_out_visits_from_their_history() -> None:
    dsv = build_dataset("synthetic", n_patients=200, n_diag=120, n_proc=60, n_med=40, seed=0,
                        split="visit")
    res = train(dsv, _cfg(epoch=2), log=quiet)
    assert 0.0 < res.val["med_jaccard"] < 1.0 and res.val["recall@20"] > 0.0
