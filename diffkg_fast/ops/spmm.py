"""CSR × dense products of the C++ extension (``csrc/``): ``csr_spmm`` and the fused LightGCN sum.

Two ops, ``torch.ops.diffkg_fast.csr_spmm(rowptr, col, val, x)`` (``A x``) and
``torch.ops.diffkg_fast.csr_propagate(rowptr, col, val, x, layers)`` (``sum_{l=0..L} A^l x``,
one call for a whole LightGCN forward), with CPU kernels in ``csrc/cpu/`` and CUDA kernels in
``csrc/cuda/``. This module adds what the dispatcher needs from Python: a fake (shape-only)
implementation of each op, for ``torch.compile``, and the autograd formula::

    d(A x)/dx                    = A^T G
    d(sum_l A^l x)/dx            = sum_l (A^T)^l G        (the same fused op, on A^T)
    d(A x)/dval[k]               = <G[row k], x[col k]>   (csr_spmm only; A is data here)

``A^T`` is built once per graph and cached (keyed on the ``val`` tensor object, weakly, with its
in-place version); when ``A`` equals its transpose, which is checked once, not assumed, the
backward reuses ``A`` itself (LightGCN's normalised adjacency is symmetric, so its backward
costs no transpose at all). Under ``torch.compile`` tracing the transpose is rebuilt inside the
graph from traceable ops (no cache, no symmetry shortcut: data-dependent control flow).

Backends: ``lightgcn_propagate(..., backend="cpu")`` and :func:`csr_spmm` run these ops, and
``backend="auto"`` takes them on a CPU: the extension is compiled on first use when no ahead-of-
time build is installed (:mod:`diffkg_fast.ops._extension`, one line on stderr says so); when it
cannot be built, "auto" warns once and runs the reference.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from diffkg_fast.ops._extension import (
    cuda_kernels_registered,
    extension_available,
    load_extension,
    require_cuda_kernels,
)
from diffkg_fast.ops.backend import register, resolve

__all__ = ["csr_parts", "csr_spmm", "csr_transpose", "ensure_ops"]

_KERNEL_DTYPES = (torch.float32, torch.float64)
_LOCK = threading.Lock()
_PY_REGISTERED = False
# adj (sparse tensor) -> (rowptr, col, val): int64, contiguous, built once per adj.
_PARTS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
# val -> (val._version, rowptr, col, transpose or None when A is symmetric).
_TRANSPOSE: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _cuda_kernels_loaded() -> bool:
    return extension_available() and cuda_kernels_registered()


def csr_parts(adj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(rowptr, col, val)`` of a torch sparse matrix (CSR or COO), int64 indices, contiguous.

    Cached per ``adj`` object (weakly): the same tensors come back for the same graph, which is
    what lets the backward find the cached transpose. ``adj`` is treated as constant data.
    """
    hit = _PARTS.get(adj)
    if hit is not None:
        return hit
    if adj.layout == torch.sparse_csr:
        csr = adj
    elif adj.layout == torch.sparse_coo:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = adj.coalesce().to_sparse_csr()
    else:
        raise ValueError(f"adj must be a sparse CSR or COO tensor, got layout {adj.layout}")
    if csr.ndim != 2:
        raise ValueError(f"adj must be a matrix, got shape {tuple(csr.shape)}")
    # detach(): values() is a differentiable view that keeps adj alive (the weak cache would
    # never drop it) and that torch.compile would replay from the sparse tensor. adj is data.
    parts = (csr.crow_indices().to(torch.int64).contiguous().detach(),
             csr.col_indices().to(torch.int64).contiguous().detach(),
             csr.values().contiguous().detach())
    _PARTS[adj] = parts
    return parts


