"""KGIN against a literal per-edge / per-user / per-pair reference on a toy graph; its options,
state, dropout semantics and training through the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from trainer_checks import assert_learns_and_is_seeded, assert_resumes_exactly, quiet

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model import PairBatch
from diffkg_fast.model.kgin import KGIN, _mean_interactions, independence_loss, scatter_mean
from diffkg_fast.train import make_config, train

U, N_ITEMS, N_ENT, R = 12, 5, 9, 3


def _toy(seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = (rng.random((U, N_ITEMS)) < 0.4).astype(np.float32)
    dense[3] = 0  # a user without training items: its mean is 0
    train = sp.csr_matrix(dense)
    kg = np.unique(np.stack([rng.integers(0, N_ENT, 25), rng.integers(0, R, 25),
                             rng.integers(0, N_ENT, 25)], 1), axis=0)
    kg = kg[kg[:, 0] != 8]  # entity 8 heads no edge: its aggregate is 0
    return train, kg


def _model(train, kg, **kw) -> KGIN:
    kw.setdefault("embedding_size", 6)
    return KGIN(U, N_ITEMS, N_ENT, R, train, kg, seed=1, **kw)


def _batch(train: sp.csr_matrix) -> PairBatch:
    coo = train.tocoo()
    users, pos = torch.from_numpy(coo.row).long(), torch.from_numpy(coo.col).long()
    return PairBatch(users, pos, (pos + 2) % N_ITEMS)


# --------------------------------------------------------------------- literal references
def _user_weights(train: sp.csr_matrix, keep=None) -> list[list[tuple[int, float]]]:
    """Per user, its (item, weight) terms of the user mean: 1/deg, times ``keep`` (one
    multiplier per interaction in CSR order) when given."""
    out, n = [], 0
    for u in range(U):
        items = train[u].indices
        ws = [1 / max(len(items), 1)] * len(items)
        if keep is not None:
            ws = [w * float(keep[n + j]) for j, w in enumerate(ws)]
        n += len(items)
        out.append(list(zip(items.tolist(), ws, strict=True)))
    return out


def _literal_propagate(P: dict, weights, kg, hops: int, masks=None):
    """Per head, per user, per intent, written out; ``weights`` from :func:`_user_weights`;
    ``masks`` (optional): per hop the (entity, user) message-dropout multipliers."""
    user, ent, lat, rel, att = P["user"], P["entity"], P["latent"], P["relation"], P["att"]
    d = user.shape[1]
    intents = [sum(torch.softmax(att[p], 0)[r] * rel[r] for r in range(rel.shape[0]))
               for p in range(att.shape[0])]
    u_out, e_out = user.clone(), ent.clone()
    for layer in range(hops):
        a = torch.zeros(N_ENT, d, dtype=ent.dtype)
        for h in range(N_ENT):
            msgs = [ent[t] * rel[r] for hh, r, t in kg if hh == h]
            if msgs:
                a[h] = sum(msgs) / len(msgs)
        c = torch.zeros(U, d, dtype=ent.dtype)
        for u in range(U):
            if not weights[u]:
                continue
            b = sum(ent[i] * w for i, w in weights[u])
            beta = torch.softmax(torch.stack([user[u] @ lat[p] for p in range(len(intents))]), 0)
            c[u] = sum(beta[p] * intents[p] for p in range(len(intents))) * b + b
        if masks is not None:
            a, c = a * masks[layer][0], c * masks[layer][1]
        ent = torch.stack([x / x.norm().clamp(min=1e-12) for x in a])
        user = torch.stack([x / x.norm().clamp(min=1e-12) for x in c])
        u_out, e_out = u_out + user, e_out + ent
    return u_out, e_out


def _literal_ind(w: torch.Tensor, ind: str, temp: float) -> torch.Tensor:
    n = w.shape[0]
    if ind == "mi":
        z = [w[i] / w[i].norm() for i in range(n)]
        return -sum(torch.log(torch.exp(z[i] @ z[i] / temp)
                              / sum(torch.exp(z[i] @ z[j] / temp) for j in range(n)))
                    for i in range(n))
    total = torch.zeros((), dtype=w.dtype)
    for i in range(n):
        for j in range(i + 1, n):
            x, y = w[i], w[j]
            if ind == "cosine":
                total = total + (x @ y / (x.norm() * y.norm())) ** 2
            else:  # distance correlation, Székely's definition
                def centred(v):
                    a = (v[:, None] - v[None, :]).abs()
                    return a - a.mean(0) - a.mean(1)[:, None] + a.mean()
                A, B = centred(x), centred(y)
                dcov = ((A * B).mean()).sqrt()
                total = total + dcov / ((A * A).mean().sqrt() * (B * B).mean().sqrt()).sqrt()
    return total


def _params64(m: KGIN) -> dict:
    return {k: p.detach().double().requires_grad_() for k, p in
            (("user", m.user), ("entity", m.entity), ("latent", m.latent),
             ("relation", m.relation), ("att", m.disen_weight_att))}


def test_scatter_mean_is_the_per_index_mean() -> None:
    # (KGIN normalises the mean, so its scale is only visible here.)
    src = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([2, 0, 2, 2, 4, 0])
    got = scatter_mean(src, index, 5)
    for k in range(5):
        rows = [src[e] for e in range(6) if index[e] == k]
        want = sum(rows) / len(rows) if rows else torch.zeros(3)
        torch.testing.assert_close(got[k], want)
    # and the user mean's matrix (RecBole's interact_mat): 1/deg(u) on each interaction
    train, _ = _toy()
    rowptr, col, val = _mean_interactions(train, U, N_ITEMS)
    dense = torch.sparse_csr_tensor(rowptr, col, val, size=(U, N_ITEMS)).to_dense()
    rows = torch.from_numpy(train.toarray())
    torch.testing.assert_close(dense, rows / rows.sum(1, keepdim=True).clamp(min=1))


@pytest.mark.parametrize("ind", ["cosine", "distance", "mi"])
def test_independence_loss_equals_its_literal_definition(ind) -> None:
    w = torch.randn(4, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = independence_loss(w, ind, 0.3)
    want = _literal_ind(w, ind, 0.3)
    assert float(got) == pytest.approx(float(want), rel=1e-3 if ind == "distance" else 1e-9)


@pytest.mark.parametrize("reverse", [False, True])
def test_loss_and_gradient_equal_a_literal_computation(reverse) -> None:
    train, kg = _toy()
    m = _model(train, kg, node_dropout_rate=0.0, mess_dropout_rate=0.0, reg_weight=1e-2,
               sim_regularity=0.5, ind="cosine", kg_reverse_r=reverse, context_hops=2)
    batch = _batch(train)
    loss, parts = m(batch)
    P = _params64(m)
    edges = kg.tolist() + ([[t, r + R, h] for h, r, t in kg.tolist()] if reverse else [])
    u, e = _literal_propagate(P, _user_weights(train), edges, 2)
    users, pos, neg, _ = batch
    ub, pb, nb = u[users], e[pos], e[neg]
    bpr = -torch.log(torch.sigmoid((ub * pb).sum(1) - (ub * nb).sum(1))).mean()
    reg = 1e-2 * (ub.norm() + pb.norm() + nb.norm()) / len(users)
    cor = 0.5 * _literal_ind(P["att"], "cosine", 0.2)
    want = bpr + reg + cor
    for got, ref in ((parts["bpr"], bpr), (parts["reg"], reg), (parts["cor"], cor),
                     (loss, want)):
        assert float(got) == pytest.approx(float(ref), rel=1e-4), (got, ref)
    loss.backward()
    want.backward()
    for name, p in (("entity", m.entity), ("relation", m.relation), ("latent", m.latent),
                    ("att", m.disen_weight_att), ("user", m.user)):
        torch.testing.assert_close(p.grad.double(), P[name].grad, rtol=1e-3, atol=1e-6,
                                   msg=name)
    # Scores: the eval forward (no dropout), <u*, e*_i> over the items.
    torch.testing.assert_close(m.score(torch.arange(U)).double(),
                               (u @ e[:N_ITEMS].T).detach(), rtol=1e-4, atol=1e-5)


def test_dropout_forward_equals_a_literal_with_the_same_draws() -> None:
    """Node dropout keeps int(n_edges * rate) edges and drops interactions with probability
    mess_dropout_rate (scaled 1/(1-p)); message dropout before the normalisation."""
    train, kg = _toy()
    m = _model(train, kg, node_dropout_rate=0.25, mess_dropout_rate=0.3, context_hops=2)
    state = m.dropout_generator.get_state()
    _, parts = m(_batch(train))
    g = torch.Generator()
    g.set_state(state)
    n = len(kg)
    kept = torch.randperm(n, generator=g)[: int(n * 0.25)]
    keep = (torch.rand(train.nnz, generator=g) >= 0.3).double() / 0.7
    masks = [((torch.rand(N_ENT, 6, generator=g) >= 0.3).double() / 0.7,
              (torch.rand(U, 6, generator=g) >= 0.3).double() / 0.7) for _ in range(2)]
    P = _params64(m)
    u, e = _literal_propagate(P, _user_weights(train, keep), kg[kept.numpy()].tolist(),
                              2, masks)
    users, pos, neg, _ = _batch(train)
    bpr = -torch.log(torch.sigmoid((u[users] * e[pos]).sum(1) - (u[users] * e[neg]).sum(1)))
    assert float(parts["bpr"]) == pytest.approx(float(bpr.mean()), rel=1e-4)
    # Eval scores ignore dropout, and do not draw from the stream.
    after = m.dropout_generator.get_state()
    m.score(torch.arange(3))
    assert torch.equal(after, m.dropout_generator.get_state())


# --------------------------------------------------------------------- options and state
def test_options_are_recbole_defaults_and_checked() -> None:
    opts = KGIN.options()
    assert opts == {"embedding_size": 64, "context_hops": 3, "n_factors": 4, "reg_weight": 1e-5,
                    "sim_regularity": 1e-4, "ind": "cosine", "temperature": 0.2,
                    "node_dropout_rate": 0.1, "mess_dropout_rate": 0.1, "kg_reverse_r": False,
                    "seed": 421, "device": "cpu"}
    for bad, needle in (({"ind": "l2"}, "ind"), ({"mess_dropout_rate": 1.0}, "mess_dropout"),
                        ({"node_dropout_rate": 1.5}, "node_dropout"),
                        ({"n_factors": 0}, "n_factors"), ({"reg_weight": -1}, "reg_weight")):
        with pytest.raises(ValueError, match=needle):
            KGIN.check_options({**opts, **bad})


def test_state_dict_round_trip_scores_identically() -> None:
    train, kg = _toy()
    m = _model(train, kg)
    opt = m.configure_optimizer(0.05)
    for _ in range(3):
        loss, _ = m(_batch(train))
        opt.zero_grad()
        loss.backward()
        opt.step()
    fresh = KGIN(U, N_ITEMS, N_ENT, R, train, kg, embedding_size=6, seed=99)
    fresh.load_state_dict(m.state_dict())
    users = torch.arange(U)
    assert torch.equal(fresh.score(users), m.score(users))
    # The dropout stream travels with the state: the next training step is the same.
    m.train(), fresh.train()
    assert torch.equal(m(_batch(train))[0], fresh(_batch(train))[0])


def test_losses_decrease() -> None:
    train, kg = _toy()
    m = _model(train, kg, node_dropout_rate=0.0, mess_dropout_rate=0.0)
    opt = m.configure_optimizer(0.05)
    losses = []
    for _ in range(20):
        loss, _ = m(_batch(train))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0]


# --------------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=300, n_diag=300, n_proc=150, n_med=60, seed=0)


def _cfg(**kw):
    base = {"model": "kgin", "epoch": 3, "embedding_size": 16, "lr": 1e-2, "seed": 3,
            "context_hops": 2}
    return make_config(**{**base, **kw})



def test_trains_improves_validation_and_is_seeded(ds) -> None:
    assert_learns_and_is_seeded(ds, _cfg(), "bpr", _cfg(seed=4))


def test_resume_continues_exactly(ds, tmp_path) -> None:
    assert_resumes_exactly(ds, _cfg(), tmp_path)


def test_refused_on_the_visit_split() -> None:
    visit = build_dataset("synthetic", n_patients=150, n_diag=300, n_proc=150, n_med=60,
                          seed=0, split="visit")
    with pytest.raises(Exception, match="cannot score a patient without training"):
        train(visit, _cfg(epoch=1), log=quiet)
