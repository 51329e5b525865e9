"""numpy arrays, dtypes and scalars from a pickle stream, checked before numpy sees them.

numpy's own reconstructors trust the stream: ``ndarray.__setstate__`` with an object dtype and a
list shorter than the shape reads past the list (a crash, or arbitrary objects), a ``dtype``'s
state can place a field outside its item, ``scalar(dtype('U'))`` sets the itemsize of numpy's
shared unsized ``'U'`` dtype for the whole process, and ``_reconstruct`` allocates whatever
shape it is given. So the restricted unpickler hands out the callables below instead:

- ``numpy.dtype(spec, align, copy)`` returns a :class:`_DtypeSpec` that records the spec and the
  state BUILD gives it; :func:`resolve_dtype` turns it into a fresh ``np.dtype`` when an array
  or scalar needs it, accepting only sized, non-structured, non-object dtypes whose state agrees
  with the spec.
- ``numpy.ndarray`` is a token (the class, called, would allocate any shape) that
  ``_reconstruct`` accepts; ``_reconstruct`` creates only the empty array numpy pickles ((0,)
  of ``b'b'``), of the private subclass :class:`_CheckedArray`, whose ``__setstate__`` checks
  shape, dtype and byte count.
- ``scalar`` needs a resolved dtype and exactly its bytes; ``_frombuffer`` likewise.
- dill's array form, ``_create_array(f, args, state, npdict)`` with ``f`` obtained as
  ``_get_attr(_import_module('numpy.core._multiarray_umath'), '_reconstruct')`` (dill < 0.3.5,
  the SafeDrug and GAMENet files) or as a global (later dill): ``_import_module`` answers only
  numpy's module spellings with an inert token, ``_get_attr`` only numpy's reconstructor names
  on that token, ``_create_array`` only the checked reconstructor, without instance attributes.

Every callable is a :class:`_Frozen` instance: a stream may BUILD (set attributes on) any
object it is handed, and these have nothing it could set.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from diffkg_fast.data.errors import excerpt

_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_NP_SCALAR = np.float64(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 (out-of-band buffers)

# numpy 1 calls its C module ``numpy.core._multiarray_umath``, numpy 2 ``numpy._core...``; old
# files name either (``multiarray`` re-exports the same functions).
NUMPY_MODULES = frozenset(
    f"numpy.{core}.{mod}" for core in ("core", "_core") for mod in ("_multiarray_umath",
                                                                     "multiarray")
)
DILL_MODULES = ("dill._dill", "dill.dill")  # dill >= 0.3 and the older spelling


class Refused(pickle.UnpicklingError):
    """The stream asked a stand-in for something outside the table (the message says what)."""


class _Frozen:
    """A callable that a stream cannot alter: no ``__dict__``, and ``setattr`` refused."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name: str, value: object) -> None:
        raise Refused(f"setting {excerpt(name)} on a numpy stand-in")

    def __call__(self, *args: object) -> Any:
        return self._fn(*args)


def _call(name: str, args: tuple) -> str:
    """``name(arg, …)`` with each argument a bounded excerpt, for messages."""
    return f"{name}({', '.join(excerpt(a, 40) for a in args[:4])}{', …' if len(args) > 4 else ''})"


# ---------------------------------------------------------------------- dtypes
class _DtypeSpec:
    """``numpy.dtype(spec, align, copy)`` as pickled, plus the state BUILD sets on it."""

    def __init__(self, spec: object) -> None:
        self.spec = spec
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


def _dtype(spec: object, _align: object = False, _copy: object = False) -> _DtypeSpec:
    return _DtypeSpec(spec)


def _checked_state_dtype(base: np.dtype, state: object) -> np.dtype:
    # numpy writes (3, byteorder, subarray, names, fields, elsize, alignment, flags), and a
    # 9th item (metadata) in version 4.
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
        raise Refused(f"numpy dtype state {excerpt(state)} is not numpy's (version 3 or 4)")
    byteorder, subarray, names, fields, elsize = state[1:6]
    if subarray is not None or names is not None or fields is not None:
        raise Refused("structured and sub-array numpy dtypes are not accepted")
    if byteorder not in ("<", ">", "|", "="):
        raise Refused(f"numpy dtype byte order {excerpt(byteorder)}")
    if elsize not in (-1, base.itemsize):
        raise Refused(f"numpy dtype {base.str} with item size {excerpt(elsize)}")
    return base.newbyteorder(byteorder) if byteorder in "<>" else base


