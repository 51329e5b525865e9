"""Segment softmax over the rows of a CSR edge set: the attention normalisation of KGAT.

For edge values ``x`` (n_edges,) grouped into rows by CSR offsets ``rowptr`` (n_rows + 1,)::

    m_h      = max_{e in row h} x_e                              (detached: shift invariance)
    out_e    = exp(x_e - m_h) / sum_{e' in row h} exp(x_e' - m_h)

so every non-empty row sums to one; an empty row has no entries (nothing to normalise). Duplicate
edges (two entries with the same head and tail) are separate entries, each with its own weight,
as in a COO matrix that is not coalesced. Subtracting the row max keeps ``exp`` finite for any
logit magnitude; the denominator is at least 1.

The reference backend is plain differentiable torch (the row ids from ``rowptr``, then
:func:`diffkg_fast.ops.attention.segment_softmax`: scatter max, exp, index_add), so its gradient
is autograd's::

    d out_e / d x_f = out_e (1[e = f] - out_f)                   (e, f in the same row)
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffkg_fast.ops.attention import segment_softmax as _segment_softmax_rows
from diffkg_fast.ops.backend import register, resolve

__all__ = ["csr_rows", "segment_softmax"]


def csr_rows(rowptr: Tensor) -> Tensor:
    """``(nnz,)`` row id of each entry of a CSR with offsets ``rowptr`` (n_rows + 1,)."""
    n_rows = rowptr.numel() - 1
    return torch.repeat_interleave(torch.arange(n_rows, device=rowptr.device), rowptr.diff(),
                                   output_size=int(rowptr[-1]))


def _check(logits: Tensor, rowptr: Tensor) -> None:
    if logits.ndim != 1:
        raise ValueError(f"logits must be 1-D (one value per edge), got {tuple(logits.shape)}")
    if rowptr.ndim != 1 or rowptr.numel() < 1:
        raise ValueError("rowptr must be 1-D with n_rows + 1 >= 1 offsets")
    if rowptr.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rowptr must be an integer tensor, got {rowptr.dtype}")
    if rowptr.device != logits.device:
        raise ValueError(f"rowptr on {rowptr.device}, logits on {logits.device}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != logits.numel():
        raise ValueError(f"rowptr must run from 0 to n_edges={logits.numel()}, got "
                         f"{int(rowptr[0])} … {int(rowptr[-1])}")
    if rowptr.numel() > 1 and bool((rowptr.diff() < 0).any()):
        raise ValueError("rowptr must be non-decreasing")


@register("segment_softmax", "reference")
def _segment_softmax_reference(logits: Tensor, rowptr: Tensor) -> Tensor:
    rows = csr_rows(rowptr.to(torch.int64))
    return _segment_softmax_rows(logits, rows, rowptr.numel() - 1)


def segment_softmax(logits: Tensor, rowptr: Tensor, backend: str = "auto") -> Tensor:
    """Softmax of ``logits`` within each CSR row (math in the module docstring).

    Args:
        logits: ``(n_edges,)`` float values in CSR order (edges of row 0 first).
        rowptr: ``(n_rows + 1,)`` integer offsets, from 0 to ``n_edges``, non-decreasing;
            empty rows allowed.
        backend: ``"auto"`` or ``"reference"`` (see :mod:`diffkg_fast.ops.backend`).

    Returns:
        ``(n_edges,)`` weights, each non-empty row summing to one; differentiable in ``logits``.
    """
    _check(logits, rowptr)
    return resolve("segment_softmax", backend, logits.device)(logits, rowptr)
