"""Row-wise logsumexp of a product, ``logsumexp(a @ bᵀ, dim=-1)``: the denominator of InfoNCE.

DiffKG's contrastive loss (:func:`diffkg_fast.model.diffkg.info_nce`) takes it over a batch of
``B`` nodes against all ``N`` nodes of the other view (B × N = 1,024 × 6,350 logits at the
medication size, twice per BPR step). Autograd through the reference keeps the logits, then
allocates four more B × N tensors (``x - max`` in the forward; ``x - lse``, its ``exp`` and the
product with the incoming gradient in the backward). The ``"cpu"`` backend keeps ONE B × N
buffer for the whole step: the forward runs the reference's arithmetic in place on it, and the
backward recomputes the logits into the same buffer (one more ``B × N × d`` GEMM) and turns them
into the gradient in place. Those are the same operations in the same order, so the loss and
both gradients are bitwise those of the reference (tested). The buffer being written over in
place is what saves the time: in a training process the allocator hands out fresh B × N
blocks, and their pages fault anew. 83 BPR steps of the medication preset faulted 2.01M pages
with the reference and 0.15M with this backend (one thread), and the recommender phase went from
10.3–11.5 s to 8.0–10.4 s per 40 steps (2 threads: 7.5–7.9 s → 6.6–6.9 s). Timed alone in a
loop, the blocks come back warm and the extra GEMM about cancels the gain
(``bench/bench_contrastive.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffkg_fast.ops.backend import register, resolve

__all__ = ["logsumexp_mm"]


@register("logsumexp_mm", "reference")
def _logsumexp_mm_reference(a: Tensor, b: Tensor) -> Tensor:
    return torch.logsumexp(a @ b.T, dim=-1)


class _LogSumExpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        buf = torch.mm(a, b.T)
        # torch.logsumexp's steps: the row max (0 where it is infinite), then
        # log(sum(exp(x - max))) + max.
        m = buf.amax(dim=-1, keepdim=True)
        m.masked_fill_(m.isinf(), 0.0)
        lse = buf.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
        ctx.save_for_backward(a, b, lse)
        ctx.buf = buf  # not a saved tensor: the backward overwrites it (freed with the graph)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        a, b, lse = ctx.saved_tensors
        buf = ctx.buf
        # Autograd's logsumexp backward, grad * exp(x - lse), in place on the recomputed x;
        # then mm's backward as autograd runs it for a and for the transposed view bᵀ.
        p = torch.mm(a, b.T, out=buf).sub_(lse.unsqueeze(-1)).exp_().mul_(grad.unsqueeze(-1))
        da = torch.mm(p, b) if ctx.needs_input_grad[0] else None
        db = torch.mm(p.T, a) if ctx.needs_input_grad[1] else None
        return da, db


# On CUDA the caching allocator hands blocks back without page faults, so there the gain is the
# memory: one B × N block live instead of the reference's logits plus up to three temporaries
# in its backward (Alibaba's user view: 1,024 × 114,737 floats, 448 MB each), for one more
# B × N × d GEMM. Not timed on a GPU (none was lent).
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
