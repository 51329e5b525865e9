"""The restricted unpicklers: real dill streams load, nothing in a pickle ever runs."""

from __future__ import annotations

import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import dill
import numpy as np
import pytest
import scipy.sparse as sp

from diffkg_fast.data.errors import DataError
from diffkg_fast.data.safedrug import Voc
from diffkg_fast.data.unpickle import (
    NUMPY_GLOBALS,
    SPARSE_GLOBALS,
    load_plain_pickle,
    load_safedrug_voc,
)

from helpers import VOC_SOURCE

WORDS = {"diag_voc": ["4019", "41401", "4280"], "pro_voc": ["3615"], "med_voc": ["N02B", "A01A"]}


def stream_globals(data: bytes) -> set[str]:
    """Every ``module.name`` a pickle stream asks ``find_class`` for (GLOBAL and STACK_GLOBAL).

    STACK_GLOBAL takes its two strings from the stack, often through the memo (dill memoizes
    ``'dill._dill'`` once), so pushes, memo writes and memo reads are followed.
    """
    found: set[str] = set()
    pushed: list[object] = []
    memo: dict[int, object] = {}
    for op, arg, _pos in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
            pushed.append(None)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(None)
        elif "UNICODE" in op.name or op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
            pushed.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        elif op.name not in ("FRAME", "PROTO", "MARK", "POP", "POP_MARK"):
            pushed.append(None)
    return found


@pytest.fixture
def fake_main(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A fresh module installed as ``__main__``, as when SafeDrug's script ran."""
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    # dill recognises the main module's globals by identity with the module it saw at import.
    monkeypatch.setattr(dill._dill, "_main_module", main)
    return main


def _make_vocs(main: types.ModuleType, source: str = VOC_SOURCE) -> dict[str, object]:
    exec(compile(source, "processing.py", "exec"), main.__dict__)
    vocs = {}
    for key, words in WORDS.items():
        v = main.Voc()
        v.add_sentence(words)
        vocs[key] = v
    return vocs


# ---------------------------------------------------------------------- real dill streams
@pytest.mark.parametrize("recurse", [False, True])
def test_dill_voc_by_value_loads(tmp_path: Path, fake_main: types.ModuleType,
                                 recurse: bool) -> None:
    data = dill.dumps(_make_vocs(fake_main), byref=False, recurse=recurse)
    names = stream_globals(data)
    # The stream really carries the class by value: these are what SafeDrug's file contains.
    assert {"dill._dill._create_type", "dill._dill._load_type", "dill._dill._create_function",
            "dill._dill._create_code"} <= names
    assert "__main__.Voc" not in names
    if not recurse:
        assert "__builtin__.__main__" in names
    path = tmp_path / "voc_final.pkl"
    path.write_bytes(data)
    assert load_safedrug_voc(path) == WORDS


def test_dill_voc_written_by_a_real_script(tmp_path: Path) -> None:
    """SafeDrug's situation exactly: a script run as ``__main__`` dumps its vocabularies."""
    script = tmp_path / "processing.py"
    out = tmp_path / "voc_final.pkl"
    script.write_text(VOC_SOURCE + textwrap.dedent(f"""
        import dill
        vocs = {{}}
        for key, words in {WORDS!r}.items():
            vocs[key] = Voc()
            vocs[key].add_sentence(words)
        dill.dump(obj=vocs, file=open({str(out)!r}, "wb"))
    """))
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path)
    assert "dill._dill._create_type" in stream_globals(out.read_bytes())
    assert load_safedrug_voc(out) == WORDS


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_voc_by_reference_loads(tmp_path: Path, fake_main: types.ModuleType,
                                protocol: int) -> None:
    path = tmp_path / "voc.pkl"
    path.write_bytes(pickle.dumps(_make_vocs(fake_main), protocol=protocol))
    assert load_safedrug_voc(path) == WORDS
    ours = {k: Voc(w) for k, w in WORDS.items()}  # diffkg_fast.data.safedrug.Voc
    path.write_bytes(pickle.dumps(ours, protocol=protocol))
    assert load_safedrug_voc(path) == WORDS


# ---------------------------------------------------------------------- nothing runs
class Boom:
    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


class NotVoc:
    pass


def _assert_refused(path: Path, marker: Path, refused: str | None) -> None:
    loaders = [load_safedrug_voc, load_plain_pickle,
               lambda p: load_plain_pickle(p, allowed=SPARSE_GLOBALS)]
    for load in loaders:
        with pytest.raises(DataError) as info:
            load(path)
        assert path.name in str(info.value)
        if refused is not None:
            assert refused in str(info.value)
        assert not marker.exists(), "the payload ran"


