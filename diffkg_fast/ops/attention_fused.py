"""The fused RGAT layer as a torch op: ``torch.ops.diffkg_fast.rgat_forward`` / ``rgat_backward``.

Schemas live in ``csrc/attention.cpp``; the CPU kernels in ``csrc/cpu/attention_cpu.cpp``; the CUDA
kernels are the Triton kernels of :mod:`diffkg_fast.kernels.attention`, registered here for the
``cuda`` dispatch key. This module adds the fake (shape-only) implementations, for
``torch.compile``, and the autograd formula (``rgat_forward``'s backward is ``rgat_backward``).
The math is in :mod:`diffkg_fast.ops.attention`, whose reference is the oracle of both kernels.

The op takes the per-relation projections ``P1 = Rel W1^T`` and ``P2 = Rel W2^T`` (R × d,
computed by autograd-visible matmuls here, so ``dRel`` and ``dW`` follow from ``dP1``, ``dP2``)
and the graph as tensors: the head CSR, the transposed CSR (``KGCSR.by_tail``) and the relation
grouping (``KGCSR.by_relation``), each built once per graph. The dropout mask is an input (drawn
with :func:`~diffkg_fast.ops.attention.dropout_mask`, the reference's generator and call), so the
fused and reference layers agree mask for mask.

Backends of ``rgat_aggregate``: ``"cpu"`` (the C++ kernels; ``"auto"`` on a CPU, building the
extension on first use and falling back to the reference with one warning when it cannot be
built) and ``"triton"`` (``"auto"`` on a CUDA device when Triton is installed). float16 and
bfloat16 run on the Triton path; the CPU kernels take float32 and float64 (other dtypes use the
reference).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from diffkg_fast.ops._extension import extension_available, load_extension
from diffkg_fast.ops.attention import _rgat_aggregate_reference, dropout_mask
from diffkg_fast.ops.backend import register
from diffkg_fast.ops.graph import KGCSR

__all__ = ["ensure_ops", "graph_tensors"]

_LOCK = threading.Lock()
_PY_REGISTERED = False
_CPU_DTYPES = (torch.float32, torch.float64)
_N_GRAPH = 8  # rowptr, col, rel, t_rowptr, t_edge, row, r_rowptr, r_edge


def graph_tensors(kg: KGCSR) -> tuple[Tensor, ...]:
    """The eight graph tensors of the op's schema, in order (the aux ones cached on ``kg``)."""
    t_rowptr, t_edge = kg.by_tail
    r_rowptr, r_edge = kg.by_relation
    return kg.rowptr, kg.col, kg.rel, t_rowptr, t_edge, kg.row, r_rowptr, r_edge


def _acc_dtype(E: Tensor) -> torch.dtype:
    return torch.float64 if E.dtype == torch.float64 else torch.float32


def _fake_forward(E, P1, P2, rowptr, col, rel, t_rowptr, t_edge, row, r_rowptr, r_edge, mask,
                  normalize):
    torch._check(E.dim() == 2 and P1.dim() == 2 and P2.dim() == 2,
                 lambda: "rgat_forward: E, P1 and P2 must be 2-D")
    n = E.shape[0]
    return (torch.empty_like(E, memory_format=torch.contiguous_format),
            E.new_empty((n,), dtype=_acc_dtype(E)), E.new_empty((n,), dtype=_acc_dtype(E)))


def _fake_backward(grad_y, E, P1, P2, rowptr, col, rel, t_rowptr, t_edge, row, r_rowptr, r_edge,
                   y, lse, norm, mask, normalize):
    return (torch.empty_like(E, memory_format=torch.contiguous_format),
            torch.empty_like(P1, memory_format=torch.contiguous_format),
            torch.empty_like(P2, memory_format=torch.contiguous_format))


def _setup_forward(ctx, inputs, output) -> None:
    E, P1, P2, *graph, mask, normalize = inputs
    y, lse, norm = output
    ctx.mark_non_differentiable(lse, norm)
    ctx.normalize = normalize
    ctx.has_mask = mask is not None
    ctx.save_for_backward(E, P1, P2, *graph, y, lse, norm,
                          *((mask,) if mask is not None else ()))


def _backward_forward(ctx, grad_y: Tensor, _grad_lse, _grad_norm):
    E, P1, P2, *rest = ctx.saved_tensors
    graph, (y, lse, norm) = rest[:_N_GRAPH], rest[_N_GRAPH:_N_GRAPH + 3]
    mask = rest[-1] if ctx.has_mask else None
    dE, dP1, dP2 = torch.ops.diffkg_fast.rgat_backward(
        grad_y.contiguous(), E, P1, P2, *graph, y, lse, norm, mask, ctx.normalize)
    return (dE, dP1, dP2) + (None,) * _N_GRAPH + (None, None)


