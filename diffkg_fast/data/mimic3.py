"""MIMIC-III tables -> :class:`MedicalRecords` by SafeDrug's preprocessing, without pandas.

Follows ``data/processing.py`` of SafeDrug (Yang et al. 2021, github.com/ycq091044/SafeDrug):

1. ``PRESCRIPTIONS``: rows with NDC empty or ``"0"`` dropped; NDC -> RxCUI by the GAMENet dict
   ``ndc2rxnorm_mapping.txt``; RxCUI -> ATC by ``ndc2atc_level4.csv.gz``, FIRST row per RxCUI
   (SafeDrug's ``drop_duplicates(subset=["RXCUI"])``), truncated to the ATC level (level 3 = 4
   characters, SafeDrug's ``x[:4]``); unmapped NDCs and empty RxCUIs dropped; the ``top_med`` most
   frequent ATC codes kept (``filter_300_most_med``).
2. ``DIAGNOSES_ICD``: rows without a code dropped (``dropna``), codes de-duplicated per visit, the
   ``top_diag`` most frequent kept (``filter_2000_most_diag``). ``PROCEDURES_ICD``: likewise, all
   codes kept (``top_proc=None``: SafeDrug leaves ``filter_1000_most_pro`` commented out).
3. Visits kept: (SUBJECT_ID, HADM_ID) pairs with codes of all three kinds after filtering
   (SafeDrug's inner join). Patients ordered by SUBJECT_ID; vocabularies in order of first
   appearance walking patients, visits and codes (SafeDrug's ``create_str_token_mapping``).

Deviations from SafeDrug, and why:

* Frequencies count visits. For diagnoses and procedures that is SafeDrug's row count (rows are
  de-duplicated per visit first); for medications SafeDrug counts rows distinct on (visit, start
  date, drug name, ATC), weighing a class by its number of drugs and start dates, and needing two
  more columns of the 4M-row table. At ATC level 3 the cut never binds by default (the mapping
  has 173 ATC-3 classes, ``top_med=300``). Ties at the cut: first appearance in the file wins
  (pandas' unstable sort leaves them arbitrary).
* SafeDrug forward-fills empty PRESCRIPTIONS cells (``fillna(method="pad")``), so a row without
  an NDC takes the NDC of the row above, another drug. We drop such rows.
* SafeDrug first drops patients with fewer than two admissions in PRESCRIPTIONS
  (``process_visit_lg2``): ``min_rx_admissions=2`` here (default 1, no such filter).
  ``min_visits`` (patients with fewer complete visits after the join) and ``min_code_freq``
  (codes in fewer visits of their table, applied with the top-k cut) are not in SafeDrug.
* Visit order: SafeDrug's groupby sorts visits by HADM_ID, random with respect to time in MIMIC.
  By default (``visit_order="admittime"``) visits follow ADMITTIME from ADMISSIONS when that table
  exists (``"hadm"``: SafeDrug's order). Dates are ISO (``2146-07-21 00:00:00``) or ``m/d/yy H:MM``
  (the demo); two-digit years get the centuries that make one patient's admissions span the
  shortest time (the demo's patient 41976 runs from 10/29/98 to 10/3/02).
* Within a visit codes keep the order of their first row in the file (SafeDrug: unstable sort).
* An exactly empty cell is a missing value, its row dropped (``dropna``; MIMIC-III has 47
  diagnosis rows without a code). A malformed code or a non-integer id raises
  :class:`DataError` naming file, line and column; pandas' float ids (``"123.0"``) are accepted.
"""
from __future__ import annotations

import ast
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

from diffkg_fast.data.codes import bundled_path
from diffkg_fast.data.csvtable import csv_table, locate_row
from diffkg_fast.data.errors import DataError, excerpt
from diffkg_fast.data.records import MedicalRecords

REQUIRED_TABLES = ("DIAGNOSES_ICD", "PROCEDURES_ICD", "PRESCRIPTIONS")
# ATC level -> code length: level 1 "N", 2 "N02", 3 "N02B", 4 "N02BE".
ATC_LENGTH = {1: 1, 2: 3, 3: 4, 4: 5}
VISIT_ORDERS = ("admittime", "hadm")

_CODE_RE = re.compile(r"[0-9A-Za-z]+")
_ISO_RE = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d*)?)?)?"
)
_US_RE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{2}|\d{4})(?:\s+(\d{1,2}):(\d{2})(?::(\d{2}))?)?")

Key = tuple[str, str]  # raw (SUBJECT_ID, HADM_ID) strings as read
Visit = tuple[int, int]  # parsed (SUBJECT_ID, HADM_ID)


