"""Triton kernels of the fused diffusion: the sampler's last GEMM with the row top-k in its
epilogue (``linear_topk``), and the training step's row passes (``denoise_input``,
``weighted_sq_err``). Specifications: ``diffkg_fast.ops.diffusion`` (reference) and
``diffkg_fast.ops.diffusion_fused``.

``linear_topk`` (rebuild; ``A`` = the last step's ``tanh`` activations, B × H)::

    out[b, e] = scale · (sum_h A[b, h] W[e, h] + bias[e])          (W = out_layer.weight, E × H)
    top-k of every row of out, without writing out

One program owns a ``BLOCK_M × BLOCK_N`` tile of ``out``: it accumulates the tile over ``H`` in
``BLOCK_K`` steps with ``tl.dot`` (float32 accumulation; ``ieee`` or ``tf32`` inputs, or
bfloat16 operands), adds the bias, scales, and keeps the tile's own top-k per row (``K``
passes of max / argmax / mask-out), written as ``K`` candidates per row and tile.
A ``torch.topk`` over the ``ceil(E / BLOCK_N) · K`` candidates of each row gives the result
(the row top-k is among the tile top-ks). The row-tile index is the fast grid axis, so the
programs that share a ``W`` tile run together and ``W`` is read from DRAM about once.

``denoise_input`` (training prologue, one program per row, two passes over the row)::

    x_t  = sa[t_b] x0 + sb[t_b] noise                     (q_sample)
    x_in = x_t / max(‖x_t‖, 1e-12) · mask        (F.normalize; dropout: mask ∈ {0, 1/(1-p)})

``sampler_step`` (rebuild: one reverse step of the hidden-space sampler of
``diffkg_fast.ops.diffusion_sample_fused``, one program per row, in place; ``q = a [M | G]`` is
the step's cuBLAS GEMM, ``q_m``, ``q_g`` its two halves)::

    f_sq = <q_g, a> + 2 <a, W2ᵀb2> + ‖b2‖²      f_x = <a, y> + p                (pass 1)
    n ← c1² f_sq + 2 c1 c2 f_x + c2² n         p ← c1 (<a, W2ᵀb2> + ‖b2‖²) + c2 p
    z ← c1 (q_m + W1 b2) + c2 z                y ← c1 (q_g + W2ᵀb2) + c2 y     (pass 2)
    a ← tanh(z / max(√n, 1e-12) + c)                                         (the next step's)

With ``update=False`` only the last line (the first step's activation). It replaces ~33 small
torch launches per step (the row sums, the updates, normalise, bias, tanh).

``weighted_sq_err`` (training loss, one program per row): ``sum_e (out - x0)²``, and with
``GRAD`` the gradient ``coef_b (out - x0)`` written over ``out`` in place (the reconstruction is
written once by the GEMM, read once here, then read by the two backward GEMMs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._align import _align
from ._launch import on_device

__all__ = ["MAX_TOPK", "TOPK_CONFIG", "denoise_input", "linear_topk", "linear_topk_aligned",
           "sampler_step", "weighted_sq_err"]

MAX_TOPK = 32  # K selection passes over the tile in the epilogue; rebuild_k is 1 by default
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's default (a constexpr global: see attention.py)
# Elements of a row per step of the row kernels: 4 fp32 per thread at 8 warps, so every load is
# one 16-byte LDG.E.128 (checked by tests/test_kernels_compile.py). One width for every E: a
# short row only masks lanes, and one configuration is one compile to check.
ROW_BLOCK = 1024
# Hidden units per step of sampler_step: 1024 covers DiffKG's H = 1000 in one iteration of each
# pass; 4 warps keep it at 8 fp32 per thread.
STEP_BLOCK = 1024

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of linear_topk per operand precision:
# tensor-core tiles of Triton's matmul tutorial for tf32 / bf16 (sm_90: 117-139 registers, no
# spills); IEEE float32 runs on the FMA units, where a 128 × 128 tile took 254 registers (one
# block per SM), so it gets 64 × 64. Not tuned on a GPU yet (none was lent):
# bench_diffusion.py times them there.
TOPK_CONFIG = {"ieee": (64, 64, 32, 4, 3), "tf32": (128, 128, 32, 8, 3),
               "bf16": (128, 128, 64, 8, 3)}


@triton.jit
def _linear_topk_kernel(A, W, bias, cand_val, cand_idx, B, E_n, H_k, scale, n_cand, K,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        TF32: tl.constexpr, ALIGN_K: tl.constexpr, ALIGN_N: tl.constexpr):
    H = H_k * ALIGN_K  # sizes come divided by their alignment: see _align
    E = E_n * ALIGN_N
    # One grid axis, row tiles fastest: a 2-D grid's y-axis (65,535) capped E at 4.2M columns.
    m_tiles = tl.cdiv(B, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % m_tiles
    pid_n = pid // m_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < B
    nmask = offs_n < E
    rows_a = A + offs_m.to(tl.int64)[:, None] * H  # A and W are contiguous: row stride H
    rows_w = W + offs_n.to(tl.int64)[None, :] * H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < H
        a = tl.load(rows_a + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(rows_w + offs_k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if TF32:
            acc = tl.dot(a, w, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, w, acc, input_precision="ieee")
    b = tl.load(bias + offs_n, mask=nmask, other=0.0).to(tl.float32)
    v = (acc + b[None, :]) * scale
    v = tl.where(nmask[None, :], v, float("-inf"))
    lane = tl.arange(0, BLOCK_N)
    out = offs_m.to(tl.int64) * n_cand + pid_n * K
    for j in range(K):  # a runtime loop: one compiled kernel for every k
        best = tl.max(v, axis=1)
        arg = tl.argmax(v, axis=1)  # the lowest lane of a tie
        tl.store(cand_val + out + j, best, mask=mmask)
        tl.store(cand_idx + out + j, pid_n * BLOCK_N + arg.to(tl.int64), mask=mmask)
        v = tl.where(lane[None, :] == arg[:, None], float("-inf"), v)


def linear_topk(a: Tensor, w: Tensor, bias: Tensor, scale: float, k: int, *, tf32: bool = False,
                config: tuple[int, int, int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` of every row of ``scale · (a wᵀ + bias)`` → ``(values, indices)``, each (B, k),
    values in float32, sorted descending. ``a`` (B × H) and ``w`` (E × H) float32 or bfloat16."""
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"linear_topk takes 1 <= k <= {MAX_TOPK}, got {k}")
    if a.dtype != w.dtype or a.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"linear_topk takes float32 or bfloat16 operands, got {a.dtype}, "
                         f"{w.dtype}")
    (n_rows, hid), n_ent = a.shape, w.shape[0]
    if w.shape[1] != hid or bias.shape != (n_ent,):
        raise ValueError(f"shapes a {tuple(a.shape)}, w {tuple(w.shape)}, bias "
                         f"{tuple(bias.shape)} do not chain")
    if k > n_ent:
        raise ValueError(f"k={k} > {n_ent} columns")
    a, w, bias = a.contiguous(), w.contiguous(), bias.contiguous()
    if not linear_topk_aligned(hid, a.dtype):
        raise ValueError(f"linear_topk needs H = {hid} to be a multiple of "
                         f"{16 // a.dtype.itemsize} for {a.dtype} (16-byte rows: unaligned, "
                         f"the kernel spills); take the GEMM and torch.topk instead")
    prec = "bf16" if a.dtype == torch.bfloat16 else "tf32" if tf32 else "ieee"
    bm, bn, bk, warps, stages = config or TOPK_CONFIG[prec]
    n_tiles = triton.cdiv(n_ent, bn)
    cand_val = torch.empty(n_rows, n_tiles * k, device=a.device, dtype=torch.float32)
    cand_idx = torch.empty(n_rows, n_tiles * k, device=a.device, dtype=torch.int64)
    if n_rows:
        grid = (triton.cdiv(n_rows, bm) * n_tiles,)
        ak, an = _align(hid), _align(n_ent)
        with on_device(a):
            _linear_topk_kernel[grid](a, w, bias, cand_val, cand_idx, n_rows, n_ent // an,
                                      hid // ak, float(scale), n_tiles * k, k,
                                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, TF32=prec == "tf32",
                                      ALIGN_K=ak, ALIGN_N=an, num_warps=warps,
                                      num_stages=stages)
    vals, pos = torch.topk(cand_val, k, dim=-1)
    return vals, cand_idx.gather(1, pos)


