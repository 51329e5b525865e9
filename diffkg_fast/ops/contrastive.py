"""Row-wise logsumexp of a product, ``logsumexp(a @ bᵀ, dim=-1)``: the denominator of InfoNCE.

DiffKG's contrastive loss (:func:`diffkg_fast.model.diffkg.info_nce`) takes it over a batch of
``B`` nodes against all ``N`` nodes of the other view (B × N = 1,024 × 6,350 logits at the
medication size, twice per BPR step). Autograd through the reference keeps the logits, then
allocates four more B × N tensors (``x - max`` in the forward; ``x - lse``, its ``exp`` and the
product with the incoming gradient in the backward). The ``"cpu"`` backend keeps ONE B × N
buffer for the whole step, the logits: the forward writes them with one GEMM and takes each
row's max, ``exp(x - max)`` and its sum a chunk of rows at a time through a cache-sized scratch
(~1 MB), so the exponentials never go to memory; the backward turns the kept logits into the
gradient in place, chunk by chunk, then runs mm's two backward GEMMs. Those are the
reference's operations in the reference's order (a row's reduction does not depend on how many
rows are beside it; elementwise ops do not on chunking; the GEMMs stay whole, since a GEMM of
a chunk of rows can take another kernel with other bits), so the loss and both gradients are
bitwise those of the reference (tested, at 1 and 2 threads, with chunks of 8 rows and at the
medication size). A second backward through a retained graph finds the buffer consumed and
recomputes the logits (one more GEMM) first.

Why one buffer: in a training process the allocator hands out fresh B × N blocks whose pages
fault anew (83 BPR steps of the medication preset faulted 2.01M pages with the reference and
0.15M with one buffer, one thread). What it costs against the compulsory work (the forward
GEMM and the two backward GEMMs, ``3·B·N·d`` multiply-adds; one ``exp`` per logit in each
direction): one write of the logits, one read in the forward, one read-modify-write in the
backward, and the two GEMMs' reads (``bench/bench_contrastive.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffkg_fast.ops.backend import register, resolve

__all__ = ["logsumexp_mm", "sampled_logsumexp"]


@register("logsumexp_mm", "reference")
def _logsumexp_mm_reference(a: Tensor, b: Tensor) -> Tensor:
    return torch.logsumexp(a @ b.T, dim=-1)


# Rows per chunk of the elementwise passes: ~1 MB of logits, so a chunk written by one op is
# still in cache when the next reads it (at least 8 rows, so that a chunk's row reductions split
# over rows, as the whole buffer's do, and never within a row).
_CHUNK_BYTES, _MIN_ROWS = 1 << 20, 8


def _chunk_rows(width: int, element_size: int) -> int:
    """Rows of ``width`` elements in one chunk."""
    return max(_MIN_ROWS, _CHUNK_BYTES // max(width * element_size, 1))


def _chunks(buf: Tensor) -> range:
    return range(0, buf.shape[0], _chunk_rows(buf.shape[1], buf.element_size()))


class _LogSumExpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        x = torch.mm(a, b.T)  # the logits, kept for the backward (no second GEMM there)
        lse = x.new_empty(x.shape[0])
        starts = _chunks(x)
        tmp = x.new_empty(min(starts.step, x.shape[0]), x.shape[1])
        for s in starts:
            xc = x[s:s + starts.step]
            # torch.logsumexp's steps: the row max (0 where it is infinite), then
            # log(sum(exp(x - max))) + max; exp(x - max) into a cache-sized scratch.
            m = xc.amax(dim=-1, keepdim=True)
            m.masked_fill_(m.isinf(), 0.0)
            e = torch.sub(xc, m, out=tmp[:xc.shape[0]]).exp_()
            lse[s:s + starts.step] = e.sum(-1).log_().add_(m.squeeze(-1))
        ctx.save_for_backward(a, b, lse)
        ctx.buf = x  # not a saved tensor: the backward overwrites it (freed with the graph)
        ctx.holds_logits = True
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        a, b, lse = ctx.saved_tensors
        p = ctx.buf
        if not ctx.holds_logits:  # a second backward (retained graph): the logits again
            torch.mm(a, b.T, out=p)
        ctx.holds_logits = False
        # Autograd's logsumexp backward, grad * exp(x - lse), in place on the kept logits, a
        # cache-sized chunk at a time (elementwise: the same bits as one pass); then mm's
        # backward as autograd runs it for a and for the transposed view bᵀ.
        starts = _chunks(p)
        for s in starts:
            sl = slice(s, s + starts.step)
            p[sl].sub_(lse[sl].unsqueeze(-1)).exp_().mul_(grad[sl].unsqueeze(-1))
        da = torch.mm(p, b) if ctx.needs_input_grad[0] else None
        db = torch.mm(p.T, a) if ctx.needs_input_grad[1] else None
        return da, db


# On CUDA the caching allocator hands blocks back without page faults, so there the gain is the
# memory: one B × N block live instead of the reference's logits plus up to three temporaries
# in its backward (Alibaba's user view: 1,024 × 114,737 floats, 448 MB each), and the
# exponentials kept in a cache-sized scratch. Not timed on a GPU (none was lent).
@register("logsumexp_mm", "cuda")
@register("logsumexp_mm", "cpu")
def _logsumexp_mm_lean(a: Tensor, b: Tensor) -> Tensor:
    # No gradient to take, or no columns (the max of an empty row): nothing to save. Under
    # torch.compile the reference: traced by torch 2.11's AOTAutograd, the buffer reused in
    # place gave wrong gradients for a (every element; the device mirror's test caught it), and
    # there the compiler plans the memory anyway.
    if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)) or not len(b) \
            or torch.compiler.is_compiling():
        return _logsumexp_mm_reference(a, b)
    return _LogSumExpMM.apply(a, b)


def logsumexp_mm(a: Tensor, b: Tensor, backend: str = "auto") -> Tensor:
    """``logsumexp(a @ bᵀ, dim=-1)`` (B,) for ``a`` (B × d) and ``b`` (N × d), differentiable in
    both. ``backend``: ``"auto"`` (the one-buffer version, ``"cpu"`` / ``"cuda"``) or
    ``"reference"``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"logsumexp_mm: a {tuple(a.shape)} and b {tuple(b.shape)} must be "
                         f"(B, d) and (N, d)")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"logsumexp_mm: a is {a.dtype} on {a.device}, b is {b.dtype} on "
                         f"{b.device}")
    return resolve("logsumexp_mm", backend, a.device)(a, b)


