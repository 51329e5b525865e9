"""LightGCN propagation over the normalised user–item graph (DiffKG's collaborative side).

For the ``(N × N)`` normalised adjacency ``A`` (:func:`~diffkg_fast.ops.graph.norm_adjacency`)
and node table ``X`` (N × d)::

    X^(0) = X,   X^(l) = A X^(l-1),   out = sum_{l=0..L} X^(l) = sum_{l=0..L} A^l X

DiffKG sums (does not average) the layers, layer 0 included. The reference runs ``L`` SpMMs with
``torch.sparse.mm`` (cuSPARSE on a GPU); the gradient reaches ``X`` only (``A`` is a constant of
the data): ``dL/dX = sum_l (A^T)^l G``, which equals ``sum_l A^l G`` since ``A`` is symmetric.

The ``"cpu"`` (and ``"cuda"``) backend, registered by :mod:`diffkg_fast.ops.spmm`, runs the whole
sum as one fused C++ op (``torch.ops.diffkg_fast.csr_propagate``, csrc/); ``"auto"`` takes it on
a CPU (building the extension on first use; the reference when it cannot be built).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffkg_fast.ops.backend import register, resolve

__all__ = ["const_spmm", "lightgcn_propagate"]


class _ConstSpMM(torch.autograd.Function):
    """``A @ X`` for a constant sparse ``A`` whose transpose is given: the backward is
    ``A^T @ G`` with that ``A^T``.

    ``torch.sparse.mm``'s own backward builds ``A^T`` as a new CSR at every call: measured
    30 ms of a 450 ms BPR step (4 calls per step, 2 layers × 2 views) at the default synthetic
    size on the 2-core CPU. A data matrix is constant, so its transpose is built once.
    """

    @staticmethod
    def forward(ctx, adj: Tensor, adj_t: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.adj_t = adj_t
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:  # type: ignore[override]
        return None, None, torch.sparse.mm(ctx.adj_t, grad)


def const_spmm(adj: Tensor, x: Tensor, adj_t: Tensor | None = None) -> Tensor:
    """``adj @ x`` for a sparse ``adj`` that is a constant (no gradient), differentiable in ``x``.

    ``adj_t``: ``adj``'s transpose, used by the backward (``None``: ``adj`` is SYMMETRIC, as
    :func:`~diffkg_fast.ops.graph.norm_adjacency` is by construction). Without a gradient to
    take this is exactly ``torch.sparse.mm(adj, x)``.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.sparse.mm(adj, x)
    return _ConstSpMM.apply(adj, adj if adj_t is None else adj_t, x)


@register("lightgcn_propagate", "reference")
def _lightgcn_propagate_reference(adj: Tensor, X: Tensor, layers: int) -> Tensor:
    out = X.clone()  # layer 0; a clone so the result never aliases the caller's table
    cur = X
    for _ in range(layers):
        cur = torch.sparse.mm(adj, cur)
        out = out + cur
    return out


def lightgcn_propagate(adj: Tensor, X: Tensor, layers: int, backend: str = "auto") -> Tensor:
    """Sum of ``layers + 1`` LightGCN layers, ``sum_{l=0..layers} adj^l X``.

    Args:
        adj: ``(N, N)`` torch sparse matrix (CSR preferred, COO accepted), same dtype and device
            as ``X``.
        X: ``(N, d)`` dense node table (users first, then items).
        layers: number of propagation steps ``L >= 0`` (DiffKG's ``gnn_layer``).
        backend: ``"auto"``, ``"reference"`` or a kernel backend (see ``ops.backend``).

    Returns:
        ``(N, d)`` tensor, differentiable in ``X``.
    """
    if not adj.is_sparse and adj.layout != torch.sparse_csr:
        raise ValueError(f"adj must be a torch sparse tensor, got layout {adj.layout}")
    if X.ndim != 2 or adj.shape[0] != adj.shape[1] or adj.shape[1] != X.shape[0]:
        raise ValueError(f"adj {tuple(adj.shape)} and X {tuple(X.shape)} do not chain")
    if adj.dtype != X.dtype or adj.device != X.device:
        raise ValueError(f"adj is {adj.dtype} on {adj.device}, X is {X.dtype} on {X.device}")
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    return resolve("lightgcn_propagate", backend, X.device)(adj, X, layers)
