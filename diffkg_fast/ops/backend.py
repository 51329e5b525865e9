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
# (op, backend) -> predicate: "auto" considers that backend only while it returns True (e.g. a
# compiled extension that could be loaded, or Triton being installed).
_AUTO_IF: dict[tuple[str, str], Callable[[], bool]] = {}


def register(
    op: str, backend: str, *, auto_if: Callable[[], bool] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as ``op``'s implementation for ``backend``.

    ``auto_if``: "auto" picks this backend only while ``auto_if()`` is true (default: always);
    forcing ``backend=`` by name ignores it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(op, {})[backend] = fn
        if auto_if is None:
            _AUTO_IF.pop((op, backend), None)
        else:
            _AUTO_IF[(op, backend)] = auto_if
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
            if name in impls and ((op, name) not in _AUTO_IF or _AUTO_IF[(op, name)]()):
                return impls[name]
        raise ValueError(f"op {op!r} has no implementation for device {kind!r}")
    if backend not in impls:
        raise ValueError(
            f"op {op!r} has no {backend!r} backend (available: {sorted(impls)}); "
            f"use backend='reference' or 'auto'"
        )
    if backend in ("triton", "cuda") and kind != "cuda":
        raise ValueError(f"backend {backend!r} of op {op!r} needs a CUDA tensor, got {kind!r}")
    if backend == "cpu" and kind != "cpu":
        raise ValueError(f"backend 'cpu' of op {op!r} needs a CPU tensor, got {kind!r}")
    return impls[backend]


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether ``backend="auto"`` runs a kernel for ``op`` on ``device`` (not the reference)."""
    return resolve(op, "auto", device) is not resolve(op, "reference", device)