# ---------------------------------------------------------------------------------- reading
def _find_tables(directory: Path) -> dict[str, Path]:
    """``NAME.csv`` or ``NAME.csv.gz`` in any letter case (``.csv`` wins when both exist)."""
    entries = {p.name.lower(): p for p in directory.iterdir() if p.is_file()}
    found = {}
    for name in (*REQUIRED_TABLES, "ADMISSIONS"):
        for suffix in (".csv", ".csv.gz"):
            if name.lower() + suffix in entries:
                found.setdefault(name, entries[name.lower() + suffix])
    missing = [f"{n}.csv or {n}.csv.gz" for n in REQUIRED_TABLES if n not in found]
    if missing:
        raise DataError(
            f"missing table: expected {'; '.join(missing)} (any letter case)", path=directory
        )
    return found


def _to_int(text: str) -> int | None:
    """Integer id or None. Accepts pandas' float form ``"123.0"``; rejects ``"1_0"``, ``"+1"``."""
    s = text.strip()
    if s.endswith(".0"):
        s = s[:-2]
    return int(s) if s.isascii() and s.isdigit() else None


def _visit_id(path: Path, subject: str, hadm: str) -> Visit:
    """Parse one raw (SUBJECT_ID, HADM_ID) pair; a non-integer id is a DataError at its line."""
    s, h = _to_int(subject), _to_int(hadm)
    if s is None or h is None:
        col, val = ("SUBJECT_ID", subject) if s is None else ("HADM_ID", hadm)
        raise DataError(
            f"{excerpt(val)} is not an integer id", path=path, line=locate_row(path, col, val),
            field=col,
        )
    return s, h


def _parse_ids(path: Path, raw: dict[Key, dict[str, None]]) -> dict[Visit, dict[str, None]]:
    """Raw (SUBJECT_ID, HADM_ID) keys -> ints (once per visit, not per row), merging spellings."""
    out: dict[Visit, dict[str, None]] = {}
    for (s, h), codes in raw.items():
        out.setdefault(_visit_id(path, s, h), {}).update(codes)
    return out


def _group_rows(
    path: Path, value_col: str, translate: Callable[[str], str | None], stats: dict
) -> tuple[dict[Visit, dict[str, None]], dict[str, int], set[Visit]]:
    """Group a table's rows by visit, translating each ``value_col`` cell to a code.

    Returns visit -> distinct codes in file order; rows per raw value (rows without HADM_ID
    excluded); and the admissions with a non-empty, non-"0" value that did not translate.
    """
    raw: dict[Key, dict[str, None]] = {}
    untranslated: dict[Key, None] = {}
    value_rows: dict[str, int] = {}
    no_hadm = 0
    with csv_table(path, ("SUBJECT_ID", "HADM_ID", value_col)) as rows:
        # The hot loop (4M rows of PRESCRIPTIONS): a few dict operations per row; ids are parsed
        # and codes validated once per distinct value afterwards, not here.
        for s, hadm, value in rows:
            if not hadm:
                no_hadm += 1
                continue
            value_rows[value] = value_rows.get(value, 0) + 1
            code = translate(value)
            if code is None:
                if value and value != "0":
                    untranslated[(s, hadm)] = None
                continue
            key = (s, hadm)
            codes = raw.get(key)
            if codes is None:
                raw[key] = codes = {}
            codes[code] = None
    visits = _parse_ids(path, raw)
    admissions = {_visit_id(path, s, h) for s, h in untranslated}
    stats.update(rows=sum(value_rows.values()) + no_hadm, rows_no_hadm=no_hadm, visits=len(visits))
    return visits, value_rows, admissions


def _read_icd(path: Path, stats: dict) -> dict[Visit, dict[str, None]]:
    """Visit -> its distinct ICD-9 codes (stripped, validated) in file order."""
    # An exactly empty code is a missing value: the row is dropped (SafeDrug's dropna).
    visits, value_rows, _ = _group_rows(path, "ICD9_CODE", lambda v: v or None, stats)
    stats["rows_no_code"] = value_rows.get("", 0)
    # Validate each distinct code once rather than every row.
    clean = {}
    for code in value_rows:
        if code:
            c = code.strip()
            if not _CODE_RE.fullmatch(c):
                raise DataError(
                    f"malformed ICD-9 code {excerpt(code)}: expected letters and digits only "
                    "(undotted, e.g. '4019' or 'V5861')",
                    path=path, line=locate_row(path, "ICD9_CODE", code), field="ICD9_CODE",
                )
            if c != code:
                clean[code] = c
    if clean:  # rare: codes padded with spaces; re-key (and re-dedupe) the visits
        visits = {v: {clean.get(c, c): None for c in codes} for v, codes in visits.items()}
    return visits


