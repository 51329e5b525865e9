"""Restricted unpicklers: reading a pickle never imports or runs anything it names.

``pickle.load`` calls whatever callable the stream names, so a pickle from the internet is a
program. Every global a stream asks for goes through :meth:`_RestrictedUnpickler.find_class`,
which answers only from a fixed table; anything else raises :class:`DataError` naming the file
and the refused ``module.name`` *before* the callable could be reached. The table's callables
check their arguments too (:mod:`diffkg_fast.data.pickle_numpy`: numpy arrays, dtypes, scalars
and dill's array form; :mod:`diffkg_fast.data.pickle_sparse`: scipy COO / CSR matrices), and
refuse, naming the file, what numpy or scipy would accept unchecked.

SafeDrug's ``voc_final.pkl`` needs extra care: it was written by ``dill`` from a script whose
``Voc`` class lived in ``__main__``, so the stream carries the class *by value* (its code objects
and functions, rebuilt through ``dill._dill._create_type`` / ``_create_function`` /
``_create_code``). Those names map to inert stand-ins here: the "class" is a fresh empty class,
the functions are non-callable placeholders and code objects are ``None``, so no byte of the
pickled code is ever turned into something executable.
"""

from __future__ import annotations

import _compat_pickle
import io
import itertools
import os
import pickle
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffkg_fast.data.errors import DataError, cut, excerpt
from diffkg_fast.data.pickle_numpy import (
    DILL_MODULES,
    NUMPY_TABLE,
    Refused,
    _Frozen,
    plain_array,
)
from diffkg_fast.data.pickle_sparse import SPARSE_TABLE, SparseState, rebuild_sparse

VOC_KEYS = ("diag_voc", "pro_voc", "med_voc")

# ``allowed`` names for :func:`load_plain_pickle`: numpy arrays and scalars (numpy's own pickles
# and dill's), and those plus scipy's COO / CSR matrices.
NUMPY_GLOBALS = frozenset(NUMPY_TABLE)
SPARSE_GLOBALS = NUMPY_GLOBALS | frozenset(SPARSE_TABLE)
_SAFE: dict[str, object] = {**NUMPY_TABLE, **SPARSE_TABLE}


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
        raise Refused(f"dill._dill._load_type({excerpt(name)})")
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
        raise Refused(f"setattr on a {type(obj).__name__}")
    # Nothing is set: the stand-ins need no attribute, and the stream gains nothing.


def _safe_reconstructor(cls: object, _base: object, state: object) -> object:
    # copyreg._reconstructor(cls, object, None) is how protocols 0 and 1 create instances.
    if not (isinstance(cls, type) and issubclass(cls, VocStandIn | SparseState)):
        raise Refused("copyreg._reconstructor of a class that is not a stand-in")
    if state is not None:
        raise Refused("copyreg._reconstructor with a base state")
    return object.__new__(cls)


def _latin1_encode(text: object, encoding: object) -> bytes:
    # Protocols 0-2 write bytes as ``_codecs.encode(str, 'latin1')``. The real function looks
    # the codec up by name (importing modules), so only these two spellings are honoured.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


# Every function handed to a stream is wrapped (_Frozen): a stream can BUILD (set attributes,
# even ``__defaults__``) on any object it gets, and must not alter this module for the process.
_RECONSTRUCTOR = _Frozen(_safe_reconstructor)
# Plain data in every protocol: bytes in protocols 0-2.
_PLAIN: dict[str, object] = {"_codecs.encode": _Frozen(_latin1_encode)}

_DILL_SAFE: dict[str, object] = {
    "_create_type": _Frozen(_create_type),
    "_load_type": _Frozen(_load_type),
    "_create_function": _Frozen(_create_function),
    "_create_code": _Frozen(_create_code),
    "_create_namespace": _Frozen(_create_namespace),
}
_VOC_EXTRA: dict[str, object] = {
    "copyreg._reconstructor": _RECONSTRUCTOR,
    "builtins.setattr": _Frozen(_safe_setattr),
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
            if isinstance(found, type) and issubclass(found, SparseState):
                return self._fresh(found)
            return found
        if full in _PLAIN:
            return _PLAIN[full]
        if self._voc:
            if name == "Voc":  # ``__main__.Voc`` or our own ``diffkg_fast.data.safedrug.Voc``
                return self._fresh(VocStandIn)
            if module in DILL_MODULES and name in _DILL_SAFE:
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
            f"refusing to unpickle global {excerpt(full, 120)} (a pickle could run it); this "
            f"file may hold "
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
    except Refused as exc:  # a table entry refused its arguments
        raise DataError(f"refusing {exc}", path=path) from exc
    except RecursionError as exc:
        raise DataError("pickle nests too deeply", path=path) from exc
    # Only stand-ins and numpy's reconstructors can run, so any other failure is a malformed or
    # truncated stream (UnpicklingError, EOFError, TypeError from an inert call, ...).
    except Exception as exc:
        raise DataError(
            f"not a readable pickle (corrupt or truncated?): {type(exc).__name__}: "
            f"{cut(str(exc))}",
            path=path,
        ) from exc


# ---------------------------------------------------------------------- plain pickles
def load_plain_pickle(
    path: str | os.PathLike[str], allowed: Iterable[str] = frozenset()
) -> Any:
    """Unpickle plain data (lists, dicts, ints, str, ...) plus the globals named in ``allowed``.

    ``allowed`` holds ``"module.name"`` strings drawn from :data:`NUMPY_GLOBALS` (numpy arrays
    and scalars, as numpy and as dill pickle them) and :data:`SPARSE_GLOBALS` (scipy COO / CSR
    matrices and arrays, numpy included). Sparse matrices come back as ``scipy.sparse``
    ``coo_matrix`` / ``csr_matrix`` rebuilt from checked state; a top-level array as a plain
    ``np.ndarray`` (nested ones are of a private subclass that only checks ``__setstate__``).
    Any other global, arguments a stand-in refuses, a corrupt or truncated file, raise
    :class:`DataError` naming the file (and what was refused).
    """
    allowed = frozenset(allowed)
    unknown = allowed - _SAFE.keys()
    if unknown:
        raise ValueError(f"no safe stand-in for {sorted(unknown)}; choose from {sorted(_SAFE)}")
    path = Path(path)
    table = {k: _SAFE[k] for k in allowed}
    sparse = bool(allowed & (SPARSE_GLOBALS - NUMPY_GLOBALS))
    if sparse:  # protocols 0 and 1 create instances through copyreg
        table["copyreg._reconstructor"] = _RECONSTRUCTOR
        table["builtins.object"] = object
    obj = plain_array(_unpickle(path, table, voc=False))
    if sparse:
        obj = rebuild_sparse(obj, path)
    return obj


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
        got = excerpt(list(obj)) if isinstance(obj, dict) else type(obj).__name__
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
            missing = [excerpt(k, 20) for k in itertools.islice(
                (k for k in i2w if not (isinstance(k, int) and 0 <= k < n)), 3)]
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
            + (f": word {excerpt(words[bad])} at index {bad}" if bad is not None else ""),
            path=path, field=f"{key}.word2idx",
        )
    return words
