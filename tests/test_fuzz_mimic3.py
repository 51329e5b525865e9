"""Hypothesis fuzzing of the MIMIC-III CSV loader: valid records or a DataError, nothing else.

Rows mix good values with empty cells, quotes, commas, embedded newlines, stray carriage returns,
non-ASCII text, floats, negative and huge ids, and short rows; files are .csv or .csv.gz.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffkg_fast.data.errors import DataError
from diffkg_fast.data.mimic3 import load_mimic3
from diffkg_fast.data.records import MedicalRecords

# NDCs of the shipped maps that reach an ATC class (C01BA, A12CA) and one that does not map.
NDCS = ["00008084199", "00904224461", "99999999999", "0", ""]
IDS = st.sampled_from(["1", "2", "3", "10", "2.0", "-1", "x", "", "99999999999999999999", " 3"])
CODES = st.sampled_from(["4019", "25000", "V5861", "3893", "", " ", "40-19", "é1", '4"0', "a,b"])
JUNK = st.text(alphabet=st.sampled_from('ab,"\r\n 1é'), max_size=6)

HEADERS = {
    "DIAGNOSES_ICD": ["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"],
    "PROCEDURES_ICD": ["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"],
    "PRESCRIPTIONS": ["ROW_ID", "SUBJECT_ID", "HADM_ID", "DRUG", "NDC"],
}


GOOD_IDS = st.sampled_from(["1", "2", "3"])


def rows(good: list[str], value: st.SearchStrategy[str]) -> st.SearchStrategy[list[list[str]]]:
    """Mostly well-formed rows (so that loads succeed too), a few hostile ones mixed in."""
    ok = st.tuples(st.just("1"), GOOD_IDS, GOOD_IDS, st.just("1"), st.sampled_from(good))
    bad = st.tuples(st.just("1"), IDS, IDS, JUNK, value)
    short = bad.map(lambda r: list(r)[:3])
    hostile = st.lists(st.one_of(bad.map(list), short), min_size=1, max_size=2)
    none: st.SearchStrategy[list[list[str]]] = st.just([])
    return st.tuples(st.lists(ok.map(list), max_size=10),
                     st.one_of(none, none, none, hostile)).map(
        lambda parts: parts[0] + parts[1])


def write(d: Path, name: str, body: list[list[str]], gz: bool, raw_tail: str) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows([HEADERS[name], *body])
    data = (buf.getvalue() + raw_tail).encode()
    (d / f"{name}.csv{'.gz' if gz else ''}").write_bytes(gzip.compress(data) if gz else data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    diag=rows(["4019", "25000", "V5861"], CODES), proc=rows(["3893", "9604"], CODES),
    rx=rows(NDCS[:2], st.sampled_from(NDCS)),
    gz=st.booleans(), tail=st.one_of(st.just(""), st.just(""), JUNK),
)
def test_fuzz_load_mimic3(diag, proc, rx, gz, tail):
    d = Path(tempfile.mkdtemp())
    try:
        write(d, "DIAGNOSES_ICD", diag, gz, tail)
        write(d, "PROCEDURES_ICD", proc, gz, "")
        write(d, "PRESCRIPTIONS", rx, False, "")
        try:
            rec = load_mimic3(d, visit_order="hadm")
        except DataError as exc:
            assert str(d) in str(exc)  # the message names the file (or the directory)
            event("DataError")
        else:
            assert isinstance(rec, MedicalRecords)
            rec.validate()
            assert rec.n_visits >= 1
            event("loaded")
    finally:
        shutil.rmtree(d)
