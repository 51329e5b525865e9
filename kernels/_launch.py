"""Launch helper shared by the Triton launchers (``attention.py``, ``diffusion.py``)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor


def on_device(x: Tensor) -> AbstractContextManager:
    """The tensors' CUDA device made current for a launch. Triton launches on the current
    device and its current stream whatever device the pointers are on: on a multi-GPU host a
    launch with ``cuda:1`` tensors while ``cuda:0`` is current would run on the wrong card, or
    unordered with ``cuda:1``'s stream. Every launcher takes it, so no caller can forget it; a
    no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()
