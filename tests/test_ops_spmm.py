"""The C++ CSR ops (csrc/): csr_spmm and the fused LightGCN csr_propagate against torch.sparse.mm,
the reference backend and dense algebra; autograd, opcheck, torch.compile, input checks.

The first test builds the extension with torch's JIT loader (~30-60 s once, then cached in
TORCH_EXTENSIONS_DIR); the module is skipped only when no C++ compiler or ninja exists.
"""

from __future__ import annotations

import gc
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils.cpp_extension import is_ninja_available

from diffkg_fast.ops import _extension as ext
from diffkg_fast.ops import backend as backend_mod
from diffkg_fast.ops import spmm as spmm_mod
from diffkg_fast.ops._extension import cuda_kernels_registered
from diffkg_fast.ops.graph import is_symmetric, norm_adjacency, torch_csr
from diffkg_fast.ops.propagation import lightgcn_propagate
from diffkg_fast.ops.spmm import csr_parts, csr_spmm, csr_transpose, ensure_ops

from helpers import assert_close

if (shutil.which("c++") is None and shutil.which("g++") is None) or not is_ninja_available():
    pytest.skip("no C++ compiler or ninja: the extension cannot be built (apt-get install g++; "
                "pip install ninja)", allow_module_level=True)

ops = torch.ops.diffkg_fast
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(scope="module", autouse=True)
def _built():
    ensure_ops()


