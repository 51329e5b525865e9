"""Restricted unpicklers: reading a pickle never imports or runs anything it names.

``pickle.load`` calls whatever callable the stream names, so a pickle from the internet is a
program. Every global a stream asks for goes through :meth:`_RestrictedUnpickler.find_class`,
which answers only from a fixed table; anything else raises :class:`DataError` naming the file
and the refused ``module.name`` *before* the callable could be reached.

SafeDrug's ``voc_final.pkl`` needs extra care: it was written by ``dill`` from a script whose
``Voc`` class lived in ``__main__``, so the stream carries the class *by value* (its code objects
and functions, rebuilt through ``dill._dill._create_type`` / ``_create_function`` /
``_create_code``). Those names map to inert stand-ins here: the "class" is a fresh empty class,
the functions are non-callable placeholders and code objects are ``None``, so no byte of the
pickled code is ever turned into something executable.

Sparse matrices are not rebuilt by scipy at load time either: old scipy pickles (``row`` /
``col`` state) do not restore into scipy >= 1.13 (``coords`` state), so the classes map to state
holders and :func:`load_plain_pickle` builds the real matrix from the checked arrays afterwards.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.errors import DataError

VOC_KEYS = ("diag_voc", "pro_voc", "med_voc")

# numpy's own reconstructors, found through the objects (numpy 1 calls the module
# ``numpy.core.multiarray``, numpy 2 ``numpy._core.multiarray``; both spellings occur in files).
_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_NP_SCALAR = np.float64(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 (out-of-band buffers)


def _np_frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    # A wrapper, not numpy's Python function itself: a stream can set attributes (even
    # ``__defaults__``) on any object it is handed, and must not alter numpy for the process.
    return _NP_FROMBUFFER(buf, dtype, shape, order)

NUMPY_GLOBALS = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",
        "numpy._core.numeric._frombuffer",
    }
)

_SPARSE_KINDS = {
    "coo_matrix": "coo",
    "coo_array": "coo",
    "csr_matrix": "csr",
    "csr_array": "csr",
}
# Every module path scipy has used for these classes (``coo`` / ``csr`` before 1.8, the private
# ``_coo`` / ``_csr`` since).
SPARSE_GLOBALS = NUMPY_GLOBALS | frozenset(
    f"scipy.sparse.{mod}{kind}.{cls}"
    for cls, kind in _SPARSE_KINDS.items()
    for mod in ("", "_")
)


class _SparseState:
    """Holds a pickled scipy sparse matrix's state until it is checked and rebuilt."""

    kind = ""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _CooState(_SparseState):
    kind = "coo"


class _CsrState(_SparseState):
    kind = "csr"


_SAFE: dict[str, object] = {
    "numpy.core.multiarray._reconstruct": _NP_RECONSTRUCT,
    "numpy._core.multiarray._reconstruct": _NP_RECONSTRUCT,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "numpy.core.multiarray.scalar": _NP_SCALAR,
    "numpy._core.multiarray.scalar": _NP_SCALAR,
    "numpy.core.numeric._frombuffer": _np_frombuffer,
    "numpy._core.numeric._frombuffer": _np_frombuffer,
}
for _name in SPARSE_GLOBALS - NUMPY_GLOBALS:
    _SAFE[_name] = _CooState if _SPARSE_KINDS[_name.rsplit(".", 1)[1]] == "coo" else _CsrState


# ---------------------------------------------------------------------- inert stand-ins
class VocStandIn:
    """What a pickled SafeDrug ``Voc`` becomes: a plain object holding its attribute dict."""


class _InertFunction:
    """Placeholder for a function dill would rebuild from pickled code: it cannot be called."""

    __call__ = None  # calling it raises TypeError (the unpickler turns that into DataError)


class _TypeToken:
    """What ``dill._dill._load_type('object' | 'type')`` yields: a name, not the real type."""

    def __init__(self, name: str) -> None:
        self.name = name

    __call__ = None


def _create_type(*_args: object) -> type:
    # A fresh subclass per call: attributes a stream sets on "its" class never leak into another
    # load. The pickled name, bases and class dict (methods, __setstate__, ...) are ignored.
    return type("Voc", (VocStandIn,), {})