# --------------------------------------------------------------------------- sampled InfoNCE
# The denominator of info_nce_sampled (diffkg_fast.model.losses): per row n,
# logsumexp([pos_n, s_n1 + shift, …, s_nk + shift]) with s = a @ bᵀ and the entries where
# negatives[i] == nodes[n] at -inf (a draw of the node itself is its positive). Under the
# large-KG regime the batch grows (max_epoch_steps): at a million entities 112,638 × 1,025
# logits, 460 MB, and the reference's chain (the sum with the shift, the masked copy, the
# concatenation, logsumexp's x - max and exp, and the backward's product) allocates six or
# seven such blocks a step. The lean version keeps one, the GEMM's logits, and rebuilds each
# row's [pos, s + shift] a cache-sized chunk at a time in the forward and the backward: the
# reference's operations in its order on the same values (elementwise, or reductions within a
# row), so the same bits (tested).


@register("sampled_logsumexp", "reference")
def _sampled_logsumexp_reference(a: Tensor, b: Tensor, pos: Tensor, nodes: Tensor,
                                 negatives: Tensor, shift: float) -> Tensor:
    logits = a @ b.T + shift
    logits = logits.masked_fill(negatives[None, :] == nodes[:, None], float("-inf"))
    return torch.logsumexp(torch.cat([pos[:, None], logits], 1), -1)


def _row_chunk(x: Tensor, logits: Tensor, pos: Tensor, nodes: Tensor, negatives: Tensor,
               shift: float, sl: slice) -> tuple[Tensor, Tensor]:
    """Rows ``sl`` of the reference's ``cat([pos, masked logits + shift])`` written into ``x``;
    and their mask."""
    x[:, 0] = pos[sl]
    torch.add(logits[sl], shift, out=x[:, 1:])
    mask = negatives[None, :] == nodes[sl, None]
    x[:, 1:].masked_fill_(mask, float("-inf"))
    return x, mask


