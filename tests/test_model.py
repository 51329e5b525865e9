"""The models on the interface: DiffKG, LightGCN and MostPop against literal small references;
options read from the signatures; scoring; the extension kernels in training."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from diffkg_fast.eval.topk import topk_items
from diffkg_fast.model import (
    MODELS,
    DiffKG,
    LightGCN,
    MostPop,
    PairBatch,
    bpr_loss,
    info_nce,
    l2_reg,
)
from diffkg_fast.model import lightgcn as lightgcn_mod
from diffkg_fast.model.lightgcn import propagate
from diffkg_fast.ops.graph import KGCSR, norm_adjacency
from diffkg_fast.ops.propagation import lightgcn_propagate

U, N_ITEMS, N_ENT, R = 30, 8, 20, 3


def _toy(seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = sp.csr_matrix((rng.random((U, N_ITEMS)) < 0.3).astype(np.float32))
    kg = np.stack([rng.integers(0, N_ENT, 60), rng.integers(0, R, 60),
                   rng.integers(0, N_ENT, 60)], 1)
    return train, kg


def _diffkg(train: sp.csr_matrix, kg: np.ndarray, codes=None, **kw) -> DiffKG:
    kw.setdefault("dims", [16])
    return DiffKG(U, N_ITEMS, N_ENT, R, train, kg, codes, seed=0, **kw)


def _batch(train: sp.csr_matrix, shift: int = 1) -> PairBatch:
    coo = train.tocoo()
    users, pos = torch.from_numpy(coo.row).long(), torch.from_numpy(coo.col).long()
    return PairBatch(users, pos, (pos + shift) % N_ITEMS)


# --------------------------------------------------------------------- options
def test_diffkg_options_are_params_py_and_checked() -> None:
    opts = DiffKG.options()
    params_py = {"latdim": 64, "gnn_layer": 2, "reg": 1e-7, "layer_num_kg": 1,
                 "mess_dropout_rate": 0.1, "ssl_reg": 0.1, "temp": 0.1, "seed": 421,
                 "dims": (1000,), "d_emb_size": 10, "norm": True, "steps": 5,
                 "noise_scale": 0.1, "noise_min": 1e-4, "noise_max": 0.02, "sampling_steps": 0,
                 "rebuild_k": 1, "e_loss": 0.5, "keepRate": 0.5, "res_lambda": 0.5,
                 "triplet_num": 10, "cl_pattern": 0, "lr": 1e-3, "batch": 1024}
    assert {k: opts[k] for k in params_py} == params_py
    assert opts["patient_codes"] is True  # from_dataset's own option
    assert "codes" not in opts and "train" not in opts  # data, not options
    for bad, needle in (({"keepRate": 1.5}, "keepRate"), ({"dims": [100, 100]}, "dims"),
                        ({"cl_pattern": 2}, "cl_pattern"), ({"lr": float("inf")}, "lr"),
                        ({"sampling_steps": 6}, "sampling_steps")):
        with pytest.raises(ValueError, match=needle):
            DiffKG.check_options({**opts, **bad})
    assert set(MODELS) == {"diffkg", "lightgcn", "mostpop", "multivae", "cdae", "diffrec", "kgat",
                           "kgin", "kgcn"}
    ddi = {"ddi_loss": False, "target_ddi": 0.06, "kp": 0.05, "ddi_scale": 5e-4}  # SafeDrug's
    assert {k: opts[k] for k in ddi} == ddi and "ddi_pairs" not in opts
    assert set(LightGCN.options()) == {"latdim", "gnn_layer", "reg", "seed", "device", *ddi}


def test_bpr_l2_info_nce_match_their_formulas() -> None:
    g = torch.Generator().manual_seed(1)
    u, p, n = (torch.randn(5, 4, generator=g) for _ in range(3))
    want = -torch.log(torch.sigmoid((u * p).sum(1) - (u * n).sum(1))).mean()
    assert torch.allclose(bpr_loss(u, p, n), want, atol=1e-6)
    assert torch.allclose(l2_reg([u, p], 0.5), 0.5 * (u.pow(2).sum() + p.pow(2).sum()))
    v1, v2 = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    nodes = torch.tensor([0, 3, 3, 6])
    z1 = v1 / v1.norm(dim=1, keepdim=True)
    z2 = v2 / v2.norm(dim=1, keepdim=True)
    num = torch.exp((z1[nodes] * z2[nodes]).sum(1) / 0.2)
    den = torch.exp(z1[nodes] @ z2.T / 0.2).sum(1)
    assert torch.allclose(info_nce(v1, v2, nodes, 0.2), -torch.log(num / den).mean(), atol=1e-5)


# --------------------------------------------------------------------- literal references
def _dense_adj(train: sp.csr_matrix) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 of the bipartite graph, dense, float64."""
    r = torch.from_numpy((train.toarray() != 0).astype(np.float64))
    a = torch.zeros(U + N_ITEMS, U + N_ITEMS, dtype=torch.float64)
    a[:U, U:], a[U:, :U] = r, r.T
    a += torch.eye(U + N_ITEMS, dtype=torch.float64)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def _literal_rgat(E, Rel, W, kg: KGCSR, res_lambda: float) -> torch.Tensor:
    """One RGAT layer written per head, then DiffKG's residual: res_lambda * E + e1."""
    rows = []
    for h in range(kg.n_entities):
        lo, hi = int(kg.rowptr[h]), int(kg.rowptr[h + 1])
        agg = E[h].clone()
        if hi > lo:
            ts, rs = kg.col[lo:hi], kg.rel[lo:hi]
            logits = F.leaky_relu(((torch.cat([E[h].expand(hi - lo, -1), E[ts]], 1) @ W)
                                   * Rel[rs]).sum(1), 0.2)
            agg = agg + (torch.softmax(logits, 0)[:, None] * E[ts]).sum(0)
        rows.append(agg / agg.norm())
    return res_lambda * E + torch.stack(rows)


