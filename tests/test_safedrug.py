"""SafeDrug pickles: round trip, SafeDrug's own dill vocabulary, every malformed input."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import dill
import numpy as np
import pytest

from diffkg_fast.data.errors import DataError
from diffkg_fast.data.records import KINDS, MedicalRecords
from diffkg_fast.data.safedrug import (
    DDI_FILE,
    EHR_FILE,
    RECORDS_FILE,
    VOC_FILE,
    Voc,
    check_records,
    load_safedrug,
    write_safedrug,
)

from helpers import VOC_SOURCE

DIAG = ["4019", "41401", "4280", "42731"]
PROC = ["3615", "3961"]
MED = ["N02B", "A01A", "B01A", "C07A"]
NESTED = [
    [[[0, 1], [0], [0, 1, 2]], [[2], [1], [3]]],
    [[[3, 0], [0, 1], [1, 3]]],
]
DDI = np.array([[0, 2], [1, 3]])


def _records(ddi: np.ndarray | None = DDI) -> MedicalRecords:
    return MedicalRecords.from_nested(NESTED, DIAG, PROC, MED, ddi_pairs=ddi)


def _write_raw(root: Path, records: object = None, vocs: object = None, ddi: object = None,
               ehr: object = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / RECORDS_FILE).write_bytes(pickle.dumps(NESTED if records is None else records))
    default_vocs = {"diag_voc": Voc(DIAG), "pro_voc": Voc(PROC), "med_voc": Voc(MED)}
    (root / VOC_FILE).write_bytes(pickle.dumps(default_vocs if vocs is None else vocs))
    if ddi is not None:
        (root / DDI_FILE).write_bytes(pickle.dumps(ddi))
    if ehr is not None:
        (root / EHR_FILE).write_bytes(pickle.dumps(ehr))
    return root


def _assert_same(a: MedicalRecords, b: MedicalRecords) -> None:
    assert a.to_nested() == b.to_nested()
    for kind in KINDS:
        assert a.voc(kind) == b.voc(kind)
    if a.ddi_pairs is None:
        assert b.ddi_pairs is None
    else:
        assert np.array_equal(np.asarray(a.ddi_pairs), np.asarray(b.ddi_pairs))


# ---------------------------------------------------------------------- round trip
def test_round_trip(tmp_path: Path) -> None:
    rec = _records()
    write_safedrug(rec, tmp_path / "out")
    got = load_safedrug(tmp_path / "out")
    _assert_same(rec, got)
    assert got.source == "safedrug"
    assert got.ddi_pairs.dtype == np.int64
    ehr = pickle.loads((tmp_path / "out" / EHR_FILE).read_bytes())
    assert ehr.shape == (4, 4) and np.array_equal(ehr, ehr.T) and not np.diagonal(ehr).any()
    assert ehr[0, 1] == ehr[1, 3] == 1 and ehr[0, 3] == 0  # co-prescribed in one visit or not
    ddi = pickle.loads((tmp_path / "out" / DDI_FILE).read_bytes())
    assert ddi.dtype == np.float64 and ddi[0, 2] == ddi[2, 0] == 1 and ddi.sum() == 4


def test_round_trip_without_ddi_removes_a_stale_file(tmp_path: Path) -> None:
    write_safedrug(_records(), tmp_path)
    assert (tmp_path / DDI_FILE).exists()
    write_safedrug(_records(ddi=None), tmp_path)
    assert not (tmp_path / DDI_FILE).exists()
    got = load_safedrug(tmp_path)
    assert got.ddi_pairs is None
    _assert_same(_records(ddi=None), got)


def test_safedrug_dill_vocabulary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vocabulary as SafeDrug writes it: dill, class Voc by value from ``__main__``."""
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(dill._dill, "_main_module", main)
    exec(VOC_SOURCE, main.__dict__)
    vocs = {}
    for key, words in (("diag_voc", DIAG), ("med_voc", MED), ("pro_voc", PROC)):
        vocs[key] = main.Voc()
        vocs[key].add_sentence(words)
    _write_raw(tmp_path)
    (tmp_path / VOC_FILE).write_bytes(dill.dumps(vocs))
    assert b"_create_type" in (tmp_path / VOC_FILE).read_bytes()
    ddi = np.zeros((4, 4))
    ddi[0, 2] = ddi[2, 0] = 1
    (tmp_path / DDI_FILE).write_bytes(pickle.dumps(ddi))
    got = load_safedrug(tmp_path)
    _assert_same(_records(ddi=np.array([[0, 2]])), got)


