"""numpy arrays in pickles: dill's forms load (SafeDrug's and GAMENet's matrices), and the
reconstructors refuse what numpy itself would do unchecked."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import dill
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pickles import OLD_MODULES, AttrRef, ModuleRef, Reduce, dill_dumps, old_dill_dumps

from diffkg_fast.data.errors import DataError
from diffkg_fast.data.unpickle import NUMPY_GLOBALS, SPARSE_GLOBALS, load_plain_pickle

FORMS = ("dill", *OLD_MODULES)
DTYPES = ["<f8", ">f8", "<f4", "<i8", ">i4", "<i2", "|i1", "|u1", "|b1", "<c16", "<U3", "|S2"]


def _load(tmp_path: Path, data: bytes, name: str = "ddi_A_final.pkl") -> object:
    path = tmp_path / name
    path.write_bytes(data)
    return load_plain_pickle(path, allowed=NUMPY_GLOBALS)


def _dill_loads(data: bytes) -> object:
    with warnings.catch_warnings():  # numpy 2 warns on the numpy.core spelling
        warnings.simplefilter("ignore", DeprecationWarning)
        return dill.loads(data)


# ---------------------------------------------------------------------- dill streams load
@settings(max_examples=60, deadline=None)
@given(a=hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=3,
                                                               min_side=0, max_side=5)),
       protocol=st.integers(0, pickle.HIGHEST_PROTOCOL), form=st.sampled_from(FORMS),
       fortran=st.booleans())
def test_dill_arrays_load(tmp_path_factory: pytest.TempPathFactory, a: np.ndarray,
                          protocol: int, form: str, fortran: bool) -> None:
    a = np.asfortranarray(a) if fortran else a
    data = dill_dumps(a, protocol, form)
    if form != "dill":
        assert b"_get_attr" in data and form.encode() in data  # really the old form
    want = _dill_loads(data)
    got = _load(tmp_path_factory.mktemp("a"), data)
    # numpy's own loader turns a big-endian array of protocols 0-4 native: so must this.
    assert type(got) is np.ndarray and got.dtype == want.dtype
    assert got.shape == a.shape and np.array_equal(got, a, equal_nan=a.dtype.kind in "fc")


@pytest.mark.parametrize("form", OLD_MODULES)
def test_old_dill_scalars_and_nesting(tmp_path: Path, form: str) -> None:
    obj = [np.int64(7), np.float32(0.5), {"m": np.eye(3)}, (np.zeros((2, 0)), np.bool_(True))]
    data = old_dill_dumps(obj, 3, form)
    got = _load(tmp_path, data)
    assert got[:2] == [7, 0.5] and type(got[0]) is np.int64
    assert np.array_equal(got[2]["m"], np.eye(3)) and got[3][0].shape == (2, 0)
    assert got[3][1] is np.True_ or got[3][1] == np.True_


# ---------------------------------------------------------------------- nothing runs
def _hostile(tmp_path: Path, stream: bytes, refused: str, marker: Path | None = None) -> None:
    for allowed in (NUMPY_GLOBALS, SPARSE_GLOBALS):
        path = tmp_path / "ddi_A_final.pkl"
        path.write_bytes(stream)
        with pytest.raises(DataError) as info:
            load_plain_pickle(path, allowed=allowed)
        assert str(info.value).startswith(f"{path}: refusing")
        assert refused in str(info.value), info.value
        assert marker is None or not marker.exists(), "the payload ran"


def _state(a: np.ndarray) -> tuple:
    return a.__reduce__()[2]


def test_get_attr_of_os_system_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    array = Reduce(dill._dill._create_array, AttrRef("os", "system"),
                   (f"touch {marker}",), _state(np.zeros(1)), None)
    data = pickle.dumps(array, protocol=3)
    with pytest.raises(Exception):  # noqa: B017  (dill runs the payload, then fails)
        _dill_loads(data)
    assert marker.exists(), "the test's payload should be live under dill"
    marker.unlink()
    _hostile(tmp_path, data, "dill._dill._import_module('os')", marker)


@pytest.mark.parametrize(
    "obj, refused",
    [
        (Reduce(dill._dill._get_attr, ModuleRef("builtins"), "eval"), "_import_module('builtins')"),
        (Reduce(dill._dill._get_attr, ModuleRef(OLD_MODULES[0]), "array"),
         "_get_attr(numpy.core._multiarray_umath, 'array')"),
        (Reduce(dill._dill._get_attr, ModuleRef(OLD_MODULES[1]), "__builtins__"), "'__builtins__'"),
        (Reduce(dill._dill._get_attr, np.dtype("f8"), "_reconstruct"), "_get_attr(<_DtypeSpec"),
        (Reduce(dill._dill._import_module, "numpy.core._multiarray_umath.os"), "_import_module"),
        (Reduce(dill._dill._create_array, np.dtype, ("f8",), None, None), "_create_array of"),
        (Reduce(dill._dill._create_array, AttrRef(OLD_MODULES[0], "_reconstruct"),
                (np.ndarray, (10**10,), b"b"), None, None), "only (ndarray, (0,), b'b')"),
        (Reduce(dill._dill._create_array, AttrRef(OLD_MODULES[0], "_reconstruct"),
                (np.ndarray, (0,), b"b"), _state(np.zeros(2)), {"x": 1}), "instance attributes"),
    ],
)
def test_dill_stand_ins_refuse(tmp_path: Path, obj: object, refused: str) -> None:
    _hostile(tmp_path, pickle.dumps(obj, protocol=3), refused)


# ---------------------------------------------------------------------- numpy unchecked
def _run_isolated(stream: bytes, tmp_path: Path, after: str) -> str:
    """Load ``stream`` in a fresh interpreter (a failing guard may crash it or alter numpy for
    the whole process) and print ``after`` evaluated there."""
    path = tmp_path / "m.pkl"
    path.write_bytes(stream)
    code = (
        "import numpy as np\n"
        "from diffkg_fast.data.unpickle import load_plain_pickle, NUMPY_GLOBALS\n"
        f"try:\n    load_plain_pickle({str(path)!r}, allowed=NUMPY_GLOBALS)\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
        f"print({after})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0, f"the interpreter died ({r.returncode}): {r.stderr[-500:]}"
    return r.stdout


def test_scalar_cannot_resize_numpys_shared_unsized_dtype(tmp_path: Path) -> None:
    # numpy's scalar(dtype('U')) sets the shared 'U' dtype's itemsize to 1 for the process.
    stream = pickle.dumps(Reduce(np.float64(0).__reduce__()[0], np.dtype("U")), protocol=2)
    out = _run_isolated(stream, tmp_path, "np.dtype('U').itemsize")
    assert "refusing unsized numpy dtype" in out and out.split()[-1] == "0", out


def test_object_array_with_a_short_list_is_refused(tmp_path: Path) -> None:
    # numpy's ndarray.__setstate__ reads past a list shorter than the shape (a crash, or
    # arbitrary objects). The state is swapped in after pickling a real object array.
    class Arr:
        def __reduce__(self) -> tuple:
            f, args, state = np.array([1, 2], dtype=object).__reduce__()
            return f, args, (state[0], (10**6,), *state[2:])

    out = _run_isolated(pickle.dumps(Arr(), protocol=2), tmp_path, "'alive'")
    assert "(object or structured)" in out and "alive" in out, out


@pytest.mark.parametrize(
    "obj, refused",
    [
        (Reduce(np.ndarray, (10**12,)), "numpy.ndarray((1000000000000,))"),
        (Reduce(np.ndarray.__reduce__(np.zeros(1))[0], np.ndarray, (10**9,), b"b"),
         "only (ndarray, (0,), b'b')"),
        (np.zeros(3, dtype=[("a", "<f8")]), "refusing numpy dtype |V8"),
        (Reduce(np.float64(0).__reduce__()[0], Reduce.with_state(
            (np.dtype, ("f8", False, True)),
            (3, "|", None, ("a",), {"a": (np.dtype("i1"), 100)}, 8, 1, 16)), b"\0" * 8),
         "structured and sub-array numpy dtypes"),
        (np.array(["2020-01-01"], dtype="M8[D]"), "only numbers, booleans and fixed-size"),
        (np.zeros(2, dtype="V8"), "only numbers, booleans and fixed-size"),
        (Reduce(np.zeros(1).__reduce_ex__(5)[0], bytearray(8), np.dtype("f8"), (10**6,), "C"),
         "_frombuffer: 8 bytes for shape (1000000,)"),
        (Reduce(np.float64(0).__reduce__()[0], np.dtype("f8"), b"\0" * 4), "exactly its 8 bytes"),
    ],
)
def test_numpy_reconstructors_check_their_arguments(tmp_path: Path, obj: object,
                                                    refused: str) -> None:
    _hostile(tmp_path, pickle.dumps(obj, protocol=5), refused)  # 5: in-band bytearray


def test_array_state_must_fill_the_shape(tmp_path: Path) -> None:
    class Arr:
        def __init__(self, shape: tuple, raw: bytes) -> None:
            self.shape, self.raw = shape, raw

        def __reduce__(self) -> tuple:
            f, args, state = np.zeros(2).__reduce__()
            return f, args, (1, self.shape, state[2], False, self.raw)

    _hostile(tmp_path, pickle.dumps(Arr((10**9,), b"\0" * 16), 2), "(8000000000 bytes expected)")
    _hostile(tmp_path, pickle.dumps(Arr((2,), [1.0, 2.0]), 2), "numpy array data")


def test_a_stream_cannot_alter_the_stand_ins(tmp_path: Path) -> None:
    """BUILD sets attributes (even ``__defaults__``) on what a stream is handed."""
    from diffkg_fast.data import pickle_numpy

    stream = (b"\x80\x02cnumpy.core.numeric\n_frombuffer\n"
              b"N}X\x0c\x00\x00\x00__defaults__(K\x01ts\x86b.")
    _hostile(tmp_path, stream, "setting '__defaults__' on a numpy stand-in")
    assert pickle_numpy._frombuffer.__defaults__ is None
