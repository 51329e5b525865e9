"""``train``'s config sources (YAML, presets, precedence) and its reporting (progress bar,
``curves.png``, TensorBoard): none of the reporting may change a result, and a missing optional
package is either one note (plot) or one ``error:`` line (``--tensorboard``)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from diffkg_fast.cli import main
from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.train import train
from diffkg_fast.train.config import make_config, resolve_config
from diffkg_fast.train.presets import PRESETS, preset
from diffkg_fast.train.report import CURVES, TB_DIR, VIZ_HINT, RunReporter, plot_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--set", "latdim=16", "--set", "dims=[32]", "--set", "epoch=2", "--set", "batch=256",
        "--set", "seed=1"]


@pytest.fixture(scope="module")
def ds():
    # Small vocabulary too: a 2-epoch run takes well under a second.
    return build_dataset("synthetic", n_patients=200, n_diag=300, n_proc=150, n_med=60, seed=0)


@pytest.fixture(scope="module")
def data_file(ds, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    ds.save(path)
    return path


def _history(n: int = 3) -> list[dict]:
    """The shape of the trainer's history, for the reporter tests that need no training."""
    return [{"epoch": e, "loss": {"total": 1.0 / (e + 1), "bpr": 0.5, "reg": 0.01, "cl": 0.3,
                                  "diff_loss": 0.2},
             "info": {"kg_edges": 100},
             "val": {f"{m}@{k}": 0.1 * (e + 1) for m in ("recall", "ndcg") for k in (10, 20, 40)},
             "time": {"diffusion": 0.1, "rebuild": 0.05, "recommender": 0.3, "evaluation": 0.02}}
            for e in range(n)]


# --------------------------------------------------------------------- YAML config files
def test_yaml_config_equals_json(tmp_path) -> None:
    values = {"latdim": 8, "dims": [16], "reg": 1e-5, "lr": 0.002, "patience": None,
              "use_diffusion": False, "model": "diffkg", "temp": 1}
    js = tmp_path / "cfg.json"
    js.write_text(json.dumps(values))
    # "1e-5" without a dot is a string to plain PyYAML (YAML 1.1): the loader must read a float.
    yml = tmp_path / "cfg.yaml"
    yml.write_text("# DiffKG on Last-FM, smaller\nlatdim: 8\ndims: [16]\nreg: 1e-5\nlr: 0.002\n"
                   "patience: null\nuse_diffusion: false\nmodel: diffkg\ntemp: 1\n")
    cfg = resolve_config(str(yml))
    assert cfg == resolve_config(str(js))
    assert cfg["reg"] == 1e-5 and isinstance(cfg["reg"], float)
    assert isinstance(cfg["temp"], float)
    short = tmp_path / "cfg.yml"
    short.write_text("dims:\n  - 16\nlatdim: 8\n")
    assert resolve_config(str(short))["dims"] == [16]


@pytest.mark.parametrize(("text", "needle"), [
    ("latdim: 8\nepoch: [1, 2\n", "cfg.yaml, line 3: not valid YAML"),
    ("latdim: 8\n  epoch: 2\n", "cfg.yaml, line 2: not valid YAML"),
    ("- 1\n- 2\n", "cfg.yaml: a YAML config file holds one mapping"),
    ("", "cfg.yaml: a YAML config file holds one mapping"),
    ("latdim: 8\nbogus: 1\n", "cfg.yaml, field 'bogus': unknown config key"),
    ("epoch: two\n", "cfg.yaml, field 'epoch': expected an integer"),
    ("lr: fast\n", "cfg.yaml, field 'lr': expected a number"),
])
def test_yaml_errors_name_the_file(tmp_path, text, needle) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        resolve_config(str(path))
    assert needle in str(info.value) and info.value.path == str(path)


def test_yaml_error_is_one_cli_line(tmp_path, capsys) -> None:
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml: cannot read config" in err[0]


# --------------------------------------------------------------------- presets
def test_every_preset_resolves_to_its_values() -> None:
    assert set(PRESETS) >= {"diffkg", "lastfm", "mind", "alibaba", "medication"}
    assert resolve_config(preset="diffkg") == make_config()
    for name, values in PRESETS.items():
        cfg = resolve_config(preset=name).to_dict()
        assert {k: cfg[k] for k in values} == values, name
    last = resolve_config(preset="lastfm")
    assert [last[k] for k in ("reg", "keepRate", "triplet_num", "cl_pattern", "layer_num_kg")
            ] == [1e-5, 0.1, -1, 1, 2]
    assert resolve_config(preset="alibaba")["epoch"] == 50
    # A preset's DiffKG keys are skipped for a model that does not take them.
    light = resolve_config(None, {"model": "lightgcn"}, preset="lastfm")
    assert light["reg"] == 1e-5 and "keepRate" not in light
    assert preset("mind") is not PRESETS["mind"]  # a copy: callers cannot change the table