def test_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"diag_voc": Boom(os.system, f"touch {marker}")}))
    _assert_refused(path, marker, f"{os.system.__module__}.system")


def test_eval_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Boom(eval, f"open({str(marker)!r}, 'w')"), protocol=0))
    _assert_refused(path, marker, "builtins.eval")
    # Sanity: the same bytes do run under plain pickle.
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("name", ["subprocess.Popen", "builtins.getattr", "builtins.exec",
                                  "posix.system", "dill._dill._eval_repr", "numpy.load",
                                  "numpy.core.multiarray.array"])
def test_other_globals_are_refused(tmp_path: Path, name: str) -> None:
    module, attr = name.rsplit(".", 1)
    path = tmp_path / "g.pkl"
    path.write_bytes(f"c{module}\n{attr}\n(tR.".encode())
    _assert_refused(path, tmp_path / "none", name)


def test_class_by_reference_that_is_not_voc(tmp_path: Path) -> None:
    path = tmp_path / "voc_final.pkl"
    path.write_bytes(pickle.dumps({"diag_voc": NotVoc()}))
    _assert_refused(path, tmp_path / "none", f"{NotVoc.__module__}.NotVoc")


def test_dill_class_by_value_code_is_never_run(tmp_path: Path,
                                              fake_main: types.ModuleType) -> None:
    """A by-value Voc whose __setstate__ writes a file: dill runs it, we must not."""
    marker = tmp_path / "pwned"
    source = VOC_SOURCE + textwrap.dedent(f"""
        def __setstate__(self, state):
            open({str(marker)!r}, "w").close()
            self.__dict__.update(state)
        Voc.__setstate__ = __setstate__
    """)
    data = dill.dumps(_make_vocs(fake_main, source), byref=False)
    dill.loads(data)
    assert marker.exists(), "the test's payload should be live under dill"
    marker.unlink()
    path = tmp_path / "voc_final.pkl"
    path.write_bytes(data)
    assert load_safedrug_voc(path) == WORDS
    assert not marker.exists()


def test_dill_function_by_value_cannot_be_called(tmp_path: Path,
                                                fake_main: types.ModuleType) -> None:
    marker = tmp_path / "pwned"
    exec(f"def payload():\n    open({str(marker)!r}, 'w').close()\n", fake_main.__dict__)
    data = dill.dumps({"diag_voc": Boom(fake_main.payload)}, byref=False, recurse=True)
    assert "dill._dill._create_function" in stream_globals(data)
    dill.loads(data)
    assert marker.exists(), "the test's payload should be live under dill"
    marker.unlink()
    path = tmp_path / "voc_final.pkl"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"voc_final\.pkl"):
        load_safedrug_voc(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "stream, message",
    [
        (b"cdill._dill\n_load_type\n(VFunctionType\ntR.", "_load_type('FunctionType')"),
        (b"cbuiltins\nsetattr\n(cbuiltins\nobject\nVx\nI1\ntR.", "setattr on a type"),
        (b"ccopyreg\n_reconstructor\n(cbuiltins\nobject\ncbuiltins\nobject\nNtR.",
         "_reconstructor of a class"),
        (b"c_codecs\nencode\n(Vx\nVrot13\ntR.", "_codecs.encode"),
    ],
)
def test_stand_ins_refuse_misuse(tmp_path: Path, stream: bytes, message: str) -> None:
    path = tmp_path / "voc_final.pkl"
    path.write_bytes(stream)
    with pytest.raises(DataError, match=r"voc_final\.pkl") as info:
        load_safedrug_voc(path)
    assert message in str(info.value)