class _SampledLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, pos: Tensor, nodes: Tensor,  # type: ignore[override]
                negatives: Tensor, shift: float) -> Tensor:
        logits = torch.mm(a, b.T)  # kept for the backward: one B × k block
        lse = logits.new_empty(logits.shape[0])
        width = logits.shape[1] + 1
        step = _chunk_rows(width, logits.element_size())
        tmp = logits.new_empty(min(step, logits.shape[0]), width)
        n = logits.shape[0]
        for s in range(0, n, step):
            sl = slice(s, s + step)
            x, _ = _row_chunk(tmp[:min(step, n - s)], logits, pos, nodes, negatives, shift, sl)
            m = x.amax(dim=-1, keepdim=True)  # torch.logsumexp's steps, as in _LogSumExpMM
            m.masked_fill_(m.isinf(), 0.0)
            lse[sl] = x.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
        ctx.save_for_backward(a, b, pos, nodes, negatives, lse)
        ctx.buf, ctx.shift, ctx.step = logits, shift, step
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b, pos, nodes, negatives, lse = ctx.saved_tensors
        logits, step = ctx.buf, ctx.step
        if logits is None:  # a second backward (retained graph): the logits again
            logits = torch.mm(a, b.T)
        ctx.buf = None
        gpos = torch.empty_like(pos)
        tmp = logits.new_empty(min(step, logits.shape[0]), logits.shape[1] + 1)
        n = logits.shape[0]
        for s in range(0, n, step):
            sl = slice(s, s + step)
            x, mask = _row_chunk(tmp[:min(step, n - s)], logits, pos, nodes, negatives,
                                 ctx.shift, sl)
            # logsumexp's backward, exp(x - lse) * grad; the cat's and masked_fill's backward.
            x.sub_(lse[sl].unsqueeze(-1)).exp_().mul_(grad[sl].unsqueeze(-1))
            gpos[sl] = x[:, 0]
            logits[sl] = x[:, 1:].masked_fill_(mask, 0.0)
        da = torch.mm(logits, b) if ctx.needs_input_grad[0] else None
        db = torch.mm(logits.T, a) if ctx.needs_input_grad[1] else None
        return da, db, gpos, None, None, None


@register("sampled_logsumexp", "cuda")
@register("sampled_logsumexp", "cpu")
def _sampled_logsumexp_lean(a: Tensor, b: Tensor, pos: Tensor, nodes: Tensor,
                            negatives: Tensor, shift: float) -> Tensor:
    if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad
                                         or pos.requires_grad)) \
            or not len(b) or torch.compiler.is_compiling():
        return _sampled_logsumexp_reference(a, b, pos, nodes, negatives, shift)
    return _SampledLogSumExp.apply(a, b, pos, nodes, negatives, shift)


def sampled_logsumexp(a: Tensor, b: Tensor, pos: Tensor, nodes: Tensor, negatives: Tensor,
                      shift: float, backend: str = "auto") -> Tensor:
    """``logsumexp([pos_n, <a_n, b_i> + shift for each i with negatives[i] != nodes[n]])`` (B,)
    for ``a`` (B × d), ``b`` (k × d), ``pos`` (B,), ``nodes`` (B,) and ``negatives`` (k,): the
    sampled InfoNCE denominator of :func:`~diffkg_fast.model.losses.info_nce_sampled`,
    differentiable in ``a``, ``b`` and ``pos``. ``backend``: ``"auto"`` (one B × k block) or
    ``"reference"``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"sampled_logsumexp: a {tuple(a.shape)} and b {tuple(b.shape)} must "
                         f"be (B, d) and (k, d)")
    if pos.shape != (a.shape[0],) or nodes.shape != (a.shape[0],) or \
            negatives.shape != (b.shape[0],):
        raise ValueError(f"sampled_logsumexp: pos {tuple(pos.shape)}, nodes "
                         f"{tuple(nodes.shape)} and negatives {tuple(negatives.shape)} must be "
                         f"({a.shape[0]},), ({a.shape[0]},) and ({b.shape[0]},)")
    return resolve("sampled_logsumexp", backend, a.device)(a, b, pos, nodes, negatives, shift)
