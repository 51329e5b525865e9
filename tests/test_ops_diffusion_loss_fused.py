"""The fused diffusion training step (``diffkg_fast.ops.diffusion_loss_fused``: hand-written
backward, in-place loss pass, Triton row kernels) against the reference loss and autograd."""

from __future__ import annotations

import pytest
import torch

from diffkg_fast.ops import backend as backend_mod
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    diffusion_loss,
    draw_timesteps_noise,
)
from diffkg_fast.ops.diffusion_loss_fused import _loss_fast, diffusion_loss_fused

from helpers import needs_interpreter

CUDA = torch.cuda.is_available()


def inputs(n_ent=53, hidden=17, n_items=20, d=8, batch=13, *, dtype=torch.float64, seed=0,
           norm=True, dropout=0.5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    model = Denoiser(n_ent, hidden, 10, norm=norm, dropout=dropout, dtype=torch.float64,
                     generator=g).to(device=device, dtype=dtype)
    x0 = (torch.rand(batch, n_ent, generator=g) < 0.1).to(device=device, dtype=dtype)
    x0[0] = 0  # an isolated entity: an empty KG row
    t, noise = draw_timesteps_noise(x0, 5, g)
    rtu = torch.randn(n_items, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    e_b = torch.randn(batch, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return model, x0, t, noise, rtu, e_b


def run(fn, model, x0, t, noise, rtu, e_b, e_loss, item_count=None, seed=7):
    """Loss, its parts and every parameter gradient, the dropout mask drawn from ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, parts = fn(model, x0, t, noise, DiffusionSchedule(), item_count or rtu.shape[0], rtu,
                     e_b, e_loss)
    loss.backward()
    return [loss.detach(), parts["diff"], parts["ckgc"]] + [p.grad.clone()
                                                           for p in model.parameters()]


def reference(*a, **k):
    return diffusion_loss(*a, **k, backend="reference")


@pytest.mark.parametrize("norm,dropout,e_loss", [
    (True, 0.5, 0.5), (True, 0.0, 0.0), (False, 0.3, 1.0), (True, 0.5, 0.01), (True, 1.0, 0.5)])
@pytest.mark.parametrize("training", [True, False])
def test_loss_and_gradients_match_reference_float64(norm, dropout, e_loss, training):
    model, *data = inputs(norm=norm, dropout=dropout)
    model.train(training)
    want = run(reference, model, *data, e_loss)
    got = run(diffusion_loss_fused, model, *data, e_loss)
    for name, a, b in zip(["loss", "diff", "ckgc"] + [n for n, _ in model.named_parameters()],
                          got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)


def test_items_cover_every_entity_and_one_row():
    # item_count == n_entities (every entity is an item) and a batch of one row.
    model, *data = inputs(n_ent=21, n_items=21, batch=1)
    for a, b in zip(run(diffusion_loss_fused, model, *data, 0.5),
                    run(reference, model, *data, 0.5), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_float32_tolerance_rule():
    """Error against float64 at most twice the reference's own float32 error (+ noise)."""
    m64, *d64 = inputs(n_ent=301, hidden=64, batch=40, seed=3)
    m32, *d32 = inputs(n_ent=301, hidden=64, batch=40, seed=3, dtype=torch.float32)
    d32[1] = d64[1]  # the same time steps
    want = run(reference, m64, *d64, 0.5)
    base = run(reference, m32, *d32, 0.5)
    got = run(diffusion_loss_fused, m32, *d32, 0.5)
    for g, b, w in zip(got, base, want, strict=True):
        e_got, e_base = (g.double() - w).abs().max(), (b.double() - w).abs().max()
        assert e_got <= 2 * e_base + 1e-6 * w.abs().max(), (e_got, e_base)


@pytest.mark.parametrize("seed", [1, 4])
def test_bf16_precision_tolerance_rule(seed):
    kw = {"n_ent": 301, "hidden": 64, "batch": 40, "seed": seed, "dropout": 0.0}
    m64, *d64 = inputs(**kw)
    m16, *d16 = inputs(**kw, dtype=torch.bfloat16)
    m32, *d32 = inputs(**kw, dtype=torch.float32)
    d16[1] = d32[1] = d64[1]
    want = run(reference, m64, *d64, 0.5)
    base = run(reference, m16, *d16, 0.5)
    got = run(lambda *a: diffusion_loss_fused(*a, precision="bf16"), m32, *d32, 0.5)
    _bf16_rule(got, base, want)


def _bf16_rule(got, base, want):
    """The tolerance rule for bf16 runs. The reference's scalars (loss and its parts) are
    rounded to bf16 at the end, so their error is luck within half a unit (measured over four
    seeds: 0.015 to 0.37 on a loss of 52-132); a scalar's bound is twice the larger of that
    error and one bf16 unit (2^-8 of the value). Gradients: twice the reference's error."""
    for j, (g, b, w) in enumerate(zip(got, base, want, strict=True)):
        e_got, e_base = (g.double() - w).abs().max(), (b.double() - w).abs().max()
        if j < 3:
            e_base = max(e_base, 2.0 ** -8 * w.abs().max())
        assert e_got <= 2 * e_base + 1e-6 * w.abs().max(), (j, e_got, e_base)


class _Loss(torch.nn.Module):
    """The fused loss as a module, so gradcheck can swap the denoiser's parameters."""

    def __init__(self, model, data):
        super().__init__()
        self.model, self.data = model, data

    def forward(self):
        return diffusion_loss_fused(self.model, *self.data[:3], DiffusionSchedule(),
                                    self.data[3].shape[0], *self.data[3:], 0.4)[0]


def test_gradcheck_float64():
    model, *data = inputs(n_ent=9, hidden=5, n_items=4, d=3, batch=4, dropout=0.0)
    module = _Loss(model.eval(), data)
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def f(*ps):
        return torch.func.functional_call(module, dict(zip(names, ps, strict=True)), ())

    assert torch.autograd.gradcheck(f, params)


def test_trains_like_the_reference():
    """Five Adam steps with dropout: the same weights (the same masks are drawn)."""
    weights = []
    for fn in (reference, diffusion_loss_fused):
        model, *data = inputs(seed=5)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(11)
        for _ in range(5):
            loss, _ = fn(model, *data[:3], DiffusionSchedule(), 20, *data[3:], 0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_auto_backend_and_errors():
    assert backend_mod.resolve("diffusion_loss", "auto", "cpu") is _loss_fast
    model, x0, t, noise, rtu, e_b = inputs(dtype=torch.float32)
    s = DiffusionSchedule()
    with pytest.raises(ValueError, match="needs a fused backend"):
        diffusion_loss(model, x0, t, noise, s, 20, rtu, e_b, 0.5, backend="reference",
                       precision="tf32")
    with pytest.raises(ValueError, match="precision"):
        diffusion_loss(model, x0, t, noise, s, 20, rtu, e_b, 0.5, precision="fp8")
    with pytest.raises(ValueError, match="item_count"):
        diffusion_loss(model, x0, t, noise, s, 19, rtu, e_b, 0.5)


# ------------------------------------------------- Triton kernels (interpreter on a CPU)

kernels = pytest.importorskip("diffkg_fast.kernels.diffusion")


@needs_interpreter
# One row block, and two or three with a partial one; row lengths aligned to 1, 4 and 16
# elements (the kernels' ALIGN).
@pytest.mark.parametrize("n_ent", [53, 1500, 2064])
def test_triton_row_kernels_interpreter_match_torch(n_ent):
    model, *data = inputs(n_ent=n_ent, batch=6, dtype=torch.float32)
    want = run(lambda *a: diffusion_loss_fused(*a, use_triton=False), model, *data, 0.5)
    got = run(lambda *a: diffusion_loss_fused(*a, use_triton=True), model, *data, 0.5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The loss pass alone: sums, and the in-place gradient.
    out, x0, coef = torch.randn(5, n_ent), (torch.rand(5, n_ent) < 0.1).float(), torch.rand(5)
    o = out.clone()
    torch.testing.assert_close(kernels.weighted_sq_err(o, x0), ((out - x0) ** 2).sum(-1))
    assert torch.equal(o, out)  # no coef: out untouched
    kernels.weighted_sq_err(o, x0, coef)
    torch.testing.assert_close(o, coef[:, None] * (out - x0))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.weighted_sq_err(out.T, x0.T)


# ------------------------------------------------------------- Triton kernels, compiled (GPU)

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_row_kernels_every_alignment():
    # Compiled, the alignment is real: vector loads at a wrong ALIGN fault or read past a row.
    for n_ent in (53, 1030, 1500, 1000, 2064):  # ALIGN 1, 2, 4, 8, 16
        model, *data = inputs(n_ent=n_ent, batch=40, dtype=torch.float32, device="cuda")
        want = run(lambda *a: diffusion_loss_fused(*a, use_triton=False), model, *data, 0.5)
        got = run(lambda *a: diffusion_loss_fused(*a, use_triton=True), model, *data, 0.5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_triton_matches_reference_float64_and_float32():
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        model, *data = inputs(n_ent=3001, hidden=200, batch=97, dtype=dtype, device="cuda",
                              dropout=0.0)
        want = run(reference, model, *data, 0.5)
        got = run(lambda *a: diffusion_loss(*a, backend="triton"), model, *data, 0.5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision,dtype", [("tf32", torch.float32), ("bf16", torch.bfloat16)])
def test_gpu_low_precision_tolerance_rule(precision, dtype):
    kw = {"n_ent": 3001, "hidden": 200, "batch": 97, "dropout": 0.0, "device": "cuda"}
    m64, *d64 = inputs(**kw)
    mlo, *dlo = inputs(**kw, dtype=dtype)
    m32, *d32 = inputs(**kw, dtype=torch.float32)
    want = run(reference, m64, *d64, 0.5)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        base = run(reference, mlo, *dlo, 0.5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    got = run(lambda *a: diffusion_loss(*a, precision=precision), m32, *d32, 0.5)
    _bf16_rule(got, base, want)
