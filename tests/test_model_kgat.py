"""KGAT against literal small references (per edge, per head, per layer, per triplet loops on a
toy CKG), its epoch phases, options, state, and training through the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from trainer_checks import assert_learns_and_is_seeded, assert_resumes_exactly, quiet

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model import KGAT, MODELS, PairBatch
from diffkg_fast.model import kgat as kgat_mod
from diffkg_fast.model.kgat import collaborative_kg, relation_normalised
from diffkg_fast.ops.attention import dropout_mask
from diffkg_fast.train import train
from diffkg_fast.train.config import make_config
from diffkg_fast.train.selection import SelectionError

U, N_ITEMS, N_ENT, R = 6, 4, 9, 2


def _toy(seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_m = (rng.random((U, N_ITEMS)) < 0.5).astype(np.float32)
    train_m[np.arange(U), rng.integers(0, N_ITEMS, U)] = 1  # every user trains
    kg = np.stack([rng.integers(0, N_ENT, 14), rng.integers(0, R, 14),
                   rng.integers(0, N_ENT, 14)], 1)
    kg = np.concatenate([kg, [[0, 1, 5], [0, 0, 5], [5, 0, 0]]])  # one pair, several relations
    return sp.csr_matrix(train_m), kg


def _model(seed: int = 0, **kw) -> KGAT:
    train_m, kg = _toy()
    opts = {"embedding_size": 5, "kg_embedding_size": 3, "layers": (4, 3), "seed": seed,
            "reg_weight": 0.05, "mess_dropout": 0.0, "batch": 7}
    opts.update(kw)
    return KGAT(U, N_ITEMS, N_ENT, R, train_m, kg, **opts)


def _edges(m: KGAT) -> list[tuple[int, int, int]]:
    return list(map(tuple, m.ckg.to_triplets().tolist()))


def _W(m: KGAT, r: int) -> torch.Tensor:
    return m.trans_w.detach().double()[r].view(m.d, m.k)


# --------------------------------------------------------------------- the graph
@pytest.mark.parametrize("inverse", [True, False])
def test_ckg_is_the_literal_edge_set(inverse: bool) -> None:
    train_m, kg = _toy()
    ckg, kg_tri = collaborative_kg(train_m, kg, U, N_ENT, R, inverse)
    ui = 2 * R if inverse else R
    best: dict[tuple[int, int], int] = {}  # (h, t) -> smallest relation linking them
    for h, r, t in kg.tolist():
        best[(h, t)] = min(best.get((h, t), r), r)
        if inverse:
            best[(t, h)] = min(best.get((t, h), r + R), r + R)
    want = {(h, r, t) for (h, t), r in best.items()}
    assert set(map(tuple, kg_tri.tolist())) == want and len(kg_tri) == len(want)
    users, items = train_m.nonzero()
    want_ckg = {(U + h, r, U + t) for h, r, t in want}
    want_ckg |= {(int(u), ui, U + int(i)) for u, i in zip(users, items, strict=True)}
    want_ckg |= {(U + int(i), ui, int(u)) for u, i in zip(users, items, strict=True)}
    got = list(map(tuple, ckg.to_triplets().tolist()))
    assert sorted(got) == sorted(want_ckg) and len(got) == len(want_ckg)
    assert ckg.n_entities == U + N_ENT and ckg.n_relations == ui + 1
    assert (0, 1, 5) not in want and (0, 0, 5) in want  # the smallest relation wins a pair


def test_initial_attention_is_recbole_init_graph() -> None:
    m = _model()
    edges = _edges(m)
    want = []
    for h, r, _ in edges:
        want.append(1.0 / sum(1 for h2, r2, _ in edges if (h2, r2) == (h, r)))
    torch.testing.assert_close(m.attention, torch.tensor(want, dtype=torch.float32))
    torch.testing.assert_close(relation_normalised(m.ckg), m.attention)


# --------------------------------------------------------------------- attention
def test_attention_refresh_equals_a_per_edge_literal() -> None:
    m = _model(seed=4)
    m.update_attention()
    ego = torch.cat([m.user_embedding, m.entity_embedding]).detach().double()
    rel = m.relation_embedding.detach().double()
    edges = _edges(m)
    pi = []
    for h, r, t in edges:
        wh, wt = ego[h] @ _W(m, r), ego[t] @ _W(m, r)
        pi.append(float(sum(wt[j] * math.tanh(wh[j] + rel[r, j]) for j in range(m.k))))
    want = []
    for e, (h, _, _) in enumerate(edges):
        row = [pi[f] for f, (h2, _, _) in enumerate(edges) if h2 == h]
        want.append(math.exp(pi[e]) / sum(math.exp(x) for x in row))
    torch.testing.assert_close(m.attention.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------- CF loss
def _literal_embeddings(m: KGAT, masks: list[torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """e* of every node, dense and per layer, in float64, with the model's parameters (kept
    differentiable: the float64 copies are leaves whose gradients the test compares)."""
    leaves = [p.detach().double().requires_grad_() for p in
              (m.user_embedding, m.entity_embedding)]
    n = U + N_ENT
    A = torch.zeros(n, n, dtype=torch.float64)
    for (h, _, t), a in zip(_edges(m), m.attention.tolist(), strict=True):
        A[h, t] += a
    ego = torch.cat(leaves)
    out = [ego]
    for li, agg in enumerate(m.aggregators):
        side = A @ ego

        def lin(layer, x):
            return x @ layer.weight.detach().double().T + layer.bias.detach().double()

        def lrelu(x):
            return torch.where(x > 0, x, 0.01 * x)

        if agg.kind == "bi":
            ego = lrelu(lin(agg.W1, ego + side)) + lrelu(lin(agg.W2, ego * side))
        elif agg.kind == "gcn":
            ego = lrelu(lin(agg.W, ego + side))
        else:
            ego = lrelu(lin(agg.W, torch.cat([ego, side], 1)))
        if masks is not None:
            ego = ego * masks[li].double()
        out.append(ego / ego.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.cat(out, 1), leaves


def _batch() -> PairBatch:
    return PairBatch(torch.tensor([0, 1, 2, 3, 5, 0]), torch.tensor([1, 0, 3, 2, 2, 3]),
                     torch.tensor([2, 3, 0, 1, 0, 0]))


def _literal_cf(emb: torch.Tensor, batch: PairBatch, reg_weight: float) -> torch.Tensor:
    terms, norms = [], [0.0, 0.0, 0.0]
    for u, p, q in zip(*batch[:3], strict=True):
        eu, ep, eq = emb[u], emb[U + p], emb[U + q]
        terms.append(-torch.log(torch.sigmoid((eu * ep).sum() - (eu * eq).sum())))
        for k, x in enumerate((eu, ep, eq)):
            norms[k] = norms[k] + (x * x).sum()
    bpr = sum(terms) / len(terms)
    return bpr + reg_weight * sum(torch.sqrt(v) for v in norms) / len(terms)


@pytest.mark.parametrize("aggregator", ["bi", "gcn", "graphsage"])
def test_cf_loss_scores_and_gradient_equal_a_literal(aggregator: str) -> None:
    m = _model(seed=1, aggregator_type=aggregator)
    m.update_attention()  # softmax values (the initial ones are simpler)
    batch = _batch()
    loss, parts = m(batch)
    emb, leaves = _literal_embeddings(m)
    want = _literal_cf(emb, batch, m.reg_weight)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(parts["reg"]) > 1e-3 * float(parts["bpr"])  # the reg term is exercised
    loss.backward()
    want.backward()
    torch.testing.assert_close(m.entity_embedding.grad.double(), leaves[1].grad,
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(m.user_embedding.grad.double(), leaves[0].grad,
                               rtol=1e-4, atol=1e-7)
    m.eval()
    scores = m.score(torch.arange(U)).double()
    torch.testing.assert_close(scores, emb[:U] @ emb[U:U + N_ITEMS].T, rtol=1e-5, atol=1e-6)
    assert m.trans_w.grad is None and m.relation_embedding.grad is None  # no grad through pi


def test_message_dropout_masks_each_layer_output() -> None:
    m = _model(seed=2, mess_dropout=0.5)
    m.train()
    state = m.dropout_generator.get_state()
    loss, _ = m(_batch())
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    masks = [dropout_mask((U + N_ENT, d), 0.5, g, torch.device("cpu"), torch.float32)
             for d in (4, 3)]
    emb, _ = _literal_embeddings(m, masks)
    want = float(_literal_cf(emb, _batch(), 0.05).detach())
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    m.eval()  # no dropout when scoring
    emb, _ = _literal_embeddings(m)
    torch.testing.assert_close(m.score(torch.arange(U)).double(),
                               emb[:U] @ emb[U:U + N_ITEMS].T, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- KG phase
def test_kg_loss_equals_a_per_triplet_literal() -> None:
    m = _model(seed=3)
    tri = m.kg_triplets
    h, r, t = tri[:, 0], tri[:, 1], tri[:, 2]
    neg = (t + 3) % N_ENT
    loss, parts = m.kg_loss(h, r, t, neg)
    E = m.entity_embedding.detach().double()
    rel = m.relation_embedding.detach().double()
    terms, norms = [], [0.0] * 4
    for hi, ri, ti, ni in zip(h.tolist(), r.tolist(), t.tolist(), neg.tolist(), strict=True):
        W = _W(m, ri)
        eh, et, en, er = E[hi] @ W, E[ti] @ W, E[ni] @ W, rel[ri]
        g_pos = float(((eh + er - et) ** 2).sum())
        g_neg = float(((eh + er - en) ** 2).sum())
        terms.append(math.log1p(math.exp(g_pos - g_neg)))
        for k, x in enumerate((eh, er, et, en)):
            norms[k] += float((x * x).sum())
    want_kg = sum(terms) / len(terms)
    want_reg = m.reg_weight * sum(math.sqrt(v) for v in norms) / len(terms)
    assert float(parts["kg"]) == pytest.approx(want_kg, rel=1e-5)
    assert float(parts["kg_reg"]) == pytest.approx(want_reg, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(want_kg + want_reg, rel=1e-5)


def test_kg_epoch_walks_every_triplet_once_with_true_negatives(monkeypatch) -> None:
    m = _model(seed=5)
    m.configure_optimizer(1e-2)
    seen = []
    real = m.kg_loss

    def recording(h, r, t, neg):
        seen.append(torch.stack([h, r, t, neg], 1))
        return real(h, r, t, neg)

    monkeypatch.setattr(m, "kg_loss", recording)
    m._kg_epoch(None)
    rows = torch.cat(seen)
    assert all(len(b) <= m.batch for b in seen) and len(seen) == math.ceil(len(rows) / 7)
    assert sorted(map(tuple, rows[:, :3].tolist())) == sorted(map(tuple,
                                                                  m.kg_triplets.tolist()))
    tails = {(h, t) for h, _, t in m.kg_triplets.tolist()}
    assert all((h, q) not in tails for h, _, _, q in rows.tolist())
    assert ((rows[:, 3] >= 0) & (rows[:, 3] < N_ENT)).all()
    assert int(rows[:, 3].max()) >= N_ITEMS  # tails are entities, not only items


def test_epoch_end_trains_kg_with_the_cf_optimizer_then_refreshes_attention() -> None:
    m = _model(seed=6)
    with pytest.raises(RuntimeError, match="configure_optimizer"):
        m.on_epoch_end(0)
    opt = m.configure_optimizer(1e-2)
    before = m.trans_w.detach().clone()
    report = m.on_epoch_end(0)
    assert set(report.time) == set(m.phases) == {"kg", "attention"}
    assert set(report.loss) == {"kg", "kg_reg"}
    assert not torch.equal(before, m.trans_w)
    assert m.trans_w in opt.state and m.user_embedding not in opt.state  # one Adam, KG grads
    rows = torch.zeros(U + N_ENT).index_add(0, m.ckg.row, m.attention)
    has_edges = m.ckg.degree > 0
    torch.testing.assert_close(rows[has_edges], torch.ones(int(has_edges.sum())))
    assert not torch.equal(m.attention, relation_normalised(m.ckg))
    refreshed = m.attention.clone()
    m.update_attention()  # the refresh came after the KG steps: the same values again
    torch.testing.assert_close(m.attention, refreshed, rtol=0, atol=0)


# --------------------------------------------------------------------- options and state
def test_options_defaults_and_checks() -> None:
    opts = KGAT.options()
    assert opts["embedding_size"] == 64 and opts["kg_embedding_size"] == 64
    assert tuple(opts["layers"]) == (64, 32, 16) and opts["mess_dropout"] == 0.1
    assert opts["reg_weight"] == 1e-5 and opts["aggregator_type"] == "bi"
    assert opts["inverse_relations"] is True
    assert MODELS["kgat"] is KGAT
    for bad in ({"embedding_size": 0}, {"kg_embedding_size": -1}, {"mess_dropout": 1.5},
                {"reg_weight": -1.0}, {"aggregator_type": "sum"}, {"layers": [32, 0]},
                {"batch": 0}):
        with pytest.raises(ValueError):
            KGAT.check_options(bad)
    cfg = make_config(model="kgat", layers="[16, 8]", aggregator_type="gcn")
    assert cfg["layers"] == [16, 8] and cfg.model_options()["aggregator_type"] == "gcn"


def test_state_dict_round_trip_scores_identically() -> None:
    m = _model(seed=7, mess_dropout=0.2)
    m.configure_optimizer(1e-2)
    m.on_epoch_end(0)
    fresh = _model(seed=99, mess_dropout=0.2)
    assert not torch.equal(fresh.score(torch.arange(U)), m.score(torch.arange(U)))
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.score(torch.arange(U)), m.score(torch.arange(U)))
    assert torch.equal(fresh.dropout_generator.get_state(), m.dropout_generator.get_state())
    assert torch.equal(fresh.kg_generator.get_state(), m.kg_generator.get_state())


# --------------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=300, n_diag=300, n_proc=150, n_med=60, seed=0)


def _cfg(**kw):
    base = {"model": "kgat", "epoch": 3, "seed": 2, "embedding_size": 16,
            "kg_embedding_size": 16, "layers": [16, 8], "batch": 512}
    base.update(kw)
    return make_config(**base)



def test_training_improves_validation_and_is_seeded(ds) -> None:
    a = assert_learns_and_is_seeded(ds, _cfg(), "bpr", _cfg(seed=3))
    assert a.history[-1]["loss"]["kg"] < a.history[0]["loss"]["kg"]


def test_resume_equals_an_uninterrupted_run(ds, tmp_path) -> None:
    assert_resumes_exactly(ds, _cfg(), tmp_path)


def test_visit_split_is_refused() -> None:
    ds_visit = build_dataset("synthetic", n_patients=150, n_diag=200, n_proc=100, n_med=40,
                             seed=0, split="visit")
    with pytest.raises(SelectionError, match="cannot score a patient without training"):
        train(ds_visit, _cfg(epoch=1), log=quiet)


def test_propagation_runs_the_spmm_kernel_when_available(monkeypatch) -> None:
    calls = []
    real = kgat_mod.csr_spmm

    def spy(adj, x, *a, **kw):
        calls.append(adj)
        return real(adj, x, *a, **kw)

    monkeypatch.setattr(kgat_mod, "csr_spmm", spy)
    m = _model(seed=8)
    m(_batch())[0].backward()
    assert len(calls) == 2 and calls[0] is calls[1]  # one cached CSR per attention state
    m.update_attention()
    m(_batch())
    assert calls[-1] is not calls[0]