def _load_type(name: object) -> _TypeToken:
    if name not in ("object", "type"):
        raise pickle.UnpicklingError(f"dill._dill._load_type({name!r}) is not allowed")
    return _TypeToken(str(name))


def _create_function(*_args: object) -> _InertFunction:
    return _InertFunction()


def _create_code(*_args: object) -> None:
    return None


def _create_namespace(*_args: object) -> types.SimpleNamespace:
    return types.SimpleNamespace()


def _safe_setattr(obj: object, name: object, _value: object) -> None:
    # dill sets ``__qualname__`` on the rebuilt class this way; only the stand-in classes (and
    # their instances) may be targets, and nothing is actually set: the stand-ins need nothing.
    if not (isinstance(obj, type) and issubclass(obj, VocStandIn)) and not isinstance(
        obj, VocStandIn
    ):
        raise pickle.UnpicklingError(f"setattr on a {type(obj).__name__} is not allowed")
    # Nothing is set: the stand-ins need no attribute, and the stream gains nothing.


def _safe_reconstructor(cls: object, _base: object, state: object) -> object:
    # copyreg._reconstructor(cls, object, None) is how protocols 0 and 1 create instances.
    if not (isinstance(cls, type) and issubclass(cls, VocStandIn | _SparseState)):
        raise pickle.UnpicklingError("copyreg._reconstructor of a class that is not a stand-in")
    if state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor with a base state is not allowed")
    return object.__new__(cls)


def _latin1_encode(text: object, encoding: object) -> bytes:
    # Protocols 0-2 write bytes as ``_codecs.encode(str, 'latin1')``. The real function looks
    # the codec up by name (importing modules), so only these two spellings are honoured.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as (str, 'latin1')")
    return text.encode("latin1")


# Plain data in every protocol: bytes in protocols 0-2.
_PLAIN: dict[str, object] = {"_codecs.encode": _latin1_encode}

_DILL_SAFE: dict[str, object] = {
    "_create_type": _create_type,
    "_load_type": _load_type,
    "_create_function": _create_function,
    "_create_code": _create_code,
    "_create_namespace": _create_namespace,
}
_VOC_EXTRA: dict[str, object] = {
    "copyreg._reconstructor": _safe_reconstructor,
    "builtins.setattr": _safe_setattr,
    "builtins.object": object,
}
# dill(recurse=True) stores the globals a method uses; SafeDrug's Voc uses only ``len``.
_VOC_TOKENS = frozenset({"builtins.type", "builtins.len"})


# ---------------------------------------------------------------------- the unpickler
class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path, table: dict[str, object],
                 voc: bool) -> None:
        super().__init__(file)
        self._path = path
        self._table = table
        self._voc = voc
        self._main: types.ModuleType | None = None
        # Classes are handed out as fresh subclasses private to this load: a stream may set
        # attributes on any object it gets (BUILD), and the module's classes must stay intact.
        self._private: dict[type, type] = {}

    def _fresh(self, cls: type) -> type:
        if cls not in self._private:
            self._private[cls] = type(cls.__name__, (cls,), {})
        return self._private[cls]

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell Python 2 names (``copy_reg``, ``__builtin__``); translate them
        # the way pickle's own find_class does, then look the result up in the table.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in self._table:
            found = self._table[full]
            if isinstance(found, type) and issubclass(found, _SparseState):
                return self._fresh(found)
            return found
        if full in _PLAIN:
            return _PLAIN[full]
        if self._voc:
            if name == "Voc":  # ``__main__.Voc`` or our own ``diffkg_fast.data.safedrug.Voc``
                return self._fresh(VocStandIn)
            if module in ("dill._dill", "dill.dill") and name in _DILL_SAFE:
                return _DILL_SAFE[name]
            if module == "builtins" and name == "__main__":
                if self._main is None:
                    self._main = types.ModuleType("__main__")  # empty; never the real one
                return self._main
            if full == "__main__.__dict__":  # dill's spelling when __main__ was swapped
                return {}
            if full in _VOC_EXTRA:
                return _VOC_EXTRA[full]
            if full in _VOC_TOKENS:
                return _TypeToken(name)
        kinds = ["plain data (lists, dicts, numbers, strings)"]
        if self._voc:
            kinds.append("SafeDrug Voc objects")
        if NUMPY_GLOBALS & self._table.keys():
            kinds.append("numpy arrays")
        if (SPARSE_GLOBALS - NUMPY_GLOBALS) & self._table.keys():
            kinds.append("scipy COO/CSR matrices")
        raise DataError(
            f"refusing to unpickle global {full!r} (a pickle could run it); this file may hold "
            f"only {', '.join(kinds)}",
            path=self._path,
        )


