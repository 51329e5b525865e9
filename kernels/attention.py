"""Triton kernels of the fused relation-aware attention (RGAT) layer: ``rgat_forward`` and
``rgat_backward``. The specification is ``diffkg_fast.ops.attention._rgat_aggregate_reference``.

Math (head ``h``, its edges ``e = (h, t_e, r_e)`` in the head-sorted CSR, ``P1 = Rel W1^T`` and
``P2 = Rel W2^T`` computed once per call by the caller)::

    forward                                       backward (G = dL/d agg, per row)
    s_e   = <e_h, P1[r_e]> + <e_t, P2[r_e]>        go    = (gy - y <y, gy>) / nrm    (normalize)
    z_e   = LeakyReLU_0.2(s_e)                     G     = go * mask
    lse_h = log sum_e exp(z_e)   (online)          g_e   = <G_h, e_t>,  D_h = sum_e a_e g_e
    a_e   = exp(z_e - lse_h)                       ds_e  = a_e (g_e - D_h) LeakyReLU'(s_e)
    agg   = e_h + sum_e a_e e_t                    dE_h += G_h + sum_e ds_e P1[r_e]
    out   = agg * mask            (dropout)        dE_t += a_e G_h + ds_e P2[r_e]
    y     = out / max(||out||, 1e-12)              dP1[r] += ds_e e_h,  dP2[r] += ds_e e_t

The forward is one program per head row: an online softmax (running max ``m`` and sum ``l``,
the accumulator rescaled by ``exp(m_old - m_new)``) over the row's edges in blocks of
``BLOCK_E``, the residual, dropout and normalisation in registers; it stores ``y`` and two
floats per row (``lse`` and the raw norm). The backward recomputes the attention from ``lse``;
it writes per-edge scalars (``a_e``, ``ds_e``: two nnz-length vectors) but no nnz × d
temporary. Gradients into tails take one of two routes (``tails=``):

- ``"csr"`` (default): a second kernel, one program per tail over the transposed CSR (edge ids
  sorted by tail, built once per graph), adds ``a_e G_h + ds_e P2[r_e]`` without atomics;
  ``dE`` is deterministic.
- ``"atomic"``: the row kernel scatters them with ``tl.atomic_add``; one kernel fewer, order of
  the float additions not fixed.

``dP1``/``dP2`` are reduced per relation over edges grouped by relation (``r_edge``) in chunks
of ``REL_CHUNK`` edges, one atomic add of a d-vector per chunk: per-edge atomics on ~10^2
relation rows would serialise. Under ``torch.use_deterministic_algorithms(True)`` each chunk
writes its partial sum instead and a second kernel, one program per relation, adds them in
chunk order: with ``tails="csr"`` the whole backward is then bitwise reproducible.

Accumulation is float32 whatever the input dtype (float64 for float64 inputs); offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._align import _align
from ._launch import on_device

__all__ = ["MAX_D", "REL_CHUNK", "block_sizes", "rgat_backward", "rgat_forward",
           "width_align"]

# Globals read inside @triton.jit must be constexpr (the interpreter accepts plain floats, the
# compiler does not: the ahead-of-time compile test caught it).
NEG_SLOPE = tl.constexpr(0.2)  # DiffKG's nn.LeakyReLU(0.2)
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's default
MAX_D = 256  # a row of E lives in registers; wider tables go to the reference
REL_CHUNK = 256  # edges per program of the relation reduction


def block_sizes(d: int) -> tuple[int, int]:
    """``(BLOCK_E, BLOCK_D)`` for width ``d``: tiles of e_t, P1 and P2 of ~1,024 elements (8 fp32
    registers per thread and tile at 4 warps). KG rows are short (mean degree 6.3 at Alibaba-
    iFashion's shape), so wider edge blocks mostly hold padding; with 2,048-element tiles the
    backward row kernel took 168 registers at d = 64 (sm_90, no GPU timing behind this choice)."""
    if not 1 <= d <= MAX_D:
        raise ValueError(f"the Triton RGAT kernels take 1 <= d <= {MAX_D}, got d = {d}")
    block_d = max(16, triton.next_power_of_2(d))
    return max(8, min(32, 1024 // block_d)), block_d


@triton.jit
def _acc(x, IS_F64: tl.constexpr):
    if IS_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _edge_tile(E, P1, P2, col, rel, eh, k0, end, d, offs_d, dmask,
               BLOCK_E: tl.constexpr, IS_F64: tl.constexpr):
    """The edges k0 .. k0+BLOCK_E-1 (< end) of a row: their offsets and lane mask, tails, the
    2-D mask, e_t / P1[r] / P2[r] tiles, the score s and the logit z (-inf on padding lanes)."""
    offs_e = k0 + tl.arange(0, BLOCK_E)
    emask = offs_e < end
    t = tl.load(col + offs_e, mask=emask, other=0)
    r = tl.load(rel + offs_e, mask=emask, other=0)
    m2 = emask[:, None] & dmask[None, :]
    et = _acc(tl.load(E + t[:, None] * d + offs_d[None, :], mask=m2, other=0.0), IS_F64)
    p1 = _acc(tl.load(P1 + r[:, None] * d + offs_d[None, :], mask=m2, other=0.0), IS_F64)
    p2 = _acc(tl.load(P2 + r[:, None] * d + offs_d[None, :], mask=m2, other=0.0), IS_F64)
    s = tl.sum(eh[None, :] * p1 + et * p2, axis=1)
    z = tl.where(emask, tl.where(s > 0, s, NEG_SLOPE * s), float("-inf"))
    return offs_e, emask, t, m2, et, p1, p2, s, z


@triton.jit
def _rgat_forward_kernel(E, P1, P2, rowptr, col, rel, mask, y, lse, norm, d_a,
                         HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr, IS_F64: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    d = d_a * ALIGN  # the width comes divided by its alignment: see _align
    h = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    start = tl.load(rowptr + h)
    end = tl.load(rowptr + h + 1)
    eh = _acc(tl.load(E + h * d + offs_d, mask=dmask, other=0.0), IS_F64)
    acc = eh * 0.0
    l_run = tl.sum(acc, axis=0)
    m_run = l_run + float("-inf")
    for k0 in range(start, end, BLOCK_E):
        _, _, _, _, et, _, _, _, z = _edge_tile(E, P1, P2, col, rel, eh, k0, end, d, offs_d,
                                                   dmask, BLOCK_E, IS_F64)
        # Every block holds at least one real edge, so m_new is finite and exp(-inf) = 0 on
        # the first block rescales the empty accumulator without a NaN.
        m_new = tl.maximum(m_run, tl.max(z, axis=0))
        scale = tl.exp(m_run - m_new)
        p = tl.exp(z - m_new)
        l_run = l_run * scale + tl.sum(p, axis=0)
        acc = acc * scale + tl.sum(p[:, None] * et, axis=0)
        m_run = m_new
    has = l_run > 0
    out = eh + tl.where(has, acc / tl.where(has, l_run, 1.0), 0.0)
    if HAS_MASK:
        out = out * _acc(tl.load(mask + h * d + offs_d, mask=dmask, other=0.0), IS_F64)
    nrm = tl.sqrt(tl.sum(out * out, axis=0))
    if NORMALIZE:
        out = out / tl.maximum(nrm, NORM_EPS)
    tl.store(y + h * d + offs_d, out.to(y.dtype.element_ty), mask=dmask)
    tl.store(lse + h, tl.where(has, m_run + tl.log(tl.where(has, l_run, 1.0)), float("-inf")))
    tl.store(norm + h, nrm)


@triton.jit
def _rgat_backward_rows_kernel(gy, E, P1, P2, rowptr, col, rel, mask, y, lse, norm,
                               G, dE, a_buf, ds_buf, d_a,
                               HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr,
                               IS_F64: tl.constexpr, TAIL_ATOMIC: tl.constexpr,
                               BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                               ALIGN: tl.constexpr):
    d = d_a * ALIGN
    h = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    start = tl.load(rowptr + h)
    end = tl.load(rowptr + h + 1)
    go = _acc(tl.load(gy + h * d + offs_d, mask=dmask, other=0.0), IS_F64)
    if NORMALIZE:
        yh = _acc(tl.load(y + h * d + offs_d, mask=dmask, other=0.0), IS_F64)
        nrm = tl.load(norm + h)
        # F.normalize divides by clamp_min(||out||, eps): below eps the divisor is constant.
        go = tl.where(nrm > NORM_EPS, (go - yh * tl.sum(yh * go, axis=0)) / nrm, go / NORM_EPS)
    if HAS_MASK:
        go = go * _acc(tl.load(mask + h * d + offs_d, mask=dmask, other=0.0), IS_F64)
    tl.store(G + h * d + offs_d, go, mask=dmask)
    eh = _acc(tl.load(E + h * d + offs_d, mask=dmask, other=0.0), IS_F64)
    lse_h = tl.load(lse + h)
    # Pass 1: D_h = sum_e a_e <G_h, e_t> (= <G_h, agg_h - e_h>, recomputed: agg is not stored).
    dsum = tl.sum(go * 0.0, axis=0)
    for k0 in range(start, end, BLOCK_E):
        _, _, _, _, et, _, _, _, z = _edge_tile(E, P1, P2, col, rel, eh, k0, end, d, offs_d,
                                                   dmask, BLOCK_E, IS_F64)
        a = tl.exp(z - lse_h)
        dsum += tl.sum(a * tl.sum(go[None, :] * et, axis=1), axis=0)
    # Pass 2: ds_e, the head's own gradient, and a_e / ds_e for the tail and relation passes.
    dEh = go
    for k0 in range(start, end, BLOCK_E):
        offs_e, emask, t, m2, et, p1, p2, s, z = _edge_tile(
            E, P1, P2, col, rel, eh, k0, end, d, offs_d, dmask, BLOCK_E, IS_F64)
        a = tl.exp(z - lse_h)
        g = tl.sum(go[None, :] * et, axis=1)
        ds = a * (g - dsum)
        # The slope multiplies ds itself: a tl.where of two constants would round 0.2 to fp32.
        ds = tl.where(s > 0, ds, ds * NEG_SLOPE)
        tl.store(a_buf + offs_e, a, mask=emask)
        tl.store(ds_buf + offs_e, ds, mask=emask)
        dEh += tl.sum(ds[:, None] * p1, axis=0)
        if TAIL_ATOMIC:
            tl.atomic_add(dE + t[:, None] * d + offs_d[None, :],
                          a[:, None] * go[None, :] + ds[:, None] * p2, mask=m2)
    if TAIL_ATOMIC:
        tl.atomic_add(dE + h * d + offs_d, dEh, mask=dmask)
    else:
        tl.store(dE + h * d + offs_d, dEh, mask=dmask)


@triton.jit
def _rgat_backward_tails_kernel(G, P2, rel, row, t_rowptr, t_edge, a_buf, ds_buf, dE, d_a,
                                IS_F64: tl.constexpr, BLOCK_E: tl.constexpr,
                                BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    d = d_a * ALIGN
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    start = tl.load(t_rowptr + t)
    end = tl.load(t_rowptr + t + 1)
    acc = _acc(tl.load(dE + t * d + offs_d, mask=dmask, other=0.0), IS_F64)
    for k0 in range(start, end, BLOCK_E):
        offs_k = k0 + tl.arange(0, BLOCK_E)
        kmask = offs_k < end
        e = tl.load(t_edge + offs_k, mask=kmask, other=0)
        h = tl.load(row + e, mask=kmask, other=0)
        r = tl.load(rel + e, mask=kmask, other=0)
        a = tl.load(a_buf + e, mask=kmask, other=0.0)
        ds = tl.load(ds_buf + e, mask=kmask, other=0.0)
        m2 = kmask[:, None] & dmask[None, :]
        gh = tl.load(G + h[:, None] * d + offs_d[None, :], mask=m2, other=0.0)
        p2 = _acc(tl.load(P2 + r[:, None] * d + offs_d[None, :], mask=m2, other=0.0), IS_F64)
        acc += tl.sum(a[:, None] * gh + ds[:, None] * p2, axis=0)
    tl.store(dE + t * d + offs_d, acc, mask=dmask)


@triton.jit
def _rgat_backward_rel_kernel(E, col, row, r_edge, c_rel, c_start, c_end, ds_buf, dP1, dP2,
                              d_a, IS_F64: tl.constexpr, PARTIAL: tl.constexpr,
                              BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                              ALIGN: tl.constexpr):
    d = d_a * ALIGN
    c = tl.program_id(0).to(tl.int64)
    r = tl.load(c_rel + c)
    start = tl.load(c_start + c)
    end = tl.load(c_end + c)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    acc1 = tl.sum(tl.zeros([BLOCK_E, BLOCK_D], tl.float32), axis=0)
    acc1 = _acc(acc1, IS_F64)
    acc2 = acc1
    for k0 in range(start, end, BLOCK_E):
        offs_k = k0 + tl.arange(0, BLOCK_E)
        kmask = offs_k < end
        e = tl.load(r_edge + offs_k, mask=kmask, other=0)
        h = tl.load(row + e, mask=kmask, other=0)
        t = tl.load(col + e, mask=kmask, other=0)
        ds = tl.load(ds_buf + e, mask=kmask, other=0.0)
        m2 = kmask[:, None] & dmask[None, :]
        eh = _acc(tl.load(E + h[:, None] * d + offs_d[None, :], mask=m2, other=0.0), IS_F64)
        et = _acc(tl.load(E + t[:, None] * d + offs_d[None, :], mask=m2, other=0.0), IS_F64)
        acc1 += tl.sum(ds[:, None] * eh, axis=0)
        acc2 += tl.sum(ds[:, None] * et, axis=0)
    if PARTIAL:  # dP1 / dP2 are the (chunks, d) partial sums, reduced by _rgat_rel_sum_kernel
        tl.store(dP1 + c * d + offs_d, acc1, mask=dmask)
        tl.store(dP2 + c * d + offs_d, acc2, mask=dmask)
    elif end > start:
        tl.atomic_add(dP1 + r * d + offs_d, acc1, mask=dmask)
        tl.atomic_add(dP2 + r * d + offs_d, acc2, mask=dmask)


@triton.jit
def _rgat_rel_sum_kernel(part1, part2, r_first, r_count, dP1, dP2, d_a, IS_F64: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """dP[r] = the sum of relation r's chunk partials, in chunk order: deterministic."""
    d = d_a * ALIGN
    r = tl.program_id(0).to(tl.int64)
    first = tl.load(r_first + r)
    count = tl.load(r_count + r)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    acc1 = _acc(tl.sum(tl.zeros([BLOCK_C, BLOCK_D], tl.float32), axis=0), IS_F64)
    acc2 = acc1
    for c0 in range(0, count, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m2 = (offs_c < count)[:, None] & dmask[None, :]
        at = (first + offs_c)[:, None] * d + offs_d[None, :]
        acc1 += tl.sum(tl.load(part1 + at, mask=m2, other=0.0), axis=0)
        acc2 += tl.sum(tl.load(part2 + at, mask=m2, other=0.0), axis=0)
    tl.store(dP1 + r * d + offs_d, acc1, mask=dmask)
    tl.store(dP2 + r * d + offs_d, acc2, mask=dmask)


def width_align(d: int, dtype: torch.dtype) -> int:
    """The alignment (in elements) of width ``d`` passed as ``ALIGN``: the largest power of two
    dividing ``d``, capped at one 16-byte vector of ``dtype`` (4 fp32, 8 bf16 / fp16, 2 fp64;
    the accumulation buffers are at least as wide, so their rows are aligned too). A larger
    alignment cannot widen a load further, and the cap keeps one compile per (dtype, width
    class): at most 4 alignments per ``BLOCK_D``. Without it, at a d that is not a multiple
    of 16 (the JIT's only mark), e.g. d = 100, every row load of these kernels was 4 bytes
    wide (SASS, sm_90)."""
    return _align(d, 16 // dtype.itemsize)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rgat_forward(E: Tensor, P1: Tensor, P2: Tensor, rowptr: Tensor, col: Tensor, rel: Tensor,
                 mask: Tensor | None, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, lse, norm)``: the layer's output (``E``'s dtype), the per-row logsumexp of the
    logits (``-inf`` for rows without edges) and the raw L2 norm of the pre-normalisation row
    (both in the accumulation dtype). Inputs contiguous, on one device."""
    n, d = E.shape
    acc = _acc_dtype(E)
    y = torch.empty_like(E)
    lse = torch.empty(n, dtype=acc, device=E.device)
    norm = torch.empty(n, dtype=acc, device=E.device)
    if n == 0:
        return y, lse, norm
    block_e, block_d = block_sizes(d)
    align = width_align(d, E.dtype)
    with on_device(E):
        _rgat_forward_kernel[(n,)](
            E, P1, P2, rowptr, col, rel, mask if mask is not None else E, y, lse, norm,
            d // align, HAS_MASK=mask is not None, NORMALIZE=normalize,
            IS_F64=acc == torch.float64, BLOCK_E=block_e, BLOCK_D=block_d, ALIGN=align)
    return y, lse, norm


def _chunk_table(r_rowptr: Tensor, nnz: int, chunk: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(relation, start, end)`` of every chunk of at most ``chunk`` edges of the relation-
    grouped edge list, in a static count ``nnz // chunk + R`` (the padding chunks are empty), so
    sizing the grid needs no host synchronisation; and per relation its first chunk and its
    chunk count (relation r's chunks are ``first[r] .. first[r] + count[r] - 1``)."""
    n_rel = r_rowptr.numel() - 1
    dev = r_rowptr.device
    per_rel = (r_rowptr.diff() + chunk - 1) // chunk
    ends = torch.cumsum(per_rel, 0)
    n_chunks = nnz // chunk + n_rel  # >= sum ceil(count / chunk)
    ids = torch.arange(n_chunks, device=dev)
    c_rel = torch.searchsorted(ends, ids, right=True).clamp_(max=max(n_rel - 1, 0))
    first = ends - per_rel
    c_start = r_rowptr[c_rel] + (ids - first[c_rel]) * chunk
    c_end = torch.minimum(c_start + chunk, r_rowptr[c_rel + 1])
    c_start = torch.minimum(c_start, c_end)  # chunks past the last relation's end: empty
    return c_rel, c_start, c_end, first, per_rel


def rgat_backward(grad_y: Tensor, E: Tensor, P1: Tensor, P2: Tensor, rowptr: Tensor,
                  col: Tensor, rel: Tensor, t_rowptr: Tensor, t_edge: Tensor, row: Tensor,
                  r_rowptr: Tensor, r_edge: Tensor, y: Tensor, lse: Tensor, norm: Tensor,
                  mask: Tensor | None, normalize: bool, tails: str = "csr",
                  deterministic: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dE, dP1, dP2)`` of :func:`rgat_forward` for the output gradient ``grad_y``.

    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``): ``dP1`` /
    ``dP2`` from per-chunk partial sums added in chunk order by a second kernel, instead of one
    atomic add per chunk; needs ``tails="csr"``. Either way ``dE`` has no atomics on that route.
    """
    if tails not in ("csr", "atomic"):
        raise ValueError(f"tails must be 'csr' or 'atomic', got {tails!r}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic and tails == "atomic":
        raise RuntimeError("rgat_backward: tails='atomic' adds the tail gradients in no fixed "
                           "order; deterministic algorithms need tails='csr'")
    n, d = E.shape
    acc = _acc_dtype(E)
    nnz = col.numel()
    dev = E.device
    dE = (torch.zeros if tails == "atomic" else torch.empty)((n, d), dtype=acc, device=dev)
    dP1 = torch.zeros(P1.shape, dtype=acc, device=dev)
    dP2 = torch.zeros(P2.shape, dtype=acc, device=dev)
    if n == 0:
        return dE.to(E.dtype), dP1.to(P1.dtype), dP2.to(P2.dtype)
    block_e, block_d = block_sizes(d)
    align = width_align(d, E.dtype)
    is_f64 = acc == torch.float64
    G = torch.empty((n, d), dtype=acc, device=dev)
    a_buf = torch.empty(nnz, dtype=acc, device=dev)
    ds_buf = torch.empty(nnz, dtype=acc, device=dev)
    with on_device(E):
        _rgat_backward_rows_kernel[(n,)](
            grad_y, E, P1, P2, rowptr, col, rel, mask if mask is not None else E, y, lse, norm,
            G, dE, a_buf, ds_buf, d // align,
            HAS_MASK=mask is not None, NORMALIZE=normalize, IS_F64=is_f64,
            TAIL_ATOMIC=tails == "atomic", BLOCK_E=block_e, BLOCK_D=block_d, ALIGN=align)
        if tails == "csr":
            _rgat_backward_tails_kernel[(n,)](
                G, P2, rel, row, t_rowptr, t_edge, a_buf, ds_buf, dE, d // align,
                IS_F64=is_f64, BLOCK_E=block_e, BLOCK_D=block_d, ALIGN=align)
        if nnz:
            c_rel, c_start, c_end, r_first, r_count = _chunk_table(r_rowptr, nnz, REL_CHUNK)
            n_chunks = c_rel.numel()
            # Deterministic: (chunks, d) partials; ~nnz / 256 rows, under 1% of the edge data.
            part1, part2 = ((torch.empty((n_chunks, d), dtype=acc, device=dev)
                             for _ in range(2)) if deterministic else (dP1, dP2))
            _rgat_backward_rel_kernel[(n_chunks,)](
                E, col, row, r_edge, c_rel, c_start, c_end, ds_buf, part1, part2, d // align,
                IS_F64=is_f64, PARTIAL=deterministic, BLOCK_E=block_e, BLOCK_D=block_d,
                ALIGN=align)
            if deterministic and P1.shape[0]:
                _rgat_rel_sum_kernel[(P1.shape[0],)](
                    part1, part2, r_first, r_count, dP1, dP2, d // align, IS_F64=is_f64,
                    BLOCK_C=block_e, BLOCK_D=block_d, ALIGN=align)
    return dE.to(E.dtype), dP1.to(P1.dtype), dP2.to(P2.dtype)