def _literal_view(m: DiffKG, params, kg: KGCSR, codes: torch.Tensor, adj: torch.Tensor):
    user, E, Rel, W = params
    ent = _literal_rgat(E, Rel, W, kg, 0.5)
    x, out = torch.cat([user, ent[:N_ITEMS]]), None
    for layer in range(3):  # gnn_layer 2: A^0 + A^1 + A^2
        out = x if layer == 0 else out + torch.linalg.matrix_power(adj, layer) @ x
    has_train = m.encoder.has_train.double()
    code = codes @ ent
    return out[:U] * has_train + code, out[U:], code


def test_diffkg_loss_equals_a_literal_computation() -> None:
    """BPR on view 1 + code BPR + L2 + ssl_reg (InfoNCE users + items) between the views, with
    every piece written out densely (no dropout: mess_dropout_rate 0)."""
    train, kg = _toy()
    rng = np.random.default_rng(5)
    codes = sp.csr_matrix((rng.random((U, N_ENT)) < 0.2).astype(np.float32))
    codes = sp.diags(1 / np.maximum(codes.sum(1).A.ravel(), 1)) @ codes  # row means
    m = _diffkg(train, kg, sp.csr_matrix(codes, dtype=np.float32), latdim=6,
                mess_dropout_rate=0.0, reg=1e-3, ssl_reg=0.7, temp=0.3)
    m.kg_denoised = m.kg_sampled.sample_neighbours(1, torch.Generator().manual_seed(2))
    kg1, kg2 = m.views()
    assert kg1 is m.kg_denoised and kg2 is m.kg_sampled  # cl_pattern 0
    batch = _batch(train)
    loss, parts = m(batch)
    adj, c = _dense_adj(train), torch.from_numpy(codes.toarray()).double()
    enc = m.encoder
    params = [p.detach().double().requires_grad_() for p in
              (enc.user, enc.entity, enc.relation, enc.W)]
    u1, i1, code = _literal_view(m, params, kg1, c, adj)
    u2, i2, _ = _literal_view(m, params, kg2, c, adj)
    users, pos, neg, _ = batch

    def bpr(u, a, b):
        return -torch.log(torch.sigmoid((u * a).sum(1) - (u * b).sum(1))).mean()

    def nce(v1, v2, nodes):
        z1, z2 = F.normalize(v1, dim=1), F.normalize(v2, dim=1)
        return (-torch.log_softmax(z1[nodes] @ z2.T / 0.3, 1)[
            torch.arange(len(nodes)), nodes]).mean()

    bpr1 = bpr(u1[users], i1[pos], i1[neg])
    code_bpr = bpr(code[users], i1[pos], i1[neg])
    reg = 1e-3 * sum(p.pow(2).sum() for p in params)
    cl = nce(u1, u2, users) + nce(i1, i2, pos)
    want = bpr1 + code_bpr + reg + 0.7 * cl
    for got, ref in ((parts["bpr"], bpr1), (parts["code_bpr"], code_bpr), (parts["cl"], cl),
                     (loss, want)):
        assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    # And the gradient of one table (the entity table, through RGAT, LightGCN and codes).
    loss.backward()
    want.backward()
    torch.testing.assert_close(m.encoder.entity.grad.double(), params[1].grad,
                               rtol=1e-4, atol=1e-6)


