"""load_mimic3: the bundled MIMIC-III demo against a brute-force recomputation, and hand-made tables
for every option and every kind of bad input."""

from __future__ import annotations

import ast
import csv
import functools
import gzip
import io
import random
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from diffkg_fast.data import csvtable, mimic3
from diffkg_fast.data.codes import atc_names, bundled_path
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.mimic3 import load_mimic3

# NDCs of the bundled mappings (checked against a plain re-read in test_ndc_fixtures_map_as_stated).
NDC_C01BA = "00002140701"  # RxCUI 853004 -> C01BA
NDC_A12CA = "00002202402"  # RxCUI 313009 -> A12CA
NDC_N06BA = "00002322930"  # RxCUI 352320 -> N06BA
NDC_B01AC = "00002475977"  # RxCUI 855816 -> B01AC
NDC_NO_ATC = "00002050101"  # RxCUI 207882, absent from the ATC table
NDC_EMPTY_RXCUI = "00026063203"  # the dictionary maps it to ''
NDC_UNKNOWN = "99999999999"  # not in the dictionary

DIAG_H = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"]
PROC_H = DIAG_H
RX_H = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "DRUG", "NDC", "ROUTE"]
ADM_H = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "ADMITTIME"]


# ------------------------------------------------------------------------------ plain re-reads
@functools.lru_cache(maxsize=1)
def _plain_mappings() -> tuple[dict[str, str], dict[str, str]]:
    ndc_rx = ast.literal_eval(bundled_path("codes", "ndc2rxnorm_mapping.txt").read_text())
    rx_atc: dict[str, str] = {}
    with gzip.open(bundled_path("codes", "ndc2atc_level4.csv.gz"), "rt", newline="") as f:
        for r in csv.DictReader(f):
            rx_atc.setdefault(r["RXCUI"], r["ATC5"])
    return ndc_rx, rx_atc


def _demo_rows(d: Path, name: str) -> list[dict[str, str]]:
    with gzip.open(d / f"{name}.csv.gz", "rt", newline="") as f:
        return list(csv.DictReader(f))


def _brute_force_demo(d: Path) -> dict[str, list[tuple[set, set, set]]]:
    """Patient -> visits in ADMITTIME order -> (diag, proc, med) code sets, with plain sets."""
    ndc_rx, rx_atc = _plain_mappings()
    diag, proc, med, rx_any = defaultdict(set), defaultdict(set), defaultdict(set), set()
    for r in _demo_rows(d, "DIAGNOSES_ICD"):
        diag[r["SUBJECT_ID"], r["HADM_ID"]].add(r["ICD9_CODE"])
    for r in _demo_rows(d, "PROCEDURES_ICD"):
        proc[r["SUBJECT_ID"], r["HADM_ID"]].add(r["ICD9_CODE"])
    for r in _demo_rows(d, "PRESCRIPTIONS"):
        rx_any.add((r["SUBJECT_ID"], r["HADM_ID"]))
        rxcui = ndc_rx.get(r["NDC"])
        if isinstance(rxcui, str) and rxcui in rx_atc:
            med[r["SUBJECT_ID"], r["HADM_ID"]].add(rx_atc[rxcui][:4])
    # The data README's count, before the NDC mapping: checks this re-read itself.
    before = set(diag) & set(proc) & rx_any
    per_patient = Counter(s for s, _ in before)
    assert (len(before), len(per_patient)) == (107, 82)
    assert sum(n >= 2 for n in per_patient.values()) == 11
    # Python's %y puts 69-99 in the 1900s and 00-68 in the 2000s: right for every demo patient.
    when = {
        (r["SUBJECT_ID"], r["HADM_ID"]): datetime.strptime(r["ADMITTIME"], "%m/%d/%y %H:%M")
        for r in _demo_rows(d, "ADMISSIONS")
    }
    out: dict[str, list] = defaultdict(list)
    for v in sorted(set(diag) & set(proc) & set(med), key=lambda v: (int(v[0]), when[v])):
        out[v[0]].append((diag[v], proc[v], med[v]))
    return out


def _as_sets(rec) -> dict[str, list[tuple[set, set, set]]]:
    out = {}
    for pid, visits in zip(rec.patient_ids, rec.to_nested(), strict=True):
        out[pid] = [
            tuple({voc[i] for i in idx} for voc, idx in zip((rec.diag_voc, rec.proc_voc,
                                                              rec.med_voc), v, strict=True))
            for v in visits
        ]
    return out


