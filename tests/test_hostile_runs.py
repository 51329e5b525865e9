"""Hostile run folders and comparisons (issue 24's second pass): a checkpoint crafted with a
valid digest, a ``data.json`` or ``compare.json`` of any shape, a lock that is a link to
``/dev/zero``, a disk that fills before the first checkpoint, a comparison resumed on another
dataset: each is one ``error:`` line naming the file (or the run goes on where it legitimately
can), never a traceback, never another run's numbers, never files of a run that never was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trainer_checks import quiet

import diffkg_fast.train.compare as compare_mod
from diffkg_fast.cli import main
from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.stats import dataset_stats, describe_validation, format_stats
from diffkg_fast.train import checkpoint as checkpoint_mod
from diffkg_fast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffkg_fast.train.config import make_config
from diffkg_fast.train.run_folder import CHECKPOINT, DATA_FILE, LOCK, load_run
from diffkg_fast.train.trainer import train

from helpers import two_split_files

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
TINY = ["--model", "lightgcn", "--set", "latdim=8", "--set", "epoch=1", "--no-progress",
        "--no-plot"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return two_split_files(tmp_path_factory.mktemp("data"),
                           n_patients=120, n_diag=80, n_proc=40, n_med=30)


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(files[0]), *TINY, "--out", str(out)]) == 0
    return out


def _crafted(run, tmp_path, change) -> Any:
    """A copy of ``run`` whose checkpoint is changed and re-signed (a valid digest)."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    ck = load_checkpoint(out / CHECKPOINT)
    ck.pop("format_version")
    change(ck)
    save_checkpoint(out / CHECKPOINT, ck)
    return out


# Fields of a run checkpoint and values of the wrong shape for each.
def _set(path: tuple, value: Any):
    def change(ck: dict) -> None:
        d = ck
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return change


BAD = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=4), st.floats(),
                st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                     st.text(max_size=2),
                                                                     max_size=2))
FIELDS = [("config",), ("data_fingerprint",), ("epoch",), ("history",), ("selection",),
          ("model",), ("selection", "best_epoch"), ("selection", "best_state"),
          ("selection", "best_value"), ("selection", "bad"), ("history", 0),
          ("history", 0, "val"), ("history", 0, "loss"), ("config", "latdim"),
          ("config", "epoch"), ("config", "model"), ("config", "lr")]


@SETTINGS
@given(st.sampled_from(FIELDS), BAD)
def test_a_crafted_checkpoint_is_refused_naming_it(run, files, tmp_path_factory, field,
                                                   value) -> None:
    tmp = tmp_path_factory.mktemp("crafted")
    out = _crafted(run, tmp, _set(field, value))
    try:
        loaded = load_run(out)
    except DataError as exc:  # a CheckpointError, or the dataset's own error
        assert str(out) in str(exc)
    else:  # the change was harmless (a config value of the right kind and range)
        assert loaded.model is not None
    cfg = load_checkpoint(out / CHECKPOINT)["config"]
    try:
        config = make_config(**{**cfg, "epoch": 2}) if isinstance(cfg, dict) else None
    except DataError:
        config = None
    if config is not None:
        ds = KGDataset.load(files[0])
        try:
            train(ds, config, log=quiet, out_dir=out, resume=True)
        except DataError as exc:
            assert str(out) in str(exc) or "config" in str(exc)


def test_weights_that_do_not_fit_the_config_are_refused_on_resume(run, files,
                                                                  tmp_path) -> None:
    out = _crafted(run, tmp_path, _set(("config", "latdim"), 16))
    ds = KGDataset.load(files[0])
    config = make_config(**{**load_checkpoint(out / CHECKPOINT)["config"], "epoch": 2})
    with pytest.raises(CheckpointError, match="does not fit the model"):
        train(ds, config, log=quiet, out_dir=out, resume=True)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_run(out)


def test_a_multi_line_error_is_printed_on_one_line(run, tmp_path, capsys) -> None:
    out = _crafted(run, tmp_path, _set(("config", "latdim"), 16))
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\t" not in err and err.startswith("error: ")


@pytest.mark.parametrize("info", ['{"data": 5}', '{"data": ["a"]}', '{"fingerprint": 3}',
                                  '{"preset": [1]}', "[1, 2]", '{"data": ' * 10_000])
def test_data_json_of_any_shape_is_one_error(run, tmp_path, capsys, info) -> None:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / DATA_FILE).write_text(info)
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and DATA_FILE in err[0]


def test_a_lock_linked_to_dev_zero_is_read_a_little_and_taken_over(files, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).symlink_to("/dev/zero")
    assert main(["train", "--data", str(files[0]), *TINY, "--out", str(out)]) == 0
    assert (out / CHECKPOINT).is_file() and not (out / LOCK).exists()


