"""Pickle streams as the tools of SafeDrug's and GAMENet's time wrote them, for loader tests.

dill < 0.3.5 pickled every numpy array as ``dill._dill._create_array(f, args, state, npdict)``
and looked numpy's builtin ``f`` up through its module:
``dill._dill._get_attr(dill._dill._import_module('numpy.core._multiarray_umath'), '_reconstruct')``
(numpy scalars likewise, with ``'scalar'``). Today's dill names ``f`` as a global instead. These
helpers make today's dill write the old form, so that the tests load streams of both kinds.
"""

from __future__ import annotations

import io
import sys
import types
from typing import Any

import dill
import numpy as np
import pytest

OLD_MODULES = ("numpy.core._multiarray_umath", "numpy._core._multiarray_umath")


class ModuleRef:
    """Pickles as ``dill._dill._import_module(name)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple:
        return dill._dill._import_module, (self.name,)


class AttrRef:
    """Pickles as ``dill._dill._get_attr(_import_module(module), name)``; callable so that it can
    stand as the function of another reduce."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __reduce__(self) -> tuple:
        return dill._dill._get_attr, (ModuleRef(self.module), self.name)

    def __call__(self, *args: object) -> None:
        raise NotImplementedError("only ever pickled")


class Reduce:
    """Pickles as ``func(*args)``: hand-made streams, hostile ones included."""

    def __init__(self, func: Any, *args: object) -> None:
        self.func, self.args = func, args

    state: object = None

    def __reduce__(self) -> tuple:
        if self.state is None:
            return self.func, self.args
        return self.func, self.args, self.state

    @classmethod
    def with_state(cls, call: tuple, state: object) -> Reduce:
        """Pickles as ``call[0](*call[1])`` followed by BUILD with ``state``."""
        r = cls(call[0], *call[1])
        r.state = state
        return r


def old_dill_dumps(obj: object, protocol: int = 3, module: str = OLD_MODULES[0]) -> bytes:
    """``dill.dumps`` as dill 0.3.0-0.3.4 wrote arrays and numpy scalars (module docstring)."""

    class OldDill(dill.Pickler):
        dispatch = dill.Pickler.dispatch.copy()

    def save_array(pickler: dill.Pickler, a: np.ndarray) -> None:
        f, args, state = a.__reduce__()
        pickler.save_reduce(dill._dill._create_array, (AttrRef(module, f.__name__), args,
                                                       state, None), obj=a)

    def save_scalar(pickler: dill.Pickler, x: np.generic) -> None:
        f, args = x.__reduce__()
        pickler.save_reduce(AttrRef(module, f.__name__), args, obj=x)

    OldDill.dispatch[np.ndarray] = save_array
    for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.float32, np.float64, np.bool_):
        OldDill.dispatch[t] = save_scalar
    buf = io.BytesIO()
    OldDill(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def dill_dumps(obj: object, protocol: int, form: str) -> bytes:
    """``form``: ``"dill"`` (today's dill) or one of :data:`OLD_MODULES` (the old form)."""
    if form == "dill":
        return dill.dumps(obj, protocol=protocol)
    return old_dill_dumps(obj, protocol, form)


@pytest.fixture
def fake_main(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A fresh module installed as ``__main__``, as when SafeDrug's script ran."""
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    # dill recognises the main module's globals by identity with the module it saw at import.
    monkeypatch.setattr(dill._dill, "_main_module", main)
    return main