def _build_transpose(rowptr: Tensor, col: Tensor, val: Tensor,
                     n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of ``A^T`` from traceable ops with static output shapes (works on fake tensors)."""
    nnz = col.shape[0]
    n_rows = rowptr.shape[0] - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=col.device), rowptr.diff(),
                                   output_size=nnz)
    perm = torch.argsort(col, stable=True)  # rows ascending inside each column
    t_sorted = col[perm]
    t_rowptr = torch.searchsorted(t_sorted, torch.arange(n_cols + 1, device=col.device))
    return t_rowptr.to(torch.int64), rows[perm], val[perm]


def csr_transpose(rowptr: Tensor, col: Tensor, val: Tensor,
                  n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """``A^T`` as ``(rowptr, col, val)`` for an ``(n_rows, n_cols)`` CSR ``A``.

    Built once per ``val`` tensor (cached weakly, invalidated by an in-place change of ``val``);
    when ``A`` equals its transpose the cached answer is ``A``'s own tensors. Inside
    ``torch.compile`` tracing it is rebuilt from traceable ops every time.
    """
    plain = all(type(t) is Tensor for t in (rowptr, col, val))
    if not plain or torch.compiler.is_compiling():
        return _build_transpose(rowptr, col, val, n_cols)
    hit = _TRANSPOSE.get(val)
    if (hit is not None and hit[0] == val._version and hit[1] is rowptr and hit[2] is col):
        return (rowptr, col, val) if hit[3] is None else hit[3]
    with torch.no_grad():
        t = _build_transpose(rowptr, col, val, n_cols)
        symmetric = (rowptr.shape[0] == n_cols + 1 and torch.equal(t[0], rowptr)
                     and torch.equal(t[1], col) and torch.equal(t[2], val))
    _TRANSPOSE[val] = (val._version, rowptr, col, None if symmetric else t)
    return (rowptr, col, val) if symmetric else t


def _setup_spmm(ctx, inputs, output) -> None:
    rowptr, col, val, x = inputs
    ctx.save_for_backward(rowptr, col, val, x)


def _backward_spmm(ctx, grad: Tensor):
    rowptr, col, val, x = ctx.saved_tensors
    grad_val = grad_x = None
    if ctx.needs_input_grad[3]:
        grad_x = torch.ops.diffkg_fast.csr_spmm(*csr_transpose(rowptr, col, val, x.shape[0]),
                                                grad)
    if ctx.needs_input_grad[2]:
        rows = torch.repeat_interleave(torch.arange(rowptr.shape[0] - 1, device=col.device),
                                       rowptr.diff(), output_size=col.shape[0])
        grad_val = (grad[rows] * x[col]).sum(-1)
    return None, None, grad_val, grad_x


def _setup_propagate(ctx, inputs, output) -> None:
    rowptr, col, val, _x, layers = inputs
    ctx.save_for_backward(rowptr, col, val)
    ctx.layers = layers


def _backward_propagate(ctx, grad: Tensor):
    rowptr, col, val = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("diffkg_fast::csr_propagate differentiates x only: A (val) is data; "
                           "detach val, or use csr_spmm layer by layer for a gradient in val")
    grad_x = None
    if ctx.needs_input_grad[3]:
        t = csr_transpose(rowptr, col, val, grad.shape[0])
        grad_x = torch.ops.diffkg_fast.csr_propagate(*t, grad, ctx.layers)
    return None, None, None, grad_x, None


def _fake_spmm(rowptr: Tensor, col: Tensor, val: Tensor, x: Tensor) -> Tensor:
    torch._check(rowptr.dim() == 1 and col.dim() == 1 and val.dim() == 1 and x.dim() == 2,
                 lambda: "csr_spmm: rowptr, col and val must be 1-D and x 2-D")
    torch._check(val.dtype == x.dtype, lambda: "csr_spmm: val and x must share a dtype")
    return x.new_empty((rowptr.shape[0] - 1, x.shape[1]))


def _fake_propagate(rowptr: Tensor, col: Tensor, val: Tensor, x: Tensor, layers: int) -> Tensor:
    torch._check(rowptr.dim() == 1 and col.dim() == 1 and val.dim() == 1 and x.dim() == 2,
                 lambda: "csr_propagate: rowptr, col and val must be 1-D and x 2-D")
    torch._check(val.dtype == x.dtype, lambda: "csr_propagate: val and x must share a dtype")
    torch._check(rowptr.shape[0] - 1 == x.shape[0], lambda: "csr_propagate: A must be square")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def ensure_ops() -> None:
    """Load the extension (building it on first use) and register its fake and autograd parts."""
    global _PY_REGISTERED
    if _PY_REGISTERED:
        return
    load_extension()
    with _LOCK:
        if _PY_REGISTERED:
            return
        torch.library.register_fake("diffkg_fast::csr_spmm")(_fake_spmm)
        torch.library.register_fake("diffkg_fast::csr_propagate")(_fake_propagate)
        torch.library.register_autograd("diffkg_fast::csr_spmm", _backward_spmm,
                                        setup_context=_setup_spmm)
        torch.library.register_autograd("diffkg_fast::csr_propagate", _backward_propagate,
                                        setup_context=_setup_propagate)
        _PY_REGISTERED = True


def _check_pair(adj: Tensor, x: Tensor) -> None:
    if adj.layout not in (torch.sparse_csr, torch.sparse_coo):
        raise ValueError(f"adj must be a sparse CSR or COO tensor, got layout {adj.layout}")
    if x.ndim != 2 or adj.ndim != 2 or adj.shape[1] != x.shape[0]:
        raise ValueError(f"adj {tuple(adj.shape)} and x {tuple(x.shape)} do not chain")
    if adj.dtype != x.dtype or adj.device != x.device:
        raise ValueError(f"adj is {adj.dtype} on {adj.device}, x is {x.dtype} on {x.device}")


@register("csr_spmm", "reference")
def _csr_spmm_reference(adj: Tensor, x: Tensor) -> Tensor:
    return torch.sparse.mm(adj, x)


def _csr_spmm_kernel(adj: Tensor, x: Tensor) -> Tensor:
    if x.dtype not in _KERNEL_DTYPES:  # float16 / bfloat16: the kernels stop at float32
        return _csr_spmm_reference(adj, x)
    ensure_ops()
    if x.is_cuda:
        require_cuda_kernels("csr_spmm")
    return torch.ops.diffkg_fast.csr_spmm(*csr_parts(adj), x)


def _propagate_kernel(adj: Tensor, X: Tensor, layers: int) -> Tensor:
    if X.dtype not in _KERNEL_DTYPES:
        return resolve("lightgcn_propagate", "reference", X.device)(adj, X, layers)
    ensure_ops()
    if X.is_cuda:
        require_cuda_kernels("lightgcn_propagate")
    return torch.ops.diffkg_fast.csr_propagate(*csr_parts(adj), X, layers)


# "auto" takes the kernels whenever the extension loads (built on first use; a failed build
# warns once and "auto" runs the reference); the CUDA backend only where the extension carries
# CUDA kernels (csrc/cuda/, built by setup.py).
register("csr_spmm", "cpu", auto_if=extension_available)(_csr_spmm_kernel)
register("csr_spmm", "cuda", auto_if=_cuda_kernels_loaded)(_csr_spmm_kernel)
register("lightgcn_propagate", "cpu", auto_if=extension_available)(_propagate_kernel)
register("lightgcn_propagate", "cuda", auto_if=_cuda_kernels_loaded)(_propagate_kernel)


def csr_spmm(adj: Tensor, x: Tensor, backend: str = "auto") -> Tensor:
    """``adj @ x`` for a constant sparse ``adj`` (CSR or COO), differentiable in ``x``.

    Args:
        adj: ``(n_rows, n_cols)`` torch sparse matrix, same dtype and device as ``x``.
        x: ``(n_cols, d)`` dense.
        backend: ``"auto"``, ``"reference"`` (``torch.sparse.mm``), ``"cpu"`` or ``"cuda"``
            (the extension's kernels; ``"cpu"`` builds the extension on first use).

    Returns:
        ``(n_rows, d)`` tensor. The kernels' backward multiplies by ``adj^T``, built once per
        ``adj`` (``adj`` itself when symmetric).
    """
    _check_pair(adj, x)
    return resolve("csr_spmm", backend, x.device)(adj, x)
