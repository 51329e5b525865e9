"""Id spaces sized by the largest id: one stray id in a small file must not allocate gigabytes."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffkg_fast.data.errors import DataError
from diffkg_fast.data.kgrec import ID_SLACK, load_diffkg, load_kgat

BIG = 99_999_999
FILES = {"train": "0 1 2\n1 2 3\n2 4\n", "test": "0 3\n1 0\n", "kg": "0 0 4\n1 1 5\n2 0 6\n"}
NAMES = {"train": "train.txt", "test": "test.txt", "kg": "kg_final.txt", "valid": "valid.txt"}


def kgat(root: Path, **files: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for key, text in {**FILES, **files}.items():
        (root / NAMES[key]).write_text(text)
    return root


@pytest.fixture(scope="module", autouse=True)
def _scanner_compiled(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The text scanner's first call loads numba's compiled code: not what is measured here."""
    load_kgat(kgat(tmp_path_factory.mktemp("warm")))


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "files, fname, line, what",
    [
        ({"train": f"0 1 2\n{BIG} 2 3\n"}, "train.txt", 2, f"user id {BIG:,}"),
        ({"test": f"0 3\n1 {BIG}\n"}, "test.txt", 2, f"item id {BIG:,}"),
        ({"valid": f"1 1\n\n{BIG}\n"}, "valid.txt", 3, f"user id {BIG:,}"),
        ({"kg": f"0 0 4\n1 1 5\n2 {BIG} 6\n"}, "kg_final.txt", 3, f"relation id {BIG:,}"),
        ({"kg": f"0 0 4\n{BIG} 1 5\n"}, "kg_final.txt", 2, f"entity id {BIG:,}"),
        ({"kg": f"0 0 4\n1 1 {BIG}\n"}, "kg_final.txt", 2, f"entity id {BIG:,}"),
    ],
)
def test_one_large_id_is_refused_without_allocating(tmp_path: Path, files: dict, fname: str,
                                                    line: int, what: str) -> None:
    root = kgat(tmp_path, **files)

    def load() -> None:
        with pytest.raises(DataError, match=rf"{what} makes {BIG + 1:,} .*s, but only \d+ "
                                            r"distinct .* occur.* sparse_ids=true") as info:
            load_kgat(root)
        assert Path(info.value.path).name == fname and info.value.line == line

    assert _peak(load) < 5_000_000


def test_diffkg_matrix_shape_is_checked_against_its_content(tmp_path: Path) -> None:
    """A trnMat.pkl declaring 99,999,999 x 99,999,999 around three interactions."""
    m = sp.coo_matrix((np.ones(3), ([0, 1, 2], [0, 1, 2])), shape=(BIG, BIG))
    (tmp_path / "trnMat.pkl").write_bytes(pickle.dumps(m))
    (tmp_path / "tstMat.pkl").write_bytes(pickle.dumps(sp.coo_matrix(([1.0], ([0], [2])),
                                                                     shape=(BIG, BIG))))
    (tmp_path / "kg.txt").write_text("0 0 1\n")

    def load() -> None:
        with pytest.raises(DataError, match=rf"trnMat\.pkl: the matrix shape declares {BIG:,} "
                                            r"users, but only 3 distinct users occur"):
            load_diffkg(tmp_path)

    assert _peak(load) < 5_000_000


def test_sparse_ids_lets_sparse_ids_through_up_to_max_id(tmp_path: Path) -> None:
    gap = 3 * ID_SLACK
    root = kgat(tmp_path, train=f"0 1 2\n{gap} 2 3\n")
    with pytest.raises(DataError, match="sparse_ids=true"):
        load_kgat(root)
    ds = load_kgat(root, sparse_ids=True, valid_fraction=0)
    assert ds.n_users == gap + 1
    with pytest.raises(DataError, match=rf"larger than max_id={gap - 1}"):
        load_kgat(root, sparse_ids=True, max_id=gap - 1)


def test_dense_ids_with_gaps_are_fine(tmp_path: Path) -> None:
    """Up to max(ids used, ID_SLACK) unused ids: subsampled benchmarks keep their ids."""
    ds = load_kgat(kgat(tmp_path, train=f"0 1 2\n{ID_SLACK} 2 3\n"), valid_fraction=0)
    assert ds.n_users == ID_SLACK + 1


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["train", "test", "kg"]), line=st.integers(0, 2),
       field=st.integers(0, 2), big=st.integers(2 * ID_SLACK + 10, BIG))
def test_any_stray_id_is_refused_where_it_is(tmp_path: Path, where: str, line: int, field: int,
                                             big: int) -> None:
    lines = FILES[where].splitlines()
    line = min(line, len(lines) - 1)
    tokens = lines[line].split()
    field = min(field, len(tokens) - 1)
    tokens[field] = str(big)
    lines[line] = " ".join(tokens)
    root = kgat(tmp_path / "d", **{where: "\n".join(lines) + "\n"})
    with pytest.raises(DataError, match=f"id {big:,} makes") as info:
        load_kgat(root)
    assert Path(info.value.path).name == NAMES[where] and info.value.line == line + 1