_GRAPH_NAMES = ("rowptr", "col", "rel", "t_rowptr", "t_edge", "row", "r_rowptr", "r_edge")
# rowptr -> (n, R, ids and versions of the eight graph tensors) last validated: the value checks
# cost a device-to-host sync, paid once per graph (DiffKG rebuilds its KG once an epoch).
_VALIDATED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _check_triton_args(op: str, E: Tensor, P1: Tensor, P2: Tensor, graph: tuple[Tensor, ...],
                       floats: dict[str, tuple[Tensor | None, tuple[int, ...], torch.dtype]],
                       ) -> tuple[Tensor, ...]:
    """The CPU kernel's checks (``check_args`` of csrc/cpu/attention_cpu.cpp) for the Triton
    path, whose kernels index ``E`` and ``P1`` by the graph's values unchecked: a bad index
    there is an illegal address that poisons the CUDA context, or silent garbage. Shapes,
    dtypes and devices at every call (no sync); the graph's values once per graph. Returns the
    graph tensors contiguous (the kernels assume stride 1)."""
    if E.dim() != 2 or not E.dtype.is_floating_point:
        raise RuntimeError(f"{op}: E must be a 2-D float tensor, got {E.dtype} of shape "
                           f"{tuple(E.shape)}")
    (n, d), dev = E.shape, E.device
    if P1.dim() != 2 or P1.shape[1] != d:
        raise RuntimeError(f"{op}: P1 must be (R, {d}), got shape {tuple(P1.shape)}")
    n_rel = P1.shape[0]
    for name, (t, shape, dtype) in {"P1": (P1, (n_rel, d), E.dtype),
                                    "P2": (P2, (n_rel, d), E.dtype), **floats}.items():
        if t is not None and (t.device != dev or tuple(t.shape) != shape or t.dtype != dtype):
            raise RuntimeError(f"{op}: {name} must be {dtype} of shape {shape} on {dev}, got "
                               f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")
    nnz = graph[1].numel()
    lengths = (n + 1, nnz, nnz, n + 1, nnz, nnz, n_rel + 1, nnz)
    for name, t, length in zip(_GRAPH_NAMES, graph, lengths, strict=True):
        if t.device != dev or t.dtype != torch.int64 or t.dim() != 1 or t.numel() != length:
            raise RuntimeError(f"{op}: {name} must be int64 of length {length} on {dev} (n = "
                               f"{n}, R = {n_rel}, nnz = col.numel() = {nnz}), got {t.dtype} "
                               f"of shape {tuple(t.shape)} on {t.device}")
    graph = tuple(t.contiguous() for t in graph)
    stamp = (n, n_rel, tuple(id(t) for t in graph), tuple(t._version for t in graph))
    if _VALIDATED.get(graph[0]) != stamp:
        _check_graph_values(op, graph, n, n_rel, nnz)
        _VALIDATED[graph[0]] = stamp
    return graph


def _check_graph_values(op: str, graph: tuple[Tensor, ...], n: int, n_rel: int,
                        nnz: int) -> None:
    rowptr, col, rel, t_rowptr, t_edge, row, r_rowptr, r_edge = graph

    def offsets_bad(p: Tensor) -> Tensor:  # CSR offsets: from 0 to nnz, non-decreasing
        return (p[0] != 0) | (p[-1] != nnz) | (p.diff() < 0).any()

    def outside(t: Tensor, hi: int) -> Tensor:
        return ((t < 0) | (t >= hi)).any()

    checks = {
        "rowptr must run from 0 to nnz and be non-decreasing": offsets_bad(rowptr),
        "t_rowptr must run from 0 to nnz and be non-decreasing": offsets_bad(t_rowptr),
        "r_rowptr must run from 0 to nnz and be non-decreasing": offsets_bad(r_rowptr),
        f"col holds an index outside [0, {n})": outside(col, n),
        f"row holds an index outside [0, {n})": outside(row, n),
        f"rel holds an index outside [0, {n_rel})": outside(rel, n_rel),
        f"t_edge holds an index outside [0, {nnz})": outside(t_edge, nnz),
        f"r_edge holds an index outside [0, {nnz})": outside(r_edge, nnz),
    }
    bad = torch.stack(list(checks.values())).tolist()  # one device-to-host sync
    for what, flag in zip(checks, bad, strict=True):
        if flag:
            raise RuntimeError(f"{op}: {what}")


def _triton_forward(E, P1, P2, rowptr, col, rel, t_rowptr, t_edge, row, r_rowptr, r_edge, mask,
                    normalize):
    from diffkg_fast.kernels.attention import rgat_forward

    n, d = E.shape
    graph = _check_triton_args("rgat_forward", E, P1, P2, (
        rowptr, col, rel, t_rowptr, t_edge, row, r_rowptr, r_edge),
        {"mask": (mask, (n, d), E.dtype)})
    return rgat_forward(E.contiguous(), P1.contiguous(), P2.contiguous(), *graph[:3],
                        None if mask is None else mask.contiguous(), normalize)


def _triton_backward(grad_y, E, P1, P2, rowptr, col, rel, t_rowptr, t_edge, row, r_rowptr,
                     r_edge, y, lse, norm, mask, normalize):
    from diffkg_fast.kernels.attention import rgat_backward

    n, d = E.shape
    acc = _acc_dtype(E)
    graph = _check_triton_args("rgat_backward", E, P1, P2, (
        rowptr, col, rel, t_rowptr, t_edge, row, r_rowptr, r_edge),
        {"grad_y": (grad_y, (n, d), E.dtype), "y": (y, (n, d), E.dtype),
         "lse": (lse, (n,), acc), "norm": (norm, (n,), acc), "mask": (mask, (n, d), E.dtype)})
    return rgat_backward(grad_y.contiguous(), E.contiguous(), P1.contiguous(),
                         P2.contiguous(), *graph, y.contiguous(), lse.contiguous(),
                         norm.contiguous(), None if mask is None else mask.contiguous(),
                         normalize)


def _has_triton() -> bool:
    from diffkg_fast.kernels import HAS_TRITON

    return HAS_TRITON


@torch.compiler.disable  # a lock and a build: run eagerly (a graph break on a cold first call)
def ensure_ops() -> None:
    """Load the extension (building it on first use) and register the Python parts of the op:
    fakes, autograd, and the Triton kernels for CUDA tensors (where Triton is installed)."""
    global _PY_REGISTERED
    if _PY_REGISTERED:
        return
    load_extension()
    with _LOCK:
        if _PY_REGISTERED:
            return
        torch.library.register_fake("diffkg_fast::rgat_forward")(_fake_forward)
        torch.library.register_fake("diffkg_fast::rgat_backward")(_fake_backward)
        torch.library.register_autograd("diffkg_fast::rgat_forward", _backward_forward,
                                        setup_context=_setup_forward)
        if _has_triton():
            torch.library.register_kernel("diffkg_fast::rgat_forward", "cuda", _triton_forward)
            torch.library.register_kernel("diffkg_fast::rgat_backward", "cuda",
                                          _triton_backward)
        _PY_REGISTERED = True


def _rgat_fused(E: Tensor, Rel: Tensor, W: Tensor, kg: KGCSR, *, dropout: float = 0.0,
                training: bool = False, normalize: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    d = E.shape[1]
    if d == 0 or (E.device.type == "cpu" and E.dtype not in _CPU_DTYPES):
        return _rgat_aggregate_reference(E, Rel, W, kg, dropout=dropout, training=training,
                                         normalize=normalize, generator=generator)
    if E.device.type == "cuda":
        from diffkg_fast.kernels.attention import MAX_D

        if d > MAX_D:  # a row must fit in registers
            return _rgat_aggregate_reference(E, Rel, W, kg, dropout=dropout,
                                             training=training, normalize=normalize,
                                             generator=generator)
    if not _PY_REGISTERED:  # read as a constant under torch.compile once registered
        ensure_ops()
    p1 = Rel @ W[:d].T
    p2 = Rel @ W[d:].T
    mask = None
    if training and dropout > 0.0:
        mask = dropout_mask((kg.n_entities, d), dropout, generator, E.device, E.dtype)
    y, _, _ = torch.ops.diffkg_fast.rgat_forward(E.contiguous(), p1, p2, *graph_tensors(kg),
                                                 mask, normalize)
    return y


def _triton_usable() -> bool:
    return _has_triton() and extension_available()


# "auto" on a CPU: the C++ kernels, built on first use (extension_available() tries once, warns
# and answers False when it cannot build: the reference then runs). On CUDA: the Triton kernels.
register("rgat_aggregate", "cpu", auto_if=extension_available)(_rgat_fused)
register("rgat_aggregate", "triton", auto_if=_triton_usable)(_rgat_fused)
