"""Code dictionaries shipped with the package: ICD-9 titles, ATC class names, and the DDI pairs.

The files live in ``diffkg_fast/data/bundled/`` (sources and licences in its NOTICE). Everything is
read lazily and cached: importing this module reads nothing.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import os
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from diffkg_fast.data.errors import DataError, excerpt


def bundled_path(*parts: str) -> Path:
    """Path of a shipped data file, e.g. ``bundled_path("ddi", "drug-atc.csv")``."""
    return Path(str(resources.files("diffkg_fast.data").joinpath("bundled", *parts)))


def open_bytes(path: str | os.PathLike[str]) -> io.BufferedIOBase:
    """Open a file, gzip-compressed or not (by content, not name), as its decompressed bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")  # type: ignore[return-value]


def open_text(path: str | os.PathLike[str]) -> io.TextIOBase:
    """Open ``.csv`` or ``.csv.gz`` (by content, not name) as UTF-8 text."""
    return io.TextIOWrapper(open_bytes(path), encoding="utf-8", newline="")


@functools.lru_cache(maxsize=4)
def icd9_titles(kind: str) -> dict[str, str]:
    """Undotted ICD-9 code -> long title; ``kind`` is ``"diag"`` or ``"proc"`` (MIMIC-III)."""
    name = {"diag": "D_ICD_DIAGNOSES.csv.gz", "proc": "D_ICD_PROCEDURES.csv.gz"}[kind]
    path = bundled_path("mimic3-demo", name)
    with open_text(path) as f:
        rows = csv.DictReader(f)
        return {r["ICD9_CODE"]: r["LONG_TITLE"] or r["SHORT_TITLE"] for r in rows}


@functools.lru_cache(maxsize=1)
def atc_names() -> dict[str, str]:
    """ATC class code (levels 1–4) -> WHO class name."""
    out: dict[str, str] = {}
    for name in ("atc3_names.csv", "atc4_names.csv"):
        with open_text(bundled_path("codes", name)) as f:
            for r in csv.DictReader(f):
                out.setdefault(r["code"], r["name"])
    return out


# ATC code length of each level: A / A10 / A10B / A10BA / A10BA02.
ATC_LEVEL_LENGTH = {1: 1, 2: 3, 3: 4, 4: 5, 5: 7}


def atc_level(code: str) -> int:
    """ATC level of a code from its length (raises :class:`DataError` on a malformed code)."""
    for level, n in ATC_LEVEL_LENGTH.items():
        if len(code) == n:
            return level
    raise DataError(f"{excerpt(code)} is not an ATC code (length 1, 3, 4, 5 or 7)", field="ATC")


def atc_ancestors(code: str) -> list[str]:
    """Parent classes of an ATC code, nearest first: ``N02B -> [N02, N]``."""
    level = atc_level(code)
    return [code[: ATC_LEVEL_LENGTH[k]] for k in range(level - 1, 0, -1)]


@functools.lru_cache(maxsize=1)
def _ddi_sources() -> tuple[dict[str, tuple[str, ...]], tuple[tuple[str, str], ...]]:
    cid_atc: dict[str, tuple[str, ...]] = {}
    with open(bundled_path("ddi", "drug-atc.csv"), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\r\n").split(",")
            if parts[0]:
                cid_atc[parts[0]] = tuple(a for a in parts[1:] if a)
    with open(bundled_path("ddi", "drug-DDI-top40.csv"), encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        pairs = tuple((r["STITCH 1"], r["STITCH 2"]) for r in rows)
    return cid_atc, pairs


def ddi_pairs(med_voc: Sequence[str]) -> np.ndarray:
    """Interacting medication pairs ``(i, j)``, ``i < j``, by SafeDrug's ``get_ddi_matrix`` rule.

    Exactly as SafeDrug / GAMENet: each STITCH CID maps to the 4-character prefixes (ATC level 3)
    of its ATC codes that prefix at least one vocabulary code; a TWOSIDES pair (top-40 side-effect
    types, already filtered in the shipped file) links every vocabulary code under the first
    CID's ATC-3 classes to every one under the second's, both directions, never a code to itself.
    """
    short = [c for c in med_voc if len(c) < 4]
    if short:
        raise DataError(
            f"SafeDrug's DDI rule maps interactions at ATC level 3 (4 characters); medication "
            f"codes such as {short[0]!r} are coarser. Build with atc_level >= 3 or ddi=false",
            field="ddi",
        )
    by_prefix: dict[str, list[int]] = defaultdict(list)
    for i, code in enumerate(med_voc):
        by_prefix[code[:4]].append(i)
    cid_atc, pairs = _ddi_sources()
    cid2atc3 = {
        cid: {a[:4] for a in atcs if a[:4] in by_prefix} for cid, atcs in cid_atc.items()
    }
    found: set[tuple[int, int]] = set()
    for c1, c2 in pairs:
        for a in cid2atc3.get(c1, ()):
            for b in cid2atc3.get(c2, ()):
                for i in by_prefix[a]:
                    for j in by_prefix[b]:
                        if i != j:
                            found.add((min(i, j), max(i, j)))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.array(sorted(found), dtype=np.int64)