def test_train_help_names_every_preset(capsys) -> None:
    # cli.py names them without importing torch; this keeps that list in step with PRESETS.
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in PRESETS)


def test_set_overrides_a_preset() -> None:
    cfg = resolve_config(None, {"keepRate": 0.3, "epoch": 3}, preset="lastfm")
    assert (cfg["keepRate"], cfg["epoch"], cfg["reg"]) == (0.3, 3, 1e-5)


def test_unknown_preset(capsys) -> None:
    with pytest.raises(DataError, match=r"field '--preset': unknown preset 'lastfn'"):
        resolve_config(preset="lastfn")
    assert main(["train", "--preset", "lastfn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'--preset'" in err[0] and "'lastfm'" in err[0]


def test_precedence_defaults_preset_file_set_device(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    # mind: e_loss 0.1, temp 1, ssl_reg 1; the file changes temp and latdim and names cuda.
    path.write_text("temp: 0.5\nlatdim: 8\ndevice: cuda\n")
    cfg = resolve_config(str(path), {"latdim": 16}, "cpu", preset="mind")
    assert cfg["e_loss"] == 0.1 and cfg["ssl_reg"] == 1.0  # preset over defaults
    assert cfg["temp"] == 0.5  # file over preset
    assert cfg["latdim"] == 16  # --set over file
    assert cfg["device"] == "cpu"  # --device over everything
    assert cfg["lr"] == make_config()["lr"]  # untouched: the default


# --------------------------------------------------------------------- reporting
def test_cli_run_writes_plot_tensorboard_and_preset(data_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_file), *TINY, "--preset", "diffkg",
                 "--out", str(out), "--tensorboard"]) == 0
    assert "epoch 1 " in capsys.readouterr().out
    png = (out / CURVES).read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
    assert json.loads((out / "data.json").read_text())["preset"] == "diffkg"
    events = list((out / TB_DIR).glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / TB_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/bpr", "loss/cl", "loss/diff_loss", "val/recall@20",
            "val/ndcg@20", "time/diffusion", "time/evaluation"} <= tags
    assert [e.step for e in acc.Scalars("val/recall@20")] == [0, 1]


def test_tensorboard_needs_out(capsys) -> None:
    assert main(["train", "--tensorboard"]) == 2
    assert "--tensorboard needs --out" in capsys.readouterr().err


def test_tensorboard_missing_is_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(DataError, match=r"field '--tensorboard'.*diffkg-fast\[viz\]"):
        RunReporter(tmp_path, tensorboard=True)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines: list[str] = []
    rep = RunReporter(tmp_path, plot=True, log=lines.append)
    assert not lines  # said at the first epoch: a refused run prints only its error
    for n in (1, 2, 3):
        rep.epoch_end(_history(n))
    rep.close()
    assert len(lines) == 1 and VIZ_HINT in lines[0]
    assert not (tmp_path / CURVES).exists()


def test_plot_of_a_run_without_losses(tmp_path) -> None:
    # MostPop's one-epoch history: no losses, one validation point. Still a valid PNG.
    hist = _history(1)
    hist[0]["loss"] = {}
    plot_curves(hist, tmp_path / CURVES)
    assert (tmp_path / CURVES).read_bytes().startswith(PNG_SIGNATURE)


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_and_reporter_do_not_change_results(ds, tmp_path, monkeypatch) -> None:
    cfg = make_config(epoch=1, latdim=16, dims=[32], batch=256, seed=1)
    plain = train(ds, cfg, log=lambda _: None)
    fake = _TTY()
    monkeypatch.setattr(sys, "stderr", fake)  # a terminal: the bar is really drawn
    with RunReporter(tmp_path, tensorboard=True, plot=False) as rep:
        shown = train(ds, cfg, log=lambda _: None, progress=True, reporter=rep)
    assert "epoch 0" in fake.getvalue()  # the bar was there
    assert list((tmp_path / TB_DIR).glob("events.out.tfevents.*"))
    assert [h["loss"] for h in shown.history] == [h["loss"] for h in plain.history]
    assert [h["val"] for h in shown.history] == [h["val"] for h in plain.history]
    assert shown.test == plain.test
