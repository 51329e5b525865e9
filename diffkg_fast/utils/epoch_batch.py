"""The training batch of an epoch whose step count is bounded (``max_epoch_steps``)."""

from __future__ import annotations

__all__ = ["epoch_batch"]


def epoch_batch(rows: int, batch: int, max_epoch_steps: int = 0) -> int:
    """The batch an epoch over ``rows`` rows steps with: ``batch``, grown to
    ``ceil(rows / max_epoch_steps)`` when that is larger (``max_epoch_steps > 0``), so that the
    epoch takes at most ``max_epoch_steps`` steps and still visits every row once.

    Why: a step of a graph recommender encodes the whole graph, and an epoch has ``rows /
    batch`` steps; both grow with the graph, so at a fixed batch the epoch costs O(graph²).
    A bounded step count makes it O(graph) (docs/large-kg-epochs.md)."""
    if max_epoch_steps <= 0:
        return batch
    return max(batch, -(-rows // max_epoch_steps))
