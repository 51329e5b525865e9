"""Keep freed host memory in the process, so that a training step's big blocks do not fault anew.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves a block above its mmap
threshold (at most 32 MB) with a fresh ``mmap`` and gives it back with ``munmap`` when it is
freed, so each such block's pages fault and are zeroed by the kernel again on first touch, in
every step. DiffKG's steps at Alibaba-iFashion's shape are made of such blocks: the InfoNCE
logits (1,024 × 114,737 floats, 448 MB), the diffusion's 1,024 × 89,196 KG-row blocks (348 MB
each). One recommender step there took 256,000 page faults (1 GB of fresh pages) and 2.6 s at
one thread; served from the heap and kept there, 1 fault and 2.1 s (``bench/results/
cpu-epoch-alibaba.txt`` has the whole epoch).

:func:`keep_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (every block from the heap) and its
``M_TRIM_THRESHOLD`` out of reach (freed heap memory stays for the next step), as PyTorch's CUDA
caching allocator keeps device memory. The price: the process's resident memory does not fall
back after a peak until it exits, and blocks of slightly different sizes fragment the heap: the
Alibaba-shape epoch's peak RSS is 7.6 GiB with it, 5.5 GiB without; at a million entities
three recommender steps grow the heap to 14.4 GiB with it, 9.6 GiB without, at 18.9 against
29.5 s a step (``docs/large-kg-epochs.md``: that epoch fits 16 GB only without it). It
changes where blocks live, never a value (the same bits: a 2-epoch run's checkpoint, three
Alibaba-shape steps). The CLI calls it at start (``DIFFKG_FAST_KEEP_FREED_MEMORY=0`` turns that
off); a Python caller opts in by calling it once before training. Elsewhere than glibc it does
nothing.

Tried instead: torch's transparent-huge-page option (``THP_MEM_ALLOC_ENABLE=1``, blocks of 2 MB
and more ``madvise``d as huge pages): no memory cost and as fast on two diffusion batches, but
the full epoch took over 60 minutes where this one takes 44 (``CHANGELOG.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["KEEP_ENV", "keep_freed_memory", "keep_requested"]

# The switch of the processes that call keep_freed_memory on their own (the CLI, the benchmark
# children): "0" turns it off.
KEEP_ENV = "DIFFKG_FAST_KEEP_FREED_MEMORY"

# <malloc.h>: mallopt's parameter numbers.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely."
_NEVER_TRIM = -1


def keep_freed_memory() -> bool:
    """Serve every host allocation from the heap and keep freed memory there (module docstring).
    Returns whether the setting took (``False`` outside glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def keep_requested() -> bool:
    """Whether the environment asks for :func:`keep_freed_memory` (``KEEP_ENV`` unset or not
    ``"0"``)."""
    return os.environ.get(KEEP_ENV, "1") != "0"
