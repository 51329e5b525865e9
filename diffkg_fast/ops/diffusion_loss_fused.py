"""Fused diffusion training step: DiffKG's diffusion + CKGC loss with a hand-written backward.

The same loss as :func:`diffkg_fast.ops.diffusion._diffusion_loss_reference` (the oracle)::

    x_in  = dropout(normalize(sqrt(abar_t) x0 + sqrt(1-abar_t) eps))      (prologue, one pass)
    a     = tanh(x_in W1ᵀ + c_t)                                           GEMM 1, bias + tanh
    out   = a W2ᵀ + b2                                                     GEMM 2
    loss  = (1-λ) mean_b(w_t ‖out - x0‖² / E) + λ mean_b(‖out[:, :I] (Rᵀ U) - E_b‖² / d)

    g     = ∂loss/∂out = (1-λ) 2 w_t (out - x0) / (E B)  +  λ 2 (e_hat - E_b)(Rᵀ U)ᵀ / (d B)
    dW2 = gᵀ a,  db2 = Σ_b g,  da = g W2,  dh = da (1 - a²),  dW1 = dhᵀ x_in,  dc_t = dh

Autograd through the reference keeps ~7 B × E temporaries per step (the q_sample terms, the
normalised and dropped-out rows, the mask, the difference and its square; measured on the
Alibaba shape: ~2.5 GB a step). Here the forward writes two: ``x_in`` (kept for ``dW1``) and
``out``, which the loss pass overwrites in place with ``g`` (on CUDA one Triton pass: the
reconstruction is written once and read once before the backward GEMMs read ``g``; on a CPU
three in-place torch passes). The gradient is computed in the forward, scaled by the incoming
scalar in the backward.

Why the prologue is a separate pass and not fused into GEMM 1: ``x_in`` is needed twice (GEMM 1
and ``dW1``). Written once, it costs ~6 row-sized transfers per step (read ``x0``, ``eps``, the
mask; write ``x_in``; read it in both GEMMs); rebuilt inside both GEMMs it costs ~8 (the two
GEMMs read ``x0``, ``eps`` and the mask each, after a norm pass over ``x0`` and ``eps``). Bytes,
not a timing: no GPU was lent to measure it.

The dropout mask is ``bernoulli(1-p) / (1-p)`` drawn from torch's default generator, exactly the
draw ``F.dropout`` makes on a CPU (so on a CPU this backend trains bit-for-bit on the same
masks as the reference; on CUDA ``F.dropout`` draws differently, the mask law is the same).

Backends of ``diffusion_loss``: ``"cpu"`` (torch ops, oneDNN / MKL GEMMs) and ``"triton"``
(CUDA: the prologue and the loss pass are the Triton row kernels of
:mod:`diffkg_fast.kernels.diffusion`, the GEMMs cuBLAS). ``precision="tf32"`` (CUDA) or
``"bf16"`` (bfloat16 GEMM operands, float32 accumulation) trade accuracy for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffkg_fast.kernels import HAS_TRITON
from diffkg_fast.ops.backend import register
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    _diffusion_loss_reference,
    dropout_mask,
    q_sample,
    step_weights_of,
)
from diffkg_fast.ops.diffusion_sample_fused import PRECISIONS, _mm, _precision

__all__ = ["diffusion_loss_fused"]


def _prologue(x0: Tensor, t: Tensor, noise: Tensor, sa: Tensor, sb: Tensor,
              mask: Tensor | None, use_triton: bool) -> Tensor:
    if use_triton:
        from diffkg_fast.kernels.diffusion import denoise_input

        return denoise_input(x0, noise, t, sa, sb, mask)
    x = sa[t].to(x0.dtype)[:, None] * x0
    x.add_(sb[t].to(x0.dtype)[:, None] * noise)
    x = F.normalize(x, dim=-1)
    return x.mul_(mask) if mask is not None else x


def _sq_err_grad(out: Tensor, x0: Tensor, coef: Tensor, use_triton: bool) -> Tensor:
    """Row sums of ``(out - x0)²``; ``out`` becomes ``coef_b (out - x0)`` in place."""
    if use_triton:
        from diffkg_fast.kernels.diffusion import weighted_sq_err

        return weighted_sq_err(out, x0, coef).to(out.dtype)
    diff = out.sub_(x0)
    sq = torch.linalg.vector_norm(diff, dim=-1).square_()
    diff.mul_(coef.to(out.dtype)[:, None])
    return sq


class _DenoiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_in, w1, c_rows, w2, b2, x0, w_rows, r_t_u, e_batch, e_loss, item_count,
                mm_dtype, use_triton):
        n_rows, n_ent = x0.shape
        # The biases as in-place adds after the GEMMs: the code bench/results' accuracy runs
        # used (addmm's beta term would save one B × E pass, small beside the GEMMs).
        a = torch.tanh(_mm(x_in, w1.T, mm_dtype).add_(c_rows))
        out = _mm(a, w2.T, mm_dtype).add_(b2)
        e_diff = out[:, :item_count] @ r_t_u - e_batch
        ckgc = e_diff.square().mean(-1).mean()
        # (1-λ) mean_b(w_b sq_b / E): d/d out = coef_b (out - x0) with this coef.
        coef = (1.0 - e_loss) * 2.0 * w_rows / (n_ent * max(n_rows, 1))
        sq = _sq_err_grad(out, x0, coef, use_triton)  # out is g from here on
        diff = (w_rows * sq / n_ent).mean()
        g = out
        g[:, :item_count].addmm_(e_diff, r_t_u.T, alpha=e_loss * 2.0 / (e_diff.shape[1]
                                                                        * max(n_rows, 1)))
        ctx.save_for_backward(x_in, w2, a, g)
        ctx.mm_dtype = mm_dtype
        loss = (1.0 - e_loss) * diff + e_loss * ckgc
        ctx.mark_non_differentiable(diff, ckgc, sq)
        return loss, diff, ckgc, sq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _gd, _gc, _gs):
        x_in, w2, a, g = ctx.saved_tensors
        mm = ctx.mm_dtype
        gl = grad_loss.to(g.dtype)
        d_w2 = _mm(g.T, a, mm).mul_(gl) if ctx.needs_input_grad[3] else None
        d_b2 = g.sum(0).mul_(gl) if ctx.needs_input_grad[4] else None
        d_h = _mm(g, w2, mm).mul_(gl).mul_(1.0 - a * a)
        d_w1 = _mm(d_h.T, x_in, mm) if ctx.needs_input_grad[1] else None
        return (None, d_w1, d_h, d_w2, d_b2) + (None,) * 8


def diffusion_loss_fused(
    denoiser: Denoiser, x0: Tensor, t: Tensor, noise: Tensor, schedule: DiffusionSchedule,
    item_count: int, R_T_U: Tensor, E_batch: Tensor, e_loss: float, *,
    precision: str = "fp32", use_triton: bool | None = None,
    row_weights: Tensor | None = None, step_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`~diffkg_fast.ops.diffusion.diffusion_loss` with the fused forward / backward
    (``row_weights`` / ``step_weights`` as there: they only change each row's weight ``w_b``).

    ``use_triton``: the Triton row kernels for the prologue and the loss pass (default: on CUDA
    tensors when Triton is installed; ``True`` also runs them on CPU tensors under
    ``TRITON_INTERPRET=1``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if R_T_U.shape[0] != item_count:
        raise ValueError(f"R_T_U has {R_T_U.shape[0]} rows, expected item_count={item_count}")
    if use_triton is None:
        use_triton = HAS_TRITON and x0.device.type == "cuda"
    n_ent = denoiser.n_entities
    abar = schedule.alphas_cumprod.to(x0.device)
    mask = None
    if denoiser.training and denoiser.dropout > 0:
        # F.dropout's CPU draw (zeros, no draw, at p >= 1), or the denoiser's own generator,
        # or the rows of a whole batch's draw a data-parallel rank presets.
        mask = getattr(denoiser, "preset_mask", None)
        if mask is None:
            mask = dropout_mask(x0, denoiser.dropout, denoiser.dropout_generator)
    use_triton = use_triton and x0.dtype == torch.float32  # the row kernels are float32
    if denoiser.norm:
        x_in = _prologue(x0, t, noise, abar.sqrt(), (1.0 - abar).sqrt(), mask, use_triton)
    else:
        x_in = q_sample(x0, t, noise, schedule)
        x_in = x_in.mul_(mask) if mask is not None else x_in
    w = step_weights_of(schedule, step_weights, t, x0)
    w_rows = w if row_weights is None else w * row_weights.to(w.dtype)
    mm = torch.bfloat16 if precision == "bf16" else x0.dtype
    with _precision(precision, x0.device):
        loss, diff, ckgc, sq = _DenoiseLoss.apply(
            x_in, denoiser.in_layer.weight[:, :n_ent], denoiser.time_bias(t),
            denoiser.out_layer.weight, denoiser.out_layer.bias, x0.contiguous(), w_rows,
            R_T_U.detach(), E_batch.detach(), float(e_loss), item_count, mm, use_triton)
    return loss, {"diff": diff.detach(), "ckgc": ckgc.detach(), "rows": w * sq / n_ent}


def _loss_fast(denoiser, x0, t, noise, schedule, item_count, R_T_U, E_batch, e_loss,
               precision="fp32", **weights):
    # A denoiser that is not a Denoiser (a functional_call closure, say) has no weights to fuse.
    if not isinstance(denoiser, Denoiser) or x0.dtype not in (torch.float32, torch.float64):
        return _diffusion_loss_reference(denoiser, x0, t, noise, schedule, item_count, R_T_U,
                                         E_batch, e_loss, **weights)
    return diffusion_loss_fused(denoiser, x0, t, noise, schedule, item_count, R_T_U, E_batch,
                                e_loss, precision=precision, **weights)


_loss_fast.takes_precision = True


register("diffusion_loss", "cpu")(_loss_fast)
register("diffusion_loss", "triton", auto_if=lambda: HAS_TRITON)(_loss_fast)
