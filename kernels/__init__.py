"""Triton kernels of diffkg-fast, installed as ``diffkg_fast.kernels`` (never as ``kernels``).

The package imports on machines without Triton (macOS, Windows, aarch64): ``HAS_TRITON`` tells
whether the kernels can be used, and callers fall back to the reference ops otherwise.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # Triton ships wheels for Linux x86-64 only
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
