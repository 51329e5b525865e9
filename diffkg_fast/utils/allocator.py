"""Huge pages for torch's big host blocks, so that a training step's fresh blocks do not fault
4 KB at a time.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves a block above its mmap
threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it when it is freed, so each step's big
blocks are faulted in and zeroed by the kernel anew, one 4 KB page at a time. DiffKG's steps at
Alibaba-iFashion's shape are made of such blocks: the InfoNCE logits (1,024 × 114,737 floats,
448 MB), the diffusion's 1,024 × 89,196 KG-row blocks (348 MB each). Two diffusion batches there
took 2.6M page faults and 25 s at two threads; with torch's transparent-huge-page option
(``THP_MEM_ALLOC_ENABLE=1``: blocks of 2 MB and more are 2 MB-aligned and ``madvise``d
``MADV_HUGEPAGE``) 21,000 faults and 17.5 s; a recommender step 256,000 faults → 22,000.

Why not keep freed memory in the heap instead (glibc ``M_MMAP_MAX=0``, no trimming: no faults
at all): it was as fast on the diffusion and ~10 % faster on a recommender step, but blocks of
slightly different sizes fragmented the heap and the Alibaba-shape epoch's peak RSS rose from
5.5 to 7.6 GiB (``CHANGELOG.md``). Huge pages cost no memory beyond rounding a block up to 2 MB.

torch reads the option once, at its first allocation, so :func:`huge_pages_for_big_blocks` must
run before torch is imported: the CLI calls it first thing; a Python caller sets
``THP_MEM_ALLOC_ENABLE=1`` in the environment of its process. It changes where blocks live,
never a value (the same bits: checked on a 2-epoch run's checkpoint and on three Alibaba-shape
recommender steps). ``THP_MEM_ALLOC_ENABLE=0`` in the environment turns it off.
"""

from __future__ import annotations

import os
import sys

__all__ = ["huge_pages_for_big_blocks", "thp_mode"]

_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), the
    bracketed word of ``/sys/kernel/mm/transparent_hugepage/enabled``; ``None`` without it."""
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_for_big_blocks() -> bool:
    """Turn on torch's huge pages for big host blocks (module docstring) unless the environment
    already says otherwise. Returns whether they are on for this process: ``False`` when torch
    is already imported (too late), the kernel's mode is ``never`` (or unknown), or
    ``THP_MEM_ALLOC_ENABLE`` is set to anything but ``1``."""
    if "torch" in sys.modules or thp_mode() not in ("always", "madvise"):
        return False
    return os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1") == "1"
