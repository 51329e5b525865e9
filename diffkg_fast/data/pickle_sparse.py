"""scipy sparse matrices from a pickle stream, rebuilt from checked state after loading.

Old scipy pickles (``row`` / ``col`` state) do not restore into scipy >= 1.13 (``coords``
state), and scipy's own ``__setstate__`` checks nothing, so the classes map to state holders and
:func:`rebuild_sparse` builds the real matrix from the checked arrays afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.errors import DataError, cut, excerpt

_SPARSE_KINDS = {
    "coo_matrix": "coo",
    "coo_array": "coo",
    "csr_matrix": "csr",
    "csr_array": "csr",
}


class SparseState:
    """Holds a pickled scipy sparse matrix's state until it is checked and rebuilt."""

    kind = ""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _CooState(SparseState):
    kind = "coo"


class _CsrState(SparseState):
    kind = "csr"


# Every module path scipy has used for these classes (``coo`` / ``csr`` before 1.8, the private
# ``_coo`` / ``_csr`` since).
SPARSE_TABLE: dict[str, type[SparseState]] = {
    f"scipy.sparse.{mod}{kind}.{cls}": _CooState if kind == "coo" else _CsrState
    for cls, kind in _SPARSE_KINDS.items()
    for mod in ("", "_")
}


def rebuild_sparse(obj: Any, path: Path, depth: int = 0) -> Any:
    """Replace sparse state holders (at the top or inside lists / tuples / dicts) by matrices."""
    if isinstance(obj, SparseState):
        return _sparse_from_state(obj, path)
    if depth > 3:  # DiffKG stores bare matrices; don't walk deep plain data for nothing
        return obj
    if isinstance(obj, list | tuple):
        return type(obj)(rebuild_sparse(x, path, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return {k: rebuild_sparse(v, path, depth + 1) for k, v in obj.items()}
    return obj


def _array(state: dict, key: str, path: Path, *, integer: bool) -> np.ndarray:
    a = state.get(key)
    if not isinstance(a, np.ndarray) or a.ndim != 1:
        raise DataError(f"sparse matrix state needs a 1-D array {key!r}", path=path, field=key)
    if a.dtype.kind not in ("iu" if integer else "iufb"):
        raise DataError(f"{key!r} has dtype {a.dtype}, expected a numeric array", path=path,
                        field=key)
    return np.asarray(a)  # a plain ndarray, not the unpickler's checked subclass


def _shape(state: dict, path: Path) -> tuple[int, int]:
    shape = state.get("_shape", state.get("shape"))
    if (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or not all(isinstance(s, int | np.integer) and s >= 0 for s in shape)
    ):
        raise DataError(f"sparse matrix shape {excerpt(shape)} is not two non-negative ints",
                        path=path, field="shape")
    return int(shape[0]), int(shape[1])


def _coo(state: dict, shape: tuple[int, int], data: np.ndarray, path: Path) -> sp.coo_matrix:
    coords = state.get("coords")
    if coords is not None:
        if not isinstance(coords, tuple) or len(coords) != 2:
            raise DataError("'coords' must be a (row, col) pair", path=path, field="coords")
        state = {**state, "row": coords[0], "col": coords[1]}
    row = _array(state, "row", path, integer=True)
    col = _array(state, "col", path, integer=True)
    if not len(row) == len(col) == len(data):
        raise DataError("row, col and data lengths differ", path=path, field="data")
    if len(row) and (row.min() < 0 or row.max() >= shape[0] or col.min() < 0
                     or col.max() >= shape[1]):
        raise DataError(f"an index lies outside the shape {shape}", path=path, field="row/col")
    return sp.coo_matrix((data, (row, col)), shape=shape)


def _csr(state: dict, shape: tuple[int, int], data: np.ndarray, path: Path) -> sp.csr_matrix:
    indptr = _array(state, "indptr", path, integer=True)
    indices = _array(state, "indices", path, integer=True)
    if (len(indptr) != shape[0] + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
            or indptr[-1] != len(indices) or len(indices) != len(data)):
        raise DataError("inconsistent CSR indptr / indices / data", path=path, field="indptr")
    if len(indices) and (indices.min() < 0 or indices.max() >= shape[1]):
        raise DataError(f"a column index lies outside the shape {shape}", path=path,
                        field="indices")
    return sp.csr_matrix((data, indices, indptr), shape=shape)


def _sparse_from_state(holder: SparseState, path: Path) -> sp.spmatrix:
    state = getattr(holder, "state", None)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]  # (dict, slotstate) form
    if not isinstance(state, dict):
        raise DataError("sparse matrix pickle without a state dict", path=path)
    shape = _shape(state, path)
    data = _array(state, "data", path, integer=False)
    try:
        build = _coo if holder.kind == "coo" else _csr
        return build(state, shape, data, path)
    except (ValueError, TypeError, MemoryError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot rebuild the sparse matrix: {cut(str(exc))}", path=path) from exc
