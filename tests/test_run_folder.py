"""A run folder never reports another run: digest, fingerprint and config inside the
checkpoint, a lock while a process trains in it, and ``--resume`` from the folder alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from trainer_checks import quiet

from diffkg_fast.cli import main
from diffkg_fast.data.errors import DataError
from diffkg_fast.train import train
from diffkg_fast.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)
from diffkg_fast.train.commands import evaluate_run
from diffkg_fast.train.config import make_config
from diffkg_fast.train.run_folder import CHECKPOINT, DATA_FILE, LOCK, RunFolder, load_run

from helpers import two_split_files

TINY = ["--set", "latdim=8", "--set", "dims=[16]", "--set", "batch=256", "--no-progress",
        "--no-plot"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two datasets of the same shapes that differ in their split (another seed)."""
    return two_split_files(tmp_path_factory.mktemp("data"),
                           n_patients=150, n_diag=100, n_proc=50, n_med=30)


@pytest.fixture(scope="module")
def two_runs(files, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for i, path in enumerate(files):
        out = root / f"run{i}"
        assert main(["train", "--data", str(path), *TINY, "--set", "epoch=1",
                     "--out", str(out)]) == 0
        runs.append(out)
    return runs


# --------------------------------------------------------------------- the checkpoint file
def test_digest_catches_a_flipped_bit(tmp_path) -> None:
    state = {"w": torch.arange(1000, dtype=torch.float32), "meta": {"epoch": 3, "name": "x"}}
    path = tmp_path / "ck.pt"
    save_checkpoint(path, state)
    assert load_checkpoint(path)["meta"] == {"epoch": 3, "name": "x"}
    raw = bytearray(path.read_bytes())
    # Flip one bit inside the stored weight bytes (float 999.0 is in the payload).
    needle = torch.tensor([999.0]).numpy().tobytes()
    at = raw.find(needle)
    assert at > 0
    raw[at + 1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_checkpoint(path)


def test_digest_covers_structure_and_values() -> None:
    base = {"a": torch.zeros(3), "b": [1, 2.5, "x"], "c": None}
    assert state_digest(base) == state_digest({"c": None, "b": [1, 2.5, "x"], "a": torch.zeros(3)})
    for changed in ({**base, "a": torch.zeros(4)}, {**base, "a": torch.zeros(3).double()},
                    {**base, "b": [1, 2.5, "y"]}, {**base, "c": 0}):
        assert state_digest(changed) != state_digest(base)


# --------------------------------------------------------------------- another run's files
def test_a_checkpoint_copied_from_another_run_is_refused(two_runs, tmp_path, capsys) -> None:
    a, b = tmp_path / "a", two_runs[1]
    shutil.copytree(two_runs[0], a)
    shutil.copy(b / CHECKPOINT, a / CHECKPOINT)  # same shapes, another split
    for cmd in (["evaluate", str(a)], ["recommend", str(a), "--patient", "0"],
                ["train", "--out", str(a), "--resume"]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not the one this run was trained on" in err[0], err


def test_a_truncated_data_json_is_an_error_line(two_runs, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    text = (run / DATA_FILE).read_text()
    (run / DATA_FILE).write_text(text[: len(text) // 2])
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.json" in err[0] and "not a readable" in err[0]


def test_evaluate_takes_the_checkpoint_file_for_its_folder(two_runs, capsys) -> None:
    run = two_runs[0]
    assert main(["evaluate", str(run), "--format", "json"]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run / CHECKPOINT), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_folder


# --------------------------------------------------------------------- the lock
def test_a_live_lock_refuses_a_second_trainer(files, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                            "since": "2026-12-07 01:00:00"}))
        assert main(["train", "--data", str(files[0]), *TINY, "--set", "epoch=1",
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and "is in use" in err
        assert not (out / DATA_FILE).exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over; leftovers of a killed write go.
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert main(["train", "--data", str(files[0]), *TINY, "--set", "epoch=1",
                 "--out", str(out)]) == 0
    assert not (out / LOCK).exists() and not list(out.glob(".*.tmp"))


def test_the_lock_is_reentrant_in_one_process(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run")
    with folder.lock(), folder.lock():
        assert (folder.path / LOCK).exists()
    assert not (folder.path / LOCK).exists()
    (folder.path / LOCK).write_text("{not json")  # unreadable and fresh: held
    with pytest.raises(DataError, match="lock"), folder.lock():
        pass


# --------------------------------------------------------------------- resume from the folder
def test_resume_needs_no_flags_and_may_train_further(files, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(files[0]), *TINY, "--set", "epoch=2",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    # The run's own config and data; nothing to train: the same table.
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert not [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    # A changed option is refused by name; a smaller epoch too.
    assert main(["train", "--out", str(out), "--resume", "--set", "lr=0.01"]) == 2
    assert "lr: run 0.001 vs now 0.01" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--epoch", "1"]) == 2
    assert "already trained 2 epochs" in capsys.readouterr().err
    # A larger epoch trains on, to the bits of a run that had that epoch count from the start.
    assert main(["train", "--out", str(out), "--resume", "--epoch", "3"]) == 0
    assert [ln.split()[1] for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("epoch ")] == ["2"]
    straight = tmp_path / "straight"
    assert main(["train", "--data", str(files[0]), *TINY, "--set", "epoch=3",
                 "--out", str(straight)]) == 0
    a, b = load_run(out), load_run(straight)
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                         strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), k
    assert evaluate_run(out) == evaluate_run(straight)


def test_python_resume_refuses_another_dataset(files, tmp_path) -> None:
    from diffkg_fast.data.dataset import KGDataset

    cfg = make_config(model="lightgcn", epoch=1, latdim=8, batch=256)
    train(KGDataset.load(files[0]), cfg, log=quiet, out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="not the one this run was trained on"):
        train(KGDataset.load(files[1]), cfg, log=quiet, out_dir=tmp_path, resume=True)


# --------------------------------------------------------------------- OS errors
def test_os_errors_are_one_line_and_leave_the_last_checkpoint(files, tmp_path, capsys,
                                                              monkeypatch) -> None:
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    assert main(["train", "--data", str(files[0]), *TINY, "--set", "epoch=1",
                 "--out", str(afile)]) == 2
    assert "a_file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["train", "--data", str(files[0]), *TINY, "--out", str(ro / "run")]) == 2
        assert "cannot write" in capsys.readouterr().err
    # A full disk at epoch 1's checkpoint: one error line, epoch 0's checkpoint and log intact.
    import diffkg_fast.train.run_folder as rf

    out = tmp_path / "run"
    real, calls = rf.save_checkpoint, []

    def full_disk(path, state):
        calls.append(state["epoch"])
        if state["epoch"] == 1:
            raise OSError(28, "No space left on device")
        real(path, state)

    monkeypatch.setattr(rf, "save_checkpoint", full_disk)
    assert main(["train", "--data", str(files[0]), *TINY, "--set", "epoch=2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "checkpoint.pt" in err[0]
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 0
    assert (out / "log.csv").read_text().count("\n") == 2  # the header and epoch 0
    monkeypatch.setattr(rf, "save_checkpoint", real)
    assert main(["train", "--out", str(out), "--resume"]) == 0  # and the run goes on