def linear_topk_aligned(hid: int, dtype: torch.dtype) -> bool:
    """Whether :func:`linear_topk` takes rows of ``hid`` elements of ``dtype``: 16-byte rows."""
    return hid % (16 // dtype.itemsize) == 0


@triton.jit
def _denoise_input_kernel(x0, noise, t, sa, sb, mask, x_in, E_a, HAS_MASK: tl.constexpr,
                          BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    E = E_a * ALIGN  # see _align
    row = tl.program_id(0)
    base = row.to(tl.int64) * E
    step = tl.load(t + row)
    ca = tl.load(sa + step)
    cb = tl.load(sb + step)
    sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for e0 in range(0, E, BLOCK):  # pass 1: ‖x_t‖²
        offs = e0 + tl.arange(0, BLOCK)
        m = offs < E
        xt = ca * tl.load(x0 + base + offs, mask=m, other=0.0).to(tl.float32) + \
            cb * tl.load(noise + base + offs, mask=m, other=0.0).to(tl.float32)
        sq += xt * xt
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), NORM_EPS)
    for e0 in range(0, E, BLOCK):  # pass 2: normalised, dropped out
        offs = e0 + tl.arange(0, BLOCK)
        m = offs < E
        xt = ca * tl.load(x0 + base + offs, mask=m, other=0.0).to(tl.float32) + \
            cb * tl.load(noise + base + offs, mask=m, other=0.0).to(tl.float32)
        xt = xt * inv
        if HAS_MASK:
            xt = xt * tl.load(mask + base + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(x_in + base + offs, xt.to(x_in.dtype.element_ty), mask=m)


def denoise_input(x0: Tensor, noise: Tensor, t: Tensor, sqrt_abar: Tensor,
                  sqrt_one_minus_abar: Tensor, mask: Tensor | None,
                  out_dtype: torch.dtype | None = None) -> Tensor:
    """``normalize(q_sample(x0, t, noise)) · mask`` (B × E) in one pass pair per row; float32
    arithmetic. ``mask`` holds 0 or ``1/(1-p)`` (dropout), ``None`` for none."""
    x0, noise = x0.contiguous(), noise.contiguous()
    n_rows, n_ent = x0.shape
    x_in = torch.empty(n_rows, n_ent, device=x0.device, dtype=out_dtype or x0.dtype)
    if n_rows and n_ent:
        align = _align(n_ent)
        with on_device(x0):
            _denoise_input_kernel[(n_rows,)](
                x0, noise, t.contiguous(), sqrt_abar.to(torch.float32).contiguous(),
                sqrt_one_minus_abar.to(torch.float32).contiguous(),
                x0 if mask is None else mask.contiguous(), x_in, n_ent // align,
                HAS_MASK=mask is not None, BLOCK=ROW_BLOCK, ALIGN=align, num_warps=8)
    return x_in


@triton.jit
def _weighted_sq_err_kernel(out, x0, coef, sq, E_a, GRAD: tl.constexpr, BLOCK: tl.constexpr,
                            ALIGN: tl.constexpr):
    E = E_a * ALIGN  # see _align
    row = tl.program_id(0)
    base = row.to(tl.int64) * E
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    c = tl.load(coef + row) if GRAD else 0.0
    for e0 in range(0, E, BLOCK):
        offs = e0 + tl.arange(0, BLOCK)
        m = offs < E
        diff = tl.load(out + base + offs, mask=m, other=0.0).to(tl.float32) - \
            tl.load(x0 + base + offs, mask=m, other=0.0).to(tl.float32)
        acc += diff * diff
        if GRAD:
            tl.store(out + base + offs, (c * diff).to(out.dtype.element_ty), mask=m)
    tl.store(sq + row, tl.sum(acc, axis=0))


def weighted_sq_err(out: Tensor, x0: Tensor, coef: Tensor | None = None) -> Tensor:
    """Per-row ``sum_e (out - x0)²`` (B,) in float32; with ``coef`` (B,), ``out`` is overwritten
    by the gradient ``coef_b (out - x0)`` in the same pass."""
    if not (out.is_contiguous() and x0.is_contiguous()):
        raise ValueError("weighted_sq_err needs contiguous rows (it may write out in place)")
    n_rows, n_ent = out.shape
    sq = torch.zeros(n_rows, device=out.device, dtype=torch.float32)
    if n_rows and n_ent:
        align = _align(n_ent)
        with on_device(out):
            _weighted_sq_err_kernel[(n_rows,)](
                out, x0, out if coef is None else coef.to(torch.float32).contiguous(), sq,
                n_ent // align, GRAD=coef is not None, BLOCK=ROW_BLOCK, ALIGN=align,
                num_warps=8)
    return sq


@triton.jit
def _tanh(x):
    # tanh(|x|) = (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]: no overflow for any x; the
    # absolute error stays ~1e-7 (the activations are O(1) inputs of a GEMM).
    e = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -r, r)