# ------------------------------------------------------------------------------ the demo
@pytest.fixture(scope="module")
def demo(mimic3_demo_dir):
    stats: dict = {}
    return load_mimic3(mimic3_demo_dir, stats=stats), stats


def test_ndc_fixtures_map_as_stated():
    ndc_rx, rx_atc = _plain_mappings()
    assert rx_atc[ndc_rx[NDC_C01BA]] == "C01BA"
    assert rx_atc[ndc_rx[NDC_A12CA]] == "A12CA"
    assert rx_atc[ndc_rx[NDC_N06BA]] == "N06BA"
    assert rx_atc[ndc_rx[NDC_B01AC]] == "B01AC"
    assert ndc_rx[NDC_NO_ATC] not in rx_atc
    assert ndc_rx[NDC_EMPTY_RXCUI] == ""
    assert NDC_UNKNOWN not in ndc_rx


def test_demo_equals_brute_force(demo, mimic3_demo_dir):
    rec, stats = demo
    expected = _brute_force_demo(Path(mimic3_demo_dir))
    assert _as_sets(rec) == dict(expected)
    assert rec.patient_ids == sorted(expected, key=int)
    # After the NDC mapping every one of the 107 visits still has a medication.
    assert (rec.n_visits, rec.n_patients) == (107, 82) == (stats["visits"], stats["patients"])
    for kind, voc in (("diag", rec.diag_voc), ("proc", rec.proc_voc), ("med", rec.med_voc)):
        k = ("diag", "proc", "med").index(kind)
        assert set(voc) == {c for vs in expected.values() for v in vs for c in v[k]}
    assert stats["vocab"] == {"diag": 523, "proc": 157, "med": 106}
    assert rec.source == "mimic3" and rec.ddi_pairs is None


def test_demo_stats(demo):
    _, stats = demo
    assert stats["DIAGNOSES_ICD"]["rows"] == 1761
    assert stats["PROCEDURES_ICD"]["rows"] == 506
    rx = stats["PRESCRIPTIONS"]
    assert rx["rows"] == 10398
    assert rx["rows_mapped"] + rx["rows_no_ndc"] + rx["rows_no_rxcui"] + rx["rows_no_atc"] == 10398
    assert rx["rows_no_ndc"] == 1478  # 1477 NDC "0" and 1 empty
    assert rx["ndc_unmapped_share"] == pytest.approx((rx["ndcs_no_rxcui"] + rx["ndcs_no_atc"])
                                                     / rx["ndcs"])
    assert 0.2 < rx["ndc_unmapped_share"] < 0.35  # 280 of 995 NDCs
    assert stats["visits_joined"] == 107 and stats["visit_order"] == "admittime"


def test_demo_codes_are_known(demo):
    rec, _ = demo
    names = atc_names()
    assert all(len(c) == 4 for c in rec.med_voc)
    assert all(c in names for c in rec.med_voc)  # all 106 ATC-3 codes have a WHO class name
    assert all(c.isalnum() and c == c.strip() for c in rec.diag_voc + rec.proc_voc)


def test_demo_vocab_is_first_appearance(demo):
    rec, _ = demo
    for k in range(3):
        seen: list[int] = []
        for patient in rec.to_nested():
            for visit in patient:
                seen += [i for i in visit[k] if i not in seen]
        assert seen == list(range(len(rec.voc(("diag", "proc", "med")[k]))))


def test_demo_visit_order(demo, mimic3_demo_dir):
    rec, _ = demo
    by_hadm = load_mimic3(mimic3_demo_dir, visit_order="hadm")
    assert _as_sets(by_hadm).keys() == _as_sets(rec).keys()
    # Patient 41976 runs from 10/29/98 to 10/3/02; HADM_ID order is not time order for them.
    a, b = _as_sets(rec)["41976"], _as_sets(by_hadm)["41976"]
    assert len(a) >= 2 and a != b
    assert sorted(map(repr, a)) == sorted(map(repr, b))


