"""Loading the C++ extension of ``csrc/`` (the ``torch.ops.diffkg_fast`` ops).

Two ways in, tried in order:

1. ahead of time: ``setup.py`` built ``diffkg_fast._C`` (``pip install --no-build-isolation``
   with torch importable at build time); importing it registers the ops;
2. just in time: the first call compiles the ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` sources with
   ``torch.utils.cpp_extension.load`` (g++ and ninja, cached under ``TORCH_EXTENSIONS_DIR``,
   default ``~/.cache/torch_extensions``; rebuilt only when a source changes), and
   ``csrc/cuda/*.cu`` too where ``setup.py`` would: torch has CUDA and nvcc is found.

An ahead-of-time build that exists but does not import (e.g. built against another torch) is
said in a warning, not swallowed, and the just-in-time build takes over.

The sources are found next to the package: ``diffkg_fast/csrc`` when installed from a wheel
(``setup.py`` copies them there as package data), else the checkout's ``csrc/`` (editable
install). Without a compiler or ninja, :func:`load_extension` raises a :class:`RuntimeError`
saying what to install; the ``reference`` backend of every op keeps working without it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["cuda_kernels_registered", "extension_available", "extension_loaded",
           "load_extension", "require_cuda_kernels", "source_dir"]

_SOURCES = ("spmm.cpp", "cpu/spmm_cpu.cpp", "attention.cpp", "cpu/attention_cpu.cpp")
_CUDA_SOURCES = ("cuda/spmm_cuda.cu",)
# setup.py's list for a build node without a GPU to read the architecture from: A100 and
# H100 / H200, plus PTX for newer cards.
_DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# Two cache entries: a CUDA torch without nvcc (or with a broken one) builds the CPU one.
_JIT_NAME = "diffkg_fast_cpu"
_JIT_CUDA_NAME = "diffkg_fast_cuda"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def extension_loaded() -> bool:
    """Whether the ops are registered in this process (never builds anything). "auto" asks at
    every call; a loaded library stays loaded, so a yes is remembered."""
    if _STATE.get("loaded"):
        return True
    if _registered():
        _STATE["loaded"] = True
        return True
    return False


def extension_available() -> bool:
    """Whether the ops can run in this process, loading (building on first use) the extension
    if needed. What ``backend="auto"`` asks on a CPU: when the build fails (no compiler) it warns
    once, says why, and answers ``False`` from then on, so "auto" runs the reference ops."""
    if extension_loaded():
        return True
    if "error" in _STATE:
        return False
    try:
        return load_extension()
    except RuntimeError as exc:
        warnings.warn(f"{exc}; running the reference (plain PyTorch) ops instead", stacklevel=2)
        return False


def _registered() -> bool:
    try:
        torch.ops.diffkg_fast.csr_spmm  # noqa: B018 (attribute lookup raises when absent)
        torch.ops.diffkg_fast.rgat_forward  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    # The schemas alone are not enough: the CPU kernels must be registered too.
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"diffkg_fast::{op}", "CPU")
               for op in ("csr_spmm", "rgat_forward"))


def cuda_kernels_registered() -> bool:
    """Whether the SpMM ops have CUDA kernels in this process (never builds anything)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("diffkg_fast::csr_spmm", "CUDA")


def require_cuda_kernels(op: str) -> None:
    """Raise a :class:`RuntimeError` naming ``op`` and the way to get them when the loaded
    extension has no CUDA kernels: forcing ``backend="cuda"`` would otherwise reach the
    dispatcher's "Could not run ... with arguments from the 'CUDA' backend"."""
    if cuda_kernels_registered():
        return
    how = {"aot": "the ahead-of-time build diffkg_fast._C",
           "jit": "the just-in-time build"}.get(str(_STATE.get("how")), "the extension")
    labels = {"aot_error": "diffkg_fast._C did not import", "cuda_error": "CUDA build"}
    why = "".join(f" ({label}: {_STATE[key]})" for key, label in labels.items() if key in _STATE)
    raise RuntimeError(
        f"backend 'cuda' of op {op!r}: {how} loaded in this process has no CUDA kernels{why}. "
        "They are compiled where torch has CUDA and nvcc is found (CUDA_HOME): "
        "`pip install --no-build-isolation -e .`, or a first call with nvcc on PATH; "
        "or use backend='reference' (torch.sparse.mm, cuSPARSE)"
    )


def _jit_cuda() -> bool:
    """Whether the just-in-time build compiles ``csrc/cuda/`` too (as setup.py would)."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _jit_sources(with_cuda: bool) -> tuple[str, ...]:
    return _SOURCES + (_CUDA_SOURCES if with_cuda else ())


def source_dir() -> Path:
    """The folder holding ``spmm.cpp`` and ``cpu/``: packaged copy first, then the checkout."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg / "csrc", pkg.parent / "csrc"):
        if all((cand / s).is_file() for s in _SOURCES):
            return cand
    raise RuntimeError(
        f"the C++ sources of diffkg_fast are missing (looked in {pkg / 'csrc'} and "
        f"{pkg.parent / 'csrc'}); reinstall the package or use backend='reference'"
    )


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    missing = []
    try:
        cxx = get_cxx_compiler()
    except Exception:  # torch raises when no compiler answers
        cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} not found: `apt-get install g++`, or set CXX)")
    if not is_ninja_available():
        missing.append("ninja (`pip install ninja`)")
    if missing:
        raise RuntimeError(
            "building the diffkg_fast extension needs " + " and ".join(missing)
            + "; or use backend='reference', which needs no compiler"
        )


