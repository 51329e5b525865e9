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

``weighted_sq_err`` (training loss, one program per row): ``sum_e (out - x0)²``, and with
``GRAD`` the gradient ``coef_b (out - x0)`` written over ``out`` in place (the reconstruction is
written once by the GEMM, read once here, then read by the two backward GEMMs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MAX_TOPK", "TOPK_CONFIG", "denoise_input", "linear_topk", "weighted_sq_err"]

MAX_TOPK = 32  # K selection passes over the tile in the epilogue; rebuild_k is 1 by default
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's default (a constexpr global: see attention.py)
# Elements of a row per step of the row kernels: 4 fp32 per thread at 8 warps, so every load is
# one 16-byte LDG.E.128 (checked by tests/test_kernels_compile.py). One width for every E: a
# short row only masks lanes, and one configuration is one compile to check.
ROW_BLOCK = 1024

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of linear_topk per operand precision:
# tensor-core tiles of Triton's matmul tutorial for tf32 / bf16 (sm_90: 117-139 registers, no
# spills); IEEE float32 runs on the FMA units, where a 128 × 128 tile took 254 registers (one
# block per SM), so it gets 64 × 64. Not tuned on a GPU yet (none was lent):
# bench_diffusion.py times them there.
TOPK_CONFIG = {"ieee": (64, 64, 32, 4, 3), "tf32": (128, 128, 32, 8, 3),
               "bf16": (128, 128, 64, 8, 3)}


@triton.jit
def _linear_topk_kernel(A, W, bias, cand_val, cand_idx, B, E, H, scale, stride_a, stride_w,
                        n_cand, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, TF32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < B
    nmask = offs_n < E
    rows_a = A + offs_m.to(tl.int64)[:, None] * stride_a
    rows_w = W + offs_n.to(tl.int64)[None, :] * stride_w
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
    prec = "bf16" if a.dtype == torch.bfloat16 else "tf32" if tf32 else "ieee"
    bm, bn, bk, warps, stages = config or TOPK_CONFIG[prec]
    n_tiles = triton.cdiv(n_ent, bn)
    cand_val = torch.empty(n_rows, n_tiles * k, device=a.device, dtype=torch.float32)
    cand_idx = torch.empty(n_rows, n_tiles * k, device=a.device, dtype=torch.int64)
    if n_rows:
        grid = (triton.cdiv(n_rows, bm), n_tiles)
        _linear_topk_kernel[grid](a, w, bias, cand_val, cand_idx, n_rows, n_ent, hid,
                                  float(scale), a.stride(0), w.stride(0), n_tiles * k, k,
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, TF32=prec == "tf32",
                                  num_warps=warps, num_stages=stages)
    vals, pos = torch.topk(cand_val, k, dim=-1)
    return vals, cand_idx.gather(1, pos)


@triton.jit
def _denoise_input_kernel(x0, noise, t, sa, sb, mask, x_in, E, HAS_MASK: tl.constexpr,
                          BLOCK: tl.constexpr):
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
        _denoise_input_kernel[(n_rows,)](
            x0, noise, t.contiguous(), sqrt_abar.to(torch.float32).contiguous(),
            sqrt_one_minus_abar.to(torch.float32).contiguous(),
            x0 if mask is None else mask.contiguous(), x_in, n_ent, HAS_MASK=mask is not None,
            BLOCK=ROW_BLOCK, num_warps=8)
    return x_in


@triton.jit
def _weighted_sq_err_kernel(out, x0, coef, sq, E, GRAD: tl.constexpr, BLOCK: tl.constexpr):
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
        _weighted_sq_err_kernel[(n_rows,)](
            out, x0, out if coef is None else coef.to(torch.float32).contiguous(), sq, n_ent,
            GRAD=coef is not None, BLOCK=ROW_BLOCK, num_warps=8)
    return sq