@functools.lru_cache(maxsize=1)
def _ndc_rxcui() -> dict[str, int | None]:
    """NDC -> RxCUI (None where the dictionary gives an empty or non-numeric RxCUI)."""
    path = bundled_path("codes", "ndc2rxnorm_mapping.txt")
    # literal_eval, never eval: the file is a dict literal with u'' strings (GAMENet's format).
    mapping = ast.literal_eval(path.read_text(encoding="utf-8"))
    # The file also holds an entry 'idx': 4203 (not an NDC); non-string values are skipped.
    return {k: _to_int(v) for k, v in mapping.items() if isinstance(v, str)}


@functools.lru_cache(maxsize=1)
def _rxcui_atc5() -> dict[int, str]:
    """RxCUI -> 5-character ATC code of its FIRST row in the file (SafeDrug's drop_duplicates)."""
    path = bundled_path("codes", "ndc2atc_level4.csv.gz")
    out: dict[int, str] = {}
    with csv_table(path, ("RXCUI", "ATC5")) as rows:
        for text, atc in rows:
            rxcui = _to_int(text)
            if rxcui is not None and rxcui not in out:
                out[rxcui] = atc.strip()
    return out


@functools.lru_cache(maxsize=len(ATC_LENGTH))
def _ndc_atc(atc_level: int) -> dict[str, str]:
    """NDC -> ATC code at ``atc_level``, for every NDC that maps all the way."""
    n, rx_atc = ATC_LENGTH[atc_level], _rxcui_atc5()
    out = {}
    for ndc, rxcui in _ndc_rxcui().items():
        atc = rx_atc.get(rxcui) if rxcui is not None else None
        if atc is not None and len(atc) >= n:
            out[ndc] = atc[:n]
    return out


def _read_prescriptions(
    path: Path, atc_level: int, stats: dict
) -> tuple[dict[Visit, dict[str, None]], set[Visit]]:
    """Visit -> distinct ATC codes in file order; and every admission with a usable NDC row."""
    ndc_atc = _ndc_atc(atc_level)
    visits, ndc_rows, unmapped = _group_rows(path, "NDC", ndc_atc.get, stats)
    # Why each unmapped NDC failed, counted by rows and by distinct NDC.
    ndc_rx = _ndc_rxcui()
    rows = dict.fromkeys(("mapped", "no_ndc", "no_rxcui", "no_atc"), 0)
    ndcs = dict.fromkeys(rows, 0)
    for ndc, n_rows in ndc_rows.items():
        if ndc in ndc_atc:
            reason = "mapped"
        elif ndc in ("", "0"):
            reason = "no_ndc"
        elif ndc_rx.get(ndc) is None:
            reason = "no_rxcui"  # not in the dictionary, or an empty RxCUI there
        else:
            reason = "no_atc"  # RxCUI not in the ATC table (or its ATC shorter than the level)
        rows[reason] += n_rows
        ndcs[reason] += 1
    n_ndc = len(ndc_rows) - ndcs["no_ndc"]
    stats.update({f"rows_{k}": v for k, v in rows.items()})
    stats.update(ndcs=n_ndc, ndcs_no_rxcui=ndcs["no_rxcui"], ndcs_no_atc=ndcs["no_atc"])
    stats["ndc_unmapped_share"] = (ndcs["no_rxcui"] + ndcs["no_atc"]) / max(n_ndc, 1)
    return visits, unmapped | visits.keys()


# ---------------------------------------------------------------------------------- visit order
def _parse_time(text: str) -> tuple[int, bool, tuple[int, ...]] | None:
    """(year, year has two digits, (month, day, hour, minute, second)), or None if unparseable."""
    if m := _ISO_RE.fullmatch(text.strip()):
        y, mo, d = m.group(1, 2, 3)
    elif m := _US_RE.fullmatch(text.strip()):
        mo, d, y = m.group(1, 2, 3)
    else:
        return None
    fields = (int(mo), int(d), *(int(x) if x else 0 for x in m.group(4, 5, 6)))
    if not (1 <= fields[0] <= 12 and 1 <= fields[1] <= 31 and fields[2] < 24):
        return None
    return int(y), len(y) == 2, fields


