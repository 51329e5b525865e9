"""KGDataset invariants and its one-file save / load (atomic, corruption detected)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

from diffkg_fast.data.dataset import KGDataset, to_csr
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.medkg import build_medication_dataset

from helpers import random_records


@pytest.fixture(scope="module")
def ds() -> KGDataset:
    return build_medication_dataset(random_records(50, seed=0), split="visit", cooc_min_count=2)


def assert_same(a: KGDataset, b: KGDataset) -> None:
    for f in dataclasses.fields(KGDataset):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if sp.issparse(x):
            assert x.shape == y.shape and (x != y).nnz == 0, f.name
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), f.name
        elif dataclasses.is_dataclass(x):
            for g in dataclasses.fields(x):
                assert np.array_equal(getattr(x, g.name), getattr(y, g.name)), g.name
        else:
            assert x == y, f.name


def test_save_load_round_trip(ds, tmp_path):
    ds.save(tmp_path / "d.npz")
    assert_same(ds, KGDataset.load(tmp_path / "d.npz"))
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]  # no temp file left


def test_truncated_file(ds, tmp_path):
    ds.save(tmp_path / "d.npz")
    data = (tmp_path / "d.npz").read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        (tmp_path / "t.npz").write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"t\.npz"):
            KGDataset.load(tmp_path / "t.npz")


def test_corrupt_file(tmp_path):
    # An uncompressible payload so that flipped bytes land in array data, not only in deflate.
    rng = np.random.default_rng(0)
    big = build_medication_dataset(random_records(400, seed=1), cooc_min_count=2)
    big.save(tmp_path / "d.npz")
    data = bytearray((tmp_path / "d.npz").read_bytes())
    raised = 0
    for pos in rng.integers(0, len(data), 40):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        (tmp_path / "c.npz").write_bytes(bytes(bad))
        try:
            loaded = KGDataset.load(tmp_path / "c.npz")
        except DataError as exc:
            assert "c.npz" in str(exc)
            raised += 1
        else:
            # A flip in a byte the zip container ignores (a timestamp, say) is harmless: the
            # dataset must then be exactly the one saved, never a silently different one.
            assert_same(big, loaded)
    assert raised >= 30


def test_foreign_and_missing_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(DataError, match=r"other\.npz.*header"):
        KGDataset.load(tmp_path / "other.npz")
    with pytest.raises(DataError, match="no such dataset file"):
        KGDataset.load(tmp_path / "absent.npz")


def test_failed_save_keeps_old_file(ds, tmp_path, monkeypatch):
    ds.save(tmp_path / "d.npz")
    before = (tmp_path / "d.npz").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError, match="disk full"):
        ds.save(tmp_path / "d.npz")
    assert (tmp_path / "d.npz").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]


def broken(ds: KGDataset, **changes) -> KGDataset:
    return dataclasses.replace(ds, **changes)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: {"kg": d.kg[::-1].copy()}, "kg"),
        (lambda d: {"kg": np.concatenate([d.kg, d.kg[:1]])[np.lexsort(
            np.concatenate([d.kg, d.kg[:1]]).T[::-1])]}, "kg"),
        (lambda d: {"kg": np.concatenate([d.kg, [[0, 0, d.n_entities]]])}, "kg"),
        (lambda d: {"kg": np.concatenate([d.kg, [[d.n_entities - 1, 99, 0]]])}, "kg"),
        (lambda d: {"test": d.train.copy()}, "test"),
        (lambda d: {"valid": to_csr([0], [0], (3, 3))}, "valid"),
        (lambda d: {"entity_type": d.entity_type[:-1]}, "entity_type"),
        (lambda d: {"entity_names": d.entity_names[:-1]}, "entity_names"),
        (lambda d: {"n_entities": d.n_items - 1}, "n_entities"),
    ],
)
def test_invariants_are_checked(ds, change, field):
    with pytest.raises(DataError, match=field):
        broken(ds, **change(ds)).validate()


def test_unsorted_csr_is_rejected(ds):
    m = ds.train.copy()
    row = int(np.flatnonzero(np.diff(m.indptr) >= 2)[0])
    a, b = m.indptr[row], m.indptr[row + 1]
    m.indices[a:b] = m.indices[a:b][::-1].copy()
    m.has_sorted_indices = False
    with pytest.raises(DataError, match=r"train.*sorted"):
        broken(ds, train=m).validate()


def test_to_csr_canonical():
    m = to_csr(np.array([2, 0, 2, 2]), np.array([1, 3, 0, 1]), (3, 4))
    assert m.has_canonical_format and m.nnz == 3
    assert m.toarray().tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]]
