"""The extension loader (diffkg_fast/ops/_extension.py), without building anything: the
toolchain error, the stale build lock, when a compile is coming, the ahead-of-time build that
does not import, the just-in-time CUDA build and its CPU fallback, the missing-CUDA error."""

from __future__ import annotations

import os
import time
import warnings

import pytest

from diffkg_fast.ops import _extension as ext
from diffkg_fast.ops._extension import _check_toolchain


def test_toolchain_error_says_what_to_install(monkeypatch):
    import torch.utils.cpp_extension as ce

    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setattr(ce, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"apt-get install g\+\+.*pip install ninja"):
        _check_toolchain()


def test_stale_build_lock_is_removed(monkeypatch, tmp_path, capsys):
    # torch's loader waits without a limit while its lock file exists; a killed build leaves it.
    monkeypatch.setattr(ext, "_build_dir", lambda name: tmp_path / name)
    (tmp_path / ext._JIT_NAME).mkdir()
    lock = tmp_path / ext._JIT_NAME / "lock"
    lock.touch()
    ext._clear_stale_lock(ext._JIT_CUDA_NAME)  # the other build's folder: nothing there
    assert lock.exists() and capsys.readouterr().err == ""
    ext._clear_stale_lock()  # fresh: another build may own it; left alone, and said so
    assert lock.exists() and "waiting for another process's build" in capsys.readouterr().err
    old = time.time() - ext._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="did not finish"):
        ext._clear_stale_lock()
    assert not lock.exists()
    ext._clear_stale_lock()  # no lock: nothing to do


@pytest.mark.parametrize("with_cuda", [False, True])
def test_up_to_date_counts_the_headers(monkeypatch, tmp_path, with_cuda):
    # The progress line is printed when a compile is coming: a changed header recompiles too,
    # csrc/cuda's only in the CUDA build (its own cache entry).
    src, build = tmp_path / "src", tmp_path / "build"
    for rel in (*ext._jit_sources(True), "cpu/simd.h", "cuda/spmm_kernels.cuh"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).touch()
    build.mkdir()
    monkeypatch.setattr(ext, "_build_dir", lambda name: build / name)
    name = ext._JIT_CUDA_NAME if with_cuda else ext._JIT_NAME
    (build / name).mkdir()
    assert not ext._up_to_date(src, with_cuda)  # nothing built
    lib = build / name / f"{name}.so"
    lib.touch()
    t = time.time()
    for f in src.rglob("*"):
        os.utime(f, (t - 100, t - 100))
    os.utime(lib, (t - 50, t - 50))
    assert ext._up_to_date(src, with_cuda)
    assert not ext._up_to_date(src, not with_cuda)  # the other entry was never built
    os.utime(src / "cuda/spmm_kernels.cuh", (t, t))
    assert ext._up_to_date(src, with_cuda) is not with_cuda
    os.utime(src / "cpu/simd.h", (t, t))
    assert not ext._up_to_date(src, with_cuda)


def test_cuda_sources_are_shipped():
    # The just-in-time CUDA build compiles them from the checkout or the wheel's copy.
    src = ext.source_dir()
    assert ext._jit_sources(False) == ext._SOURCES
    assert all((src / s).is_file() for s in ext._jit_sources(True))
    assert set(ext._jit_sources(True)) - set(ext._SOURCES) == {"cuda/spmm_cuda.cu"}


def _raise(exc: BaseException):
    def fail(name: str):
        raise exc
    return fail


def test_aot_build_that_does_not_import_is_warned(monkeypatch):
    monkeypatch.setattr(ext, "_STATE", {})
    # Not built (build isolation): normal, nothing said.
    missing = ModuleNotFoundError("No module named 'diffkg_fast._C'", name="diffkg_fast._C")
    monkeypatch.setattr(ext.importlib, "import_module", _raise(missing))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ext._import_aot()
    assert "aot_error" not in ext._STATE
    # Built against another torch: said, kept for the missing-CUDA error.
    broken = ImportError("diffkg_fast/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")
    monkeypatch.setattr(ext.importlib, "import_module", _raise(broken))
    with pytest.warns(UserWarning, match=r"_C does not import \(ImportError: .*undefined symbol"
                      r".*just in time instead"):
        ext._import_aot()
    monkeypatch.setattr(ext, "cuda_kernels_registered", lambda: False)
    with pytest.raises(RuntimeError, match=r"no CUDA kernels \(diffkg_fast._C did not import: "
                       r"ImportError: .*undefined symbol"):
        ext.require_cuda_kernels("csr_spmm")
    # A module the build needs is missing: also a failure of the build, not its absence.
    monkeypatch.setattr(ext.importlib, "import_module",
                        _raise(ModuleNotFoundError("no c10_cuda", name="c10_cuda")))
    with pytest.warns(UserWarning, match="c10_cuda"):
        ext._import_aot()