def resolve_dtype(obj: object) -> np.dtype:
    """The fresh ``np.dtype`` a :class:`_DtypeSpec` describes, or :class:`Refused`."""
    if not isinstance(obj, _DtypeSpec) or not isinstance(obj.spec, str):
        raise Refused(f"expected a numpy dtype, got {excerpt(obj)}")
    try:
        base = np.dtype(obj.spec)
    except (TypeError, ValueError) as exc:
        raise Refused(f"numpy dtype {excerpt(obj.spec)}: {exc}") from None
    # Object arrays could hold anything, and numpy's own state checks are weakest there; an
    # unsized dtype ('U', 'S', 'V') gives no byte count to check shapes against.
    if base.hasobject or base.fields is not None or base.subdtype is not None:
        raise Refused(f"numpy dtype {excerpt(obj.spec)} (object or structured)")
    if base.itemsize == 0:
        raise Refused(f"unsized numpy dtype {excerpt(obj.spec)}")
    if base.kind not in "biufcSU":  # datetimes keep their unit in state metadata, not read here
        raise Refused(f"numpy dtype {base} (only numbers, booleans and fixed-size strings)")
    return base if obj.state is None else _checked_state_dtype(base, obj.state)


# ---------------------------------------------------------------------- arrays
def _shape(shape: object) -> tuple[int, ...]:
    ok = isinstance(shape, tuple) and len(shape) <= 32 and all(
        isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 0 for s in shape)
    if not ok:
        raise Refused(f"numpy shape {excerpt(shape)} is not a tuple of non-negative ints")
    return tuple(int(s) for s in shape)


class _CheckedArray(np.ndarray):
    """What ``_reconstruct`` creates: ``__setstate__`` checks before numpy fills the array.

    A plain ndarray otherwise (no instance attributes); :func:`plain_array` views a top-level
    one as ``np.ndarray``.
    """

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise Refused(f"numpy array state {excerpt(state)} is not numpy's")
        version = state[0] if len(state) == 5 else 0
        shape, dtype, fortran, raw = state[-4:]
        shape, dtype = _shape(shape), resolve_dtype(dtype)
        if not isinstance(fortran, bool):
            raise Refused(f"numpy array order flag {excerpt(fortran)}")
        want = math.prod(shape) * dtype.itemsize
        if not isinstance(raw, bytes | bytearray) or len(raw) != want:
            got = f"{len(raw)} bytes" if isinstance(raw, bytes | bytearray) else excerpt(raw)
            raise Refused(f"numpy array data: {got} for shape {shape} of {dtype.str} "
                          f"({want} bytes expected)")
        super().__setstate__((version, shape, dtype, fortran, raw))


class _NdarrayToken:
    """What the global ``numpy.ndarray`` gives: the class itself would allocate any shape."""

    __slots__ = ()

    def __call__(self, *args: object) -> None:
        raise Refused(f"{_call('numpy.ndarray', args)}: it would allocate any shape it is given")


NDARRAY = _NdarrayToken()


def _reconstruct(subtype: object, shape: object, typecode: object) -> np.ndarray:
    # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') followed by its state.
    if subtype is not NDARRAY or _shape(shape) != (0,) or typecode not in (b"b", "b"):
        raise Refused(f"{_call('numpy _reconstruct', (subtype, shape, typecode))}: only "
                      "(ndarray, (0,), b'b') as numpy writes it")
    return _NP_RECONSTRUCT(_CheckedArray, (0,), b"b")


def _scalar(dtype: object, *data: object) -> np.generic:
    dt = resolve_dtype(dtype)
    if len(data) != 1 or not isinstance(data[0], bytes) or len(data[0]) != dt.itemsize:
        raise Refused(f"numpy scalar of {dt.str} needs exactly its {dt.itemsize} bytes")
    return _NP_SCALAR(dt, data[0])


