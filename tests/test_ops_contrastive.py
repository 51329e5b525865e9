"""logsumexp_mm: the one-buffer CPU backend against the reference (bitwise), gradcheck, edges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffkg_fast.ops import backend as backend_mod
from diffkg_fast.ops.contrastive import _logsumexp_mm_lean, logsumexp_mm


def _pair(b, n, d, *, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(b, d, generator=g, dtype=dtype) * scale).requires_grad_(True)
    c = (torch.randn(n, d, generator=g, dtype=dtype) * scale).requires_grad_(True)
    return a, c


def _run(a, c, backend, weights):
    a_, c_ = a.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)
    out = logsumexp_mm(a_, c_, backend=backend)
    (out * weights).sum().backward()
    return out.detach(), a_.grad, c_.grad


@pytest.mark.parametrize("b,n,d", [(1, 1, 1), (7, 13, 3), (64, 301, 64), (130, 6, 17), (0, 5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_backend_is_bitwise_the_reference(b, n, d, dtype):
    # Same operations in the same order (module docstring): equal, not close. Logits up to
    # ±80 (scale 3, d 64, as at temp 0.1 on unit rows with a wider spread) stay finite.
    a, c = _pair(b, n, d, dtype=dtype, seed=b + n, scale=3.0)
    w = torch.randn(b, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got, want = _run(a, c, "cpu", w), _run(a, c, "reference", w)
    for name, x, y in zip(("lse", "grad a", "grad b"), got, want, strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("chunk_bytes", [1, None])
def test_cpu_backend_in_chunks_is_bitwise_the_reference(monkeypatch, chunk_bytes):
    """The elementwise passes run a cache-sized chunk of rows at a time: with 8-row chunks (the
    last one partial) and at the medication size (1,024 × 6,350, 41-row chunks), still the
    reference's bits."""
    from diffkg_fast.ops import contrastive

    b, n = (130, 301) if chunk_bytes else (1024, 6350)
    if chunk_bytes:
        monkeypatch.setattr(contrastive, "_CHUNK_BYTES", chunk_bytes)
    a, c = _pair(b, n, 64, seed=5, scale=3.0)
    w = torch.randn(b, generator=torch.Generator().manual_seed(2))
    assert len(contrastive._chunks(torch.empty(b, n))) > 1
    got, want = _run(a, c, "cpu", w), _run(a, c, "reference", w)
    for name, x, y in zip(("lse", "grad a", "grad b"), got, want, strict=True):
        assert torch.equal(x, y), name


def test_info_nce_shape_bitwise_with_shared_rows():
    # As info_nce calls it: a is rows of b's view (scaled by 1/temp), so b also gets the
    # positive term's gradient; the accumulated gradients are bitwise the reference's too.
    def loss(backend, v1, v2, nodes):
        z1 = F.normalize(v1[nodes], dim=-1) / 0.1
        z2 = F.normalize(v2, dim=-1)
        return (logsumexp_mm(z1, z2, backend=backend) - (z1 * z2[nodes]).sum(-1)).mean()

    g = torch.Generator().manual_seed(3)
    v1, v2 = torch.randn(500, 64, generator=g), torch.randn(500, 64, generator=g)
    nodes = torch.randint(0, 500, (200,), generator=g)
    res = {}
    for backend in ("cpu", "reference"):
        p1, p2 = v1.clone().requires_grad_(True), v2.clone().requires_grad_(True)
        out = loss(backend, p1, p2, nodes)
        out.backward()
        res[backend] = (out.detach(), p1.grad, p2.grad)
    for x, y in zip(res["cpu"], res["reference"], strict=True):
        assert torch.equal(x, y)


def test_gradcheck_float64_and_one_sided_gradients():
    a, c = _pair(5, 9, 4, dtype=torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda x, y: _logsumexp_mm_lean(x, y), (a, c))
    # Only one input needs a gradient: the other's is not computed, the values still match.
    out = _logsumexp_mm_lean(a.detach(), c)
    (gc,) = torch.autograd.grad(out.sum(), c)
    torch.testing.assert_close(out, torch.logsumexp(a.detach() @ c.detach().T, -1))
    assert gc.shape == c.shape


def test_no_grad_empty_columns_and_retained_graph():
    a, c = _pair(4, 6, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(logsumexp_mm(a, c), torch.logsumexp(a @ c.T, -1))
    empty = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(logsumexp_mm(a, empty), torch.full((4,), -torch.inf, dtype=torch.float64))
    # The first backward consumes the kept logits; a second one through the retained graph
    # recomputes them into the same buffer: the same result.
    out = logsumexp_mm(a, c)
    g1 = torch.autograd.grad(out.sum(), (a, c), retain_graph=True)
    g2 = torch.autograd.grad(out.sum(), (a, c))
    assert all(torch.equal(x, y) for x, y in zip(g1, g2, strict=True))


def test_inside_torch_compile():
    # Under torch.compile the op traces the reference (torch 2.11's AOTAutograd got the reused
    # buffer's gradient wrong); inductor fuses the element-wise passes, so the values equal the
    # eager reference to float32 rounding, not bitwise.
    a, c = _pair(7, 11, 5, seed=4)
    w = torch.randn(7, generator=torch.Generator().manual_seed(2))
    fn = torch.compile(lambda x, y: (logsumexp_mm(x, y, backend="cpu") * w).sum())
    out = fn(a, c)
    got = (out, *torch.autograd.grad(out, (a, c)))
    ref = (torch.logsumexp(a @ c.T, -1) * w).sum()
    want = (ref, *torch.autograd.grad(ref, (a, c)))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_reference_with_one_block():
    assert backend_mod.resolve("logsumexp_mm", "auto", "cuda") is _logsumexp_mm_lean
    a, c = (t.detach().cuda().requires_grad_(True) for t in _pair(1024, 20_000, 64, seed=5))
    w = torch.randn(1024, device="cuda")
    peak, res = {}, {}
    for backend in ("cuda", "reference"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res[backend] = _run(a, c, backend, w)
        torch.cuda.synchronize()
        peak[backend] = torch.cuda.max_memory_allocated() - base
    for x, y in zip(res["cuda"], res["reference"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    block = 1024 * 20_000 * 4  # one B × N float32 block
    assert peak["cuda"] < 1.5 * block < peak["reference"], peak


def test_auto_backend_and_argument_errors():
    assert backend_mod.resolve("logsumexp_mm", "auto", "cpu") is _logsumexp_mm_lean
    a = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"a \(3, 4\) and b \(5, 2\)"):
        logsumexp_mm(a, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="float64"):
        logsumexp_mm(a, torch.zeros(5, 4, dtype=torch.float64))
