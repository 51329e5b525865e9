"""Fused diffusion sampling: the whole reverse loop in the denoiser's hidden space.

The reference (:func:`diffkg_fast.ops.diffusion._sample_reference`) runs the denoiser ``f`` once
per step on the full ``B × E`` row: two ``B × E × H`` GEMMs a step, ten for DiffKG's 5 steps.
But sampling adds no noise, and every ``x_t`` stays in the span of the start row and the
previous outputs ``f_s = a_s W2ᵀ + b2`` (``a_s = tanh(h_s)``, ``B × H``). So each step needs
only these ``B × H`` / ``B`` summaries of ``x_t``, updated exactly (``W1`` = the ``x`` columns
of the first layer, ``W2``, ``b2`` the second layer, ``c_t`` the step's time bias)::

    z_t = x_t W1ᵀ      y_t = x_t W2      n_t = ‖x_t‖²      p_t = <x_t, b2>

    a_t     = tanh(z_t / max(√n_t, 1e-12) + c_t)            (F.normalize; ``norm=False``: z_t)
    [aM|aG] = a_t [M | G],  M = W2ᵀ W1ᵀ,  G = W2ᵀ W2        (H × 2H, once per call)
    z_{t-1} = c1 (aM + W1 b2)   + c2 z_t                     (x_{t-1} = c1 f_t + c2 x_t)
    y_{t-1} = c1 (aG + W2ᵀ b2)  + c2 y_t
    n_{t-1} = c1² ‖f_t‖² + 2 c1 c2 <f_t, x_t> + c2² n_t
              ‖f_t‖² = <aG, a_t> + 2 <a_t, W2ᵀ b2> + ‖b2‖²,   <f_t, x_t> = <a_t, y_t> + p_t
    p_{t-1} = c1 (<a_t, W2ᵀ b2> + ‖b2‖²) + c2 p_t
    output  = c1_0 (a_0 W2ᵀ + b2)                              (c2_0 = 0 for every schedule)

One ``B × H × 2H`` GEMM a step and one ``B × H × E`` GEMM at the end replace the ten
``B × E × H`` GEMMs; ``M`` and ``G`` cost two more, once per call (amortised over all batches).
The start summaries of a binary KG row (``sampling_steps = 0``) are sparse sums of the rows of
``W1ᵀ`` and ``W2`` (``embedding_bag`` over the row's columns), so the first step never reads a
dense row; a noisy start (``sampling_steps > 0``) takes two dense GEMMs. The final GEMM is
followed by the row top-k; on CUDA the Triton kernel of :mod:`diffkg_fast.kernels.diffusion`
fuses bias, scale and a per-tile top-k into its epilogue so the ``B × E`` output is never
written.

Mathematically this is the reference; numerically it re-associates sums (float64: agreement to
~1e-12; float32: within the reference's own float32 error, see the tests). ``precision``:
``"fp32"`` (default, full-precision products), ``"tf32"`` (CUDA: TF32 tensor-core products) or
``"bf16"`` (bfloat16 weights and activations in the products, float32 accumulation).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffkg_fast.kernels import HAS_TRITON
from diffkg_fast.ops.backend import register
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    _kg_rows_reference,
    _sample_reference,
    _sample_topk_reference,
    check_sampling_steps,
    csr_row_entries,
    draw_timesteps_noise,
    q_sample,
)
from diffkg_fast.ops.graph import csr_offsets

__all__ = ["PRECISIONS", "SamplerFactors", "distinct_entries", "sample_hidden",
           "sample_topk_hidden"]

PRECISIONS = ("fp32", "tf32", "bf16")
_NORM_EPS = 1e-12  # F.normalize's default


@dataclass(frozen=True)
class SamplerFactors:
    """The denoiser's weights folded for sampling, computed once per call (no gradient)."""

    w1t: Tensor  # E × H, the x columns of the first layer, transposed (rows gathered)
    w2: Tensor  # E × H, the second layer's weight
    b2: Tensor  # E
    mg: Tensor  # H × 2H: [M | G] = [W2ᵀ W1ᵀ | W2ᵀ W2]
    w1b2: Tensor  # H: W1 b2
    w2b2: Tensor  # H: W2ᵀ b2
    bb: Tensor  # (): ‖b2‖²
    bb_value: float  # the same on the host (read once per call: no sync per step)
    bias: Tensor  # steps × H: the time bias of every step
    c1: tuple[float, ...]
    c2: tuple[float, ...]
    norm: bool
    precision: str
    mm_dtype: torch.dtype  # dtype of the GEMM operands (bfloat16 under precision="bf16")
    w2_mm: Tensor  # w2 in mm_dtype (the same tensor unless bf16), for the last GEMM

    @staticmethod
    @torch.no_grad()
    def build(denoiser: Denoiser, schedule: DiffusionSchedule,
              precision: str = "fp32") -> SamplerFactors:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        n_ent = denoiser.n_entities
        w1 = denoiser.in_layer.weight[:, :n_ent]
        w2, b2 = denoiser.out_layer.weight, denoiser.out_layer.bias
        c1, c2 = schedule.posterior_coefs()
        if float(c2[0]) != 0.0:  # c2_0 = (1 - abar_{-1}) … = 0 by construction
            raise ValueError("the hidden-space sampler needs c2_0 = 0")
        mm = torch.bfloat16 if precision == "bf16" else w2.dtype
        with _precision(precision, w2.device):
            mg = torch.cat([_mm(w1, w2, mm).T, _mm(w2.T, w2, mm)], 1)
        steps = torch.arange(schedule.steps, device=w2.device)
        bb = b2 @ b2
        return SamplerFactors(
            w1t=w1.T.contiguous(), w2=w2.contiguous(), b2=b2.contiguous(), mg=mg.to(mm),
            w1b2=w1 @ b2, w2b2=w2.T @ b2, bb=bb, bb_value=float(bb),
            bias=denoiser.time_bias(steps),
            c1=tuple(float(v) for v in c1), c2=tuple(float(v) for v in c2),
            norm=denoiser.norm, precision=precision, mm_dtype=mm, w2_mm=w2.contiguous().to(mm))