@triton.jit
def _sampler_step_kernel(a, q, z, y, n, p, w1b2, w2b2, bias, H_a, c1, c2, bb,
                         UPDATE: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr,
                         ALIGN: tl.constexpr):
    H = H_a * ALIGN  # see _align
    row = tl.program_id(0)
    base = row.to(tl.int64) * H
    qbase = base * 2
    n_row = tl.load(n + row)
    if UPDATE:
        s_ga = tl.zeros((BLOCK,), dtype=tl.float32)
        s_ab = tl.zeros((BLOCK,), dtype=tl.float32)
        s_ay = tl.zeros((BLOCK,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK):  # pass 1: the row sums of the old a
            offs = h0 + tl.arange(0, BLOCK)
            m = offs < H
            av = tl.load(a + base + offs, mask=m, other=0.0)
            s_ga += av * tl.load(q + qbase + H + offs, mask=m, other=0.0)
            s_ab += av * tl.load(w2b2 + offs, mask=m, other=0.0)
            s_ay += av * tl.load(y + base + offs, mask=m, other=0.0)
        a_b = tl.sum(s_ab, axis=0)
        f_sq = tl.sum(s_ga, axis=0) + 2.0 * a_b + bb
        p_row = tl.load(p + row)
        f_x = tl.sum(s_ay, axis=0) + p_row
        n_row = c1 * c1 * f_sq + 2.0 * c1 * c2 * f_x + c2 * c2 * n_row
        tl.store(n + row, n_row)
        tl.store(p + row, c1 * (a_b + bb) + c2 * p_row)
    denom = tl.maximum(tl.sqrt(tl.maximum(n_row, 0.0)), NORM_EPS)
    for h0 in range(0, H, BLOCK):  # pass 2: the new z, y and the next step's a, in place
        offs = h0 + tl.arange(0, BLOCK)
        m = offs < H
        zv = tl.load(z + base + offs, mask=m, other=0.0)
        if UPDATE:
            zv = c1 * (tl.load(q + qbase + offs, mask=m, other=0.0)
                       + tl.load(w1b2 + offs, mask=m, other=0.0)) + c2 * zv
            yv = c1 * (tl.load(q + qbase + H + offs, mask=m, other=0.0)
                       + tl.load(w2b2 + offs, mask=m, other=0.0)) \
                + c2 * tl.load(y + base + offs, mask=m, other=0.0)
            tl.store(z + base + offs, zv, mask=m)
            tl.store(y + base + offs, yv, mask=m)
        h = zv / denom if NORM else zv
        tl.store(a + base + offs, _tanh(h + tl.load(bias + offs, mask=m, other=0.0)), mask=m)


def sampler_step(a: Tensor, z: Tensor, y: Tensor, n: Tensor, p: Tensor, bias: Tensor, *,
                 norm: bool, q: Tensor | None = None, w1b2: Tensor | None = None,
                 w2b2: Tensor | None = None, c1: float = 0.0, c2: float = 0.0,
                 bb: float = 0.0) -> None:
    """One reverse step of the hidden-space sampler, in place on float32 ``a``, ``z``, ``y``
    (B × H), ``n``, ``p`` (B): with ``q`` (B × 2H, ``a [M | G]``) the update of the summaries
    and then the next activation ``a = tanh(z / max(√n, 1e-12) + bias)``; without ``q`` only
    that activation (``a`` is then output only). ``bias`` (H,) is the next step's time bias."""
    update = q is not None
    tensors = {"a": a, "z": z, "y": y, "n": n, "p": p, "bias": bias}
    if update:
        tensors.update(q=q, w1b2=w1b2, w2b2=w2b2)
    for name, t in tensors.items():
        if t is None or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"sampler_step: {name} must be a contiguous float32 tensor")
    n_rows, hid = z.shape
    if a.shape != z.shape or y.shape != z.shape or n.shape != (n_rows,) or \
            p.shape != (n_rows,) or bias.shape != (hid,) or \
            (update and (q.shape != (n_rows, 2 * hid) or w1b2.shape != (hid,)
                         or w2b2.shape != (hid,))):
        raise ValueError(f"sampler_step: shapes do not match z {tuple(z.shape)}")
    if n_rows and hid:
        align = _align(hid)
        with on_device(z):
            _sampler_step_kernel[(n_rows,)](
                a, q if update else a, z, y, n, p, w1b2 if update else bias,
                w2b2 if update else bias, bias, hid // align, float(c1), float(c2), float(bb),
                UPDATE=update, NORM=norm, BLOCK=STEP_BLOCK, ALIGN=align, num_warps=4)