def load_extension(verbose: bool = False) -> bool:
    """Register ``torch.ops.diffkg_fast.*`` in this process; ``True`` once done.

    Builds the extension on first use when no ahead-of-time build is installed (one line on
    stderr says so). Raises :class:`RuntimeError` when it cannot be built (the message says what
    to install) and re-raises that same error on later calls without retrying.
    """
    if _registered():
        return True
    with _LOCK:
        if _registered():
            return True
        if "error" in _STATE:
            raise RuntimeError(str(_STATE["error"]))
        _import_aot()
        if _registered():
            _STATE["how"] = "aot"
            return True
        try:
            _jit_build(verbose)
        except RuntimeError as exc:
            _STATE["error"] = str(exc)
            raise
        _STATE["how"] = "jit"
        return True


def _import_aot() -> None:
    """Import ``diffkg_fast._C`` when it was built; its absence is normal (build isolation),
    any other import failure is warned about and kept for :func:`require_cuda_kernels`."""
    try:
        importlib.import_module("diffkg_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name == "diffkg_fast._C":
            return
        _aot_failed(exc)
    except (ImportError, OSError) as exc:  # e.g. an undefined symbol: built for another torch
        _aot_failed(exc)


def _aot_failed(exc: BaseException) -> None:
    _STATE["aot_error"] = msg = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"the ahead-of-time build diffkg_fast._C does not import ({msg}); "
                  "building the extension just in time instead (rebuild it with `pip install "
                  "--no-build-isolation -e .` against this torch)", stacklevel=4)


def _build_dir(name: str = _JIT_NAME) -> Path | None:
    try:  # private helper of torch's JIT loader: where load() keeps this extension's build
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except Exception:
        return None


def _up_to_date(src: Path, with_cuda: bool = False) -> bool:
    """Whether a built library newer than every source exists (load() then only loads it):
    the progress line is printed only when a compile is coming."""
    name = _JIT_CUDA_NAME if with_cuda else _JIT_NAME
    d = _build_dir(name)
    if d is None:
        return False
    libs = list(d.glob(f"{name}*.so"))
    # The headers too: ninja rebuilds when one changed (compiler depfiles).
    files = [src / s for s in _jit_sources(with_cuda)] + list(src.glob("*.h")) + list(
        src.glob("cpu/*.h")) + (list(src.glob("cuda/*.cuh")) if with_cuda else [])
    newest_src = max(f.stat().st_mtime for f in files)
    return any(lib.stat().st_mtime >= newest_src for lib in libs)


# torch's loader serialises builds with a lock file in the build folder and waits, silently and
# without a limit, while it exists; a build killed midway leaves it behind, and every later
# first use then hangs (seen here: a CI run killed during the build hung the next one). A build
# takes ~40 s on this 2-core machine, so a lock older than 10 minutes has no live owner.
_STALE_LOCK_S = 600.0


def _clear_stale_lock(name: str = _JIT_NAME) -> None:
    d = _build_dir(name)
    if d is None:
        return
    lock = d / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:  # no lock, or the other build just finished
        return
    if age > _STALE_LOCK_S:
        warnings.warn(f"removing {lock}, left {age / 60:.0f} min ago by a diffkg_fast extension "
                      "build that did not finish", stacklevel=3)
        lock.unlink(missing_ok=True)
    else:
        print(f"waiting for another process's build of the diffkg_fast extension ({lock}; "
              "delete it if no build is running)", file=sys.stderr, flush=True)


def _jit_build(verbose: bool) -> None:
    _check_toolchain()
    src = source_dir()
    if _jit_cuda() and all((src / s).is_file() for s in _CUDA_SOURCES):
        try:
            _jit_load(src, True, verbose)
            return
        except RuntimeError as exc:
            # A broken CUDA toolchain must not cost the CPU kernels: build those alone.
            _STATE["cuda_error"] = str(exc)
            if _registered():  # loaded, but without CUDA kernels: nothing to add
                return
            warnings.warn(f"{exc}; building the CPU kernels alone (backend 'cuda' of the SpMM "
                          "ops is unavailable)", stacklevel=4)
    _jit_load(src, False, verbose)


def _jit_load(src: Path, with_cuda: bool, verbose: bool) -> None:
    from torch.utils.cpp_extension import load

    name, what = (_JIT_CUDA_NAME, "CPU + CUDA") if with_cuda else (_JIT_NAME, "CPU")
    _clear_stale_lock(name)
    if verbose or not _up_to_date(src, with_cuda):
        print(f"building the diffkg_fast {what} extension (once, "
              f"{'~2-4 min' if with_cuda else '~30-60 s'}; cached in "
              f"{_build_dir(name) or 'TORCH_EXTENSIONS_DIR'})...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # No GPU to read the architecture from: torch's builder would fail (setup.py does the same).
    archs = (with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST")
             and not torch.cuda.is_available())
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _DEFAULT_CUDA_ARCHS
    try:
        load(
            name=name,
            sources=[str(src / s) for s in _jit_sources(with_cuda)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_cuda_cflags=["-O3"],
            extra_ldflags=["-fopenmp"],
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler errors arrive as RuntimeError / CalledProcessError
        raise RuntimeError(f"building the diffkg_fast {what} extension failed: {exc}") from exc
    finally:
        if archs:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
    if verbose:
        print(f"diffkg_fast {what} extension ready in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    if not _registered():
        raise RuntimeError(f"the diffkg_fast {what} extension loaded but registered no CPU kernel")
    if with_cuda and not cuda_kernels_registered():
        raise RuntimeError("the diffkg_fast CPU + CUDA extension loaded but registered no CUDA "
                           "kernel")