# ------------------------------------------------------------------ nothing of a run that never was
def test_a_full_disk_before_the_first_checkpoint_leaves_no_run_files(files, tmp_path, capsys,
                                                                     monkeypatch) -> None:
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_mod.torch, "save", full)
    out = tmp_path / "run"
    assert main(["train", "--data", str(files[0]), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {out / CHECKPOINT}: cannot write: No space left on device"]
    assert not out.exists()  # made by this command, emptied: removed
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--data", str(files[0]), *TINY, "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only what was there


def test_resume_of_a_missing_folder_creates_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "nope"
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "no checkpoint file" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
    "to allocate 800000000000 bytes.\nmore")])
def test_out_of_memory_is_one_line(monkeypatch, capsys, exc) -> None:
    import diffkg_fast.train.commands as commands

    def boom(_args):
        raise exc

    monkeypatch.setattr(commands, "cmd_evaluate", boom)
    assert main(["evaluate", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory") and "latdim" in err[0]


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch) -> None:
    import diffkg_fast.train.commands as commands

    def boom(_args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "cmd_evaluate", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["evaluate", "x"])


def test_evaluate_with_an_empty_data_spec_is_refused(run, capsys) -> None:
    assert main(["evaluate", str(run), "--data", ""]) == 2
    assert "field '--data': empty" in capsys.readouterr().err


# ------------------------------------------------------------------ compare.json
CMP = ["--rows", "MostPop", "--seeds", "1", "--set", "epoch=1"]


@pytest.fixture(scope="module")
def compared(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    assert main(["compare", "--data", str(files[0]), *CMP, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(("change", "needle"), [
    (lambda p: p.write_text('[{"row": '), "not a readable compare.json"),
    (lambda p: p.write_text('[{"row": 1}]'), "not a run of diffkg-fast compare"),
    (lambda p: p.write_text('{"a": 1}'), "not a run of diffkg-fast compare"),
    (lambda p: p.write_text(json.dumps([{**json.loads(p.read_text())[0], "val": "x"}])),
     "not a run of diffkg-fast compare"),
])
def test_a_compare_json_of_any_shape_is_one_error(files, compared, tmp_path, capsys, change,
                                                  needle) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    change(out / "compare.json")
    assert main(["compare", "--data", str(files[0]), *CMP, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "compare.json" in err[0] and needle in err[0]


@pytest.mark.parametrize(("data", "extra", "needle"), [
    (1, [], "is of another dataset"),
    (0, ["--set", "epoch=2"], "has another config (epoch: 1 vs now 2)"),
])
def test_a_comparison_never_reuses_runs_of_another_dataset_or_config(
        files, compared, tmp_path, capsys, monkeypatch, data, extra, needle) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    monkeypatch.setattr(compare_mod, "train", lambda *a, **k: pytest.fail("trained"))
    assert main(["compare", "--data", str(files[data]), *CMP, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "compare.json" in err[0] and needle in err[0]


def test_a_run_predating_a_key_counts_it_at_its_default(files, compared, tmp_path, capsys,
                                                        monkeypatch) -> None:
    """A key added after the run (a new option; its default is the old behaviour) does not
    make the run another config's; a value other than the default still does."""
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    runs = json.loads((out / "compare.json").read_text())
    del runs[0]["config"]["eval_every"]  # as if the run predated the key
    (out / "compare.json").write_text(json.dumps(runs))
    monkeypatch.setattr(compare_mod, "train", lambda *a, **k: pytest.fail("trained"))
    assert main(["compare", "--data", str(files[0]), *CMP, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["compare", "--data", str(files[0]), *CMP, "--set", "eval_every=2",
                 "--out", str(out)]) == 2
    assert "has another config (eval_every: 1 vs now 2)" in capsys.readouterr().err


def test_compare_checks_its_keys_before_the_data_and_holds_a_lock(files, tmp_path,
                                                                  capsys) -> None:
    assert main(["compare", "--data", "missing.npz", *CMP, "--set", "epohc=1",
                 "--out", str(tmp_path / "a")]) == 2
    assert "field 'epohc': no model takes this key" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": __import__("socket").gethostname(),
                                        "since": "then"}))
    assert main(["compare", "--data", str(files[0]), *CMP, "--out", str(out)]) == 2
    assert "is in use: process 1" in capsys.readouterr().err


def test_a_compare_write_error_names_the_file(files, tmp_path, capsys, monkeypatch) -> None:
    @contextlib.contextmanager
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield

    monkeypatch.setattr(compare_mod, "atomic_write", full)
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(files[0]), *CMP, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {out / 'compare.json'}: cannot write: No space left on device"]


# ------------------------------------------------------------------ a dataset header's meta
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=5)),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.one_of(JSON, st.fixed_dictionaries(
    {"from": st.sampled_from(["train", "none", "valid.txt"])},
    optional={k: JSON for k in ("fraction", "seed", "interactions", "users")})))
def test_any_validation_meta_is_described_without_error(info) -> None:
    text = describe_validation(info)
    assert text is None or isinstance(text, str)


def test_stats_of_a_header_with_odd_meta(files, tmp_path) -> None:
    ds = KGDataset.load(files[0])
    ds.meta["validation"] = {"from": "train", "fraction": "abc", "interactions": [1]}
    assert "carved from train: ? of each" in format_stats(dataset_stats(ds))
