"""DiffKG's recommender, LightGCN and MostPop: losses, forward, scoring."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.eval.ranking import topk_items
from diffkg_fast.model import DiffKG, DiffKGConfig, LightGCN, MostPop, bpr_loss, info_nce, l2_reg
from diffkg_fast.model import diffkg as diffkg_mod
from diffkg_fast.model.diffkg import propagate
from diffkg_fast.ops.graph import KGCSR, norm_adjacency, torch_csr
from diffkg_fast.ops.propagation import lightgcn_propagate

U, N_ITEMS, N_ENT, R = 30, 8, 20, 3


def _toy(seed: int = 0) -> tuple[sp.csr_matrix, KGCSR]:
    rng = np.random.default_rng(seed)
    train = sp.csr_matrix((rng.random((U, N_ITEMS)) < 0.3).astype(np.float32))
    kg = np.stack([rng.integers(0, N_ENT, 60), rng.integers(0, R, 60),
                   rng.integers(0, N_ENT, 60)], 1)
    return train, KGCSR.from_kg(kg, N_ENT, R)


def _diffkg(cfg: DiffKGConfig, train: sp.csr_matrix, kg: KGCSR) -> DiffKG:
    adj = norm_adjacency(train, U, N_ITEMS)
    gen = torch.Generator().manual_seed(0)
    return DiffKG(U, N_ITEMS, N_ENT, kg.n_relations, adj, cfg, generator=gen)


def test_config_defaults_and_validation() -> None:
    cfg = DiffKGConfig()
    assert (cfg.lr, cfg.batch, cfg.latdim, cfg.gnn_layer, cfg.reg) == (1e-3, 1024, 64, 2, 1e-7)
    assert (cfg.keepRate, cfg.res_lambda, cfg.triplet_num, cfg.epoch, cfg.seed) == (
        0.5, 0.5, 10, 25, 421)
    assert cfg.dims == [1000] and cfg.steps == 5 and cfg.e_loss == 0.5 and cfg.use_diffusion
    with pytest.raises(ValueError, match="model"):
        DiffKGConfig(model="kgat")
    with pytest.raises(ValueError, match="keepRate"):
        DiffKGConfig(keepRate=1.5)
    with pytest.raises(ValueError, match="dims"):
        DiffKGConfig(dims=[100, 100])


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


def test_diffkg_forward_shapes_and_init() -> None:
    train, kg = _toy()
    cfg = DiffKGConfig(latdim=8)
    m = _diffkg(cfg, train, kg)
    assert m.relation.shape == (2 * R, 8) and m.W.shape == (16, 8)
    bound = torch.nn.init.calculate_gain("relu") * (6 / (16 + 8)) ** 0.5  # Xavier, ReLU gain
    assert float(m.W.detach().abs().max()) <= bound
    u, i = m(kg)
    assert u.shape == (U, 8) and i.shape == (N_ITEMS, 8)
    with pytest.raises(ValueError, match="needs a KG"):
        m(None)


def test_diffkg_losses_finite_and_decreasing() -> None:
    train, kg = _toy()
    cfg = DiffKGConfig(latdim=8, mess_dropout_rate=0.0, lr=0.05, reg=1e-4)
    m = _diffkg(cfg, train, kg)
    half = kg.sample_neighbours(1, torch.Generator().manual_seed(0))
    coo = train.tocoo()
    users, pos = torch.from_numpy(coo.row).long(), torch.from_numpy(coo.col).long()
    neg = (pos + 1) % N_ITEMS
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(15):
        loss, parts = m.loss(users, pos, neg, kg, half)
        assert all(np.isfinite(v) for v in parts.values()) and parts["cl"] > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0]


def test_diffkg_score_is_eval_forward_and_cache_follows_steps() -> None:
    train, kg = _toy()
    m = _diffkg(DiffKGConfig(latdim=8, mess_dropout_rate=0.5), train, kg)
    m.train()
    users = torch.tensor([0, 5, 7])
    s1 = m.score(users, kg)
    assert m.training  # score restores the mode
    m.eval()
    u, i = m(kg)
    assert torch.allclose(s1, u[users] @ i.T, atol=1e-6)
    with torch.no_grad():
        m.user.add_(1.0)  # an in-place update must invalidate the cache
    assert not torch.allclose(m.score(users, kg), s1)
    other = kg.sample_neighbours(1, torch.Generator().manual_seed(3))
    assert not torch.allclose(m.score(users, other), m.score(users, kg))


def test_lightgcn_loss_decreases() -> None:
    train, _ = _toy()
    cfg = DiffKGConfig(model="lightgcn", latdim=8, lr=0.05)
    adj = norm_adjacency(train, U, N_ITEMS)
    m = LightGCN(U, N_ITEMS, adj, cfg, torch.Generator().manual_seed(0))
    coo = train.tocoo()
    users, pos = torch.from_numpy(coo.row).long(), torch.from_numpy(coo.col).long()
    neg = (pos + 3) % N_ITEMS
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
    first = last = None
    for _ in range(15):
        loss, _ = m.loss(users, pos, neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    assert last < 0.8 * first


def test_mostpop_ranks_by_training_popularity() -> None:
    train, _ = _toy()
    m = MostPop(train)
    pop = np.asarray(train.sum(axis=0)).ravel()
    users = torch.arange(U)
    top = topk_items(m.score(users), train, N_ITEMS).numpy()
    want = np.lexsort((np.arange(N_ITEMS), -pop))  # popularity descending, id ascending
    for u in range(U):
        seen = set(train[u].indices)
        expected = [j for j in want if j not in seen]
        assert list(top[u][: len(expected)]) == expected


@pytest.mark.parametrize("kernels", [True, False])
def test_propagate_matches_the_reference_values_and_gradient(monkeypatch, kernels) -> None:
    # kernels=False: the path without the extension (the const_spmm loop).
    if not kernels:
        monkeypatch.setattr(diffkg_mod, "_has_kernel", lambda op, device: False)
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
    # Issue 5: the model's LightGCN propagation and its code term run the C++ ops in training
    # too (a training forward once took torch.sparse.mm on a CPU), forward and backward.
    train, kg = _toy()
    rng = np.random.default_rng(4)
    codes = torch_csr(sp.csr_matrix((rng.random((U, N_ENT)) < 0.2).astype(np.float32)), "cpu")
    adj = norm_adjacency(train, U, N_ITEMS)
    model = DiffKG(U, N_ITEMS, N_ENT, kg.n_relations, adj, DiffKGConfig(), codes=codes,
                   generator=torch.Generator().manual_seed(0))
    users, pos, neg = torch.arange(8), torch.arange(8) % N_ITEMS, (torch.arange(8) + 3) % N_ITEMS
    with torch.profiler.profile() as prof:
        loss, _ = model.loss(users, pos, neg, kg, kg, torch.Generator().manual_seed(1))
        loss.backward()
    names = {e.key for e in prof.key_averages()}
    # Two views: csr_propagate forward twice and twice more on A^T in the backward.
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("diffkg_fast::csr_propagate", 0) >= 4, sorted(names)
    assert counts.get("diffkg_fast::csr_spmm", 0) >= 4, sorted(names)
