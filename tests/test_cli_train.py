"""``diffkg-fast train`` / ``evaluate`` end to end on a tiny synthetic dataset, and the config
errors that must end as one ``error:`` line with exit status 2."""

from __future__ import annotations

import csv
import json

import pytest

from diffkg_fast.cli import main
from diffkg_fast.data.build import build_dataset
from diffkg_fast.train.commands import resolve_config

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
    assert (cfg.latdim, cfg.epoch, cfg.dims, cfg.lr, cfg.patience) == (32, 4, [16], 1.0, None)
    assert isinstance(cfg.lr, float)
    assert resolve_config(None, {"dims": 64}).dims == [64]
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
    # epoch comes from --set; everything else the preset leaves at Params.py's value.
    assert saved["ssl_reg"] == 0.1 and saved["epoch"] == 2
    # --resume resolves the run's own preset again, so the config check passes.
    assert main(["train", "--resume", "--out", str(out), *TINY]) == 0
    # An explicit preset is used and recorded as given.
    out2 = tmp_path / "run2"
    assert main(["train", "--data", str(data_file), "--preset", "mind", *TINY,
                 "--set", "epoch=1", "--out", str(out2)]) == 0
    assert json.loads((out2 / "data.json").read_text())["preset"] == "mind"
    assert json.loads((out2 / "config.json").read_text())["ssl_reg"] == 1.0
