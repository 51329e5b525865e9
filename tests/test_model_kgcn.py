"""KGCN against a literal per-user / per-entity reference on a toy graph; the sampled receptive
fields; options, state and training through the trainer."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from trainer_checks import assert_learns_and_is_seeded, assert_resumes_exactly

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model import PairBatch
from diffkg_fast.model.kgcn import KGCN, sample_neighbourhood
from diffkg_fast.train import make_config

U, N_ITEMS, N_ENT, R = 7, 5, 10, 3


def _toy_kg(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kg = np.unique(np.stack([rng.integers(0, 9, 14), rng.integers(0, R, 14),
                             rng.integers(0, 9, 14)], 1), axis=0)
    return kg  # entity 9 has no neighbour: its field is itself, through the padding relation


def _model(**kw) -> KGCN:
    kw.setdefault("embedding_size", 5)
    return KGCN(U, N_ITEMS, N_ENT, R, _toy_kg(), seed=2, **kw)


def _batch() -> PairBatch:
    users = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 3])
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    return PairBatch(users, pos, (pos + 2) % N_ITEMS)


# --------------------------------------------------------------------- the receptive fields
def _neighbours(kg: np.ndarray, n_entities: int) -> list[list[tuple[int, int]]]:
    """RecBole's undirected neighbour lists: (tail, r) for the head, (head, r) for the tail."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(n_entities)]
    for h, r, t in kg.tolist():
        out[h].append((t, r))
        out[t].append((h, r))
    return out


def test_sampled_fields_are_neighbours_drawn_as_recbole_draws() -> None:
    kg = _toy_kg()
    k = 3
    nbrs = _neighbours(kg, N_ENT)
    ent, rel = sample_neighbourhood(kg, N_ENT, R, k, torch.Generator().manual_seed(0))
    assert ent.shape == rel.shape == (N_ENT, k)
    for e in range(N_ENT):
        got = list(zip(ent[e].tolist(), rel[e].tolist(), strict=True))
        if not nbrs[e]:
            assert got == [(e, R)] * k
        elif len(nbrs[e]) >= k:  # without replacement: a sub-multiset of the neighbour list
            assert not Counter(got) - Counter(nbrs[e]), (e, got, nbrs[e])
        else:
            assert set(got) <= set(nbrs[e])
    again = sample_neighbourhood(kg, N_ENT, R, k, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ent) and torch.equal(again[1], rel)


def test_sampling_is_uniform_with_and_without_replacement() -> None:
    # k = 3: 2,000 heads with 5 tails each (without replacement), 2,000 with 2 (with).
    n = 2000
    heads = np.repeat(np.arange(2 * n), np.r_[np.full(n, 5), np.full(n, 2)])
    slot = np.concatenate([np.tile(np.arange(5), n), np.tile(np.arange(2), n)])
    tails = 2 * n + slot  # tail entities 2n … 2n+4, shared: relation id = the slot
    kg = np.stack([heads, slot, tails], 1)
    _, rel = sample_neighbourhood(kg, 2 * n + 5, 5, 3, torch.Generator().manual_seed(1))
    wo, wr = rel[:n], rel[n:2 * n]
    assert (wo[:, 0] != wo[:, 1]).all() and (wo[:, 1] != wo[:, 2]).all()  # distinct
    assert (wo[:, 0] != wo[:, 2]).all()
    freq = torch.bincount(wo.flatten(), minlength=5).double() / (3 * n)
    assert torch.allclose(freq, torch.full((5,), 0.2, dtype=torch.float64), atol=0.02)
    # Two neighbours, three draws with replacement: all three alike with probability 1/4.
    same = ((wr[:, 0] == wr[:, 1]) & (wr[:, 1] == wr[:, 2])).double().mean()
    assert abs(float(same) - 0.25) < 0.03
    assert abs(float((wr == 0).double().mean()) - 0.5) < 0.03


# --------------------------------------------------------------------- literal reference
def _literal_item(m: KGCN, u: torch.Tensor, v: int, P: dict) -> torch.Tensor:
    """The item vector of ``v`` for user vector ``u``, per entity: ``vec_{i+1}[e]`` from
    ``vec_i[e]`` and ``vec_i`` of e's sampled neighbours (a node's update depends on its entity
    only, so the per-entity recursion equals the receptive-field tree)."""
    adj_e, adj_r = m.adj_entity.tolist(), m.adj_relation.tolist()
    k, d = m.k, u.shape[0]
    vec = [P["entity"][e] for e in range(N_ENT)]
    for i in range(m.n_iter):
        W, b = P["W"][i], P["b"][i]
        nxt = []
        for e in range(N_ENT):
            scores = torch.stack([u @ P["relation"][r] / d for r in adj_r[e]])
            w = torch.softmax(scores, 0)
            agg = sum(w[j] * vec[adj_e[e][j]] for j in range(k)) / k
            x = {"sum": vec[e] + agg, "neighbor": agg,
                 "concat": torch.cat([vec[e], agg])}[m.aggregator]
            y = W @ x + b
            nxt.append(torch.tanh(y) if i == m.n_iter - 1 else torch.relu(y))
        vec = nxt
    return vec[v]


def _params64(m: KGCN) -> dict:
    def leaf(t):
        return t.detach().double().requires_grad_()
    return {"user": leaf(m.user), "entity": leaf(m.entity), "relation": leaf(m.relation),
            "W": [leaf(layer.weight) for layer in m.layers],
            "b": [leaf(layer.bias) for layer in m.layers]}


