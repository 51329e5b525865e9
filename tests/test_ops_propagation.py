"""LightGCN propagation: sum of A^l X against dense torch, scipy and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.ops.graph import norm_adjacency, torch_csr
from diffkg_fast.ops.propagation import const_spmm, lightgcn_propagate

from helpers import assert_close


def random_train(u: int, i: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    r = (rng.random((u, i)) < 0.2).astype(np.float32)
    r[1] = 0  # isolated user
    r[:, 2] = 0  # isolated item
    r[0] = 1  # a long row
    return sp.csr_matrix(r)


def dense_sum(a: torch.Tensor, x: torch.Tensor, layers: int) -> torch.Tensor:
    power = torch.eye(a.shape[0], dtype=a.dtype)
    total = torch.zeros_like(a)
    for _ in range(layers + 1):
        total = total + power
        power = power @ a
    return total @ x


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
@pytest.mark.parametrize("self_loops", [True, False])
@pytest.mark.parametrize("d", [37, 64])
def test_matches_dense_and_scipy(layers, self_loops, d):
    u, i = 23, 19
    train = random_train(u, i, seed=layers)
    adj = norm_adjacency(train, u, i, self_loops=self_loops, dtype=torch.float64)
    x = torch.randn(u + i, d, dtype=torch.float64)
    out = lightgcn_propagate(adj, x, layers)
    assert_close(out, dense_sum(adj.to_dense(), x, layers), rtol=1e-12, atol=1e-12)
    a = sp.csr_matrix((adj.values().numpy(), adj.col_indices().numpy(),
                       adj.crow_indices().numpy()), shape=adj.shape)
    cur, want = x.numpy(), x.numpy().copy()
    for _ in range(layers):
        cur = a @ cur
        want = want + cur
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)
    f32 = lightgcn_propagate(adj.to(torch.float32), x.float(), layers)
    assert_close(f32, out.float(), rtol=1e-5, atol=1e-5)


def test_layer_zero_is_a_copy():
    adj = norm_adjacency(random_train(5, 4, 0), 5, 4)
    x = torch.randn(9, 8)
    out = lightgcn_propagate(adj, x, 0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_gradients():
    u, i, d = 13, 11, 37
    adj = norm_adjacency(random_train(u, i, 3), u, i, dtype=torch.float64)
    x = torch.randn(u + i, d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(u + i, d, dtype=torch.float64)
    (lightgcn_propagate(adj, x, 2) * g).sum().backward()
    xd = x.detach().clone().requires_grad_()
    (dense_sum(adj.to_dense(), xd, 2) * g).sum().backward()
    assert_close(x.grad, xd.grad, rtol=1e-12, atol=1e-12)
    small = norm_adjacency(random_train(4, 3, 4), 4, 3, dtype=torch.float64)
    x7 = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lightgcn_propagate(small, t, 3), (x7,))


def test_coo_accepted_and_checks():
    adj = norm_adjacency(random_train(6, 5, 1), 6, 5)
    x = torch.randn(11, 4)
    assert_close(lightgcn_propagate(adj.to_sparse_coo(), x, 2),
                               lightgcn_propagate(adj, x, 2))
    with pytest.raises(ValueError, match="sparse"):
        lightgcn_propagate(adj.to_dense(), x, 1)
    with pytest.raises(ValueError, match="chain"):
        lightgcn_propagate(adj, x[:-1], 1)
    with pytest.raises(ValueError, match="float64"):
        lightgcn_propagate(adj, x.double(), 1)
    with pytest.raises(ValueError, match="layers"):
        lightgcn_propagate(adj, x, -1)


def test_backend_choice():
    adj = norm_adjacency(random_train(6, 5, 2), 6, 5)
    x = torch.randn(11, 32)
    ref = lightgcn_propagate(adj, x, 2, backend="reference")
    # "auto" on a CPU: the C++ kernel (tests/test_ops_spmm.py), equal within rounding.
    assert torch.allclose(lightgcn_propagate(adj, x, 2, backend="auto"), ref, atol=1e-6)
    with pytest.raises(ValueError, match="triton"):
        lightgcn_propagate(adj, x, 2, backend="triton")


def test_const_spmm_backward_uses_the_given_transpose():
    rng = np.random.default_rng(3)
    m = sp.random(9, 6, density=0.3, format="csr", random_state=rng, dtype=np.float64)
    m = sp.csr_matrix(sp.diags((np.arange(9) != 4).astype(np.float64)) @ m)  # an empty row
    assert m[4].nnz == 0
    a = torch_csr(m, dtype=torch.float64)
    a_t = torch_csr(m.T, dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 5, dtype=torch.float64)
    (const_spmm(a, x, a_t) * g).sum().backward()
    xd = x.detach().clone().requires_grad_()
    ((torch.from_numpy(m.toarray()) @ xd) * g).sum().backward()
    assert_close(x.grad, xd.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: const_spmm(a, t, a_t), (x.detach().requires_grad_(),))
    sym = norm_adjacency(random_train(4, 3, 4), 4, 3, dtype=torch.float64)
    x7 = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: const_spmm(sym, t), (x7,))
    with torch.no_grad():
        assert torch.equal(const_spmm(a, x, a_t), torch.sparse.mm(a, x))
