"""MIMIC-III tables damaged at the byte level: bad encodings, broken or cut gzip streams. Every
one is one error line naming the file, exit status 2, and no dataset written."""

from __future__ import annotations

import gzip
import shutil
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffkg_fast.cli import main
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.mimic3 import load_mimic3

TABLES = ("DIAGNOSES_ICD", "PROCEDURES_ICD", "PRESCRIPTIONS", "ADMISSIONS")


@pytest.fixture
def tables(tmp_path: Path, mimic3_demo_dir: Path) -> Path:
    root = tmp_path / "mimic"
    root.mkdir()
    for name in TABLES:
        shutil.copy(mimic3_demo_dir / f"{name}.csv.gz", root)
    return root


def _text(root: Path, name: str) -> bytes:
    return gzip.decompress((root / f"{name}.csv.gz").read_bytes())


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def bad_utf8_header(root: Path, name: str) -> int:
    data = _text(root, name)
    (root / f"{name}.csv.gz").write_bytes(gzip.compress(b"\xff" + data))
    return 1


def bad_utf8_row(root: Path, name: str) -> int:
    data = _text(root, name)
    pos = data.index(b"\n", len(data) // 2) + 1
    (root / f"{name}.csv.gz").unlink()
    (root / f"{name}.csv").write_bytes(data[:pos] + b"caf\xe9," + data[pos:])  # latin-1
    return _line_of(data, pos)


def gzip_header(root: Path, name: str) -> None:
    raw = bytearray((root / f"{name}.csv.gz").read_bytes())
    raw[2] = 7  # compression method: not deflate
    (root / f"{name}.csv.gz").write_bytes(bytes(raw))


def gzip_mid_stream(root: Path, name: str) -> None:
    raw = bytearray((root / f"{name}.csv.gz").read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 8):
        raw[i] ^= 0x5A
    (root / f"{name}.csv.gz").write_bytes(bytes(raw))


def gzip_truncated(root: Path, name: str) -> None:
    raw = (root / f"{name}.csv.gz").read_bytes()
    (root / f"{name}.csv.gz").write_bytes(raw[: len(raw) * 2 // 3])


def gzip_crc(root: Path, name: str) -> None:
    raw = (root / f"{name}.csv.gz").read_bytes()
    (root / f"{name}.csv.gz").write_bytes(raw[:-8] + bytes(8))


@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize(
    "damage, message",
    [
        (bad_utf8_header, "byte 0xff is not UTF-8 text; expected a UTF-8 CSV file"),
        (bad_utf8_row, "byte 0xe9 is not UTF-8 text"),
        (gzip_header, "damaged or truncated gzip stream"),
        (gzip_mid_stream, "damaged or truncated gzip stream"),
        (gzip_truncated, "damaged or truncated gzip stream"),
        (gzip_crc, "damaged or truncated gzip stream"),
    ],
)
def test_damaged_tables_are_one_error_line(tables: Path, tmp_path: Path, capsys, name: str,
                                           damage, message: str) -> None:
    line = damage(tables, name)
    out = tmp_path / "x.npz"
    assert main(["data", "build", "--source", "mimic3", "--path", str(tables),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tables / name}.csv") and err.count("\n") == 1, err
    assert message in err
    if line is not None:
        assert f", line {line}:" in err, err
    assert not out.exists() and list(tmp_path.glob("*.tmp")) == []


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                     max_size=4),
       truncate=st.one_of(st.none(), st.integers(0, 10**6)))
def test_any_damaged_gzip_table_loads_or_names_its_file(tables: Path, cuts: list,
                                                        truncate: int | None) -> None:
    """Byte flips anywhere in PROCEDURES_ICD.csv.gz, maybe a truncation: the records, or a
    DataError naming the file; never another exception."""
    path = tables / "PROCEDURES_ICD.csv.gz"
    good = path.read_bytes()  # restored below: hypothesis reuses the fixture's folder
    raw = bytearray(good)
    for pos, value in cuts:
        raw[pos % len(raw)] = value
    if truncate is not None:
        raw = raw[: truncate % len(raw)]
    path.write_bytes(bytes(raw))
    try:
        load_mimic3(tables, visit_order="hadm")
    except DataError as exc:
        assert str(exc).startswith(str(path)), exc
    finally:
        path.write_bytes(good)


def test_zlib_error_is_not_an_oserror() -> None:
    """Why csvtable lists zlib.error: it is no OSError, unlike gzip.BadGzipFile."""
    assert not issubclass(zlib.error, OSError) and issubclass(gzip.BadGzipFile, OSError)


@pytest.mark.parametrize(
    "name, column, message",
    [
        ("DIAGNOSES_ICD", "ICD9_CODE", "malformed ICD-9 code 'x"),
        ("PROCEDURES_ICD", "SUBJECT_ID", "'x"),
        ("ADMISSIONS", "ADMITTIME", "cannot read the date 'x"),
    ],
)
def test_huge_cells_are_quoted_as_excerpts(tables: Path, name: str, column: str,
                                           message: str) -> None:
    """A 5 MB cell in the error message would be 5 MB of message: an excerpt is quoted."""
    lines = _text(tables, name).split(b"\r\n" if b"\r\n" in _text(tables, name) else b"\n")
    header = [h.strip('"').upper() for h in lines[0].decode().split(",")]
    row = lines[1].decode().split(",")
    row[header.index(column)] = "x-" * 2_500_000  # no digit-only or date-like prefix
    lines[1] = ",".join(row).encode()
    (tables / f"{name}.csv.gz").write_bytes(gzip.compress(b"\n".join(lines)))
    with pytest.raises(DataError, match=message) as info:
        load_mimic3(tables)
    assert len(str(info.value)) < len(str(tables)) + 400
