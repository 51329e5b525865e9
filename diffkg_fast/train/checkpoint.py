"""Run directories: ``checkpoint.pt`` (exact resume), ``config.json`` and ``log.csv``.

A checkpoint holds everything the epoch loop of :func:`diffkg_fast.train.train` carries from one
epoch to the next, so that a resumed run ends bitwise equal to an uninterrupted one with the
same seed (on the same device and torch build): model, denoiser and both optimisers' state, every
per-purpose ``torch.Generator``, the python / numpy / torch global RNG states (the denoiser's
dropout draws from torch's global RNG), the sampled original KG, the history, the best state so
far and its KG, the patience counter and the resolved config.

Only tensors and plain python values are stored (numpy arrays become tensors), so the file loads
with ``torch.load(weights_only=True)``: reading a checkpoint never runs pickled code.
Every file is written atomically (temporary file, then rename): a crash mid-write leaves the
previous epoch's file intact.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffkg_fast.data.errors import DataError
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.utils.io import atomic_write

__all__ = [
    "CHECKPOINT", "CONFIG", "LOG", "CheckpointError", "check_config", "get_rng_state",
    "kg_from_tensor", "kg_to_tensor", "load_checkpoint", "save_checkpoint", "set_rng_state",
    "write_config_json", "write_log_csv",
]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
LOG = "log.csv"
FORMAT_VERSION = 1

# Keys that may differ between the run that wrote a checkpoint and the one resuming it: the
# device only decides where the same computation runs (bitwise equality then is not promised).
RESUMABLE_DIFFERENCES = frozenset({"device"})


class CheckpointError(DataError):
    """A missing, unreadable or incompatible checkpoint (a :class:`DataError`, so the CLI
    reports it as one ``error:`` line with exit status 2)."""


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


# ------------------------------------------------------------------ graphs
def kg_to_tensor(kg: KGCSR | None) -> Tensor | None:
    """``(n_edges, 3)`` int64 CPU ``(h, r, t)`` rows in CSR order (``None`` stays ``None``)."""
    return None if kg is None else torch.from_numpy(kg.to_triplets())


def kg_from_tensor(triplets: Tensor | None, n_entities: int, n_relations: int,
                   device: torch.device | str = "cpu") -> KGCSR | None:
    """Inverse of :func:`kg_to_tensor`: the rows are already in CSR order and
    :meth:`KGCSR.from_triplets` sorts stably, so the rebuilt graph is edge-for-edge the same."""
    if triplets is None:
        return None
    return KGCSR.from_triplets(triplets, n_entities, n_relations).to(device)


# ------------------------------------------------------------------ checkpoint file
def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` (plus the format version) atomically to ``path``."""
    with atomic_write(path, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; anything else is a
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no checkpoint file", path=path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    # A truncated or foreign file raises many types (pickle, zip, EOF …): all mean the same.
    except Exception as exc:
        raise CheckpointError(f"not a readable checkpoint: {exc}", path=path) from exc
    if not isinstance(ck, dict) or ck.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"not a checkpoint of format version {FORMAT_VERSION}", path=path)
    return ck


def check_config(saved: dict[str, Any], current: dict[str, Any],
                 path: str | os.PathLike[str] | None = None) -> None:
    """Refuse (``CheckpointError``) to resume under a config that differs from the saved one
    in any key but :data:`RESUMABLE_DIFFERENCES`; the message names every differing key."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_DIFFERENCES)
    diff = [k for k in keys if saved.get(k, "<missing>") != current.get(k, "<missing>")]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k, '<missing>')!r} vs "
                           f"now {current.get(k, '<missing>')!r}" for k in diff)
        raise CheckpointError(f"cannot resume with a different config ({detail})", path=path)


# ------------------------------------------------------------------ human-readable files
def write_config_json(out_dir: str | os.PathLike[str], config: dict[str, Any]) -> None:
    """``out_dir/config.json``: the resolved config, loadable by ``--config``."""
    with atomic_write(Path(out_dir) / CONFIG, "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _columns(history: list[dict[str, Any]]) -> list[str]:
    # Columns are the union over epochs in first-seen order, so a loss part that only some
    # models have (diffusion) still gets one fixed column.
    cols: dict[str, None] = {"epoch": None}
    for group in ("loss", "kg_edges", "val", "time"):
        for h in history:
            if group == "kg_edges":
                cols["kg_edges"] = None
            else:
                cols.update({f"{group}_{k}": None for k in h.get(group, {})})
    return list(cols)


def write_log_csv(out_dir: str | os.PathLike[str], history: list[dict[str, Any]]) -> None:
    """``out_dir/log.csv``: one row per epoch (epoch, losses, kg edges, validation metrics,
    phase times in seconds), rewritten whole and atomically after every epoch."""
    cols = _columns(history)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for h in history:
        flat: dict[str, Any] = {"epoch": h["epoch"], "kg_edges": h.get("kg_edges")}
        for group in ("loss", "val", "time"):
            flat.update({f"{group}_{k}": v for k, v in h.get(group, {}).items()})
        w.writerow(["" if flat.get(c) is None else flat[c] for c in cols])
    with atomic_write(Path(out_dir) / LOG, "w") as f:
        f.write(buf.getvalue())
