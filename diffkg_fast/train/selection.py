"""Model selection on validation: the best epoch's state, and early stopping on patience.

The best epoch is the one with the highest validation metric (the first of equal ones); its
scoring state is kept and is what the test split is ranked with, once, at the end. ``patience``
validations without a better one stop the run. A metric that is NaN or missing cannot select:
that is an error saying why, never a silent choice of the first epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Selection", "SelectionError", "clone_state"]


class SelectionError(ValueError):
    """Validation gave nothing to select on (an empty validation split, a NaN metric)."""


def clone_state(obj: Any) -> Any:
    """A deep copy of a state (tensors cloned, containers rebuilt): a snapshot that later
    in-place updates of the model cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(clone_state(v) for v in obj)
    return obj


class Selection:
    """Tracks the best validated epoch of ``metric`` and the early stop of ``patience``."""

    def __init__(self, metric: str, patience: int | None = None) -> None:
        self.metric, self.patience = metric, patience
        self.best_epoch, self.best_value = -1, -math.inf
        self.best_state: Any = None
        self.bad = 0
        self.stopped = False

    def update(self, epoch: int, metrics: dict[str, float], state: Callable[[], Any]) -> bool:
        """Record epoch ``epoch``'s validation ``metrics``; ``state()`` is called (and its
        result kept) only when the epoch is the new best. Returns whether it is."""
        value = metrics.get(self.metric, math.nan)
        if not math.isfinite(value):
            raise SelectionError(
                f"validation {self.metric} of epoch {epoch} is {value} "
                f"({metrics.get('n_users', 0)} validation users with held-out items): the best "
                "epoch cannot be selected; the dataset needs a validation split")
        if value > self.best_value:
            self.best_epoch, self.best_value, self.best_state = epoch, value, clone_state(state())
            self.bad = 0
            return True
        self.bad += 1
        self.stopped = bool(self.patience and self.bad >= self.patience)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_value": self.best_value,
                "best_state": self.best_state, "bad": self.bad, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_epoch, self.best_value = state["best_epoch"], state["best_value"]
        self.best_state, self.bad = state["best_state"], state["bad"]
        self.stopped = state["stopped"]
