"""SafeDrug's output folder as its preprocessing writes it (every file by dill), and records
pickles built to cost far more than their size."""

from __future__ import annotations

import itertools
import pickle
import re
import time
import tracemalloc
from pathlib import Path

import dill
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pickles import OLD_MODULES, fake_main, old_dill_dumps  # noqa: F401  (fixture)

from diffkg_fast.cli import main
from diffkg_fast.data.codes import atc_names, icd9_titles
from diffkg_fast.data.errors import DataError, excerpt
from diffkg_fast.data.safedrug import (
    DDI_FILE,
    EHR_FILE,
    MASK_FILE,
    RECORDS_FILE,
    VOC_FILE,
    Voc,
    load_safedrug,
)

from helpers import VOC_SOURCE

# SafeDrug's cohort (docs/data.md, "The synthetic cohort"): patients by number of visits,
# 1 … 5, then a tail of 170 patients to 29 visits, 15,032 visits in all; 112 ATC-3 medications.
VISITS = [1] * 908 + [2] * 3792 + [3] * 949 + [4] * 373 + [5] * 158 + [6] * 153 + [29] * 17
N_MED, N_DIAG, N_PROC = 112, 1958, 1430


def _codes(rng: np.random.Generator, n_visits: int, n_voc: int, mean: float) -> list[list[int]]:
    """Distinct codes per visit, about ``mean`` of them, heavy-tailed code frequencies."""
    counts = np.clip(rng.poisson(mean, n_visits), 1, n_voc)
    weights = 1.0 / np.arange(1, n_voc + 1)
    weights /= weights.sum()
    return [rng.choice(n_voc, size=int(c), replace=False, p=weights).tolist() for c in counts]


def _vocabularies(main) -> dict[str, object]:
    """SafeDrug's Voc objects, class by value from the script's ``__main__``."""
    exec(VOC_SOURCE, main.__dict__)
    words = {"diag_voc": sorted(icd9_titles("diag"))[:N_DIAG],
             "pro_voc": sorted(icd9_titles("proc"))[:N_PROC],
             "med_voc": sorted(c for c in atc_names() if len(c) == 4)[:N_MED]}
    vocs = {}
    for key, ws in words.items():
        vocs[key] = main.Voc()
        vocs[key].add_sentence(ws)
    return vocs


def write_safedrug_standin(root: Path, main, mean_codes: tuple[float, float, float]) -> None:
    """SafeDrug's data/output/ at the cohort's size: records, vocabularies and the three
    matrices (DDI, co-prescription, substructure mask), all written by dill, the matrices in
    dill's old numpy form (dill < 0.3.5, the released files)."""
    rng = np.random.default_rng(0)
    n_visits = len(VISITS) and sum(VISITS)
    kinds = [_codes(rng, n_visits, n, m) for n, m in zip((N_DIAG, N_PROC, N_MED), mean_codes,
                                                        strict=True)]
    visits = [list(v) for v in zip(*kinds, strict=True)]
    starts = np.concatenate([[0], np.cumsum(VISITS)])
    records = [visits[a:b] for a, b in itertools.pairwise(starts)]
    root.mkdir(parents=True)
    (root / RECORDS_FILE).write_bytes(dill.dumps(records))
    (root / VOC_FILE).write_bytes(dill.dumps(_vocabularies(main)))
    ddi = np.triu(rng.random((N_MED, N_MED)) < 0.05, 1).astype(np.float64)
    (root / DDI_FILE).write_bytes(old_dill_dumps(ddi + ddi.T, 3, OLD_MODULES[0]))
    ehr = np.triu(rng.random((N_MED, N_MED)) < 0.3, 1).astype(np.float64)
    (root / EHR_FILE).write_bytes(old_dill_dumps(ehr + ehr.T, 3, OLD_MODULES[0]))
    mask = (rng.random((N_MED, 491)) < 0.02).astype(np.float64)
    (root / MASK_FILE).write_bytes(old_dill_dumps(mask, 3, OLD_MODULES[0]))


