"""Row-length alignment passed to the Triton kernels as a constexpr (``diffusion.py``,
``attention.py``)."""

from __future__ import annotations

MAX_ALIGN = 16


def _align(n: int, cap: int = MAX_ALIGN) -> int:
    """The largest power of two up to ``cap`` (itself a power of two, at most 16) that divides
    the row length ``n``.

    Why the kernels take it: Triton's JIT marks an integer argument divisible by 16 or by
    nothing, and DiffKG's shapes are neither (H = 1000, Alibaba's E = 89,196, the medication
    graph's E = 3,573; an embedding width d = 100). Without the mark the row offsets have
    unknown alignment and every load is 4 bytes wide; linear_topk at H = 1000 also lost its
    16-byte ``cp.async`` copies and spilled (bfloat16 sm_90: 255 registers + 168 B of stack,
    against 126 and none; sizes from cuobjdump, tests/test_kernels_compile.py).
    ``tl.multiple_of`` on a scalar argument changed nothing in the SASS, so a size is passed
    divided by its alignment and multiplied back by the constexpr inside the kernel, from which
    the compiler derives the divisibility."""
    a = cap
    while n % a:
        a //= 2
    return a
