"""Loading the C++ extension of ``csrc/`` (the ``torch.ops.diffkg_fast`` ops).

Two ways in, tried in order:

1. ahead of time: ``setup.py`` built ``diffkg_fast._C`` (``pip install --no-build-isolation``
   with torch importable at build time); importing it registers the ops;
2. just in time: the first call compiles the ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` sources with
   ``torch.utils.cpp_extension.load`` (g++ and ninja, cached under ``TORCH_EXTENSIONS_DIR``,
   default ``~/.cache/torch_extensions``; rebuilt only when a source changes).

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

__all__ = ["extension_available", "extension_loaded", "load_extension", "source_dir"]

_SOURCES = ("spmm.cpp", "cpu/spmm_cpu.cpp", "attention.cpp", "cpu/attention_cpu.cpp")
_JIT_NAME = "diffkg_fast_cpu"
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
            "building the diffkg_fast CPU extension needs " + " and ".join(missing)
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
        try:
            importlib.import_module("diffkg_fast._C")
        except ImportError:
            pass
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


def _build_dir() -> Path | None:
    try:  # private helper of torch's JIT loader: where load() keeps this extension's build
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(_JIT_NAME, verbose=False))
    except Exception:
        return None


def _up_to_date(src: Path) -> bool:
    """Whether a built library newer than every source exists (load() then only loads it):
    the progress line is printed only when a compile is coming."""
    d = _build_dir()
    if d is None:
        return False
    libs = list(d.glob(f"{_JIT_NAME}*.so"))
    # The headers too: ninja rebuilds when one changed (compiler depfiles).
    files = [src / s for s in _SOURCES] + list(src.glob("*.h")) + list(src.glob("cpu/*.h"))
    newest_src = max(f.stat().st_mtime for f in files)
    return any(lib.stat().st_mtime >= newest_src for lib in libs)


# torch's loader serialises builds with a lock file in the build folder and waits, silently and
# without a limit, while it exists; a build killed midway leaves it behind, and every later
# first use then hangs (seen here: a CI run killed during the build hung the next one). A build
# takes ~40 s on this 2-core machine, so a lock older than 10 minutes has no live owner.
_STALE_LOCK_S = 600.0


def _clear_stale_lock() -> None:
    d = _build_dir()
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
        print(f"waiting for another process's build of the diffkg_fast CPU extension ({lock}; "
              "delete it if no build is running)", file=sys.stderr, flush=True)


def _jit_build(verbose: bool) -> None:
    _check_toolchain()
    src = source_dir()
    from torch.utils.cpp_extension import load

    _clear_stale_lock()

    if verbose or not _up_to_date(src):
        print("building the diffkg_fast CPU extension (once, ~30-60 s; cached in "
              f"{_build_dir() or 'TORCH_EXTENSIONS_DIR'})...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        load(
            name=_JIT_NAME,
            sources=[str(src / s) for s in _SOURCES],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler errors arrive as RuntimeError / CalledProcessError
        raise RuntimeError(f"building the diffkg_fast CPU extension failed: {exc}") from exc
    if verbose:
        print(f"diffkg_fast CPU extension ready in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    if not _registered():
        raise RuntimeError("the diffkg_fast CPU extension loaded but registered no CPU kernel")
