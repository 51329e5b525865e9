"""Backend choice shared by every op: one public function per op, ``backend=`` picks the code.

``"reference"`` is the plain-PyTorch specification (always available). The kernel issues add
``"triton"`` and ``"cuda"`` (GPU) and ``"cpu"`` (numba / C++ kernels). ``"auto"`` takes the fastest
backend registered for the input's device, falling back to the reference; forcing a backend that
is not registered for that device is an error naming the op, the backend and the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
# Preference order of "auto" per device type; only registered implementations are considered.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def register(op: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as ``op``'s implementation for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


def available(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, backend: str, device: torch.device | str) -> Callable[..., Any]:
    """The implementation of ``op`` to run on ``device`` for ``backend`` (``"auto"`` allowed)."""
    impls = _REGISTRY.get(op, {})
    kind = torch.device(device).type
    if backend == "auto":
        for name in _AUTO_ORDER.get(kind, ("reference",)):
            if name in impls:
                return impls[name]
        raise ValueError(f"op {op!r} has no implementation for device {kind!r}")
    if backend not in impls:
        raise ValueError(
            f"op {op!r} has no {backend!r} backend (available: {sorted(impls)}); "
            f"use backend='reference' or 'auto'"
        )
    if backend in ("triton", "cuda") and kind != "cuda":
        raise ValueError(f"backend {backend!r} of op {op!r} needs a CUDA tensor, got {kind!r}")
    return impls[backend]
