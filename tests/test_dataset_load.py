"""KGDataset.load on files built to hurt: zip bombs, lying array headers, and files whose
checksum is right but whose arrays or header fields have the wrong types."""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from diffkg_fast.cli import main
from diffkg_fast.data.dataset import _HEADER, ARRAYS, LOAD_FLOOR, KGDataset, _digest
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.medkg import build_medication_dataset

from helpers import random_records


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ds") / "d.npz"
    build_medication_dataset(random_records(40, seed=2), split="visit", cooc_min_count=2).save(path)
    return path


def rewrite(src: Path, dst: Path, arrays: dict | None = None, header: dict | None = None) -> Path:
    """``src`` with arrays and header fields replaced, and a checksum that matches them."""
    with np.load(src) as z:
        data = {k: z[k] for k in z.files}
    head = json.loads(data.pop("header").tobytes())
    data.update(arrays or {})
    head["sha256"] = _digest(data)
    head.update(header or {})
    data["header"] = np.frombuffer(json.dumps(head).encode(), dtype=np.uint8)
    np.savez_compressed(dst, **data)
    return dst


def _npy_header(dtype: str, shape: tuple) -> bytes:
    head = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    head += b" " * (63 - (len(head) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------- sizes
def test_zip_bomb_is_refused_before_decompressing(saved: Path, tmp_path: Path) -> None:
    """100 MB of zeros in a 100 KB file: refused from the sizes the zip declares."""
    bomb = tmp_path / "bomb.npz"
    with np.load(saved) as z, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for k in z.files:
            if k != "train_indices":
                out.writestr(f"{k}.npy", z.zip.read(f"{k}.npy"))
        n = 100 << 20
        with out.open("train_indices.npy", "w", force_zip64=True) as f:
            f.write(_npy_header("<i8", (n // 8,)))
            zeros = bytes(1 << 20)
            for _ in range(n >> 20):
                f.write(zeros)
    assert bomb.stat().st_size < 1 << 20

    def load() -> None:
        with pytest.raises(DataError, match=r"bomb\.npz: the arrays would take 10[0-9,]+ bytes "
                                            r"decompressed, more than the limit of 67,108,864"):
            KGDataset.load(bomb)

    assert _peak(load) < 5_000_000
    with pytest.raises(DataError, match="checksum mismatch"):  # read when the limit allows
        KGDataset.load(bomb, max_bytes=200 << 20)


@pytest.mark.parametrize("key", sorted(k for k in ARRAYS if k != "header"))
def test_an_array_header_larger_than_its_data_is_refused(saved: Path, tmp_path: Path,
                                                         key: str) -> None:
    dtype = ARRAYS[key][0]
    shape = (10**9, 3) if key == "kg" else (10**9,)
    bad = tmp_path / "lie.npz"
    with np.load(saved) as z, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as out:
        for k in z.files:
            if k != key:
                out.writestr(f"{k}.npy", z.zip.read(f"{k}.npy"))
        out.writestr(f"{key}.npy", _npy_header(dtype.str, shape) + bytes(64))

    def load() -> None:
        with pytest.raises(DataError, match=rf"lie\.npz, field '{key}': array of shape "
                                            r"\(1000000000, ?\d*\) does not fill"):
            KGDataset.load(bad)

    assert _peak(load) < 5_000_000


# ---------------------------------------------------------------------- types
def _wrong(key: str, a: np.ndarray) -> list[np.ndarray]:
    """Arrays of the wrong kind, size, order or rank for ``key`` (same values where possible)."""
    out = [a.astype(np.float64), a.astype(np.int32 if a.dtype.itemsize == 8 else np.int64)]
    out.append(a.reshape(-1, 1) if a.ndim == 1 else a[:, :2])
    if a.ndim == 2:
        out.append(np.asfortranarray(a))  # same values, Fortran order
    return out


@pytest.mark.parametrize("key", sorted(k for k in ARRAYS if k != "header"))
def test_every_array_is_type_checked(saved: Path, tmp_path: Path, key: str) -> None:
    with np.load(saved) as z:
        a = z[key]
    for i, wrong in enumerate(_wrong(key, a)):
        bad = rewrite(saved, tmp_path / f"{i}.npz", arrays={key: wrong})
        with pytest.raises(DataError, match=rf"{i}\.npz, field '{key}': .*expected a "
                                            rf"{ARRAYS[key][1]}-D {ARRAYS[key][0]} array"):
            KGDataset.load(bad)


BAD_HEADER = {"name": 3, "split": "random", "sha256": None, "n_users": "40", "n_items": -1,
              "n_entities": 2**40, "has_visits": 1, "seed": 1.5, "meta": [],
              "relation_names": "abc", "entity_type_names": [0], "entity_codes": [1, 2],
              "entity_names": None}


def test_bad_header_covers_every_field() -> None:
    assert BAD_HEADER.keys() == _HEADER.keys()


@pytest.mark.parametrize("field", sorted(BAD_HEADER))
def test_every_header_field_is_type_checked(saved: Path, tmp_path: Path, field: str,
                                            capsys) -> None:
    bad = rewrite(saved, tmp_path / "h.npz", header={field: BAD_HEADER[field]})
    with pytest.raises(DataError, match=rf"h\.npz, field '{field}': expected"):
        KGDataset.load(bad)
    assert main(["data", "stats", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_item_ids_beyond_the_items_are_refused(saved: Path, tmp_path: Path) -> None:
    with np.load(saved) as z:
        indices = z["test_indices"].copy()
    indices[-1] = 10**6
    bad = rewrite(saved, tmp_path / "i.npz", arrays={"test_indices": indices})
    with pytest.raises(DataError, match=r"i\.npz, field 'test_indptr/test_indices'"):
        KGDataset.load(bad)


def test_float_visits_fail_in_stats_not_after_an_epoch(saved: Path, tmp_path: Path,
                                                       capsys) -> None:
    with np.load(saved) as z:
        diag = z["visits_diag"].astype(np.float64)
    bad = rewrite(saved, tmp_path / "f.npz", arrays={"visits_diag": diag})
    assert main(["data", "stats", str(bad)]) == 2
    assert "field 'visits_diag': float64 array" in capsys.readouterr().err


def test_the_limit_floor_admits_ordinary_files(saved: Path) -> None:
    assert saved.stat().st_size * 64 < LOAD_FLOOR
    assert KGDataset.load(saved).n_users == 40