def _triton_default(flag: bool | None, device: torch.device) -> bool:
    """``fused_topk`` / ``fused_steps``: as given, or (None) on for CUDA tensors when Triton is
    installed."""
    return (HAS_TRITON and device.type == "cuda") if flag is None else flag


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` with operands in ``dtype`` (bf16: float32 accumulation), result in a's dtype."""
    if dtype == a.dtype:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


@contextmanager
def _precision(precision: str, device: torch.device):
    """TF32 tensor-core products inside the block (CUDA only; a no-op elsewhere)."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def distinct_entries(rowptr: Tensor, col: Tensor, rows: Tensor,
                     n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(row_of, cols, ptr)`` of the CSR rows ``rows``' distinct entries, grouped by row
    (position in ``rows``, ascending columns; ``ptr`` their offsets): duplicate CSR entries
    count once, as in ``kg_rows``."""
    row_of, pos = csr_row_entries(rowptr, rows)
    keys = torch.unique(row_of * n_cols + col[pos])  # sorted: grouped by batch row
    row_of, cols = keys // n_cols, keys % n_cols
    return row_of, cols, csr_offsets(row_of, rows.numel())


def _sparse_start(fac: SamplerFactors, cols: Tensor,
                  ptr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z, y, n, p)`` of binary KG rows given by their distinct columns ``cols`` grouped by
    ``ptr`` (:func:`distinct_entries`): sums of ``W1ᵀ`` / ``W2`` rows over each row's columns."""
    offsets, counts = ptr[:-1], ptr[1:] - ptr[:-1]
    z = F.embedding_bag(cols, fac.w1t, offsets, mode="sum")
    y = F.embedding_bag(cols, fac.w2, offsets, mode="sum")
    p = F.embedding_bag(cols, fac.b2[:, None], offsets, mode="sum")[:, 0]
    return z, y, counts.to(z.dtype), p


def _dense_start(fac: SamplerFactors, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z, y, n, p)`` of dense start rows ``x`` (B × E)."""
    return (_mm(x, fac.w1t, fac.mm_dtype), _mm(x, fac.w2, fac.mm_dtype),
            (x * x).sum(-1), x @ fac.b2)


def _last_hidden(fac: SamplerFactors, z: Tensor, y: Tensor, n: Tensor, p: Tensor,
                 fused_steps: bool = False) -> Tensor:
    """Run the recursion from the start summaries down to ``a_0`` (B × H). ``fused_steps``:
    each step's element-wise work in one Triton kernel (float32 only; it updates z, y, n, p in
    place)."""
    if fused_steps and z.dtype == torch.float32:
        return _last_hidden_fused(fac, z, y, n, p)
    for t in range(len(fac.c1) - 1, -1, -1):
        h = z / n.clamp_min(0).sqrt().clamp_min(_NORM_EPS)[:, None] if fac.norm else z
        a = torch.tanh(h + fac.bias[t])
        if t == 0:
            return a
        c1, c2 = fac.c1[t], fac.c2[t]
        q = _mm(a, fac.mg, fac.mm_dtype)
        hid = fac.w1t.shape[1]
        a_m, a_g = q[:, :hid], q[:, hid:]
        a_b = a @ fac.w2b2
        f_sq = (a_g * a).sum(-1) + 2 * a_b + fac.bb
        f_x = (a * y).sum(-1) + p
        n = c1 * c1 * f_sq + 2 * c1 * c2 * f_x + c2 * c2 * n
        p = c1 * (a_b + fac.bb) + c2 * p
        z = c1 * (a_m + fac.w1b2) + c2 * z
        y = c1 * (a_g + fac.w2b2) + c2 * y
    raise AssertionError("unreachable: schedules have at least one step")


def _last_hidden_fused(fac: SamplerFactors, z: Tensor, y: Tensor, n: Tensor,
                       p: Tensor) -> Tensor:
    """:func:`_last_hidden` with one GEMM and one Triton row kernel per step (instead of the
    GEMM and ~33 small torch launches)."""
    from diffkg_fast.kernels.diffusion import sampler_step

    z, y, n, p = (t.contiguous() for t in (z, y, n, p))
    a = torch.empty_like(z)
    last = len(fac.c1) - 1
    bias = fac.bias.to(torch.float32).contiguous()
    w1b2, w2b2 = fac.w1b2.contiguous(), fac.w2b2.contiguous()
    sampler_step(a, z, y, n, p, bias[last], norm=fac.norm)
    for t in range(last, 0, -1):
        q = _mm(a, fac.mg, fac.mm_dtype).contiguous()
        sampler_step(a, z, y, n, p, bias[t - 1], norm=fac.norm, q=q, w1b2=w1b2, w2b2=w2b2,
                     c1=fac.c1[t], c2=fac.c2[t], bb=fac.bb_value)
    return a


def _noisy_start(fac: SamplerFactors, x0: Tensor, schedule: DiffusionSchedule,
                 sampling_steps: int, generator: torch.Generator | None):
    # The reference's draws, call for call: the same generator gives the same noise.
    _, noise = draw_timesteps_noise(x0, 1, generator)
    return _dense_start(fac, q_sample(x0, sampling_steps - 1, noise, schedule))


def _output(fac: SamplerFactors, a: Tensor) -> Tensor:
    """``c1_0 (a W2ᵀ + b2)`` (B × E): the last step's denoised rows."""
    if fac.mm_dtype == a.dtype:
        out = torch.addmm(fac.b2, a, fac.w2.T)
    else:
        out = (a.to(fac.mm_dtype) @ fac.w2_mm.T).to(a.dtype) + fac.b2
    return out.mul_(fac.c1[0])


@torch.no_grad()
def sample_hidden(
    denoiser: Denoiser, x_start: Tensor, schedule: DiffusionSchedule, sampling_steps: int = 0,
    generator: torch.Generator | None = None, *, precision: str = "fp32",
    fused_steps: bool | None = None,
) -> Tensor:
    """:func:`~diffkg_fast.ops.diffusion.sample` through the hidden-space recursion (B × E).

    ``fused_steps``: each reverse step's element-wise work in one Triton kernel (default: on
    CUDA tensors when Triton is installed; ``True`` also runs it on CPU tensors under
    ``TRITON_INTERPRET=1``; float32 only, other dtypes take the torch ops).
    """
    check_sampling_steps(schedule, sampling_steps)
    fac = SamplerFactors.build(denoiser, schedule, precision)
    fused_steps = _triton_default(fused_steps, x_start.device)
    with _precision(precision, x_start.device):
        if sampling_steps > 0:
            start = _noisy_start(fac, x_start, schedule, sampling_steps, generator)
        else:
            start = _dense_start(fac, x_start)
        return _output(fac, _last_hidden(fac, *start, fused_steps=fused_steps))


def _topk_torch(fac: SamplerFactors, a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return torch.topk(_output(fac, a), k, dim=-1)


def _topk_triton(fac: SamplerFactors, a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    from diffkg_fast.kernels.diffusion import MAX_TOPK, linear_topk, linear_topk_aligned

    # The kernel takes float32 / bfloat16 operands, k <= MAX_TOPK (k selection passes per tile)
    # and 16-byte rows (H a multiple of 4 in float32, 8 in bfloat16; DiffKG's 1000 is); a
    # float64 denoiser, a larger k or an odd H takes the GEMM and torch.topk.
    if k > MAX_TOPK or fac.mm_dtype not in (torch.float32, torch.bfloat16) or \
            not linear_topk_aligned(a.shape[1], fac.mm_dtype):
        return _topk_torch(fac, a, k)
    return linear_topk(a.to(fac.mm_dtype), fac.w2_mm, fac.b2, fac.c1[0], k,
                       tf32=fac.precision == "tf32")


@torch.no_grad()
def sample_topk_hidden(
    denoiser: Denoiser, rowptr: Tensor, col: Tensor, rows: Tensor, schedule: DiffusionSchedule,
    k: int, batch_size: int = 1024, sampling_steps: int = 0,
    generator: torch.Generator | None = None, *, precision: str = "fp32",
    fused_topk: bool | None = None, fused_steps: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`~diffkg_fast.ops.diffusion.sample_topk` through the hidden-space recursion.

    ``fused_topk``: the last GEMM and the top-k in one Triton kernel; ``fused_steps``: each
    reverse step's element-wise work in one Triton kernel (float32). Both default to on for CUDA
    tensors when Triton is installed; ``True`` also runs them on CPU tensors under
    ``TRITON_INTERPRET=1``.
    """
    check_sampling_steps(schedule, sampling_steps)
    if k < 1 or k > denoiser.n_entities:
        raise ValueError(f"k={k} not in [1, n_entities={denoiser.n_entities}]")
    fac = SamplerFactors.build(denoiser, schedule, precision)
    topk = _topk_triton if _triton_default(fused_topk, rowptr.device) else _topk_torch
    fused_steps = _triton_default(fused_steps, rowptr.device)
    vals, idx = [], []
    with _precision(precision, rowptr.device):
        for start in range(0, rows.numel(), batch_size):
            batch = rows[start:start + batch_size].to(rowptr.device)
            if sampling_steps > 0:
                x0 = _kg_rows_reference(rowptr, col, batch, denoiser.n_entities,
                                        dtype=fac.w2.dtype)
                summ = _noisy_start(fac, x0, schedule, sampling_steps, generator)
            else:
                _, cols, ptr = distinct_entries(rowptr, col, batch, denoiser.n_entities)
                summ = _sparse_start(fac, cols, ptr)
            v, i = topk(fac, _last_hidden(fac, *summ, fused_steps=fused_steps), k)
            vals.append(v)
            idx.append(i)
    if not vals:
        empty = torch.empty(0, k, device=rowptr.device)
        return empty.to(fac.w2.dtype), empty.long()
    return torch.cat(vals), torch.cat(idx)


# ------------------------------------------------------------------------------ registration
# "cpu": oneDNN / MKL GEMMs and the torch top-k (one batch's output at a time); "triton": the
# same recursion with cuBLAS for the small GEMMs and the fused Triton GEMM + top-k at the end.

def _sample_cpu(denoiser, x_start, schedule, sampling_steps=0, generator=None):
    if not _supported(denoiser):
        return _sample_reference(denoiser, x_start, schedule, sampling_steps, generator)
    return sample_hidden(denoiser, x_start, schedule, sampling_steps, generator)


def _sample_topk_fast(denoiser, rowptr, col, rows, schedule, k, batch_size=1024,
                      sampling_steps=0, generator=None, precision="fp32"):
    if not _supported(denoiser):
        return _sample_topk_reference(denoiser, rowptr, col, rows, schedule, k, batch_size,
                                      sampling_steps, generator)
    return sample_topk_hidden(denoiser, rowptr, col, rows, schedule, k, batch_size,
                              sampling_steps, generator, precision=precision)


_sample_topk_fast.takes_precision = True


def _supported(denoiser: Denoiser) -> bool:
    # float16 / bfloat16 denoisers, or a stand-in that is not a Denoiser: the reference.
    return (isinstance(denoiser, Denoiser)
            and denoiser.out_layer.weight.dtype in (torch.float32, torch.float64))


register("diffusion_sample", "cpu")(_sample_cpu)
register("diffusion_sample_topk", "cpu")(_sample_topk_fast)
register("diffusion_sample_topk", "triton", auto_if=lambda: HAS_TRITON)(_sample_topk_fast)