def test_numpy_int_codes_and_duplicates(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    records = [[[[np.int64(0), 1, 0], [0, 0], [np.int32(2), 1, 2, 2]]]]
    _write_raw(tmp_path, records=records)
    got = load_safedrug(tmp_path)
    assert got.to_nested() == [[[[0, 1], [0], [2, 1]]]]  # first occurrences, in order
    assert "'duplicate_med_codes': 2" in caplog.text
    _, counts = check_records(records, tmp_path / RECORDS_FILE, {"diag": 4, "proc": 2, "med": 4})
    assert counts == {"duplicate_diag_codes": 1, "duplicate_proc_codes": 1,
                      "duplicate_med_codes": 2}


def test_optional_matrices_are_checked(tmp_path: Path) -> None:
    ehr = np.ones((4, 4))
    _write_raw(tmp_path, ehr=ehr)
    assert load_safedrug(tmp_path).ddi_pairs is None
    _write_raw(tmp_path, ehr=np.ones((3, 4)))
    with pytest.raises(DataError, match=rf"{EHR_FILE}: shape \(3, 4\), expected \(4, 4\)"):
        load_safedrug(tmp_path)


# ---------------------------------------------------------------------- malformed records
@pytest.mark.parametrize(
    "records, field, message",
    [
        ({"a": 1}, None, "expected a list of patients, got dict"),
        ([], None, "no patients"),
        ([NESTED[0], []], "records[1]", "patient 1 has no visit"),
        ([NESTED[0], 5], "records[1]", "expected a list of visits"),
        ([[[[0], [0]]]], "records[0][0]", "patient 0 visit 0: expected [diag_ids, proc_ids, "
         "med_ids], got a 2-element list"),
        ([[[[0], [0], [0], [0]]]], "records[0][0]", "got a 4-element list"),
        ([[[[0], [0], [0]], "visit"]], "records[0][1]", "got str"),
        ([[[[0], [0.5], [0]]]], "records[0][0][1]", "procedure indices (ints), found float"),
        ([[[[0], [True], [0]]]], "records[0][0][1]", "found bool"),
        ([[[[0], [0], "12"]]], "records[0][0][2]", "found str"),
        ([[[[0], [0], [0]]], [[[0], [0], []]]], "records[1][0][2]",
         "patient 1 visit 0: empty medication list"),
        ([[[[], [0], [0]]]], "records[0][0][0]", "empty diagnosis list"),
        ([[[[0], [0], [4]]]], "records[0][0][2]",
         "medication index 4 outside the vocabulary (med_voc has 4 codes, expected 0 … 3)"),
        ([[[[-1], [0], [0]]]], "records[0][0][0]", "diagnosis index -1 outside"),
        ([[[[0], [2], [0]]]], "records[0][0][1]", "pro_voc has 2 codes"),
    ],
)
def test_bad_records(tmp_path: Path, records: object, field: str | None, message: str) -> None:
    _write_raw(tmp_path, records=records)
    with pytest.raises(DataError) as info:
        load_safedrug(tmp_path)
    err = info.value
    assert err.path == str(tmp_path / RECORDS_FILE)
    assert err.field == field
    assert message in str(err)


# ---------------------------------------------------------------------- malformed DDI
@pytest.mark.parametrize(
    "ddi, message",
    [
        (np.zeros((3, 3)), r"shape \(3, 3\), expected \(4, 4\)"),
        (np.zeros(16), r"expected a numeric 2-D numpy array, got float64 array of shape \(16,\)"),
        ([[0, 1], [1, 0]], "expected a numeric 2-D numpy array, got list"),
        (np.array([["a"] * 4] * 4), "expected a numeric 2-D numpy array, got <U1 array"),
        (np.triu(np.ones((4, 4)), 1), r"not symmetric: entry \(0, 1\) = 1.0 but \(1, 0\) = 0.0"),
        (np.full((4, 4), 2.0) - 2 * np.eye(4), r"entry \(0, 1\) = 2.0: expected a binary"),
        (np.eye(4), r"nonzero diagonal entry \(0, 0\)"),
        (np.full((4, 4), np.nan), r"entry \(0, 0\) = nan: expected a binary 0/1 matrix"),
    ],
)
def test_bad_ddi(tmp_path: Path, ddi: object, message: str) -> None:
    _write_raw(tmp_path, ddi=ddi)
    with pytest.raises(DataError, match=rf"{DDI_FILE}: {message}"):
        load_safedrug(tmp_path)


def test_ddi_accepts_int_and_bool(tmp_path: Path) -> None:
    a = np.zeros((4, 4), dtype=bool)
    a[1, 3] = a[3, 1] = True
    for ddi in (a, a.astype(np.int8)):
        _write_raw(tmp_path, ddi=ddi)
        assert load_safedrug(tmp_path).ddi_pairs.tolist() == [[1, 3]]


# ---------------------------------------------------------------------- files
def test_missing_files_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_safedrug(tmp_path / "nope")
    tmp_path.joinpath("d").mkdir()
    with pytest.raises(DataError, match=rf"{RECORDS_FILE}: missing"):
        load_safedrug(tmp_path / "d")
    _write_raw(tmp_path / "e")
    (tmp_path / "e" / VOC_FILE).unlink()
    with pytest.raises(DataError, match=rf"{VOC_FILE}: missing"):
        load_safedrug(tmp_path / "e")


def test_malicious_records_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (eval, (f"open({str(marker)!r}, 'w')",))

    _write_raw(tmp_path / "d")
    (tmp_path / "d" / RECORDS_FILE).write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DataError, match=rf"{RECORDS_FILE}: refusing .*builtins\.eval"):
        load_safedrug(tmp_path / "d")
    assert not marker.exists()


def test_duplicate_word_in_vocabulary(tmp_path: Path) -> None:
    v = Voc(MED)
    v.idx2word[3] = "N02B"  # two indices, one code: word2idx cannot invert it
    _write_raw(tmp_path, vocs={"diag_voc": Voc(DIAG), "pro_voc": Voc(PROC), "med_voc": v})
    pattern = rf"{VOC_FILE}, field 'med_voc.word2idx': word2idx \(4 entries\) is not the inverse"
    with pytest.raises(DataError, match=pattern):
        load_safedrug(tmp_path)
    _write_raw(tmp_path, vocs={"diag_voc": Voc(DIAG), "pro_voc": Voc([]), "med_voc": Voc(MED)})
    with pytest.raises(DataError, match=rf"{VOC_FILE}, field 'pro_voc': empty vocabulary"):
        load_safedrug(tmp_path)
