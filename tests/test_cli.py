"""The ``diffkg-fast data`` commands, run in-process and as the installed console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffkg_fast.cli import main
from diffkg_fast.data.dataset import KGDataset


def test_build_stats_export_mimic3_demo(tmp_path, capsys):
    out = tmp_path / "demo.npz"
    assert main(["data", "build", "--source", "mimic3", "--set", "cooc_min_count=2",
                 "--set", "split=visit", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "patients" in printed and "triplets" in printed
    ds = KGDataset.load(out)
    assert ds.split == "visit" and ds.meta["options"]["cooc_min_count"] == 2
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["patients"] == ds.n_users and stats["triplets"] == ds.n_triplets
    assert stats["interactions"] == ds.train.nnz + ds.valid.nnz + ds.test.nnz
    assert sum(s["visits"] for s in stats["splits"].values()) == ds.visits.n_visits
    assert main(["data", "export", str(out), "--format", "kgat"]) == 0
    assert (tmp_path / "demo_kgat" / "kg_final.txt").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "synthetic", "--set", "nonsense=1"], "'nonsense'.*valid"),
        (["--source", "mimic3", "--set", "nonsense=1"], "'nonsense'.*valid options.*top_diag"),
        (["--source", "synthetic", "--set", "seed=abc"], "'seed'.*integer"),
        (["--source", "synthetic", "--set", "seed"], "key=value"),
        (["--source", "mimic3", "--set", "split=random"], "'split'"),
        (["--source", "kgat"], "--path"),
        (["--source", "mimic3", "--path", "/nonexistent/dir"], "/nonexistent/dir"),
    ],
)
def test_build_errors_name_the_field(tmp_path, capsys, args, message):
    out = tmp_path / "x.npz"
    assert main(["data", "build", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_stats_of_a_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["data", "stats", str(bad)]) == 2
    assert "bad.npz" in capsys.readouterr().err


def test_console_script(tmp_path):
    # The script pip installed beside this interpreter (the venv need not be activated).
    script = Path(sys.executable).with_name("diffkg-fast")
    assert script.is_file(), f"console script not installed at {script}"
    out = tmp_path / "demo.npz"
    r = subprocess.run([str(script), "data", "build", "--source", "mimic3", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert KGDataset.load(out).n_users > 0