def test_require_cuda_kernels(monkeypatch):
    monkeypatch.setattr(ext, "_STATE", {"how": "jit"})
    monkeypatch.setattr(ext, "cuda_kernels_registered", lambda: True)
    ext.require_cuda_kernels("csr_spmm")  # registered: nothing to say
    monkeypatch.setattr(ext, "cuda_kernels_registered", lambda: False)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' of op 'lightgcn_propagate': the "
                       r"just-in-time build .* no CUDA kernels\. .*CUDA_HOME.*--no-build-"
                       r"isolation.*backend='reference'"):
        ext.require_cuda_kernels("lightgcn_propagate")


@pytest.fixture
def jit_calls(monkeypatch):
    """``_jit_build`` with a CUDA torch and nvcc, its loads recorded instead of compiled."""
    monkeypatch.setattr(ext, "_STATE", {})
    monkeypatch.setattr(ext, "_check_toolchain", lambda: None)
    monkeypatch.setattr(ext, "_jit_cuda", lambda: True)
    calls: list[bool] = []
    return calls


def test_jit_build_compiles_cuda_where_setup_py_would(monkeypatch, jit_calls):
    monkeypatch.setattr(ext, "_jit_load", lambda src, with_cuda, verbose: jit_calls.append(
        with_cuda))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ext._jit_build(False)
    assert jit_calls == [True]


def test_failed_cuda_build_keeps_the_cpu_kernels(monkeypatch, jit_calls):
    def load(src, with_cuda, verbose):
        jit_calls.append(with_cuda)
        if with_cuda:
            raise RuntimeError("building the diffkg_fast CPU + CUDA extension failed: nvcc fatal")

    monkeypatch.setattr(ext, "_jit_load", load)
    monkeypatch.setattr(ext, "_registered", lambda: False)
    with pytest.warns(UserWarning, match="nvcc fatal; building the CPU kernels alone"):
        ext._jit_build(False)
    assert jit_calls == [True, False]
    assert "nvcc fatal" in ext._STATE["cuda_error"]
    # Loaded without its CUDA kernels: the CPU ones are there, loading them again would clash.
    jit_calls.clear()
    monkeypatch.setattr(ext, "_registered", lambda: True)
    ext._jit_build(False)
    assert jit_calls == [True]


def test_jit_load_names_the_archs_without_a_gpu(monkeypatch, tmp_path):
    # No GPU to read the architecture from: torch's builder would fail, so the build names
    # setup.py's list for its own duration only.
    import torch.utils.cpp_extension as ce

    seen = {}

    def load(**kw):
        seen.update(kw, archs=os.environ.get("TORCH_CUDA_ARCH_LIST"))

    monkeypatch.setattr(ce, "load", load)
    monkeypatch.setattr(ext.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(ext, "_registered", lambda: True)
    monkeypatch.setattr(ext, "cuda_kernels_registered", lambda: True)
    monkeypatch.setattr(ext, "_build_dir", lambda name: tmp_path / name)
    monkeypatch.setattr(ext, "_clear_stale_lock", lambda name: seen.update(lock=name))
    ext._jit_load(ext.source_dir(), True, False)
    assert seen["archs"] == ext._DEFAULT_CUDA_ARCHS and "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert seen["name"] == seen["lock"] == ext._JIT_CUDA_NAME and seen["with_cuda"]
    assert any(s.endswith("cuda/spmm_cuda.cu") for s in seen["sources"])
    monkeypatch.setattr(ext, "cuda_kernels_registered", lambda: False)
    with pytest.raises(RuntimeError, match="registered no CUDA kernel"):
        ext._jit_load(ext.source_dir(), True, False)
    ext._jit_load(ext.source_dir(), False, False)  # the CPU build does not ask for CUDA ones
    assert seen["archs"] is None and seen["name"] == ext._JIT_NAME and not seen["with_cuda"]