def test_build_on_safedrugs_output_folder(tmp_path: Path, fake_main, capsys) -> None:  # noqa: F811
    """The real files are not available here: a stand-in of their layout, writer and size."""
    root = tmp_path / "output"
    # Fewer codes per visit than the cohort's 13.6 / 4.5 / 19.6: the counts checked are of
    # patients, visits and medications, and the build stays a few seconds.
    write_safedrug_standin(root, fake_main, (4.0, 2.0, 6.0))
    assert b"_get_attr" in (root / DDI_FILE).read_bytes()
    out = tmp_path / "safedrug.npz"
    assert main(["data", "build", "--source", "safedrug", "--path", str(root),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in (r"patients +6,350", r"medications +112", r"visits +15,032",
                 r"files_used +records_final\.pkl, voc_final\.pkl, ddi_A_final\.pkl",
                 r"files_checked_not_used +ehr_adj_final\.pkl, ddi_mask_H\.pkl"):
        assert re.search(line, printed), printed


# ---------------------------------------------------------------------- the matrices
def _folder(root: Path, **matrices: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / RECORDS_FILE).write_bytes(pickle.dumps([[[[0], [0], [0, 1]]]]))
    vocs = {"diag_voc": Voc(["4019"]), "pro_voc": Voc(["3615"]), "med_voc": Voc(["N02B", "A01A"])}
    (root / VOC_FILE).write_bytes(pickle.dumps(vocs))
    for name, m in matrices.items():
        (root / name).write_bytes(old_dill_dumps(m, 3, OLD_MODULES[1]))
    return root


@pytest.mark.parametrize(
    "name, matrix, message",
    [
        (MASK_FILE, np.zeros((3, 5)), r"shape \(3, 5\), expected \(2, k >= 1\): one row per "
                                      r"medication"),
        (MASK_FILE, np.zeros((2, 0)), r"shape \(2, 0\), expected \(2, k >= 1\)"),
        (MASK_FILE, np.full((2, 4), 0.5), r"entry \(0, 0\) = 0.5: expected a binary"),
        (MASK_FILE, np.zeros(4), "expected a numeric 2-D numpy array"),
        (EHR_FILE, np.zeros((2, 3)), r"shape \(2, 3\), expected \(2, 2\)"),
        (DDI_FILE, np.zeros((3, 3)), r"shape \(3, 3\), expected \(2, 2\)"),
    ],
)
def test_matrix_shapes_are_checked_against_the_vocabulary(tmp_path: Path, name: str,
                                                          matrix: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=rf"{name}: {message}"):
        load_safedrug(_folder(tmp_path, **{name: matrix}))


def test_unused_matrices_are_read_and_reported(tmp_path: Path) -> None:
    stats: dict = {}
    load_safedrug(_folder(tmp_path, **{MASK_FILE: np.eye(2, 3), EHR_FILE: np.ones((2, 2))}),
                  stats=stats)
    assert stats["files_checked_not_used"] == f"{EHR_FILE}, {MASK_FILE}"
    assert stats["files_used"] == f"{RECORDS_FILE}, {VOC_FILE}"


# ---------------------------------------------------------------------- records that expand
def test_shared_visit_lists_are_refused_at_once(tmp_path: Path) -> None:
    """12 KB: one visit list referenced 3,000 × 3,000 times (9 million visits if expanded)."""
    visit = [[0], [0], [1]]
    patient = [visit] * 3000
    data = pickle.dumps([patient] * 3000)
    assert len(data) < 13_000
    root = _folder(tmp_path)
    (root / RECORDS_FILE).write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"records\[0\]\[1\] is the same list object as "
                                        r"records\[0\]\[0\]"):
        load_safedrug(root)
    assert time.perf_counter() - t0 < 2


@st.composite
def aliased_records(draw: st.DrawFn) -> list:
    """Small valid records, then one list (patient, visit or code list) made a second reference
    to another list of the same level."""
    n = draw(st.integers(2, 4))
    recs = [[[[0], [0], [draw(st.integers(0, 1))]] for _ in range(draw(st.integers(1, 3)))]
            for _ in range(n)]
    level = draw(st.sampled_from(["patient", "visit", "codes", "codes-in-visit"]))
    p = draw(st.integers(1, n - 1))
    if level == "patient":
        recs[p] = recs[0]
    elif level == "visit":
        recs[p][0] = recs[0][0]
    elif level == "codes":
        recs[p][0][2] = recs[0][0][2]
    else:
        recs[p][0][1] = recs[p][0][0]
    return recs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(records=aliased_records())
def test_every_shared_list_is_refused(tmp_path: Path, records: list) -> None:
    root = _folder(tmp_path)
    (root / RECORDS_FILE).write_bytes(pickle.dumps(records))
    with pytest.raises(DataError, match="is the same list object as"):
        load_safedrug(root)


def _records_with_deep_code(depth: int) -> bytes:
    """``[[[[0], [0], [X]]]]`` with X a list nested ``depth`` deep, as opcodes (pickle itself
    recurses too deep to write it): ``]`` pushes a list, ``a`` appends the top to the one below.
    """
    deep = b"]" * depth + b"a" * (depth - 1)
    return b"\x80\x04]]]" + b"]K\x00aa" * 2 + b"]" + deep + b"a" + b"aaa."


def test_bad_codes_are_quoted_in_bounded_time_and_memory(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    # A code that is a list of 200³ = 8 million leaves (shared references: a 3 KB file), and
    # one nested 100,000 deep: their repr takes 24 MB, and RecursionError.
    leaves = [[[0] * 200] * 200] * 200
    for bad, size in ((leaves, 4000), (None, 0)):
        if bad is None:
            records = _records_with_deep_code(100_000)
        else:
            records = pickle.dumps([[[[0], [0], [bad]]]])
            assert len(records) < size
        (root / RECORDS_FILE).write_bytes(records)
        tracemalloc.start()
        try:
            with pytest.raises(DataError, match=r"expected a list of medication indices \(ints\)"
                                                r", found list \[\[") as info:
                load_safedrug(root)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(str(info.value)) < len(str(root)) + 200
        assert peak < 20_000_000 if bad is None else peak < 5_000_000, peak


# ---------------------------------------------------------------------- excerpt
VALUES = st.recursive(
    st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=50), st.binary(max_size=50),
              st.none(), st.floats(allow_nan=False), st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(value=VALUES, limit=st.integers(5, 120))
def test_excerpt_is_the_repr_cut(value: object, limit: int) -> None:
    full = repr(value)
    got = excerpt(value, limit)
    assert len(got) <= limit
    assert got == full if len(full) <= limit else full.startswith(got[:-1]) and got[-1] == "…"
