"""A validation split for sources that have none (DiffKG's published folders, KGAT without
valid.txt): carved out of train per user, seeded, recorded, and shown by data build / stats."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffkg_fast.cli import main
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.export import export_dataset
from diffkg_fast.data.kgrec import load_diffkg, load_kgat

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def pairs(m: sp.csr_matrix) -> set[tuple[int, int]]:
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist(), strict=True))


def write_kgat(root: Path, train: dict[int, list[int]], test: dict[int, list[int]],
               valid: dict[int, list[int]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = {"train.txt": train, "test.txt": test, "valid.txt": valid}
    for name, rows in files.items():
        if rows is not None:
            text = "".join(" ".join(map(str, [u, *items])) + "\n" for u, items in rows.items())
            (root / name).write_text(text)
    (root / "kg_final.txt").write_text("0 0 1\n1 1 2\n")
    return root


@st.composite
def user_items(draw: st.DrawFn) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    n_users = draw(st.integers(1, 12))
    train, test = {}, {}
    for u in range(n_users):
        items = draw(st.lists(st.integers(0, 30), min_size=1, max_size=25, unique=True))
        cut = draw(st.integers(1, len(items)))
        train[u] = items[:cut]
        if items[cut:]:
            test[u] = items[cut:]
    if not test:
        test[0] = [31]
    return train, test


@SETTINGS
@given(data=user_items(), fraction=st.sampled_from([0.1, 0.25, 0.5, 0.9]),
       seed=st.integers(0, 3))
def test_carved_split_properties(tmp_path: Path, data: tuple, fraction: float, seed: int) -> None:
    train, test = data
    root = write_kgat(tmp_path / "k", train, test)
    given_ = load_kgat(root, valid_fraction=0)
    assert given_.valid.nnz == 0 and given_.meta["validation"] == {"from": "none"}
    ds = load_kgat(root, valid_fraction=fraction, seed=seed)
    tr, va = pairs(ds.train), pairs(ds.valid)
    assert tr | va == pairs(given_.train) and not tr & va and not va & pairs(ds.test)
    for u, items in train.items():
        n_valid = sum(1 for v_u, _ in va if v_u == u)
        assert n_valid == min(int(np.floor(fraction * len(items) + 0.5)), len(items) - 1)
    assert ds.meta["validation"] == {"from": "train", "fraction": fraction, "seed": seed,
                                     "interactions": len(va),
                                     "users": len({u for u, _ in va})}
    assert ds.seed == seed
    again = load_kgat(root, valid_fraction=fraction, seed=seed)
    assert pairs(again.valid) == va


def test_seeds_draw_different_splits(tmp_path: Path) -> None:
    root = write_kgat(tmp_path, {u: list(range(40)) for u in range(5)}, {0: [41]})
    splits = {frozenset(pairs(load_kgat(root, seed=s).valid)) for s in range(4)}
    assert len(splits) == 4


def _diffkg_published(root: Path) -> Path:
    """DiffKG's published layout: trnMat.pkl and tstMat.pkl only."""
    rng = np.random.default_rng(0)
    dense = rng.random((30, 50)) < 0.3
    test = dense & (rng.random((30, 50)) < 0.2)
    root.mkdir(parents=True)
    (root / "trnMat.pkl").write_bytes(pickle.dumps(sp.coo_matrix((dense & ~test) * 1.0)))
    (root / "tstMat.pkl").write_bytes(pickle.dumps(sp.coo_matrix(test * 1.0)))
    (root / "kg.txt").write_text("".join(f"{i} {i % 3} {50 + i}\n" for i in range(50)))
    return root


def test_diffkg_folder_gets_a_validation_split_in_build_and_stats(tmp_path: Path,
                                                                  capsys) -> None:
    root = _diffkg_published(tmp_path / "lastfm")
    out = tmp_path / "d.npz"
    assert main(["data", "build", "--source", "diffkg", "--path", str(root), "--set",
                 "valid_fraction=0.2", "--set", "seed=4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"validation +carved from train: 20% of each user's training interactions "
                     r"\(seed 4\), \d+ interactions of \d+ users", printed), printed
    assert re.search(r"valid +interactions [1-9]", printed)
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["validation"].startswith("carved from train: 20%")
    assert stats["splits"]["valid"]["interactions"] > 0
    assert main(["data", "build", "--source", "diffkg", "--path", str(root), "--set",
                 "valid_fraction=0", "--out", str(out)]) == 0
    assert re.search(r"validation +none \(the source has none and valid_fraction=0\)",
                     capsys.readouterr().out)


def test_a_given_validation_file_is_kept(tmp_path: Path) -> None:
    root = write_kgat(tmp_path, {0: [1, 2, 3, 4, 5, 6]}, {0: [7]}, valid={0: [8]})
    ds = load_kgat(root)
    assert pairs(ds.valid) == {(0, 8)} and ds.meta["validation"] == {"from": "valid.txt"}
    assert ds.seed is None


@pytest.mark.parametrize("fmt, load", [("kgat", load_kgat), ("diffkg", load_diffkg)])
def test_a_dataset_without_validation_survives_export(tmp_path: Path, fmt: str, load) -> None:
    """The exporters write an empty validation file; the loaders read it as an empty split."""
    ds = load_diffkg(_diffkg_published(tmp_path / "src"), valid_fraction=0)
    export_dataset(ds, fmt, tmp_path / fmt)
    back = load(tmp_path / fmt)  # default options: a present, empty file is no reason to carve
    assert back.valid.nnz == 0
    assert back.meta["validation"]["from"] in ("valid.txt", "valMat.pkl")
    for s in ("train", "test"):
        assert pairs(getattr(back, s)) == pairs(getattr(ds, s))


@pytest.mark.parametrize("value", [-0.1, 1.0, 2])
def test_valid_fraction_is_checked(tmp_path: Path, value: float) -> None:
    root = write_kgat(tmp_path, {0: [1, 2]}, {0: [3]})
    with pytest.raises(DataError, match="field 'valid_fraction': must be in"):
        load_kgat(root, valid_fraction=value)