def test_demo_min_rx_admissions(demo, mimic3_demo_dir):
    rec, _ = demo
    rx_adm = defaultdict(set)
    for r in _demo_rows(Path(mimic3_demo_dir), "PRESCRIPTIONS"):
        if r["NDC"] not in ("", "0"):
            rx_adm[r["SUBJECT_ID"]].add(r["HADM_ID"])
    stats: dict = {}
    lg2 = load_mimic3(mimic3_demo_dir, min_rx_admissions=2, stats=stats)
    assert lg2.patient_ids == [p for p in rec.patient_ids if len(rx_adm[p]) >= 2]
    assert 0 < lg2.n_patients < rec.n_patients
    assert stats["PRESCRIPTIONS"]["patients_dropped_min_rx_admissions"] == sum(
        len(h) < 2 for h in rx_adm.values()
    )


# ------------------------------------------------------------------------------ hand-made tables
def _write(d: Path, name: str, header: list[str], rows: list[list], *, gz: bool = False,
           lower: bool = False) -> Path:
    path = d / (f"{name.lower() if lower else name}.csv" + (".gz" if gz else ""))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([h.lower() for h in header] if lower else header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _cohort(d: Path, *, gz: bool = False, lower: bool = False, admissions: bool = True) -> Path:
    """Patients 7 (2 visits), 3 (1 visit), 5 (only visit lacks procedures), 9 (NDCs unmapped)."""
    diag = [[1, 7, 200, 1, "4019"], [2, 7, 200, 2, "25000"], [3, 7, 100, 1, "4019"],
            [4, 3, 300, 1, "V5861"], [5, 3, 300, 2, "4019"], [6, 3, 300, 3, "4019"],
            [7, 5, 500, 1, "4280"], [8, 9, 900, 1, "4019"], [9, 3, "", 1, "0389"],
            [10, 7, 200, 3, ""]]
    proc = [[1, 7, 200, 1, "3893"], [2, 7, 100, 1, "9604"], [3, 3, 300, 1, "3893"],
            [4, 9, 900, 1, "3893"]]
    rx = [[1, 7, 200, "a", NDC_C01BA, "PO"], [2, 7, 200, "b, with comma", NDC_A12CA, "PO"],
          [3, 7, 100, "c", NDC_C01BA, "IV"], [4, 3, 300, "d", NDC_N06BA, "PO"],
          [5, 3, 300, "e", "0", "PO"], [6, 3, 300, "f", "", "PO"],
          [7, 5, 500, "g", NDC_B01AC, "PO"], [8, 9, 900, "h", NDC_UNKNOWN, "PO"],
          [9, 9, 900, "i", NDC_NO_ATC, "PO"], [10, 9, 900, "j", NDC_EMPTY_RXCUI, "PO"]]
    _write(d, "DIAGNOSES_ICD", DIAG_H, diag, gz=gz, lower=lower)
    _write(d, "PROCEDURES_ICD", PROC_H, proc, gz=gz, lower=lower)
    _write(d, "PRESCRIPTIONS", RX_H, rx, gz=gz, lower=lower)
    if admissions:  # visit 200 of patient 7 came first, although its HADM_ID is larger
        adm = [[1, 7, 200, "2150-01-02 08:00:00"], [2, 7, 100, "2150-03-01 00:00:00"],
               [3, 3, 300, "2101-05-05 10:00:00"], [4, 5, 500, "2101-05-05 10:00:00"],
               [5, 9, 900, "2101-05-05 10:00:00"]]
        _write(d, "ADMISSIONS", ADM_H, adm, gz=gz, lower=lower)
    return d


def _words(rec) -> list[list[list[list[str]]]]:
    vocs = (rec.diag_voc, rec.proc_voc, rec.med_voc)
    return [[[[voc[i] for i in idx] for voc, idx in zip(vocs, v, strict=True)] for v in p]
            for p in rec.to_nested()]


def test_cohort(tmp_path):
    stats: dict = {}
    rec = load_mimic3(_cohort(tmp_path), stats=stats)
    # 5 dropped (no procedure), 9 dropped (no NDC maps); patients by SUBJECT_ID; 7's visits by time.
    assert rec.patient_ids == ["3", "7"]
    assert _words(rec) == [
        [[["V5861", "4019"], ["3893"], ["N06B"]]],
        [[["4019", "25000"], ["3893"], ["C01B", "A12C"]], [["4019"], ["9604"], ["C01B"]]],
    ]
    assert rec.diag_voc == ["V5861", "4019", "25000"]  # first appearance in that walk
    assert rec.med_voc == ["N06B", "C01B", "A12C"]
    rx = stats["PRESCRIPTIONS"]
    assert (rx["rows_no_ndc"], rx["rows_no_rxcui"], rx["rows_no_atc"], rx["rows_mapped"]) == (
        2, 2, 1, 5)
    assert (rx["ndcs"], rx["ndcs_no_rxcui"], rx["ndcs_no_atc"]) == (7, 2, 1)
    d = stats["DIAGNOSES_ICD"]
    assert (d["rows"], d["rows_no_hadm"], d["rows_no_code"]) == (10, 1, 1)
    assert (stats["visits_joined"], stats["patients"]) == (3, 2)


def test_hadm_order(tmp_path):
    rec = load_mimic3(_cohort(tmp_path), visit_order="hadm")
    assert _words(rec)[1][0][1] == ["9604"]  # HADM 100 first
    (tmp_path / "no_adm").mkdir()
    no_adm = load_mimic3(_cohort(tmp_path / "no_adm", admissions=False))  # falls back to HADM_ID
    assert _words(no_adm) == _words(rec)


def test_lower_case_and_gzip_give_the_same(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_mimic3(_cohort(tmp_path / "a"))
    b = load_mimic3(_cohort(tmp_path / "b", gz=True, lower=True))
    assert _words(a) == _words(b) and a.patient_ids == b.patient_ids
    assert sorted(p.name for p in (tmp_path / "b").iterdir())[0] == "admissions.csv.gz"


def test_us_dates_and_century_wrap(tmp_path):
    _cohort(tmp_path)
    adm = [[1, 7, 200, "1/2/99 8:00"], [2, 7, 100, "3/1/01 0:00"], [3, 3, 300, "5/5/64 10:00"]]
    _write(tmp_path, "ADMISSIONS", ADM_H, adm)
    rec = load_mimic3(tmp_path)
    assert _words(rec)[1][0][1] == ["3893"]  # 1999 before 2001 although 99 > 01
    _write(tmp_path, "ADMISSIONS", ADM_H, [[1, 7, 200, "1/2/20 8:00"], *adm[1:]])
    assert _words(load_mimic3(tmp_path))[1][0][1] == ["9604"]


def test_unwrap_years():
    assert mimic3._unwrap_years([98, 99, 0, 2]) == {98: 98, 99: 99, 0: 100, 2: 102}
    assert mimic3._unwrap_years([5, 7, 40]) == {5: 5, 7: 7, 40: 40}
    assert mimic3._unwrap_years([5, 7, 60]) == {60: 60, 5: 105, 7: 107}  # 47 years, not 55
    assert mimic3._unwrap_years([]) == {}
    assert mimic3._unwrap_years([64]) == {64: 64}


def test_top_k_and_min_code_freq(tmp_path):
    d = tmp_path
    diag = [[i, s, h, 1, c] for i, (s, h, c) in enumerate(
        [(1, 10, "111"), (1, 10, "222"), (1, 11, "222"), (1, 11, "333"), (2, 20, "333"),
         (2, 20, "444"), (2, 21, "111")])]
    proc = [[i, s, h, 1, "3893"] for i, (s, h) in enumerate([(1, 10), (1, 11), (2, 20), (2, 21)])]
    rx = [[i, s, h, "x", n, "PO"] for i, (s, h, n) in enumerate(
        [(1, 10, NDC_C01BA), (1, 10, NDC_A12CA), (1, 11, NDC_A12CA), (2, 20, NDC_N06BA),
         (2, 20, NDC_C01BA), (2, 21, NDC_B01AC)])]
    _write(d, "DIAGNOSES_ICD", DIAG_H, diag)
    _write(d, "PROCEDURES_ICD", PROC_H, proc)
    _write(d, "PRESCRIPTIONS", RX_H, rx)
    full = load_mimic3(d)
    assert sorted(full.diag_voc) == ["111", "222", "333", "444"]
    # Counts 2, 2, 2, 1: the tie keeps the first two seen in the file.
    assert sorted(load_mimic3(d, top_diag=2).diag_voc) == ["111", "222"]
    assert sorted(load_mimic3(d, top_med=2).med_voc) == ["A12C", "C01B"]
    stats: dict = {}
    one = load_mimic3(d, top_med=1, stats=stats)  # only A12C / C01B tie -> C01B first in file
    assert one.med_voc == ["C01B"] and one.n_visits == 2
    assert stats["PRESCRIPTIONS"]["codes_kept"] == 1
    assert sorted(load_mimic3(d, min_code_freq=2).diag_voc) == ["111", "222", "333"]
    assert load_mimic3(d, min_visits=2).n_patients == 2
    assert load_mimic3(d, top_diag=2, min_visits=2).patient_ids == ["1"]


@pytest.mark.parametrize(("level", "codes"), [
    (1, ["N", "C", "A"]), (2, ["N06", "C01", "A12"]), (3, ["N06B", "C01B", "A12C"]),
    (4, ["N06BA", "C01BA", "A12CA"]),
])
def test_atc_level(tmp_path, level, codes):
    assert load_mimic3(_cohort(tmp_path), atc_level=level).med_voc == codes


def test_min_rx_admissions_counts_before_mapping(tmp_path):
    _cohort(tmp_path)
    path = tmp_path / "PRESCRIPTIONS.csv"
    base = path.read_text()
    # SafeDrug counts admissions in PRESCRIPTIONS before the NDC mapping, without NDC "0" rows.
    path.write_text(base + f"11,3,301,z,{NDC_UNKNOWN},PO\n")
    assert load_mimic3(tmp_path, min_rx_admissions=2).patient_ids == ["3", "7"]
    path.write_text(base + "11,3,301,z,0,PO\n12,3,302,z,,PO\n")
    assert load_mimic3(tmp_path, min_rx_admissions=2).patient_ids == ["7"]
    assert "no visit" in str(_raises(tmp_path, min_rx_admissions=3))


# ------------------------------------------------------------------------------ bad input
def _raises(directory, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_mimic3(directory, **kwargs)
    return info.value


@pytest.mark.parametrize("kwargs", [
    {"atc_level": 5}, {"atc_level": 0}, {"atc_level": "3"}, {"atc_level": True},
    {"top_diag": 0}, {"top_med": -1}, {"min_visits": 0}, {"min_code_freq": 1.5},
    {"min_rx_admissions": 0}, {"visit_order": "time"},
])
def test_bad_options(tmp_path, kwargs):
    err = _raises(_cohort(tmp_path), **kwargs)
    assert err.field == next(iter(kwargs))


def test_missing_directory_and_file(tmp_path):
    assert "not a directory" in str(_raises(tmp_path / "nope"))
    _cohort(tmp_path)
    (tmp_path / "PROCEDURES_ICD.csv").unlink()
    err = _raises(tmp_path)
    assert err.path == str(tmp_path)
    assert "PROCEDURES_ICD.csv" in str(err) and "PROCEDURES_ICD.csv.gz" in str(err)


def test_missing_column(tmp_path):
    _cohort(tmp_path)
    path = _write(tmp_path, "PRESCRIPTIONS", ["ROW_ID", "SUBJECT_ID", "HADM_ID", "DRUG"],
                  [[1, 7, 200, "a"]])
    err = _raises(tmp_path)
    assert (err.path, err.line, err.field) == (str(path), 1, "NDC")
    assert "ROW_ID, SUBJECT_ID, HADM_ID, DRUG" in str(err)


@pytest.mark.parametrize("code", ["40.19", "  ", "4019 x", "é12"])
def test_malformed_code(tmp_path, code):
    _cohort(tmp_path)
    path = _write(tmp_path, "DIAGNOSES_ICD", DIAG_H,
                  [[1, 7, 200, 1, "4019"], [2, 7, 200, 2, code], [3, 7, 100, 1, "4019"]])
    err = _raises(tmp_path)
    assert (err.path, err.line, err.field) == (str(path), 3, "ICD9_CODE")
    assert repr(code) in str(err)


def test_padded_code_is_stripped(tmp_path):
    _cohort(tmp_path)
    _write(tmp_path, "PROCEDURES_ICD", PROC_H,
           [[1, 7, 200, 1, " 3893"], [2, 7, 200, 2, "3893"], [3, 7, 100, 1, "9604 "],
            [4, 3, 300, 1, "3893"]])
    rec = load_mimic3(tmp_path)
    assert rec.proc_voc == ["3893", "9604"] and _words(rec)[1][0][1] == ["3893"]


@pytest.mark.parametrize(("table", "column", "bad"), [
    ("PRESCRIPTIONS", "HADM_ID", "12a"), ("PRESCRIPTIONS", "SUBJECT_ID", "x"),
    ("DIAGNOSES_ICD", "SUBJECT_ID", "7.5"), ("PROCEDURES_ICD", "HADM_ID", "-1"),
])
def test_non_integer_id(tmp_path, table, column, bad):
    _cohort(tmp_path)
    header = {"PRESCRIPTIONS": RX_H, "DIAGNOSES_ICD": DIAG_H, "PROCEDURES_ICD": PROC_H}[table]
    row = {"PRESCRIPTIONS": [4, 7, 200, "a", NDC_C01BA, "PO"]}.get(table, [4, 7, 200, 1, "4019"])
    good = [1, 3, 300, 1, "4019"] if table != "PRESCRIPTIONS" else [1, 3, 300, "a", NDC_C01BA, "PO"]
    row[header.index(column)] = bad
    path = _write(tmp_path, table, header, [good, good, row, good])
    err = _raises(tmp_path)
    assert (err.path, err.line, err.field) == (str(path), 4, column)


def test_float_ids_are_accepted(tmp_path):
    _cohort(tmp_path)
    rows = [[1, "7.0", "200.0", "a", NDC_C01BA, "PO"], [2, 7, 100, "c", NDC_C01BA, "IV"],
            [3, 3, 300, "d", NDC_N06BA, "PO"]]
    _write(tmp_path, "PRESCRIPTIONS", RX_H, rows)
    assert load_mimic3(tmp_path).n_visits == 3


def test_short_row(tmp_path):
    _cohort(tmp_path)
    path = tmp_path / "PRESCRIPTIONS.csv"
    path.write_text(path.read_text() + "11,7,200\n")
    err = _raises(tmp_path)
    assert (err.path, err.line) == (str(path), 12)


def test_admissions_errors(tmp_path):
    _cohort(tmp_path)
    adm = [[1, 3, 300, "2150-01-02"], [2, 7, 200, "2150-01-02 08:00"], [3, 7, 100, "yesterday"]]
    path = _write(tmp_path, "ADMISSIONS", ADM_H, adm)
    err = _raises(tmp_path)
    assert (err.path, err.line, err.field) == (str(path), 4, "ADMITTIME")
    _write(tmp_path, "ADMISSIONS", ADM_H, adm[:2])
    err = _raises(tmp_path)
    assert "HADM_ID 100" in str(err) and "visit_order='hadm'" in str(err)
    assert load_mimic3(tmp_path, visit_order="hadm").n_visits == 3


def test_no_visit_survives(tmp_path):
    _cohort(tmp_path)
    _write(tmp_path, "PROCEDURES_ICD", PROC_H, [[1, 9, 900, 1, "3893"]])
    err = _raises(tmp_path)
    assert err.path == str(tmp_path) and "no visit" in str(err)
    assert "procedures 1" in str(err) and "in all three: 0" in str(err)


# ------------------------------------------------------------------------------ the fast reader
def _random_csv(rng: random.Random) -> str:
    plain = ["", "a", "0", "12", "x y", "é"]
    special = ['"q,1"', '"q""2"', '"multi\nline"', '"cr\r\nlf"', 'ab"c', '"a,\n\nb"', "c\rd"]
    # Mostly plain lines, so that the line-by-line path (not the whole-file fallback) runs.
    p_special = rng.choice([0.0, 0.01, 0.03, 0.3])
    lines = []
    for _ in range(rng.randint(0, 120)):
        if rng.random() < 0.03:
            lines.append("")
            continue
        lines.append(",".join(rng.choice(special if rng.random() < p_special else plain)
                              for _ in range(rng.randint(3, 5))))
    eol = rng.choice(["\n", "\r\n"])
    return eol.join(lines) + (eol if rng.random() < 0.7 else "")


def test_fast_reader_equals_csv_module():
    rng = random.Random(0)
    for _ in range(300):
        text = _random_csv(rng)
        index = rng.choice([[0], [1, 2], [2, 0]])
        expected = [tuple(r[i] for i in index) for r in csv.reader(io.StringIO(text, newline=""))
                    if r and len(r) > max(index)]
        if any(r and len(r) <= max(index) for r in csv.reader(io.StringIO(text, newline=""))):
            continue  # short rows raise; tested elsewhere
        for chunk in (7, 100, 1 << 20):
            got = [row for rows in csvtable.csv_rows(io.StringIO(text, newline=""), index, chunk)
                   for row in rows]
            assert got == expected, (text, index, chunk)