def test_lightgcn_loss_equals_a_literal_computation() -> None:
    train, _ = _toy()
    m = LightGCN(U, N_ITEMS, train, latdim=5, gnn_layer=2, reg=1e-2, seed=3)
    batch = _batch(train, 3)
    loss, parts = m(batch)
    adj = _dense_adj(train)
    x = torch.cat([m.user, m.item]).detach().double()
    out = x + adj @ x + adj @ adj @ x
    u, i = out[:U], out[U:]
    users, pos, neg, _ = batch
    bpr = -torch.log(torch.sigmoid((u[users] * i[pos]).sum(1) - (u[users] * i[neg]).sum(1)))
    want = bpr.mean() + 1e-2 * (x.pow(2).sum())
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(parts["bpr"]) == pytest.approx(float(bpr.mean()), rel=1e-5)


def test_mostpop_ranks_by_training_popularity() -> None:
    train, _ = _toy()
    m = MostPop(U, N_ITEMS, train)
    pop = np.asarray(train.sum(axis=0)).ravel()
    users = torch.arange(U)
    top = topk_items(m.score(users), train, N_ITEMS).numpy()
    want = np.lexsort((np.arange(N_ITEMS), -pop))  # popularity descending, id ascending
    for u in range(U):
        seen = set(train[u].indices)
        expected = [j for j in want if j not in seen]
        assert list(top[u][: len(expected)]) == expected
    assert m.configure_optimizer(1e-3) is None  # nothing to train


# --------------------------------------------------------------------- behaviour
def test_diffkg_forward_shapes_and_init() -> None:
    train, kg = _toy()
    m = _diffkg(train, kg, latdim=8)
    enc = m.encoder
    assert enc.relation.shape == (2 * R, 8) and enc.W.shape == (16, 8)
    bound = torch.nn.init.calculate_gain("relu") * (6 / (16 + 8)) ** 0.5  # Xavier, ReLU gain
    assert float(enc.W.detach().abs().max()) <= bound
    e = enc(m.kg_sampled)
    assert e.users.shape == (U, 8) and e.items.shape == (N_ITEMS, 8) and e.codes is None
    # The denoiser is not the recommender's: its own Adam, outside the trainer's optimizer.
    opt = m.configure_optimizer(1e-3)
    own = {id(p) for p in m.diffusion.denoiser.parameters()}
    assert not own & {id(p) for g in opt.param_groups for p in g["params"]}


def test_diffkg_losses_finite_and_decreasing() -> None:
    train, kg = _toy()
    m = _diffkg(train, kg, latdim=8, mess_dropout_rate=0.0, lr=0.05, reg=1e-4)
    m.kg_denoised = m.kg_full
    m.kg_sampled = m.kg_full.sample_neighbours(1, torch.Generator().manual_seed(0))
    opt = m.configure_optimizer(0.05)
    batch = _batch(train)
    losses = []
    for _ in range(15):
        loss, parts = m(batch)
        assert all(np.isfinite(float(v)) for v in parts.values()) and float(parts["cl"]) > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0]


def test_diffkg_score_is_eval_forward_and_cache_follows_steps() -> None:
    train, kg = _toy()
    m = _diffkg(train, kg, latdim=8, mess_dropout_rate=0.5)
    m.train()
    users = torch.tensor([0, 5, 7])
    s1 = m.score(users)
    assert m.training  # score restores the mode
    m.eval()
    e = m.encoder(m.views()[0])
    assert torch.allclose(s1, e.users[users] @ e.items.T, atol=1e-6)
    with torch.no_grad():
        m.encoder.user.add_(1.0)  # an in-place update must invalidate the cache
    assert not torch.allclose(m.score(users), s1)
    s2 = m.score(users)
    m.kg_denoised = m.kg_full.sample_neighbours(1, torch.Generator().manual_seed(3))
    assert not torch.allclose(m.score(users), s2)  # a new epoch's KG: a new scoring graph


