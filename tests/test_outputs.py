"""Outputs of the data commands under failing disks: one error line, exit status 2, and nothing
half-written (an export is all of its files or none)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from diffkg_fast.cli import main
from diffkg_fast.data.export import EXPORTERS
from diffkg_fast.data.medkg import build_medication_dataset
from diffkg_fast.utils import io as io_mod
from diffkg_fast.utils.io import atomic_directory

from helpers import random_records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ds") / "d.npz"
    build_medication_dataset(random_records(30, seed=5), cooc_min_count=2).save(path)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _fail_on(monkeypatch: pytest.MonkeyPatch, n: int, err: int = errno.ENOSPC) -> None:
    """The ``n``-th fsync (each file's last step before its rename) fails as a full disk."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(err, os.strerror(err))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _one_line(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


# ---------------------------------------------------------------------- exports
N_FILES = {"diffkg": 4, "kgat": 4, "recbole": 6, "triplets": 2}


def test_every_format_is_counted() -> None:
    assert N_FILES.keys() == EXPORTERS.keys()


@pytest.mark.parametrize("fmt, fail_at", [(f, k) for f, n in N_FILES.items()
                                          for k in range(1, n + 1)])
def test_a_full_disk_leaves_no_export(dataset: Path, tmp_path: Path, monkeypatch, capsys,
                                      fmt: str, fail_at: int) -> None:
    new, old = tmp_path / "new", tmp_path / "old"
    assert main(["data", "export", str(dataset), "--format", fmt, "--out", str(old)]) == 0
    (old / "mine.txt").write_text("not the exporter's")
    before = _tree(old)
    capsys.readouterr()
    for out in (new, old):
        _fail_on(monkeypatch, fail_at)
        assert main(["data", "export", str(dataset), "--format", fmt, "--out", str(out)]) == 2
        _one_line(capsys, str(out), "No space left on device", "nothing was written")
    assert not new.exists() and _tree(old) == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # and no temporary folder


def test_export_onto_a_file(dataset: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("x")
    assert main(["data", "export", str(dataset), "--format", "kgat", "--out",
                 str(tmp_path / "f")]) == 2
    _one_line(capsys, "exists and is not a directory")


def test_a_failed_move_puts_the_old_files_back(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a", "b", "c"):
        (out / name).write_text(f"old {name}")
    (out / "keep").write_text("keep")
    real, moves = os.replace, {"n": 0}

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == out:
            moves["n"] += 1
            if moves["n"] == 3:  # the third file moving in
                raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    with pytest.raises(OSError, match="I/O error"), atomic_directory(out) as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text(f"new {name}")
    assert _tree(out) == {"a": b"old a", "b": b"old b", "c": b"old c", "keep": b"keep"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_new_folder_appears_whole(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
        assert not (tmp_path / "out").exists()
    assert _tree(tmp_path / "out") == {"a": b"a"}
    assert oct((tmp_path / "out").stat().st_mode & 0o777) != "0o700"  # not mkdtemp's mode


# ---------------------------------------------------------------------- builds
def test_build_onto_a_directory_fails_before_building(tmp_path: Path, capsys) -> None:
    assert main(["data", "build", "--source", "synthetic", "--out", str(tmp_path)]) == 2
    _one_line(capsys, str(tmp_path), "is a directory")


@pytest.mark.parametrize("err, text", [(errno.ENOSPC, "No space left on device"),
                                       (errno.EACCES, "Permission denied"),
                                       (errno.EROFS, "Read-only file system")])
def test_build_on_a_failing_disk_keeps_the_old_file(tmp_path: Path, monkeypatch, capsys,
                                                    err: int, text: str) -> None:
    out = tmp_path / "d.npz"
    args = ["data", "build", "--source", "synthetic", "--set", "n_patients=60", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()
    capsys.readouterr()
    _fail_on(monkeypatch, 1, err)
    assert main(args) == 2
    _one_line(capsys, str(out), text)
    assert out.read_bytes() == before and sorted(tmp_path.iterdir()) == [out]


def test_other_os_errors_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def iterdir(self: Path):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert main(["data", "build", "--source", "mimic3", "--path", str(tmp_path),
                 "--out", str(tmp_path / "x.npz")]) == 2
    _one_line(capsys, f"{tmp_path}: Permission denied")


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_write_safedrug_is_all_or_nothing(tmp_path: Path, monkeypatch, fail_at: int) -> None:
    from diffkg_fast.data.safedrug import write_safedrug

    def records(seed: int):  # with a DDI matrix: four files
        r = random_records(10 + seed, seed=seed)
        r.ddi_pairs = np.array([[0, 1]])
        return r

    write_safedrug(records(1), tmp_path / "old")
    before = _tree(tmp_path / "old")
    for out in (tmp_path / "new", tmp_path / "old"):
        _fail_on(monkeypatch, fail_at)
        with pytest.raises(OSError, match="No space left"):
            write_safedrug(records(2), out)
    assert not (tmp_path / "new").exists() and _tree(tmp_path / "old") == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