def _unpickle(path: str | os.PathLike[str], table: dict[str, object], voc: bool) -> Any:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
    if not data:
        raise DataError("empty file (expected a pickle)", path=path)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path, table, voc).load()
    except DataError:
        raise
    except RecursionError as exc:
        raise DataError("pickle nests too deeply", path=path) from exc
    # Only stand-ins and numpy's reconstructors can run, so any other failure is a malformed or
    # truncated stream (UnpicklingError, EOFError, TypeError from an inert call, ...).
    except Exception as exc:
        raise DataError(
            f"not a readable pickle (corrupt or truncated?): {type(exc).__name__}: {exc}",
            path=path,
        ) from exc


# ---------------------------------------------------------------------- plain pickles
def load_plain_pickle(
    path: str | os.PathLike[str], allowed: Iterable[str] = frozenset()
) -> Any:
    """Unpickle plain data (lists, dicts, ints, str, ...) plus the globals named in ``allowed``.

    ``allowed`` holds ``"module.name"`` strings drawn from :data:`NUMPY_GLOBALS` (numpy arrays)
    and :data:`SPARSE_GLOBALS` (scipy COO / CSR matrices and arrays, numpy included). Sparse
    matrices come back as ``scipy.sparse`` ``coo_matrix`` / ``csr_matrix`` rebuilt from checked
    state. Any other global, a corrupt or truncated file, raises :class:`DataError` naming the
    file (and the refused global).
    """
    allowed = frozenset(allowed)
    unknown = allowed - _SAFE.keys()
    if unknown:
        raise ValueError(f"no safe stand-in for {sorted(unknown)}; choose from {sorted(_SAFE)}")
    path = Path(path)
    table = {k: _SAFE[k] for k in allowed}
    sparse = bool(allowed & (SPARSE_GLOBALS - NUMPY_GLOBALS))
    if sparse:  # protocols 0 and 1 create instances through copyreg
        table["copyreg._reconstructor"] = _safe_reconstructor
        table["builtins.object"] = object
    obj = _unpickle(path, table, voc=False)
    if sparse:
        obj = _rebuild_sparse(obj, path, depth=0)
    return obj