# ---------------------------------------------------------------------- broken files
def test_truncated_empty_and_missing(tmp_path: Path, fake_main: types.ModuleType) -> None:
    data = dill.dumps(_make_vocs(fake_main), byref=False)
    path = tmp_path / "voc_final.pkl"
    for cut in (1, len(data) // 3, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"voc_final\.pkl: .*truncated"):
            load_safedrug_voc(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"voc_final\.pkl: empty file"):
        load_safedrug_voc(path)
    with pytest.raises(DataError, match=r"nothere\.pkl"):
        load_plain_pickle(tmp_path / "nothere.pkl")
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match=r"voc_final\.pkl"):
        load_plain_pickle(path)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda v: v["med_voc"].idx2word.pop(0), "med_voc.idx2word"),
        (lambda v: v["med_voc"].idx2word.update({"0": "X", 1.5: "Y"}), "med_voc.idx2word"),
        (lambda v: v["med_voc"].idx2word.update({1: "N02B"}), "med_voc.word2idx"),
        (lambda v: v["pro_voc"].idx2word.update({0: 5}), "pro_voc.idx2word"),
        (lambda v: v["diag_voc"].word2idx.update({"4019": 2}), "diag_voc.word2idx"),
        (lambda v: v["diag_voc"].word2idx.update({"extra": 3}), "diag_voc.word2idx"),
        (lambda v: v.update({"med_voc": ["N02B"]}), "med_voc"),
        (lambda v: v.pop("pro_voc"), None),
        (lambda v: delattr(v["pro_voc"], "word2idx"), "pro_voc"),
    ],
)
def test_inconsistent_vocabularies(tmp_path: Path, mutate, field: str | None) -> None:
    vocs = {k: Voc(w) for k, w in WORDS.items()}
    mutate(vocs)
    path = tmp_path / "voc_final.pkl"
    path.write_bytes(pickle.dumps(vocs))
    with pytest.raises(DataError, match=r"voc_final\.pkl") as info:
        load_safedrug_voc(path)
    if field:
        assert info.value.field == field


# ---------------------------------------------------------------------- numpy / scipy
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_and_sparse_every_protocol(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "m.pkl"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    path.write_bytes(pickle.dumps([a, np.int64(7), b"raw"], protocol=protocol))
    got = load_plain_pickle(path, allowed=NUMPY_GLOBALS)
    assert np.array_equal(got[0], a) and got[0].dtype == a.dtype
    assert got[1:] == [7, b"raw"]
    for m in (sp.coo_matrix(a), sp.csr_matrix(a), sp.coo_array(a), sp.csr_array(a)):
        path.write_bytes(pickle.dumps(m, protocol=protocol))
        got = load_plain_pickle(path, allowed=SPARSE_GLOBALS)
        assert sp.issparse(got) and np.array_equal(got.toarray(), a)
    with pytest.raises(DataError, match=r"m\.pkl: refusing"):
        load_plain_pickle(path, allowed=NUMPY_GLOBALS)


class _OldCoo:
    """Pickles like a scipy < 1.13 coo_matrix (``row`` / ``col`` state), once renamed."""

    def __init__(self, state: dict) -> None:
        self.__dict__.update(state)


def _old_scipy_pickle(state: dict) -> bytes:
    data = pickle.dumps(_OldCoo(state), protocol=2)
    old = f"c{_OldCoo.__module__}\n_OldCoo\n".encode()
    assert old in data
    return data.replace(old, b"cscipy.sparse.coo\ncoo_matrix\n")


def test_old_scipy_coo_state(tmp_path: Path) -> None:
    path = tmp_path / "trnMat.pkl"
    state = {"_shape": (2, 3), "maxprint": 50, "row": np.array([0, 1], np.int32),
             "col": np.array([2, 0], np.int32), "data": np.array([1.0, 2.0]),
             "has_canonical_format": False}
    path.write_bytes(_old_scipy_pickle(state))
    got = load_plain_pickle(path, allowed=SPARSE_GLOBALS)
    assert np.array_equal(got.toarray(), [[0, 0, 1], [2, 0, 0]])
    for bad in ({"row": np.array([0, 2], np.int32)}, {"_shape": (2, -1)},
                {"data": np.array([1.0])}, {"col": np.array(["a", "b"])}):
        path.write_bytes(_old_scipy_pickle({**state, **bad}))
        with pytest.raises(DataError, match=r"trnMat\.pkl"):
            load_plain_pickle(path, allowed=SPARSE_GLOBALS)


def test_unknown_allowed_name_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no safe stand-in"):
        load_plain_pickle(tmp_path / "x.pkl", allowed={"os.system"})


def test_a_stream_cannot_alter_classes_for_later_loads(tmp_path: Path) -> None:
    """BUILD on a handed-out class sets attributes on it; they must not outlive the load."""
    from diffkg_fast.data.unpickle import VocStandIn

    path = tmp_path / "voc_final.pkl"
    # Voc.__setstate__ = <inert function>, via BUILD's slot state; then return the class.
    path.write_bytes(b"c__main__\nVoc\n(N}V__setstate__\ncdill._dill\n_create_function\n(tRstb.")
    with pytest.raises(DataError, match="expected a dict"):
        load_safedrug_voc(path)
    assert "__setstate__" not in vars(VocStandIn)
    path.write_bytes(pickle.dumps({k: Voc(w) for k, w in WORDS.items()}))
    assert load_safedrug_voc(path) == WORDS
