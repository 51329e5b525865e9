"""``diffkg-fast compare``: rows, seeds, mean ± std tables, the chart, resuming, refused rows."""

from __future__ import annotations

import json

import pytest

import diffkg_fast.train.compare as compare_mod
from diffkg_fast.cli import main
from diffkg_fast.data.build import build_dataset
from diffkg_fast.model.registry import MODELS

SMALL = ["--set", "epoch=1", "--set", "latdim=8", "--set", "dims=[16]", "--set", "batch=256"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = {}
    for split in ("interaction", "visit"):
        out[split] = root / f"{split}.npz"
        build_dataset("synthetic", n_patients=150, n_diag=100, n_proc=50, n_med=30,
                      split=split, seed=0).save(out[split])
    return out


def test_every_registered_model_has_a_row() -> None:
    rows = compare_mod.rows()
    assert {v["model"] for v in rows.values()} == set(MODELS)
    assert "DiffKG as published (no patient codes)" in rows and "DiffKG without diffusion" in rows


def test_compare_runs_seeds_writes_tables_and_resumes(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(files["interaction"]), "--rows", "MostPop", "LightGCN",
            "DiffKG", "--seeds", "1", "2", *SMALL, "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    runs = json.loads((out / "compare.json").read_text())
    assert sorted((r["row"], r["seed"]) for r in runs) == sorted(
        (row, s) for row in ("MostPop", "LightGCN", "DiffKG") for s in (1, 2))
    a, b = (r for r in runs if r["row"] == "LightGCN")
    assert a["config"]["seed"] == 1 and b["config"]["seed"] == 2 and a["val"] != b["val"]
    md = (out / "compare.md").read_text()
    mean = (a["test"]["recall@20"] + b["test"]["recall@20"]) / 2
    assert f"{mean:.4f} ± " in md and "| LightGCN | id |" in md and "| DiffKG | codes + id |" in md
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()

    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_mod, "train", boom)
    assert main(argv) == 0  # everything is in compare.json: nothing trains
    assert (out / "compare.md").read_text() == md


def test_a_model_that_cannot_score_new_patients_is_a_row_without_numbers(files, tmp_path,
                                                                         capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(files["visit"]), "--rows", "MostPop", "LightGCN",
                 "--seeds", "1", *SMALL, "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| LightGCN | | cannot score patients it has never seen |" in md
    assert "med_jaccard" in md  # the visit split's medication columns


def test_unknown_row_is_an_error_line(capsys) -> None:
    assert main(["compare", "--rows", "LightGNC"]) == 2
    assert "unknown rows ['LightGNC']" in capsys.readouterr().err
