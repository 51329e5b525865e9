"""The checkpoint file: one atomic, self-checking ``torch.save`` of a run's state.

What a run's checkpoint holds is decided by the trainer (:mod:`diffkg_fast.train.trainer`) and
the run folder (:mod:`diffkg_fast.train.run_folder`); this module owns the file:

- only tensors and plain python values are stored, so it loads with
  ``torch.load(weights_only=True)``: reading a checkpoint never runs pickled code;
- it is written atomically (temporary file, then rename): a crash mid-write leaves the
  previous file intact;
- it carries a SHA-256 digest of its whole content, checked on load: a flipped bit in a weight
  is an error naming the file, never a different model;
- the global RNG states (python, numpy, torch CPU and CUDA) are saved and restored here.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffkg_fast.data.errors import DataError
from diffkg_fast.utils.io import atomic_write

__all__ = ["FORMAT_VERSION", "CheckpointError", "get_rng_state", "load_checkpoint",
           "save_checkpoint", "set_rng_state", "state_digest"]

FORMAT_VERSION = 2


class CheckpointError(DataError):
    """A missing, unreadable, corrupt or incompatible checkpoint (a :class:`DataError`, so the
    CLI reports it as one ``error:`` line with exit status 2)."""


# ------------------------------------------------------------------ RNG states
def get_rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global) and torch (CPU and every CUDA device) global RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # uint32 keys as int64: weights_only loading accepts tensors, not numpy arrays.
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ digest
def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the bytes, without a copy
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:  # None, bool, int, float, str: their repr is exact
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())


def state_digest(state: Any) -> str:
    """SHA-256 of a state's structure and every tensor's bytes (independent of dict order)."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


# ------------------------------------------------------------------ the file
def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` with the format version and its digest, atomically."""
    payload = {"format_version": FORMAT_VERSION, **state}
    with atomic_write(path, "wb") as f:
        torch.save({**payload, "digest": state_digest(payload)}, f)


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`; anything else (missing,
    truncated, foreign, another format, a digest that does not match) is a
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no checkpoint file", path=path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    # A truncated or foreign file raises many types (pickle, zip, EOF …): all mean the same.
    except Exception as exc:
        raise CheckpointError(f"not a readable checkpoint: {str(exc)[:200]}", path=path) from exc
    if not isinstance(ck, dict) or ck.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"not a checkpoint of format version {FORMAT_VERSION}", path=path)
    digest = ck.pop("digest", None)
    if digest != state_digest(ck):
        raise CheckpointError("corrupt checkpoint: its content does not match its digest "
                              "(a changed or damaged file)", path=path)
    return ck