def _frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    dt, shape = resolve_dtype(dtype), _shape(shape)
    if not isinstance(buf, bytes | bytearray | pickle.PickleBuffer) or order not in ("C", "F"):
        raise Refused("numpy _frombuffer needs in-band bytes and order 'C' or 'F'")
    if memoryview(buf).nbytes != math.prod(shape) * dt.itemsize:
        raise Refused(f"numpy _frombuffer: {memoryview(buf).nbytes} bytes for shape {shape} "
                      f"of {dt.str}")
    # A view of the private class, so that a BUILD on the result is checked as well.
    return _NP_FROMBUFFER(buf, dt, shape, order).view(_CheckedArray)


# ---------------------------------------------------------------------- dill's array form
class _NumpyModule:
    """What ``dill._dill._import_module`` gives for a numpy module name: a name, nothing more."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __setattr__(self, name: str, value: object) -> None:
        raise Refused("setting attributes on a module token")


def _import_module(name: object, _safe: object = False) -> _NumpyModule:
    if name not in NUMPY_MODULES:
        raise Refused(f"dill._dill._import_module({excerpt(name)}): only numpy's modules "
                      f"{', '.join(sorted(NUMPY_MODULES))}")
    return _NumpyModule(str(name))


RECONSTRUCT = _Frozen(_reconstruct)
SCALAR = _Frozen(_scalar)
_ATTRS = {"_reconstruct": RECONSTRUCT, "scalar": SCALAR}


def _get_attr(module: object, name: object) -> _Frozen:
    if not isinstance(module, _NumpyModule) or name not in _ATTRS:
        where = module.name if isinstance(module, _NumpyModule) else excerpt(module)
        raise Refused(f"dill._dill._get_attr({where}, {excerpt(name)}): only numpy's "
                      f"reconstructors {', '.join(sorted(_ATTRS))} of numpy's modules")
    return _ATTRS[name]  # type: ignore[index]


def _create_array(f: object, args: object, state: object, npdict: object = None) -> np.ndarray:
    if f is not RECONSTRUCT or not isinstance(args, tuple) or len(args) != 3:
        raise Refused(f"dill._dill._create_array of {excerpt(f)}: only numpy's _reconstruct")
    if npdict:  # a plain array has no instance attributes; a subclass's are not rebuilt
        raise Refused("dill._dill._create_array with instance attributes")
    array = RECONSTRUCT(*args)
    array.__setstate__(state)
    return array


def _empty_bytes(*args: object) -> bytes:
    # Protocols 0-2 write an empty array's b'' as bytes(); bytes(10**10) would allocate.
    if args:
        raise Refused(f"{_call('bytes', args)}: only bytes() of an empty array")
    return b""


EMPTY_BYTES = _Frozen(_empty_bytes)


def _load_type(name: object) -> _Frozen:
    # dill's spelling of bytes() in protocols 0-2: _load_type('bytes')().
    if name != "bytes":
        raise Refused(f"dill._dill._load_type({excerpt(name)}) in a numpy pickle")
    return EMPTY_BYTES


# Every global a numpy (or dill) array pickle names, and what the unpickler hands out for it.
NUMPY_TABLE: dict[str, object] = {
    "numpy.ndarray": NDARRAY, "numpy.dtype": _Frozen(_dtype), "builtins.bytes": EMPTY_BYTES,
}
for _core in ("core", "_core"):
    NUMPY_TABLE[f"numpy.{_core}.multiarray._reconstruct"] = RECONSTRUCT
    NUMPY_TABLE[f"numpy.{_core}.multiarray.scalar"] = SCALAR
    NUMPY_TABLE[f"numpy.{_core}.numeric._frombuffer"] = _Frozen(_frombuffer)
for _dill in DILL_MODULES:
    NUMPY_TABLE[f"{_dill}._create_array"] = _Frozen(_create_array)
    NUMPY_TABLE[f"{_dill}._get_attr"] = _Frozen(_get_attr)
    NUMPY_TABLE[f"{_dill}._import_module"] = _Frozen(_import_module)
    NUMPY_TABLE[f"{_dill}._load_type"] = _Frozen(_load_type)


def plain_array(obj: object) -> object:
    """``obj`` with a checked array turned into a plain ``np.ndarray`` (anything else as is)."""
    return obj.view(np.ndarray) if isinstance(obj, _CheckedArray) else obj
