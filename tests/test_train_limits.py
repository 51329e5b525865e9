"""``train(..., limit_batches=n)``: the benchmarks' knob caps every training loop of an epoch."""

from __future__ import annotations

import pytest

import diffkg_fast.model.diffkg.diffusion as diffusion_mod
from diffkg_fast.data.build import build_dataset
from diffkg_fast.model.diffkg import DiffKG
from diffkg_fast.train import train
from diffkg_fast.train.config import RunConfig, make_config

BATCH = 128  # several diffusion batches (563 entities) and recommender steps per epoch


@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=150, n_diag=300, n_proc=150, n_med=60, seed=0)


def _cfg(**kw) -> RunConfig:
    base = {"epoch": 1, "latdim": 8, "dims": [32], "seed": 3, "batch": BATCH}
    base.update(kw)
    return make_config(**base)


def _quiet(_: str) -> None:
    pass


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {"recommender": [], "diffusion": [], "rebuild_rows": []}
    real_fwd, real_diff, real_topk = DiffKG.forward, diffusion_mod.diffusion_loss, \
        diffusion_mod.sample_topk

    def forward(self, batch):
        seen["recommender"].append(batch.users.numel())
        return real_fwd(self, batch)

    def diff(denoiser, x0, *args, **kw):
        seen["diffusion"].append(x0.shape[0])
        return real_diff(denoiser, x0, *args, **kw)

    def topk(denoiser, rowptr, col, rows, *args, **kw):
        seen["rebuild_rows"].append(rows.numel())
        return real_topk(denoiser, rowptr, col, rows, *args, **kw)

    monkeypatch.setattr(DiffKG, "forward", forward)
    monkeypatch.setattr(diffusion_mod, "diffusion_loss", diff)
    monkeypatch.setattr(diffusion_mod, "sample_topk", topk)
    return seen


def test_limit_one_runs_one_step_of_each_loop(ds, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _counting(monkeypatch)
    res = train(ds, _cfg(), log=_quiet, limit_batches=1)
    assert seen == {"recommender": [BATCH], "diffusion": [BATCH], "rebuild_rows": [BATCH]}
    h = res.history[0]
    assert h["time"]["diffusion"] > 0 and h["time"]["rebuild"] > 0
    assert h["val"]["n_users"] > 0  # evaluation is never limited

    seen_full = _counting(monkeypatch)
    train(ds, _cfg(), log=_quiet)
    assert len(seen_full["recommender"]) == -(-ds.train.nnz // BATCH) > 1
    assert len(seen_full["diffusion"]) == -(-ds.n_entities // BATCH) > 1
    assert seen_full["rebuild_rows"] == [ds.n_entities]


def test_a_limit_above_the_epoch_changes_nothing(ds) -> None:
    a = train(ds, _cfg(), log=_quiet)
    b = train(ds, _cfg(), log=_quiet, limit_batches=10**6)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["info"] for h in a.history] == [h["info"] for h in b.history]
    assert a.val == b.val and a.test == b.test


def test_limit_must_be_positive(ds) -> None:
    with pytest.raises(ValueError, match="limit_batches"):
        train(ds, _cfg(), log=_quiet, limit_batches=0)
