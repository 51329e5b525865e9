"""KGAT text and DiffKG pickle loaders: hand-made files, every bad input, synthetic round trip."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.kgrec import load_diffkg, load_kgat, write_kgat_synthetic
from diffkg_fast.data.kgrec_synthetic import _format_ints
from diffkg_fast.data.textscan import read_triplets


def kgat(root: Path, train: str | bytes = "0 1 2\n1 2 3\n", test: str | bytes = "0 3\n1 0\n",
         kg: str | bytes = "0 0 4\n1 1 5\n", valid: str | bytes | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = {"train.txt": train, "test.txt": test, "kg_final.txt": kg, "valid.txt": valid}
    for name, text in files.items():
        if text is not None:
            (root / name).write_bytes(text.encode() if isinstance(text, str) else text)
    return root


def pairs(m: sp.csr_matrix) -> set[tuple[int, int]]:
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist(), strict=True))


def test_small_kgat(tmp_path: Path) -> None:
    ds = load_kgat(kgat(tmp_path / "lastfm-mini"))
    ds.validate()
    assert ds.name == "lastfm-mini" and ds.split == "given"
    assert (ds.n_users, ds.n_items, ds.n_entities) == (2, 4, 6)
    assert pairs(ds.train) == {(0, 1), (0, 2), (1, 2), (1, 3)}
    assert pairs(ds.test) == {(0, 3), (1, 0)}
    assert ds.valid.nnz == 0 and ds.valid.shape == (2, 4)
    assert ds.kg.tolist() == [[0, 0, 4], [1, 1, 5]] and ds.kg.dtype == np.int64
    assert ds.relation_names == ["r0", "r1"]
    assert ds.entity_type.tolist() == [0, 0, 0, 0, 1, 1]
    assert ds.entity_type_names == ["item", "entity"]
    assert ds.entity_codes == [] and ds.entity_names == []
    assert ds.meta["duplicate_interactions"] == {"train": 0, "test": 0}
    assert ds.meta["duplicate_triplets"] == 0


def test_formatting_variants(tmp_path: Path) -> None:
    """CRLF, tabs, runs of blanks, blank lines, a user without items, no final newline."""
    root = kgat(tmp_path, train="\r\n0\t1  2 \r\n\n  1 2 3\r\n7\n", test="0 3\n1 0",
                kg="5 2 1\n\n0 0 4 \r\n", valid="3 1\n")
    ds = load_kgat(root)
    assert ds.n_users == 8 and ds.n_items == 4 and ds.n_entities == 6
    assert pairs(ds.train) == {(0, 1), (0, 2), (1, 2), (1, 3)}
    assert pairs(ds.valid) == {(3, 1)}
    assert ds.kg.tolist() == [[0, 0, 4], [5, 2, 1]]
    assert ds.relation_names == ["r0", "r1", "r2"]


def test_duplicates_are_counted(tmp_path: Path) -> None:
    root = kgat(tmp_path, train="0 1 1 2\n0 2\n1 3\n", kg="0 0 4\n0 0 4\n1 0 2\n0 0 4\n")
    ds = load_kgat(root)
    assert pairs(ds.train) == {(0, 1), (0, 2), (1, 3)}
    assert ds.meta["duplicate_interactions"]["train"] == 2
    assert ds.meta["duplicate_triplets"] == 2
    assert ds.kg.tolist() == [[0, 0, 4], [1, 0, 2]]


def test_kg_entities_beyond_items_and_items_beyond_kg(tmp_path: Path) -> None:
    ds = load_kgat(kgat(tmp_path, kg="0 0 1\n"))
    assert ds.n_entities == ds.n_items == 4  # the KG names fewer entities than there are items
    ds = load_kgat(kgat(tmp_path / "b", kg="0 3 99\n"))
    assert ds.n_entities == 100 and ds.entity_type.sum() == 96 and ds.n_relations == 4


def test_dataset_save_load_round_trip(tmp_path: Path) -> None:
    ds = load_kgat(kgat(tmp_path / "d"))
    ds.save(tmp_path / "d.npz")
    back = KGDataset.load(tmp_path / "d.npz")
    assert pairs(back.train) == pairs(ds.train) and np.array_equal(back.kg, ds.kg)
    assert back.meta == ds.meta


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "files, fname, line, message",
    [
        ({"train": "0 1\n1 -3\n"}, "train.txt", 2, "negative id '-3'"),
        ({"test": "0 3\n1 1.5\n"}, "test.txt", 2, "bad token '1.5'"),
        ({"kg": "0 0 4\n1 x 5\n"}, "kg_final.txt", 2, "bad token 'x'"),
        ({"train": "0 1\n\n\n2 3a 4\n"}, "train.txt", 4, "bad token '3a'"),
        ({"train": "0 1\r2\n"}, "train.txt", 1, "carriage return not followed by a newline"),
        ({"train": "0 1\n1\x0c2\n"}, "train.txt", 2, "bad token"),
        ({"train": "0 1\n1 2\xc3\xa9\n"}, "train.txt", 2, "bad token"),
        ({"train": "0 1\n1 200000000\n"}, "train.txt", 2, "larger than max_id=100000000"),
        ({"kg": "0 0 4\n1 1\n"}, "kg_final.txt", 2, "expected 3 fields 'head relation tail', "
         "got 2: '1 1'"),
        ({"kg": "0 0 4 4\n"}, "kg_final.txt", 1, "got 4: '0 0 4 4'"),
        ({"test": "0 3\n1 2 0\n"}, "test.txt", 2, "user 1 item 2 is also in train.txt"),
        ({"valid": "1 0\n0 1\n"}, "valid.txt", 2, "user 0 item 1 is also in train.txt"),
        ({"valid": "1 1\n", "test": "0 3\n1 1\n"}, "test.txt", 2,
         "user 1 item 1 is also in valid.txt"),
    ],
)
def test_bad_kgat(tmp_path: Path, files: dict[str, str], fname: str, line: int,
                  message: str) -> None:
    root = kgat(tmp_path, **files)
    with pytest.raises(DataError) as info:
        load_kgat(root)
    err = info.value
    assert err.path == str(root / fname) and err.line == line
    assert message in str(err)
    assert f"{fname}, line {line}: " in str(err)


@pytest.mark.parametrize("which", ["train", "test", "kg"])
@pytest.mark.parametrize("content", ["", "\n \r\n\t\n"])
def test_empty_files(tmp_path: Path, which: str, content: str) -> None:
    root = kgat(tmp_path, **{which: content})
    with pytest.raises(DataError, match="empty file") as info:
        load_kgat(root)
    assert Path(info.value.path).name == {"kg": "kg_final.txt"}.get(which, f"{which}.txt")


def test_train_without_interactions_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train\.txt: no interaction"):
        load_kgat(kgat(tmp_path / "a", train="0\n1\n"))
    root = kgat(tmp_path / "b")
    (root / "kg_final.txt").unlink()
    with pytest.raises(DataError, match=r"kg_final\.txt: missing file"):
        load_kgat(root)
    with pytest.raises(DataError, match="not a directory"):
        load_kgat(tmp_path / "nothing")


def test_max_id(tmp_path: Path) -> None:
    root = kgat(tmp_path, kg="0 0 4\n1 1 5\n")
    with pytest.raises(DataError, match=r"kg_final\.txt, line 1: id '4' is larger than max_id=3"):
        load_kgat(root, max_id=3)
    assert load_kgat(root, max_id=5).n_entities == 6
    with pytest.raises(DataError, match="max_id"):
        load_kgat(root, max_id=2**31)
    huge = kgat(tmp_path / "h", train="0 " + "9" * 40 + "\n")
    with pytest.raises(DataError, match=r"train\.txt, line 1: id '9{39}"):
        load_kgat(huge)


def test_long_bad_token_is_cut(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_kgat(kgat(tmp_path, train="0 1" + "x" * 5000 + "\n"))
    assert len(str(info.value)) < 400


def test_read_triplets_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "kg.txt"
    p.write_text("\n1 2 3\n\n4 5 6\n\n")
    assert read_triplets(p, 100).tolist() == [[1, 2, 3], [4, 5, 6]]


# ---------------------------------------------------------------------- DiffKG pickles
def diffkg(root: Path, train: object = None, test: object = None, kg: str = "0 0 4\n1 1 5\n",
           valid: object = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if train is None:
        train = sp.coo_matrix((np.array([1.0, 2.0, 1.0, 0.0]),
                               (np.array([0, 0, 1, 1]), np.array([1, 2, 3, 0]))), shape=(3, 4))
    if test is None:
        test = sp.coo_matrix((np.ones(2), (np.array([0, 2]), np.array([0, 1]))), shape=(3, 4))
    for name, m in (("trnMat.pkl", train), ("tstMat.pkl", test), ("valMat.pkl", valid)):
        if m is not None:
            (root / name).write_bytes(m if isinstance(m, bytes) else pickle.dumps(m))
    (root / "kg.txt").write_text(kg)
    return root


def test_small_diffkg(tmp_path: Path) -> None:
    ds = load_diffkg(diffkg(tmp_path / "mind"))
    ds.validate()
    assert ds.name == "mind" and (ds.n_users, ds.n_items, ds.n_entities) == (3, 4, 6)
    assert pairs(ds.train) == {(0, 1), (0, 2), (1, 3)}  # the explicit 0 is no interaction
    assert pairs(ds.test) == {(0, 0), (2, 1)}
    assert ds.meta["non_binary_values"] == {"train": 1, "test": 0}
    assert ds.meta["source"] == "diffkg"


def test_diffkg_csr_dense_and_valid(tmp_path: Path) -> None:
    train = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 5], [0, 0, 0, 0]], np.float32))
    valid = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    ds = load_diffkg(diffkg(tmp_path, train=train, valid=valid))
    assert pairs(ds.train) == {(0, 1), (1, 3)} and pairs(ds.valid) == {(2, 0)}


def test_diffkg_errors(tmp_path: Path) -> None:
    root = diffkg(tmp_path / "a", test=sp.coo_matrix((3, 5)))
    with pytest.raises(DataError) as info:
        load_diffkg(root)
    msg = str(info.value)
    assert "tstMat.pkl" in msg and "trnMat.pkl" in msg and "(3, 5)" in msg
    root = diffkg(tmp_path / "b", test=sp.coo_matrix(([1.0], ([1], [3])), shape=(3, 4)))
    with pytest.raises(DataError, match=r"tstMat\.pkl, field 'user 1': user 1 item 3 is also in "
                                        r"trnMat\.pkl"):
        load_diffkg(root)
    with pytest.raises(DataError, match=r"trnMat\.pkl: non-finite"):
        load_diffkg(diffkg(tmp_path / "c", train=sp.coo_matrix(np.array([[np.nan, 1.0]]))))
    with pytest.raises(DataError, match=r"trnMat\.pkl: expected a scipy sparse"):
        load_diffkg(diffkg(tmp_path / "d", train=[[0, 1]]))
    with pytest.raises(DataError, match=r"trnMat\.pkl: no interaction"):
        load_diffkg(diffkg(tmp_path / "e", train=sp.coo_matrix((3, 4))))
    with pytest.raises(DataError, match=r"kg\.txt, line 2: expected 3 fields"):
        load_diffkg(diffkg(tmp_path / "f", kg="0 0 1\n1 1\n"))
    root = diffkg(tmp_path / "g")
    (root / "tstMat.pkl").unlink()
    with pytest.raises(DataError, match=r"tstMat\.pkl: missing file"):
        load_diffkg(root)
    with pytest.raises(DataError, match=r"trnMat\.pkl: shape \(3, 200000001\) exceeds max_id"):
        load_diffkg(diffkg(tmp_path / "h", train=sp.coo_matrix((3, 200_000_001))))


def test_diffkg_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    root = diffkg(tmp_path / "a", train=pickle.dumps(Evil()))
    with pytest.raises(DataError, match=r"trnMat\.pkl: refusing to unpickle global"):
        load_diffkg(root)
    assert not marker.exists()


# ---------------------------------------------------------------------- synthetic round trip
def _parse(path: Path) -> list[list[int]]:
    return [[int(t) for t in line.split()] for line in path.read_text().splitlines()
            if line.strip()]


def test_synthetic_round_trip(tmp_path: Path) -> None:
    write_kgat_synthetic(tmp_path / "syn", n_users=50, n_items=80, n_entities=120, n_relations=4,
                         n_interactions=700, n_triplets=300, seed=3)
    ds = load_kgat(tmp_path / "syn", valid_fraction=0)
    assert (ds.n_users, ds.n_items, ds.n_entities, ds.n_relations, ds.n_triplets) == (
        50, 80, 120, 4, 300)
    assert ds.train.nnz + ds.test.nnz == 700
    assert np.all(np.diff(ds.train.indptr) >= 1)  # every user trains
    ratio = ds.test.nnz / 700
    assert 0.12 < ratio < 0.25
    # Same content as a plain Python parse of the written text.
    want = {(ln[0], i) for ln in _parse(tmp_path / "syn" / "train.txt") for i in ln[1:]}
    assert pairs(ds.train) == want
    assert sorted(map(tuple, _parse(tmp_path / "syn" / "kg_final.txt"))) == list(
        map(tuple, ds.kg.tolist()))
    # Deterministic for a seed.
    write_kgat_synthetic(tmp_path / "again", 50, 80, 120, 4, 700, 300, seed=3)
    for name in ("train.txt", "test.txt", "kg_final.txt"):
        assert (tmp_path / "syn" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_format_ints() -> None:
    values = np.array([0, 9, 10, 99, 100, 123456789012, 7])
    seps = np.array([32, 10, 32, 32, 10, 9, 10], np.uint8)
    assert _format_ints(values, seps) == b"0 9\n10 99 100\n123456789012\t7\n"
    assert _format_ints(np.zeros(0, np.int64), np.zeros(0, np.uint8)) == b""
