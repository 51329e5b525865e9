"""Checkpoints and run folders: a run crashed after epoch k and resumed ends bitwise equal to an
uninterrupted one; a different config is refused; the run folder's files are complete and can
never report another run (digest, fingerprint, lock)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from trainer_checks import same_state

from diffkg_fast.data.build import build_dataset
from diffkg_fast.train import train
from diffkg_fast.train.checkpoint import CheckpointError, load_checkpoint
from diffkg_fast.train.commands import evaluate_run
from diffkg_fast.train.config import RunConfig, config_defaults, make_config
from diffkg_fast.train.run_folder import CHECKPOINT, CONFIG, LOG


class Crash(Exception):
    """Stands for a killed process: raised from the log callback mid-run."""


def _quiet(_: str) -> None:
    pass


def _crash_at(epoch: int):
    """A log callback that dies when epoch ``epoch`` reports, i.e. before its checkpoint:
    the checkpoint left behind is the one of epoch ``epoch - 1``."""
    def log(line: str) -> None:
        if line.startswith(f"epoch {epoch} "):
            raise Crash
    return log


def _cfg(**kw) -> RunConfig:
    base = {"latdim": 16, "dims": [32], "epoch": 3, "batch": 256, "seed": 1}
    base.update(kw)
    keys = config_defaults(base.get("model", "diffkg"))
    return make_config(**{k: v for k, v in base.items() if k in keys})



@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=300, seed=0)


@pytest.fixture(scope="module")
def data_file(ds, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    ds.save(path)
    return path


@pytest.fixture(scope="module")
def full_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return train(ds, _cfg(), log=_quiet, out_dir=out), out


def _assert_same_run(a, b) -> None:
    # Everything: the recommender, the denoiser, its Adam, the graphs, the random streams.
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert same_state(sa[k], sb[k]), k
    assert a.best_epoch == b.best_epoch
    assert a.val == b.val and a.test == b.test
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha["loss"] == hb["loss"] and ha["val"] == hb["val"]
        assert ha["info"] == hb["info"]


def test_resume_after_crash_is_bitwise_equal(ds, full_run, tmp_path) -> None:
    want, _ = full_run
    with pytest.raises(Crash):
        train(ds, _cfg(), log=_crash_at(1), out_dir=tmp_path)
    ck = load_checkpoint(tmp_path / CHECKPOINT)
    assert ck["epoch"] == 0 and len(ck["history"]) == 1
    lines: list[str] = []
    got = train(ds, _cfg(), log=lines.append, out_dir=tmp_path, resume=True)
    assert lines[0].startswith("resumed from") and "after epoch 0" in lines[0]
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch ")] == ["1", "2"]
    _assert_same_run(want, got)


def test_lightgcn_resume_is_bitwise_equal(ds, tmp_path) -> None:
    cfg = _cfg(model="lightgcn", epoch=4)
    want = train(ds, cfg, log=_quiet, out_dir=tmp_path / "a")
    with pytest.raises(Crash):
        train(ds, cfg, log=_crash_at(2), out_dir=tmp_path / "b")
    got = train(ds, cfg, log=_quiet, out_dir=tmp_path / "b", resume=True)
    _assert_same_run(want, got)


def test_resuming_a_finished_run_trains_nothing(ds, full_run) -> None:
    want, out = full_run
    before = (out / CHECKPOINT).read_bytes()
    lines: list[str] = []
    got = train(ds, _cfg(), log=lines.append, out_dir=out, resume=True)
    assert not [ln for ln in lines if ln.startswith("epoch ")]
    _assert_same_run(want, got)
    assert (out / CHECKPOINT).read_bytes() == before


def test_resume_refuses_a_different_config(ds, full_run) -> None:
    _, out = full_run
    before = (out / CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointError, match="different config") as info:
        train(ds, _cfg(lr=1e-2, latdim=8), log=_quiet, out_dir=out, resume=True)
    msg = str(info.value)
    assert "lr: run 0.001 vs now 0.01" in msg and "latdim" in msg
    assert "batch" not in msg  # only the differing keys are named
    assert (out / CHECKPOINT).read_bytes() == before


def test_resume_needs_a_readable_checkpoint(ds, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        train(ds, _cfg(), log=_quiet, out_dir=tmp_path, resume=True)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(ds, _cfg(), log=_quiet, out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="needs out_dir"):
        train(ds, _cfg(), log=_quiet, resume=True)


def test_run_directory_files(full_run) -> None:
    res, out = full_run
    assert json.loads((out / CONFIG).read_text()) == res.config
    with open(out / LOG, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for row, h in zip(rows, res.history, strict=True):
        assert float(row["loss_total"]) == h["loss"]["total"]
        assert float(row["loss_diff_loss"]) == h["loss"]["diff_loss"]
        for k in (10, 20, 40):
            assert float(row[f"val_recall@{k}"]) == h["val"][f"recall@{k}"]
            assert float(row[f"val_ndcg@{k}"]) == h["val"][f"ndcg@{k}"]
        assert float(row["time_diffusion"]) >= 0.0
        assert int(row["kg_edges"]) == h["info"]["kg_edges"]
    ck = load_checkpoint(out / CHECKPOINT)
    assert ck["config"] == res.config and ck["epoch"] == 2
    assert set(ck["sampler"]) == {"negatives", "shuffle"}
    model = ck["model"]
    assert set(model["diffusion._extra_state"]["generators"]) == {"diffusion", "rebuild"}
    assert model["_extra_state"]["kg_sampled"].shape[1] == 3
    assert {"python", "numpy", "torch"} <= set(ck["rng"])
    assert ck["selection"]["best_epoch"] == res.best_epoch
    assert len(ck["data_fingerprint"]) == 64
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_evaluate_run_reproduces_the_trainers_metrics(full_run, data_file) -> None:
    res, out = full_run
    assert evaluate_run(out, "test", data=str(data_file)) == res.test
    assert evaluate_run(out, "valid", data=str(data_file)) == res.val


def test_mostpop_writes_a_run_directory(ds, data_file, tmp_path) -> None:
    res = train(ds, _cfg(model="mostpop"), log=_quiet, out_dir=tmp_path)
    assert (tmp_path / LOG).is_file() and (tmp_path / CONFIG).is_file()
    assert evaluate_run(tmp_path, "test", data=str(data_file)) == res.test


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_is_seeded_and_resumes(ds, tmp_path) -> None:
    # End to end on a GPU with every kernel on (the default backends). The diffusion noise there
    # comes from a device generator seeded by the CPU one at each pass, so a seed still fixes
    # the run and a crash resumes to it. Compared within float tolerance, not bitwise: CUDA
    # index backward (the embedding rows of a batch) accumulates with atomics.
    cfg = _cfg(device="cuda", epoch=2)  # 2 epochs: bench/gpu_suite.sh gives all GPU tests 120 s
    want = train(ds, cfg, log=_quiet, out_dir=tmp_path / "a")
    with pytest.raises(Crash):
        train(ds, cfg, log=_crash_at(1), out_dir=tmp_path / "b")
    lines: list[str] = []
    got = train(ds, cfg, log=lines.append, out_dir=tmp_path / "b", resume=True)
    assert lines[0].startswith("resumed from") and "after epoch 0" in lines[0]
    for a, b in ((want, got), (want, train(ds, cfg, log=_quiet))):
        assert len(a.history) == len(b.history) == cfg.epoch
        for ha, hb in zip(a.history, b.history, strict=True):
            assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-4)
            ka, kb = ha["info"]["kg_edges"], hb["info"]["kg_edges"]
            assert abs(ka - kb) <= 0.001 * ka
        assert a.test["recall@20"] == pytest.approx(b.test["recall@20"], abs=0.01)
    other = train(ds, _cfg(device="cuda", epoch=2, seed=2), log=_quiet)
    assert [h["loss"] for h in other.history] != [h["loss"] for h in want.history]