def _unwrap_years(years: list[int]) -> dict[int, int]:
    """Two-digit years -> sortable years: the centuries that make the span shortest.

    Sorted years on a 100-year circle; cutting the circle at its widest gap gives the order.
    """
    ys = sorted(set(years))
    if not ys:
        return {}
    # The wrap-around gap first, so that on ties the years stay as they are.
    gaps = [(ys[0] + 100 - ys[-1], 0)] + [(ys[i + 1] - ys[i], i + 1) for i in range(len(ys) - 1)]
    start = ys[max(gaps, key=lambda g: g[0])[1]]
    return {y: y if y >= start else y + 100 for y in ys}


def _admission_order(path: Path, patients: dict[int, list[int]], stats: dict) -> None:
    """Sort each patient's HADM_IDs in place by ADMITTIME (ties by HADM_ID)."""
    raw: dict[Key, str] = {}
    n = 0
    with csv_table(path, ("SUBJECT_ID", "HADM_ID", "ADMITTIME")) as rows:
        for n, (s, h, t) in enumerate(rows, 1):  # noqa: B007
            if h:
                raw.setdefault((s, h), t)
    stats.update(rows=n)
    times = {_visit_id(path, s, h): t for (s, h), t in raw.items()}
    for subject, hadms in patients.items():
        parsed = {}
        for hadm in hadms:
            text = times.get((subject, hadm))
            if text is None:
                raise DataError(
                    f"no admission row for SUBJECT_ID {subject}, HADM_ID {hadm}, needed to order "
                    "visits by ADMITTIME (pass visit_order='hadm' to order by HADM_ID instead)",
                    path=path, field="HADM_ID",
                )
            p = _parse_time(text)
            if p is None:
                raise DataError(
                    f"cannot read the date {excerpt(text)}: expected 'YYYY-MM-DD HH:MM:SS' or "
                    "'m/d/yy H:MM'",
                    path=path, line=locate_row(path, "ADMITTIME", text), field="ADMITTIME",
                )
            parsed[hadm] = p
        unwrap = _unwrap_years([p[0] for p in parsed.values() if p[1]]) if len(hadms) > 1 else {}
        hadms.sort(key=lambda h: (unwrap.get(parsed[h][0], parsed[h][0]), parsed[h][2], h))


# ---------------------------------------------------------------------------------- filtering
def _filter_codes(
    visits: dict[Visit, dict[str, None]], top: int | None, min_freq: int, stats: dict
) -> dict[Visit, list[str]]:
    """Keep the ``top`` codes by number of visits (ties: first appearance) seen in >= ``min_freq``
    visits; drop visits left without a code."""
    counts: dict[str, int] = {}
    for codes in visits.values():
        for c in codes:
            counts[c] = counts.get(c, 0) + 1
    ranked = sorted(counts, key=lambda c: -counts[c])  # stable: ties stay in first-appearance order
    if top is not None:
        ranked = ranked[:top]
    keep = {c for c in ranked if counts[c] >= min_freq}
    out = {}
    for v, codes in visits.items():
        kept = [c for c in codes if c in keep]
        if kept:
            out[v] = kept
    stats.update(codes=len(counts), codes_kept=len(keep), visits_after_filter=len(out))
    return out


def _check_options(atc_level: int, visit_order: str, counts: dict[str, int | None]) -> None:
    if isinstance(atc_level, bool) or atc_level not in ATC_LENGTH:
        raise DataError(f"must be one of 1, 2, 3, 4, got {atc_level!r}", field="atc_level")
    for name, value in counts.items():
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
        if bad and not (value is None and name.startswith("top_")):
            raise DataError(f"must be a positive integer, got {value!r}", field=name)
    if visit_order not in VISIT_ORDERS:
        raise DataError(f"must be 'admittime' or 'hadm', got {visit_order!r}", field="visit_order")