def power_law(n_rows: int, n_cols: int, nnz: int, seed: int,
              dtype: torch.dtype = torch.float64) -> sp.csr_matrix:
    """Zipf-distributed rows and columns, a run of empty rows and one row holding ~1/4 of the
    entries (a hub), values in [-1, 1]."""
    rng = np.random.default_rng(seed)
    pr = 1.0 / np.arange(1, n_rows + 1) ** 1.1
    pr[n_rows // 3: n_rows // 3 + max(n_rows // 10, 1)] = 0  # empty rows
    rows = rng.choice(n_rows, nnz, p=pr / pr.sum())
    rows[: nnz // 4] = n_rows - 1  # the hub row
    pc = 1.0 / np.arange(1, n_cols + 1) ** 0.9
    cols = rng.permutation(n_cols)[rng.choice(n_cols, nnz, p=pc / pc.sum())]
    m = sp.csr_matrix((rng.uniform(-1, 1, nnz), (rows, cols)), shape=(n_rows, n_cols))
    m.sum_duplicates()
    return m


def train(u: int, i: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    r = (rng.random((u, i)) < 0.25).astype(np.float64)
    r[1] = 0  # isolated user
    r[0] = 1  # a long row
    return sp.csr_matrix(r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# 16, 32, 64: the kernel's compile-time widths; 1, 3, 130: its any-width path.
@pytest.mark.parametrize("d", [1, 3, 16, 32, 64, 130])
@pytest.mark.parametrize("contiguous", [True, False])
def test_spmm_matches_torch_sparse(d, dtype, contiguous):
    m = power_law(157, 91, 1500, seed=d)
    adj = torch_csr(m, dtype=dtype)
    assert m.getnnz(axis=1).min() == 0 and m.getnnz(axis=1).max() > 60  # empty rows, a hub
    x = torch.randn(91, 2 * d, dtype=dtype)
    x = x[:, :d] if contiguous else x[:, ::2]
    x = x.contiguous() if contiguous else x
    assert x.is_contiguous() == contiguous
    got = ops.csr_spmm(*csr_parts(adj), x)
    assert_close(got, torch.sparse.mm(adj, x), **TOL[dtype])
    assert_close(csr_spmm(adj, x, backend="cpu"), got, rtol=0, atol=0)
    want = torch.from_numpy(m @ x.double().numpy()).to(dtype)
    assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers", [0, 1, 2, 3])
@pytest.mark.parametrize("d", [3, 32, 64])
def test_propagate_matches_reference(layers, d, dtype):
    m = power_law(120, 120, 900, seed=layers) * 0.3  # square, not symmetric
    adj = torch_csr(m, dtype=dtype)
    x = torch.randn(120, d, dtype=dtype)
    got = lightgcn_propagate(adj, x, layers, backend="cpu")
    assert_close(got, lightgcn_propagate(adj, x, layers, backend="reference"), **TOL[dtype])
    assert got.data_ptr() != x.data_ptr()
    # COO in, non-contiguous x in: same answer
    xt = x.T.contiguous().T
    assert_close(lightgcn_propagate(adj.to_sparse_coo(), xt, layers, backend="cpu"), got,
                 **TOL[dtype])


def test_empty_graph_and_zero_width():
    adj = torch_csr(sp.csr_matrix((5, 4)), dtype=torch.float32)
    assert torch.equal(ops.csr_spmm(*csr_parts(adj), torch.randn(4, 6)), torch.zeros(5, 6))
    x = torch.randn(4, 0)
    assert ops.csr_spmm(*csr_parts(adj), x).shape == (5, 0)


def test_gradients_symmetric_and_not():
    # Symmetric: LightGCN's adjacency; the backward reuses A (no transpose is stored).
    u, i = 13, 11
    sym = norm_adjacency(train(u, i, 0), u, i, dtype=torch.float64)
    assert is_symmetric(sym)
    x = torch.randn(u + i, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(u + i, 5, dtype=torch.float64)
    for layers in (1, 3):
        gk, = torch.autograd.grad((lightgcn_propagate(sym, x, layers, "cpu") * g).sum(), x)
        gr, = torch.autograd.grad((lightgcn_propagate(sym, x, layers, "reference") * g).sum(), x)
        assert_close(gk, gr, rtol=1e-12, atol=1e-12)
    rowptr, col, val = csr_parts(sym)
    assert spmm_mod._TRANSPOSE[val][3] is None
    assert all(a is b for a, b in zip(csr_transpose(rowptr, col, val, u + i), (rowptr, col, val),
                                      strict=True))
    # Not symmetric (square and rectangular): the backward must use the real transpose.
    for m in (power_law(40, 40, 300, seed=1) * 0.3, power_law(40, 27, 300, seed=2)):
        a = torch_csr(m, dtype=torch.float64)
        assert not is_symmetric(a)
        x = torch.randn(m.shape[1], 7, dtype=torch.float64, requires_grad=True)
        g = torch.randn(m.shape[0], 7, dtype=torch.float64)
        gk, = torch.autograd.grad((csr_spmm(a, x, "cpu") * g).sum(), x)
        assert_close(gk, torch.from_numpy(m.T @ g.numpy()), rtol=1e-12, atol=1e-12)
        if m.shape[0] == m.shape[1]:
            gk, = torch.autograd.grad((lightgcn_propagate(a, x, 2, "cpu") * g).sum(), x)
            gr, = torch.autograd.grad((lightgcn_propagate(a, x, 2, "reference") * g).sum(), x)
            assert_close(gk, gr, rtol=1e-12, atol=1e-12)
        t = spmm_mod._TRANSPOSE[csr_parts(a)[2]][3]
        assert t is not None and torch.equal(t[0], torch_csr(m.T).crow_indices())


def test_caches_are_weak():
    adj = torch_csr(power_law(20, 20, 60, seed=11), dtype=torch.float64)
    x = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    csr_spmm(adj, x, "cpu").sum().backward()
    n_parts, n_t = len(spmm_mod._PARTS), len(spmm_mod._TRANSPOSE)
    del adj
    gc.collect()
    assert len(spmm_mod._PARTS) == n_parts - 1 and len(spmm_mod._TRANSPOSE) == n_t - 1


def test_gradcheck_float64():
    m = power_law(9, 7, 25, seed=3)
    rowptr, col, val = csr_parts(torch_csr(m, dtype=torch.float64))
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    v = val.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, w: ops.csr_spmm(rowptr, col, w, t), (x, v))
    sq = csr_parts(torch_csr(power_law(8, 8, 20, seed=4) * 0.5, dtype=torch.float64))
    x8 = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.csr_propagate(*sq, t, 3), (x8,))
    assert torch.autograd.gradgradcheck(lambda t: ops.csr_propagate(*sq, t, 2), (x8,))


def test_propagate_val_gradient_is_an_error():
    rowptr, col, val = csr_parts(torch_csr(power_law(6, 6, 12, seed=5), dtype=torch.float64))
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    out = ops.csr_propagate(rowptr, col, val.clone().requires_grad_(), x, 1)
    with pytest.raises(RuntimeError, match="differentiates x only"):
        out.sum().backward()


def _on(device: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    if device == "cuda" and not cuda_kernels_registered():
        pytest.skip("the extension was built without csrc/cuda (no CUDA kernel registered)")
    return [t.to(device) for t in tensors]


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    m = power_law(30, 30, 150, seed=6) * 0.3
    rowptr, col, val, x = _on(device, *csr_parts(torch_csr(m, dtype=torch.float32)),
                              torch.randn(30, 5))
    x.requires_grad_()
    torch.library.opcheck(ops.csr_spmm.default, (rowptr, col, val, x))
    torch.library.opcheck(ops.csr_propagate.default, (rowptr, col, val, x, 2))
    rect = _on(device, *csr_parts(torch_csr(power_law(12, 30, 60, seed=7), dtype=torch.float64)))
    torch.library.opcheck(ops.csr_spmm.default, (*rect, x.detach().double()))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    m = power_law(50, 50, 300, seed=8) * 0.3  # not symmetric: the compiled backward transposes
    rowptr, col, val, x = _on(device, *csr_parts(torch_csr(m, dtype=torch.float32)),
                              torch.randn(50, 4))
    x.requires_grad_()

    def f(t):
        return ops.csr_propagate(rowptr, col, val, t, 2).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    gc, = torch.autograd.grad(compiled(x), x)
    ge, = torch.autograd.grad(f(x), x)
    assert_close(gc, ge)
    torch._dynamo.reset()


def test_input_checks():
    rowptr, col, val = csr_parts(torch_csr(power_law(6, 5, 12, seed=9), dtype=torch.float32))
    x = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="rowptr must be a 1-D int64"):
        ops.csr_spmm(rowptr.int(), col, val, x)
    with pytest.raises(RuntimeError, match="col must be a 1-D int64"):
        ops.csr_spmm(rowptr, col.int(), val, x)
    with pytest.raises(RuntimeError, match="val must be 1-D with one value per entry of col"):
        ops.csr_spmm(rowptr, col, val[:-1], x)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.csr_spmm(rowptr, col, val, x.double())
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.csr_spmm(rowptr, col, val.half(), x.half())
    with pytest.raises(RuntimeError, match=r"col holds an index outside \[0, 4\)"):
        ops.csr_spmm(rowptr, col, val, x[:4])
    bad = rowptr.clone()
    bad[2], bad[3] = bad[3], bad[2] - 1
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.csr_spmm(bad, col, val, x)
    with pytest.raises(RuntimeError, match="must be square"):
        ops.csr_propagate(rowptr, col, val, x, 1)
    sq = csr_parts(torch_csr(power_law(5, 5, 9, seed=10), dtype=torch.float32))
    with pytest.raises(RuntimeError, match="layers must be >= 0"):
        ops.csr_propagate(*sq, x, -1)
    adj = torch_csr(power_law(6, 5, 12, seed=9))
    with pytest.raises(ValueError, match="do not chain"):
        csr_spmm(adj, x[:4], backend="cpu")


def test_backend_choice_and_fallbacks(monkeypatch):
    adj = norm_adjacency(train(6, 5, 2), 6, 5)
    x = torch.randn(11, 8)
    # Loaded in this process: "auto" takes the kernel; not loaded: the reference.
    assert backend_mod.resolve("lightgcn_propagate", "auto", "cpu") is spmm_mod._propagate_kernel
    assert torch.equal(lightgcn_propagate(adj, x, 2), lightgcn_propagate(adj, x, 2, "cpu"))
    monkeypatch.setitem(backend_mod._AUTO_IF, ("lightgcn_propagate", "cpu"), lambda: False)
    ref = backend_mod.resolve("lightgcn_propagate", "auto", "cpu")
    assert ref is backend_mod._REGISTRY["lightgcn_propagate"]["reference"]
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        lightgcn_propagate(adj, x, 2, backend="cuda")


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: reaches the kernels' device branch without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_forced_cuda_without_cuda_kernels_says_how_to_build(monkeypatch):
    # An extension without CUDA kernels (a CPU build; patched where they are built, as in the
    # device mirror): forcing them must say so and how to get them, not end in the
    # dispatcher's "Could not run ... 'CUDA' backend".
    adj = norm_adjacency(train(6, 5, 2), 6, 5)
    x = torch.randn(11, 8).as_subclass(_OnCuda)
    monkeypatch.setattr(ext, "cuda_kernels_registered", lambda: False)
    for call, op in ((lambda: spmm_mod._csr_spmm_kernel(adj, x), "csr_spmm"),
                     (lambda: spmm_mod._propagate_kernel(adj, x, 2), "lightgcn_propagate")):
        with pytest.raises(RuntimeError, match=rf"backend 'cuda' of op '{op}'.*no CUDA kernels"
                           r".*nvcc.*backend='reference'"):
            call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_on_a_side_stream():
    # The kernels launch on torch's current stream: queued on a side stream, the same result.
    m = power_law(3000, 3000, 40000, seed=12) * 0.1
    rowptr, col, val, x = _on("cuda", *csr_parts(torch_csr(m, dtype=torch.float32)),
                              torch.randn(3000, 64))
    ref = ops.csr_propagate(rowptr, col, val, x, 2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ops.csr_propagate(rowptr, col, val, x, 2)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, ref)