@pytest.mark.parametrize(("aggregator", "n_iter", "loss_type"),
                         [("sum", 1, "bce"), ("concat", 2, "bce"), ("neighbor", 2, "bpr"),
                          ("sum", 3, "bce")])
def test_loss_scores_and_gradient_equal_a_literal_computation(aggregator, n_iter,
                                                              loss_type) -> None:
    m = _model(aggregator=aggregator, n_iter=n_iter, neighbor_sample_size=3, reg_weight=0.1,
               loss_type=loss_type)
    with torch.no_grad():  # non-zero biases, so that a bias mistake shows
        for layer in m.layers:
            layer.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    batch = _batch()
    loss, parts = m(batch)
    P = _params64(m)
    rows = []
    for u, p, n in zip(*(t.tolist() for t in batch[:3]), strict=True):
        uv = P["user"][u]
        rows.append((uv, _literal_item(m, uv, p, P), _literal_item(m, uv, n, P)))
    us, ps, ns = (torch.stack(x) for x in zip(*rows, strict=True))
    yp, yn = (us * ps).sum(1), (us * ns).sum(1)
    if loss_type == "bce":  # BCEWithLogits, positives labelled 1, negatives 0, one mean
        rec = -(torch.log(torch.sigmoid(yp)).sum() + torch.log(1 - torch.sigmoid(yn)).sum())
        rec = rec / (2 * len(yp))
    else:
        rec = -torch.log(torch.sigmoid(yp - yn)).mean()
    reg = 0.1 * (us.norm() + ps.norm() + ns.norm()) / len(yp)
    want = rec + reg
    assert float(parts[loss_type]) == pytest.approx(float(rec), rel=1e-5)
    assert float(parts["reg"]) == pytest.approx(float(reg), rel=1e-5)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    loss.backward()
    want.backward()
    for got, ref in ((m.entity.grad, P["entity"].grad), (m.relation.grad, P["relation"].grad),
                     (m.user.grad, P["user"].grad), (m.layers[0].weight.grad, P["W"][0].grad),
                     (m.layers[-1].bias.grad, P["b"][-1].grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-7)
    # Full ranking: every item for every user, literally.
    scores = m.score(torch.arange(U))
    with torch.no_grad():
        lit = torch.stack([torch.stack([P["user"][u] @ _literal_item(m, P["user"][u], v, P)
                                        for v in range(N_ITEMS)]) for u in range(U)])
    torch.testing.assert_close(scores.double(), lit, rtol=1e-5, atol=1e-6)


def test_scoring_in_chunks_equals_one_chunk(monkeypatch) -> None:
    m = _model(n_iter=2, neighbor_sample_size=2)
    users = torch.tensor([6, 0, 3, 3, 1])
    whole = m.score(users)
    monkeypatch.setattr(KGCN, "score_chunk", lambda self: 2)
    torch.testing.assert_close(m.score(users), whole)
    # and the per-pair training path gives the same item vectors
    u = m.user[users]
    per_pair = m.item_vectors(u, torch.arange(N_ITEMS).expand(len(users), -1))
    torch.testing.assert_close((per_pair * u.unsqueeze(1)).sum(-1).detach(), whole)


# --------------------------------------------------------------------- options and state
def test_options_are_recbole_defaults_and_checked() -> None:
    opts = KGCN.options()
    assert opts == {"embedding_size": 64, "n_iter": 1, "aggregator": "sum", "reg_weight": 1e-7,
                    "neighbor_sample_size": 4, "loss_type": "bce", "seed": 421,
                    "device": "cpu"}
    for bad, needle in (({"aggregator": "mean"}, "aggregator"), ({"n_iter": 0}, "n_iter"),
                        ({"loss_type": "ce"}, "loss_type"),
                        ({"neighbor_sample_size": 0}, "neighbor_sample_size"),
                        ({"reg_weight": -1.0}, "reg_weight")):
        with pytest.raises(ValueError, match=needle):
            KGCN.check_options({**opts, **bad})


def test_state_dict_round_trip_keeps_the_fields_and_scores_identically() -> None:
    m = _model(n_iter=2)
    opt = m.configure_optimizer(0.05)
    for _ in range(3):
        loss, _ = m(_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    fresh = KGCN(U, N_ITEMS, N_ENT, R, _toy_kg(), embedding_size=5, n_iter=2, seed=77)
    assert not torch.equal(fresh.adj_entity, m.adj_entity)  # another seed, other fields
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.adj_entity, m.adj_entity)
    users = torch.arange(U)
    assert torch.equal(fresh.score(users), m.score(users))


def test_losses_decrease() -> None:
    m = _model(n_iter=2)
    opt = m.configure_optimizer(0.05)
    losses = []
    for _ in range(20):
        loss, _ = m(_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


# --------------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=300, n_diag=300, n_proc=150, n_med=60, seed=0)


def _cfg(**kw):
    base = {"model": "kgcn", "epoch": 3, "embedding_size": 16, "lr": 1e-2, "seed": 3}
    return make_config(**{**base, **kw})



def test_trains_improves_validation_and_is_seeded(ds) -> None:
    assert_learns_and_is_seeded(ds, _cfg(), "bce", _cfg(seed=4))


def test_resume_continues_exactly(ds, tmp_path) -> None:
    assert_resumes_exactly(ds, _cfg(), tmp_path)