def test_an_epoch_start_trains_the_denoiser_and_rebuilds_a_subset() -> None:
    train, kg = _toy()
    m = _diffkg(train, kg, latdim=8, rebuild_k=3, keepRate=1.0, batch=8)
    before = [p.detach().clone() for p in m.diffusion.denoiser.parameters()]
    report = m.on_epoch_start(0)
    assert set(report.time) == {"diffusion", "rebuild", "kg_quality"}
    assert report.loss["diff_loss"] > 0 and "rebuild_precision" in report.info
    assert any(not torch.equal(a, b) for a, b in zip(before, m.diffusion.denoiser.parameters(),
                                                     strict=True))
    full = set(map(tuple, m.kg_full.to_triplets().tolist()))
    den = set(map(tuple, m.kg_denoised.to_triplets().tolist()))
    assert den and den <= full and m.epoch_info() == {"kg_edges": len(den)}
    assert m.views()[0] is m.kg_denoised
    # The scoring state leaves the diffusion side out and loads back into a fresh model.
    state = m.scoring_state()
    assert not [k for k in state if k.startswith("diffusion.")]
    fresh = _diffkg(train, kg, latdim=8, rebuild_k=3, keepRate=1.0, batch=8)
    fresh.load_scoring_state(state)
    users = torch.arange(U)
    assert torch.equal(fresh.score(users), m.score(users))
    ablation = _diffkg(train, kg, latdim=8, use_diffusion=False)
    assert ablation.diffusion is None and ablation.on_epoch_start(0).time == {}


def test_lightgcn_loss_decreases() -> None:
    train, _ = _toy()
    m = LightGCN(U, N_ITEMS, train, latdim=8, seed=0)
    opt = m.configure_optimizer(0.05)
    batch = _batch(train, 3)
    first = last = None
    for _ in range(15):
        loss, _ = m(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    assert last < 0.8 * first


@pytest.mark.parametrize("kernels", [True, False])
def test_propagate_matches_the_reference_values_and_gradient(monkeypatch, kernels) -> None:
    # kernels=False: the path without the extension (the const_spmm loop).
    if not kernels:
        monkeypatch.setattr(lightgcn_mod, "has_kernel", lambda op, device: False)
    train, _ = _toy()
    adj = norm_adjacency(train, U, N_ITEMS)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(U + N_ITEMS, 5, generator=g, requires_grad=True)
    w = torch.randn(U + N_ITEMS, 5, generator=g)
    ours = propagate(adj, x, 2)
    (gx,) = torch.autograd.grad((ours * w).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = lightgcn_propagate(adj, x2, 2, backend="reference")
    (gref,) = torch.autograd.grad((ref * w).sum(), x2)
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(gx, gref, atol=1e-5)


def test_training_step_runs_the_extension_kernels() -> None:
    # The model's LightGCN propagation and its code term run the C++ ops in training too (a
    # training forward once took torch.sparse.mm on a CPU), forward and backward.
    train, kg = _toy()
    rng = np.random.default_rng(4)
    codes = sp.csr_matrix((rng.random((U, N_ENT)) < 0.2).astype(np.float32))
    model = _diffkg(train, kg, codes)
    batch = PairBatch(torch.arange(8), torch.arange(8) % N_ITEMS, (torch.arange(8) + 3) % N_ITEMS)
    with torch.profiler.profile() as prof:
        loss, _ = model(batch)
        loss.backward()
    names = {e.key for e in prof.key_averages()}
    # Two views: csr_propagate forward twice and twice more on A^T in the backward.
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("diffkg_fast::csr_propagate", 0) >= 4, sorted(names)
    assert counts.get("diffkg_fast::csr_spmm", 0) >= 4, sorted(names)


def test_keys_shared_with_the_trainer_have_one_default() -> None:
    from dataclasses import asdict

    from diffkg_fast.train.config import TrainConfig

    trainer = asdict(TrainConfig())
    for name, cls in MODELS.items():
        shared = {k: v for k, v in cls.options().items() if k in trainer}
        assert shared == {k: trainer[k] for k in shared}, name
