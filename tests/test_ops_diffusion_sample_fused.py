"""The fused diffusion sampler (hidden-space recursion, ``diffkg_fast.ops.diffusion_sample_fused``)
and its Triton GEMM + top-k kernel against the reference sampler.

Float64 must agree to ~1e-10 (the recursion is exact algebra); float32 and bfloat16 follow the
tolerance rule of flash-attention: the error against the float64 reference at most twice that of
the reference run in the same precision (plus float32 noise). Triton runs in its interpreter on a
CPU (``TRITON_INTERPRET=1``, set by conftest.py) and compiled on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.ops import backend as backend_mod
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    _sample_reference,
    _sample_topk_reference,
    kg_rows,
    sample_topk,
)
from diffkg_fast.ops.diffusion_sample_fused import (
    _sample_topk_fast,
    sample_hidden,
    sample_topk_hidden,
)

from helpers import needs_interpreter

CUDA = torch.cuda.is_available()


def graph(n: int, density: float, seed: int, *, empty=(0, 5), dup: bool = True):
    """A binary KG CSR (rowptr, col) with empty rows and, with ``dup``, a repeated entry."""
    m = sp.random(n, n, density=density, format="lil", random_state=seed)
    for r in empty:
        m[r, :] = 0
    m = m.tocsr()
    m.data[:] = 1
    rowptr = torch.from_numpy(m.indptr.astype(np.int64))
    col = torch.from_numpy(m.indices.astype(np.int64))
    if dup:  # row 1 lists one of its columns twice: kg_rows keeps it binary, so must we
        r0, r1 = int(rowptr[1]), int(rowptr[2])
        assert r1 > r0, "row 1 needs an entry"
        col = torch.cat([col[:r1], col[r0:r0 + 1], col[r1:]])
        rowptr = torch.cat([rowptr[:2], rowptr[2:] + 1])
    return rowptr, col


def denoiser(n: int, hidden: int = 33, *, dtype=torch.float64, norm: bool = True,
             scale: float = 3.0, seed: int = 0) -> Denoiser:
    """Weights scaled up so that tanh bends and rows have distinct top entries; drawn in
    float64 and cast, so every dtype holds the same model (up to rounding)."""
    d = Denoiser(n, hidden, 10, norm=norm, dtype=torch.float64,
                 generator=torch.Generator().manual_seed(seed)).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.mul_(scale)
    return d.to(dtype)


def err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("norm,steps,sampling_steps", [
    (True, 5, 0), (False, 5, 0), (True, 1, 0), (True, 7, 3), (True, 5, 5), (False, 3, 2)])
def test_sample_hidden_matches_reference_float64(norm, steps, sampling_steps):
    s = DiffusionSchedule(steps=steps)
    rowptr, col = graph(97, 0.06, seed=steps)
    model = denoiser(97, norm=norm, seed=steps)
    x0 = kg_rows(rowptr, col, torch.arange(97), 97, dtype=torch.float64)
    want = _sample_reference(model, x0, s, sampling_steps, torch.Generator().manual_seed(4))
    got = sample_hidden(model, x0, s, sampling_steps, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_size,k,sampling_steps", [(1, 1, 0), (7, 4, 0), (64, 1, 2),
                                                         (1024, 3, 0)])
def test_sample_topk_matches_reference_float64(batch_size, k, sampling_steps):
    s = DiffusionSchedule()
    rowptr, col = graph(101, 0.05, seed=k)
    model = denoiser(101, seed=k)
    # A permuted subset with the empty rows (0, 5) and the duplicated-entry row (1) in it.
    rows = torch.cat([torch.tensor([5, 1, 0]), torch.randperm(101)[:40]])
    want_v, want_i = _sample_topk_reference(model, rowptr, col, rows, s, k, batch_size,
                                            sampling_steps, torch.Generator().manual_seed(9))
    v, i = sample_topk_hidden(model, rowptr, col, rows, s, k, batch_size, sampling_steps,
                              torch.Generator().manual_seed(9))
    assert torch.equal(i, want_i)
    torch.testing.assert_close(v, want_v, rtol=1e-10, atol=1e-10)


def test_edgeless_graph_matches_reference():
    # No edges at all: every start row is zero (‖x‖ = 0, the normalisation's epsilon case).
    model = denoiser(7, 5)
    rowptr, col = torch.zeros(8, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    want = _sample_topk_reference(model, rowptr, col, torch.arange(7), DiffusionSchedule(), 2)
    got = sample_topk_hidden(model, rowptr, col, torch.arange(7), DiffusionSchedule(), 2)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)


def _topk_rule(v32, i32, v32_ref, full64, k):
    """Values: error at most twice the reference's float32 error; indices: every chosen column's
    float64 value is within that same bound of the true k-th best (near-ties may swap)."""
    v64 = torch.topk(full64, k, dim=-1).values
    bound = 2 * err(v32_ref, v64) + 1e-6 * v64.abs().max().item()
    assert err(v32, v64) <= bound, (err(v32, v64), bound)
    chosen = full64.gather(1, i32)
    assert (chosen >= v64[:, -1:] - bound).all()


@pytest.mark.parametrize("norm", [True, False])
def test_float32_tolerance_rule(norm):
    s = DiffusionSchedule()
    rowptr, col = graph(211, 0.03, seed=3)
    rows = torch.arange(211)
    m64 = denoiser(211, 65, norm=norm, seed=3)
    m32 = denoiser(211, 65, norm=norm, seed=3, dtype=torch.float32)
    full64 = _sample_reference(m64, kg_rows(rowptr, col, rows, 211, dtype=torch.float64), s)
    ref_v, _ = _sample_topk_reference(m32, rowptr, col, rows, s, 3)
    v, i = sample_topk_hidden(m32, rowptr, col, rows, s, 3, batch_size=100)
    _topk_rule(v, i, ref_v, full64, 3)


def test_bf16_precision_tolerance_rule():
    """bf16 GEMM operands: error at most twice that of the reference denoiser run in bf16."""
    s = DiffusionSchedule()
    rowptr, col = graph(150, 0.04, seed=5)
    rows = torch.arange(150)
    m64 = denoiser(150, 48, seed=5)
    full64 = _sample_reference(m64, kg_rows(rowptr, col, rows, 150, dtype=torch.float64), s)
    m16 = denoiser(150, 48, seed=5, dtype=torch.bfloat16)
    ref16 = _sample_reference(m16, kg_rows(rowptr, col, rows, 150, dtype=torch.bfloat16), s)
    ours = sample_hidden(denoiser(150, 48, seed=5, dtype=torch.float32),
                         kg_rows(rowptr, col, rows, 150), s, precision="bf16")
    assert err(ours, full64) <= 2 * err(ref16, full64), (err(ours, full64), err(ref16, full64))
    v, i = sample_topk(denoiser(150, 48, seed=5, dtype=torch.float32), rowptr, col, rows, s, 2,
                       precision="bf16")
    assert i.shape == (150, 2) and err(v, torch.topk(full64, 2).values) <= 2 * err(ref16, full64)


def test_auto_backend_precision_and_argument_errors():
    assert backend_mod.resolve("diffusion_sample_topk", "auto", "cpu") is _sample_topk_fast
    s = DiffusionSchedule()
    rowptr, col = graph(20, 0.2, seed=1)
    model = denoiser(20, 8, dtype=torch.float32)
    rows = torch.arange(20)
    with pytest.raises(ValueError, match="needs a fused backend"):
        sample_topk(model, rowptr, col, rows, s, 1, precision="bf16", backend="reference")
    with pytest.raises(ValueError, match="precision"):
        sample_topk(model, rowptr, col, rows, s, 1, precision="fp16")
    with pytest.raises(ValueError, match="k=21"):
        sample_topk(model, rowptr, col, rows, s, 21)
    with pytest.raises(ValueError, match="sampling_steps"):
        sample_topk(model, rowptr, col, rows, s, 1, sampling_steps=6)
    # A float16 denoiser has no fused path: auto runs the reference for it.
    half = denoiser(20, 8, dtype=torch.float16)
    want = _sample_topk_reference(half, rowptr, col, rows, s, 1)
    got = sample_topk(half, rowptr, col, rows, s, 1)
    assert torch.equal(got[1], want[1])


# ------------------------------------------------- Triton kernels (interpreter on a CPU)

kernels = pytest.importorskip("diffkg_fast.kernels.diffusion")


@needs_interpreter
@pytest.mark.parametrize("n_rows,hid,n_ent,k,tf32", [
    (37, 52, 203, 1, False), (37, 40, 204, 5, True), (1, 20, 5, 5, False),
    (70, 16, 130, 32, False)])  # H aligned to 4, 8, 4, 16; E to 1, 4, 1, 2 (the ALIGN_*)
def test_linear_topk_interpreter_matches_torch(n_rows, hid, n_ent, k, tf32):
    a, w, b = torch.randn(n_rows, hid), torch.randn(n_ent, hid), torch.randn(n_ent)
    # Small tiles: several column tiles, a partial last one, rows beyond the last row tile.
    v, i = kernels.linear_topk(a, w, b, 0.7, k, tf32=tf32, config=(16, 32, 16, 4, 1))
    want_v, want_i = torch.topk(0.7 * (a @ w.T + b), k, dim=-1)
    torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)
    assert torch.equal(i, want_i)


@needs_interpreter
def test_linear_topk_argument_errors():
    a, w, b = torch.randn(3, 4), torch.randn(6, 4), torch.randn(6)
    with pytest.raises(ValueError, match="k <="):
        kernels.linear_topk(a, w, b, 1.0, kernels.MAX_TOPK + 1)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.linear_topk(a.double(), w.double(), b, 1.0, 1)
    with pytest.raises(ValueError, match="do not chain"):
        kernels.linear_topk(a, w[:, :3], b, 1.0, 1)
    with pytest.raises(ValueError, match="k=7"):
        kernels.linear_topk(a, w, b, 1.0, 7)
    with pytest.raises(ValueError, match="H = 6 to be a multiple of 4"):
        kernels.linear_topk(torch.randn(3, 6), torch.randn(6, 6), b, 1.0, 1)
    with pytest.raises(ValueError, match="H = 4 to be a multiple of 8"):
        kernels.linear_topk(a.bfloat16(), w.bfloat16(), b, 1.0, 1)


@needs_interpreter
def test_fused_topk_falls_back_for_float64_large_k_and_unaligned_h():
    s = DiffusionSchedule()
    rowptr, col = graph(60, 0.08, seed=2)
    model = denoiser(60, 12)  # float64: no kernel, the GEMM and torch.topk
    want = _sample_topk_reference(model, rowptr, col, torch.arange(60), s, 3)
    got = sample_topk_hidden(model, rowptr, col, torch.arange(60), s, 3, fused_topk=True)
    assert torch.equal(got[1], want[1])
    m32 = denoiser(60, 12, dtype=torch.float32)
    k = kernels.MAX_TOPK + 1
    got = sample_topk_hidden(m32, rowptr, col, torch.arange(60), s, k, fused_topk=True)
    assert got[1].shape == (60, k)
    odd = denoiser(60, 13, dtype=torch.float32)  # H = 13: rows not 16-byte aligned
    want = sample_topk_hidden(odd, rowptr, col, torch.arange(60), s, 3, fused_topk=False)
    got = sample_topk_hidden(odd, rowptr, col, torch.arange(60), s, 3, fused_topk=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_interpreter
def test_sample_topk_fused_kernel_interpreter_matches_reference():
    s = DiffusionSchedule()
    rowptr, col = graph(97, 0.05, seed=6)
    rows = torch.randperm(97)[:60]
    m32 = denoiser(97, 40, seed=6, dtype=torch.float32)
    full64 = _sample_reference(denoiser(97, 40, seed=6),
                               kg_rows(rowptr, col, rows, 97, dtype=torch.float64), s)
    ref_v, _ = _sample_topk_reference(m32, rowptr, col, rows, s, 2)
    v, i = sample_topk_hidden(m32, rowptr, col, rows, s, 2, batch_size=25, fused_topk=True)
    _topk_rule(v, i, ref_v, full64, 2)


def _step_torch(a, q, z, y, n, p, w1b2, w2b2, bias, c1, c2, bb, norm):
    """The torch ops of one step of _last_hidden (the spec of kernels.sampler_step)."""
    z, y, n, p = z.clone(), y.clone(), n.clone(), p.clone()
    if q is not None:
        hid = z.shape[1]
        a_m, a_g = q[:, :hid], q[:, hid:]
        a_b = a @ w2b2
        f_sq = (a_g * a).sum(-1) + 2 * a_b + bb
        f_x = (a * y).sum(-1) + p
        n = c1 * c1 * f_sq + 2 * c1 * c2 * f_x + c2 * c2 * n
        p = c1 * (a_b + bb) + c2 * p
        z = c1 * (a_m + w1b2) + c2 * z
        y = c1 * (a_g + w2b2) + c2 * y
    h = z / n.clamp_min(0).sqrt().clamp_min(1e-12)[:, None] if norm else z
    return torch.tanh(h + bias), z, y, n, p


@needs_interpreter
@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("norm", [False, True])
# H aligned to 1, 2, 1, 8 (DiffKG's 1000) and 16 elements: every ALIGN of the kernel.
@pytest.mark.parametrize("n_rows,hid", [(7, 37), (3, 1030), (1, 1), (2, 1000), (2, 48)])
def test_sampler_step_interpreter_matches_torch(update, norm, n_rows, hid):
    _check_sampler_step(update, norm, n_rows, hid, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_sampler_step_every_alignment():
    # Compiled, the alignment is real: vector loads at a wrong ALIGN fault or read past a row.
    for hid in (37, 1030, 1500, 1000, 2064):  # ALIGN 1, 2, 4, 8, 16
        for update in (False, True):
            _check_sampler_step(update, True, 300, hid, "cuda")


def _check_sampler_step(update, norm, n_rows, hid, device):
    g = torch.Generator().manual_seed(hid)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    a, z, y, bias, w1b2, w2b2 = (torch.tanh(r(n_rows, hid)), r(n_rows, hid), r(n_rows, hid),
                                 r(hid), r(hid), r(hid))
    q = r(n_rows, 2 * hid) if update else None
    # Row 0's squared norm ends negative (rounding in the reference's recursion can do that):
    # the clamp then makes the denominator 1e-12, tanh saturates. Large |h| must not overflow.
    n, p = r(n_rows).abs() * 5, r(n_rows)
    if not update:
        n[0] = -1.0
    c1, c2, bb = 0.8, 0.3, 1.7
    want = _step_torch(a, q, z, y, n, p, w1b2, w2b2, bias, c1, c2, bb, norm)
    got = [t.clone() for t in (a, z, y, n, p)]
    kernels.sampler_step(*got, bias, norm=norm, q=q, w1b2=w1b2, w2b2=w2b2, c1=c1, c2=c2, bb=bb)
    for name, g_, w in zip("azynp", got, want, strict=True):
        torch.testing.assert_close(g_, w, rtol=2e-5, atol=2e-5, msg=name)


@needs_interpreter
def test_sampler_step_argument_errors():
    a, z = torch.zeros(2, 4), torch.zeros(2, 4)
    n, p, bias = torch.ones(2), torch.zeros(2), torch.zeros(4)
    with pytest.raises(ValueError, match="z must be a contiguous float32"):
        kernels.sampler_step(a, z.double(), z, n, p, bias, norm=True)
    with pytest.raises(ValueError, match="y must be a contiguous float32"):
        kernels.sampler_step(a, z, torch.zeros(4, 2).T, n, p, bias, norm=True)
    with pytest.raises(ValueError, match="q must be"):
        kernels.sampler_step(a, z, z, n, p, bias, norm=True, q=torch.zeros(2, 8).double(),
                             w1b2=bias, w2b2=bias)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.sampler_step(a, z, z, n, p, torch.zeros(3), norm=True)


@needs_interpreter
@pytest.mark.parametrize("norm", [True, False])
def test_fused_steps_interpreter_match_torch_steps(norm):
    """The whole recursion with the step kernel against the torch steps (float32, sparse and
    noisy starts), and the fused top-k + fused steps path against the reference."""
    s = DiffusionSchedule(steps=4)
    rowptr, col = graph(83, 0.06, seed=8)
    rows = torch.arange(83)
    m32 = denoiser(83, 24, seed=8, dtype=torch.float32, norm=norm)
    x0 = kg_rows(rowptr, col, rows, 83, dtype=torch.float32)
    for steps in (0, 2):
        gen = [torch.Generator().manual_seed(5) for _ in range(2)]
        want = sample_hidden(m32, x0, s, steps, gen[0], fused_steps=False)
        got = sample_hidden(m32, x0, s, steps, gen[1], fused_steps=True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    full64 = _sample_reference(denoiser(83, 24, seed=8, norm=norm),
                               kg_rows(rowptr, col, rows, 83, dtype=torch.float64), s)
    ref_v, _ = _sample_topk_reference(m32, rowptr, col, rows, s, 3)
    v, i = sample_topk_hidden(m32, rowptr, col, rows, s, 3, batch_size=30, fused_topk=True,
                              fused_steps=True)
    _topk_rule(v, i, ref_v, full64, 3)


# ------------------------------------------------------------- Triton kernels, compiled (GPU)

class _tf32:
    """cuBLAS TF32 on or off inside the block (the reference's own float32 products)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old



@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("k", [1, 4])
def test_gpu_sample_topk_matches_reference(k):
    s = DiffusionSchedule()
    rowptr, col = graph(3001, 0.003, seed=k)
    rowptr, col = rowptr.cuda(), col.cuda()
    rows = torch.randperm(3001, device="cuda")
    m32 = denoiser(3001, 200, seed=k, dtype=torch.float32).cuda()
    full64 = _sample_reference(denoiser(3001, 200, seed=k).cuda(),
                               kg_rows(rowptr, col, rows, 3001, dtype=torch.float64), s)
    with _tf32(False):
        ref_v, _ = _sample_topk_reference(m32, rowptr, col, rows, s, k)
        v, i = sample_topk(m32, rowptr, col, rows, s, k, backend="triton")
    _topk_rule(v, i, ref_v, full64, k)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision,dtype", [("tf32", torch.float32), ("bf16", torch.bfloat16)])
def test_gpu_low_precision_tolerance_rule(precision, dtype):
    s = DiffusionSchedule()
    rowptr, col = graph(2001, 0.004, seed=2)
    rowptr, col = rowptr.cuda(), col.cuda()
    rows = torch.arange(2001, device="cuda")
    x64 = kg_rows(rowptr, col, rows, 2001, dtype=torch.float64)
    full64 = _sample_reference(denoiser(2001, 128, seed=2).cuda(), x64, s)
    low = denoiser(2001, 128, seed=2, dtype=dtype).cuda()
    with _tf32(precision == "tf32"):
        ref_low = _sample_reference(low, x64.to(dtype), s)
    v, _ = sample_topk(denoiser(2001, 128, seed=2, dtype=torch.float32).cuda(), rowptr, col,
                       rows, s, 1, backend="triton", precision=precision)
    v64 = torch.topk(full64, 1).values
    assert err(v, v64) <= 2 * err(torch.topk(ref_low.double(), 1).values, v64) + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_auto_uses_triton():
    assert backend_mod.resolve("diffusion_sample_topk", "auto", "cuda") is _sample_topk_fast
