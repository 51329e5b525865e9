"""What every trainable model's tests check through the trainer: a run learns and is fixed by its
seed; a run that crashed resumes to the very bits of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.train import TrainResult, train
from diffkg_fast.train.config import RunConfig


def quiet(_: str) -> None:
    pass


class Crash(Exception):
    """Raised from the log callback: a run that dies mid-run."""


def same_state(a: object, b: object) -> bool:
    """Equal states: tensors bitwise (dtype too), containers element by element."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(same_state(a[k], b[k]) for k in a))
    if isinstance(a, list | tuple):
        return (isinstance(b, list | tuple) and len(a) == len(b)
                and all(same_state(x, y) for x, y in zip(a, b, strict=True)))
    return a == b


def assert_learns_and_is_seeded(ds: KGDataset, cfg: RunConfig, loss: str,
                                other_seed: RunConfig | None = None) -> TrainResult:
    """Two runs of ``cfg`` are equal (every loss, validation metric and the test); the loss
    part ``loss`` falls and validation Recall@20 rises over the run; ``other_seed`` (the same
    config, another seed) gives other losses. The first run, for further checks."""
    a = train(ds, cfg, log=quiet)
    b = train(ds, cfg, log=quiet)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["val"] for h in a.history] == [h["val"] for h in b.history] and a.test == b.test
    assert a.history[-1]["loss"][loss] < a.history[0]["loss"][loss]
    recall = [h["val"]["recall@20"] for h in a.history]
    assert max(recall[1:]) > recall[0]
    if other_seed is not None:
        c = train(ds, other_seed, log=quiet)
        assert [h["loss"] for h in c.history] != [h["loss"] for h in a.history]
    return a


def assert_resumes_exactly(ds: KGDataset, cfg: RunConfig, tmp_path: Path,
                           crash_at: int = 2) -> tuple[TrainResult, TrainResult]:
    """A run of ``cfg`` killed as it logs epoch ``crash_at`` (before that epoch's checkpoint, so
    the resumed run trains it again from the last one) equals the uninterrupted run: history,
    validation, test and every tensor of the state, bit for bit. ``(uninterrupted, resumed)``."""
    want = train(ds, cfg, log=quiet, out_dir=tmp_path / "straight")

    def crash(line: str) -> None:
        if line.startswith(f"epoch {crash_at} "):
            raise Crash

    with pytest.raises(Crash):
        train(ds, cfg, log=crash, out_dir=tmp_path / "crashed")
    got = train(ds, cfg, log=quiet, out_dir=tmp_path / "crashed", resume=True)
    for h_want, h_got in zip(want.history, got.history, strict=True):
        assert h_got["loss"] == h_want["loss"] and h_got["val"] == h_want["val"]
        assert h_got["info"] == h_want["info"]
    assert got.val == want.val and got.test == want.test
    sa, sb = want.model.state_dict(), got.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert same_state(sa[k], sb[k]), k
    return want, got
