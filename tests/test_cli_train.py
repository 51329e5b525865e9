"""``diffkg-fast train`` / ``evaluate`` end to end on a tiny synthetic dataset, and the config
errors that must end as one ``error:`` line with exit status 2."""

from __future__ import annotations

import csv
import json

import pytest

from diffkg_fast.cli import main
from diffkg_fast.data.build import build_dataset
from diffkg_fast.train.config import resolve_config

TINY = ["--set", "latdim=16", "--set", "dims=[32]", "--set", "epoch=2", "--set", "batch=256",
        "--set", "seed=1"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    build_dataset("synthetic", n_patients=300, seed=0).save(path)
    return path


def test_train_then_evaluate(data_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_file), *TINY, "--device", "cpu",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    epochs = [ln for ln in text.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 2
    assert "train_loss: " in epochs[0] and "valid recall@20: " in epochs[0]
    assert "ndcg@20: " in epochs[0] and epochs[0].split("(")[1].split()[1] == "s)"
    table = text[text.index("split "):].splitlines()
    assert table[0].split() == ["split", "recall@10", "ndcg@10", "recall@20", "ndcg@20",
                                "recall@40", "ndcg@40"]
    assert [row.split()[0] for row in table[1:3]] == ["valid", "test"]
    for name in ("checkpoint.pt", "config.json", "log.csv", "data.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["latdim"] == 16 and cfg["dims"] == [32] and cfg["epoch"] == 2
    with open(out / "log.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
    test_row = [float(x) for x in table[2].split()[1:]]

    assert main(["evaluate", str(out), "--format", "json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["recall@20"] == pytest.approx(test_row[2], abs=1e-4)
    assert main(["evaluate", str(out), "--split", "valid", "--format", "csv"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert rows[0]["split"] == "valid" and 0.0 <= float(rows[0]["recall@20"]) <= 1.0

    # A finished run resumes to the same table; a fresh run into it is refused.
    # (--resume finds the dataset through data.json; its fingerprint is checked.)
    assert main(["train", *TINY, "--out", str(out), "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert resumed[resumed.index("split "):].splitlines()[1:3] == table[1:3]
    assert main(["train", "--data", str(data_file), *TINY, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--data", str(data_file), *TINY, "--set", "lr=0.01",
                 "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "different config" in err and "lr" in err
    assert main(["train", "--data", "synthetic", *TINY, "--out", str(out), "--resume"]) == 2
    assert "is not the one this run was trained on" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "latdmi=8"], "field 'latdmi': unknown config key; valid keys: ["),
    (["--set", "epoch=two"], "field 'epoch': expected an integer"),
    (["--set", "use_diffusion=1"], "field 'use_diffusion': expected true or false"),
    (["--set", "dims=[a]"], "field 'dims': expected a list of integers"),
    (["--set", "keepRate=2"], "keepRate must be in [0, 1]"),
    (["--set", "nokey"], "expected key=value"),
    (["--resume"], "--resume needs --out"),
    (["--data", "/nonexistent.npz"], "no such dataset file"),
])
def test_bad_input_is_one_error_line(args, needle, capsys) -> None:
    assert main(["train", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert "epoch 0" not in captured.out  # refused before any training


def test_unknown_key_lists_the_valid_ones(capsys) -> None:
    assert main(["train", "--set", "latdmi=8"]) == 2
    err = capsys.readouterr().err
    assert "'latdim'" in err and "'keepRate'" in err


def test_config_precedence_and_file_errors(tmp_path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"latdim": 8, "epoch": 4, "dims": [16], "patience": None}))
    cfg = resolve_config(str(path), {"latdim": 32, "lr": 1}, "cpu")
    got = [cfg[k] for k in ("latdim", "epoch", "dims", "lr", "patience")]
    assert got == [32, 4, [16], 1.0, None]
    assert isinstance(cfg["lr"], float)
    assert resolve_config(None, {"dims": 64})["dims"] == [64]
    path.write_text(json.dumps({"latdim": 8, "bogus": 1}))
    with pytest.raises(ValueError, match=r"cfg\.json, field 'bogus': unknown config key"):
        resolve_config(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="one JSON object"):
        resolve_config(str(path))
    path.write_text("{latdim: 8")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_config(str(path))


def test_medication_data_defaults_to_the_medication_preset(data_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_file), *TINY, "--out", str(out)]) == 0
    assert "preset medication (the default for this data" in capsys.readouterr().out
    assert json.loads((out / "data.json").read_text())["preset"] == "medication"
    saved = json.loads((out / "config.json").read_text())
    # epoch comes from --set, patience from the preset; the rest is Params.py's value.
    assert saved["ssl_reg"] == 0.1 and saved["epoch"] == 2 and saved["patience"] == 3
    # --resume takes the run's own config: the same flags again change nothing.
    assert main(["train", "--resume", "--out", str(out), *TINY]) == 0
    # An explicit preset is used and recorded as given.
    out2 = tmp_path / "run2"
    assert main(["train", "--data", str(data_file), "--preset", "mind", *TINY,
                 "--set", "epoch=1", "--out", str(out2)]) == 0
    assert json.loads((out2 / "data.json").read_text())["preset"] == "mind"
    assert json.loads((out2 / "config.json").read_text())["ssl_reg"] == 1.0


# --------------------------------------------------------------------- DiffKG's own flags
# The published commands of HKUDS/DiffKG's README, after `python Main.py`.
PUBLISHED = {
    "lastfm": "--data lastfm --reg 1e-5 --mess_dropout_rate 0.2 --layer_num_kg 2 --res_lambda 0 "
              "--triplet_num -1 --cl_pattern 1 --keepRate 0.1 --e_loss 0.01",
    "mind": "--data mind --e_loss 0.1 --temp 1 --ssl_reg 1 --mess_dropout_rate 0.2 "
            "--res_lambda 1",
    "alibaba": "--data alibaba --reg 1e-6 --epoch 50 --ssl_reg 1 --temp 1",
}
SMALL = ["--latdim", "8", "--dims", "[16]", "--batch", "256", "--no-progress", "--no-plot"]


@pytest.fixture(scope="module")
def diffkg_datasets(data_file, tmp_path_factory):
    """A DiffKG-layout dataset folder under Datasets/NAME for each published name."""
    from diffkg_fast.data.dataset import KGDataset
    from diffkg_fast.data.export import export_dataset

    root = tmp_path_factory.mktemp("diffkg_clone")
    ds = KGDataset.load(data_file)
    for name in PUBLISHED:
        export_dataset(ds, "diffkg", root / "Datasets" / name)
    return root


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_diffkg_commands_run_with_only_the_entry_point_changed(
        name, diffkg_datasets, tmp_path, monkeypatch, capsys) -> None:
    from diffkg_fast.train.presets import PRESETS

    monkeypatch.chdir(diffkg_datasets)  # DiffKG reads ./Datasets/NAME/, as Main.py does
    out = tmp_path / "run"
    argv = ["train", *PUBLISHED[name].split(), *SMALL, "--epoch", "1", "--out", str(out)]
    if name == "alibaba":
        argv.remove("--epoch")
        argv.remove("50")  # 50 epochs of the published command: too long for a test
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    expect = {k: v for k, v in PRESETS[name].items() if k != "epoch"}
    assert {k: saved[k] for k in expect} == expect
    assert json.loads((out / "data.json").read_text())["data"].endswith(f"Datasets/{name}")


def test_flags_equal_set_and_params_aliases(data_file, tmp_path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--data", str(data_file), *SMALL, "--epoch", "1", "--tstBat", "64",
                 "--tstEpoch", "2", "--keepRate", "0.3", "--norm", "false", "--out", str(a)]) == 0
    assert main(["train", "--data", str(data_file), *SMALL, "--set", "epoch=1",
                 "--set", "test_batch=64", "--set", "eval_every=2", "--set", "keepRate=0.3",
                 "--set", "norm=false", "--out", str(b)]) == 0
    capsys.readouterr()
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca == cb and ca["test_batch"] == 64 and ca["eval_every"] == 2 and ca["norm"] is False


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "reg=1e-5", "--reg", "1e-6"], "field 'reg': given twice"),
    (["--model", "lightgcn", "--keepRate", "0.2"], "field 'keepRate': unknown config key"),
    (["--gpu", "0"], "CUDA is not available"),
    (["--epoch", "0"], "epoch must be >= 1"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--topk", "5"], "topk must be one of the evaluated cut-offs"),
    (["--seed", "-1"], "seed must be in [0, 2**62)"),
    (["--data", "no_such_name"], "no such dataset"),
])
def test_bad_flags_are_one_error_line(args, needle, capsys) -> None:
    assert main(["train", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_kgat_folder_and_unused_params_flag(data_file, tmp_path, capsys) -> None:
    from diffkg_fast.data.dataset import KGDataset
    from diffkg_fast.data.export import export_dataset

    folder = tmp_path / "kgat"
    export_dataset(KGDataset.load(data_file), "kgat", folder)
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--model", "lightgcn", "--epoch", "1",
                 "--latdim", "8", "--kg_batch", "4096", "--no-progress", "--no-plot",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--kg_batch is accepted for DiffKG's command lines and ignored" in text
    assert main(["evaluate", str(out)]) == 0  # the folder is found again through data.json