# ---------------------------------------------------------------------------------- entry point
def load_mimic3(
    path: str | os.PathLike[str],
    *,
    atc_level: int = 3,
    top_diag: int | None = 2000,
    top_proc: int | None = None,
    top_med: int | None = 300,
    min_code_freq: int = 1,
    min_visits: int = 1,
    visit_order: str = "admittime",
    min_rx_admissions: int = 1,
    stats: dict | None = None,
) -> MedicalRecords:
    """Read the MIMIC-III tables in directory ``path`` into :class:`MedicalRecords`.

    Needs ``DIAGNOSES_ICD``, ``PROCEDURES_ICD`` and ``PRESCRIPTIONS`` (and ``ADMISSIONS`` for
    ``visit_order="admittime"``; without it visits are ordered by HADM_ID), as ``.csv`` or
    ``.csv.gz``, any letter case in names and headers. ``top_*`` keep the most frequent codes
    (None: all); ``min_code_freq`` drops codes seen in fewer visits; ``min_visits`` drops patients
    with fewer complete visits; ``min_rx_admissions=2`` reproduces SafeDrug's filter of patients
    with one admission in PRESCRIPTIONS. If ``stats`` is given it is filled with the counts of
    every stage (rows read, NDCs unmapped, visits and patients kept, vocabulary sizes). Every bad
    input raises :class:`DataError`. See the module docstring for the differences from SafeDrug.
    """
    _check_options(atc_level, visit_order, {
        "top_diag": top_diag, "top_proc": top_proc, "top_med": top_med, "min_code_freq":
        min_code_freq, "min_visits": min_visits, "min_rx_admissions": min_rx_admissions,
    })
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(
            f"not a directory; expected one holding the tables {', '.join(REQUIRED_TABLES)}",
            path=directory,
        )
    paths = _find_tables(directory)
    st: dict = {name: {} for name in REQUIRED_TABLES}

    diag_raw = _read_icd(paths["DIAGNOSES_ICD"], st["DIAGNOSES_ICD"])
    proc_raw = _read_icd(paths["PROCEDURES_ICD"], st["PROCEDURES_ICD"])
    rx = st["PRESCRIPTIONS"]
    med_raw, rx_adm = _read_prescriptions(paths["PRESCRIPTIONS"], atc_level, rx)
    if min_rx_admissions > 1:  # SafeDrug's process_visit_lg2, before the top-k count as there
        per_subject: dict[int, int] = {}
        for subject, _ in rx_adm:
            per_subject[subject] = per_subject.get(subject, 0) + 1
        few = {subject for subject, n in per_subject.items() if n < min_rx_admissions}
        med_raw = {v: c for v, c in med_raw.items() if v[0] not in few}
        rx["patients_dropped_min_rx_admissions"] = len(few)

    diag = _filter_codes(diag_raw, top_diag, min_code_freq, st["DIAGNOSES_ICD"])
    proc = _filter_codes(proc_raw, top_proc, min_code_freq, st["PROCEDURES_ICD"])
    med = _filter_codes(med_raw, top_med, min_code_freq, st["PRESCRIPTIONS"])

    # SafeDrug's inner join on (SUBJECT_ID, HADM_ID).
    patients: dict[int, list[int]] = {}
    for s, h in diag:
        if (s, h) in proc and (s, h) in med:
            patients.setdefault(s, []).append(h)
    st["visits_joined"] = sum(map(len, patients.values()))
    st["patients_joined"] = len(patients)
    patients = {s: sorted(hs) for s, hs in sorted(patients.items()) if len(hs) >= min_visits}
    st["patients_dropped_min_visits"] = st["patients_joined"] - len(patients)
    if not patients:
        raise DataError(
            "no visit has diagnoses, procedures and medications together after filtering "
            f"(visits with codes: diagnoses {st['DIAGNOSES_ICD']['visits_after_filter']}, "
            f"procedures {st['PROCEDURES_ICD']['visits_after_filter']}, "
            f"medications {st['PRESCRIPTIONS']['visits_after_filter']}; in all three: "
            f"{st['visits_joined']}; patients with >= {min_visits} of them: 0)",
            path=directory,
        )
    if visit_order == "admittime" and "ADMISSIONS" in paths:
        _admission_order(paths["ADMISSIONS"], patients, st.setdefault("ADMISSIONS", {}))
        st["visit_order"] = "admittime"
    else:
        st["visit_order"] = "hadm"  # already sorted by HADM_ID, SafeDrug's order

    # Vocabularies by first appearance while walking the records (SafeDrug's Voc.add_sentence).
    vocs: list[dict[str, int]] = [{}, {}, {}]
    records = []
    for s, hadms in patients.items():
        visits = []
        for h in hadms:
            visit = []
            for voc, codes in zip(vocs, (diag[(s, h)], proc[(s, h)], med[(s, h)]), strict=True):
                visit.append([voc.setdefault(c, len(voc)) for c in codes])
            visits.append(visit)
        records.append(visits)
    st["visits"] = sum(map(len, records))
    st["patients"] = len(records)
    st["vocab"] = {"diag": len(vocs[0]), "proc": len(vocs[1]), "med": len(vocs[2])}
    if stats is not None:
        stats.update(st)
    return MedicalRecords.from_nested(
        records, *(list(v) for v in vocs),
        patient_ids=[str(s) for s in patients], source="mimic3", ddi_pairs=None,
    )