def _rebuild_sparse(obj: Any, path: Path, depth: int) -> Any:
    """Replace sparse state holders (at the top or inside lists / tuples / dicts) by matrices."""
    if isinstance(obj, _SparseState):
        return _sparse_from_state(obj, path)
    if depth > 3:  # DiffKG stores bare matrices; don't walk deep plain data for nothing
        return obj
    if isinstance(obj, list | tuple):
        return type(obj)(_rebuild_sparse(x, path, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return {k: _rebuild_sparse(v, path, depth + 1) for k, v in obj.items()}
    return obj


def _array(state: dict, key: str, path: Path, *, integer: bool) -> np.ndarray:
    a = state.get(key)
    if not isinstance(a, np.ndarray) or a.ndim != 1:
        raise DataError(f"sparse matrix state needs a 1-D array {key!r}", path=path, field=key)
    if a.dtype.kind not in ("iu" if integer else "iufb"):
        raise DataError(f"{key!r} has dtype {a.dtype}, expected a numeric array", path=path,
                        field=key)
    return a


def _sparse_from_state(holder: _SparseState, path: Path) -> sp.spmatrix:
    state = getattr(holder, "state", None)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]  # (dict, slotstate) form
    if not isinstance(state, dict):
        raise DataError("sparse matrix pickle without a state dict", path=path)
    shape = state.get("_shape", state.get("shape"))
    if (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or not all(isinstance(s, int | np.integer) and s >= 0 for s in shape)
    ):
        raise DataError(f"sparse matrix shape {shape!r} is not two non-negative ints",
                        path=path, field="shape")
    shape = (int(shape[0]), int(shape[1]))
    data = _array(state, "data", path, integer=False)
    try:
        if holder.kind == "coo":
            coords = state.get("coords")
            if coords is not None:
                if not isinstance(coords, tuple) or len(coords) != 2:
                    raise DataError("'coords' must be a (row, col) pair", path=path,
                                    field="coords")
                state = {**state, "row": coords[0], "col": coords[1]}
            row = _array(state, "row", path, integer=True)
            col = _array(state, "col", path, integer=True)
            if not len(row) == len(col) == len(data):
                raise DataError("row, col and data lengths differ", path=path, field="data")
            if len(row) and (row.min() < 0 or row.max() >= shape[0] or col.min() < 0
                             or col.max() >= shape[1]):
                raise DataError(f"an index lies outside the shape {shape}", path=path,
                                field="row/col")
            return sp.coo_matrix((data, (row, col)), shape=shape)
        indptr = _array(state, "indptr", path, integer=True)
        indices = _array(state, "indices", path, integer=True)
        if (len(indptr) != shape[0] + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
                or indptr[-1] != len(indices) or len(indices) != len(data)):
            raise DataError("inconsistent CSR indptr / indices / data", path=path,
                            field="indptr")
        if len(indices) and (indices.min() < 0 or indices.max() >= shape[1]):
            raise DataError(f"a column index lies outside the shape {shape}", path=path,
                            field="indices")
        return sp.csr_matrix((data, indices, indptr), shape=shape)
    except DataError:
        raise
    except (ValueError, TypeError, MemoryError) as exc:
        raise DataError(f"cannot rebuild the sparse matrix: {exc}", path=path) from exc


# ---------------------------------------------------------------------- SafeDrug vocabularies
def load_safedrug_voc(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read SafeDrug's ``voc_final.pkl`` into ``{'diag_voc', 'pro_voc', 'med_voc'}`` code lists.

    Each list is ordered by index (``idx2word``). Accepts the dill stream SafeDrug writes (the
    ``Voc`` class by value, rebuilt as an inert stand-in) and plain pickles of any class named
    ``Voc`` by reference. Raises :class:`DataError` naming the file and the refused global, or
    the vocabulary whose ``idx2word`` / ``word2idx`` are not a consistent bijection with
    ``0 … n-1``.
    """
    path = Path(path)
    obj = _unpickle(path, {}, voc=True)
    if not isinstance(obj, dict) or set(obj) != set(VOC_KEYS):
        got = sorted(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"expected a dict with keys {list(VOC_KEYS)}, got {got}", path=path)
    return {key: _voc_words(obj[key], path, key) for key in VOC_KEYS}


def _voc_words(voc: object, path: Path, key: str) -> list[str]:
    if not isinstance(voc, VocStandIn):
        raise DataError(f"expected a Voc object, got {type(voc).__name__}", path=path, field=key)
    i2w = voc.__dict__.get("idx2word")
    w2i = voc.__dict__.get("word2idx")
    if not isinstance(i2w, dict) or not isinstance(w2i, dict):
        raise DataError("Voc needs dicts idx2word and word2idx", path=path, field=key)
    n = len(i2w)
    words: list[str] = []
    for i in range(n):
        w = i2w.get(i)
        if not isinstance(w, str):
            missing = sorted(repr(k) for k in i2w if not (isinstance(k, int) and 0 <= k < n))[:3]
            raise DataError(
                f"idx2word keys must be the ints 0 … {n - 1} mapping to str; "
                f"index {i} is {'missing' if w is None else type(w).__name__}"
                f"{' (unexpected keys ' + ', '.join(missing) + ')' if missing else ''}",
                path=path, field=f"{key}.idx2word",
            )
        words.append(w)
    if len(w2i) != n or any(w2i.get(w) != i for i, w in enumerate(words)):
        bad = next((i for i, w in enumerate(words) if w2i.get(w) != i), None)
        raise DataError(
            f"word2idx ({len(w2i)} entries) is not the inverse of idx2word ({n} entries)"
            + (f": word {words[bad]!r} at index {bad}" if bad is not None else ""),
            path=path, field=f"{key}.word2idx",
        )
    return words
