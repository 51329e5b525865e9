"""Metrics as a table, JSON or CSV: what ``train`` prints and ``evaluate --format`` writes."""

from __future__ import annotations

import csv
import io
import json

from diffkg_fast.data.errors import DataError
from diffkg_fast.eval.ranking import KS

__all__ = ["FORMATS", "MED_COLS", "SAFE_COLS", "format_metrics"]

FORMATS = ("table", "json", "csv")
# The medication metrics of a visit-split evaluation (evaluation.py), in table order: the
# chosen set rule's, then the DDI-aware rule's (PRAUC reads the scores: no safe_ twin).
MED_COLS = ("med_jaccard", "med_f1", "med_prauc", "med_ddi_rate", "med_avg_meds")
SAFE_COLS = ("safe_jaccard", "safe_f1", "safe_ddi_rate", "safe_avg_meds")


def format_metrics(rows: dict[str, dict[str, float]], fmt: str = "table") -> str:
    """Recall and NDCG @ 10/20/40 of each split (the seed paper's Table 3 columns), plus the
    medication metrics :data:`MED_COLS` when the rows hold ``med_*`` keys (visit-split data) and
    :data:`SAFE_COLS` when they hold ``safe_*`` ones (the DDI-aware set rule's):
    an aligned table (the medication columns as a second block under the first, so that lines
    stay readable), JSON (every key) or CSV (one row per split, medication columns appended).

    JSON of a single split is its flat metrics dict (``{"recall@20": …}``); of several, one
    dict per split.
    """
    cols = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg")]
    has_med = any(k.startswith("med_") for m in rows.values() for k in m)
    has_safe = any(k.startswith("safe_") for m in rows.values() for k in m)
    blocks = [cols, list(MED_COLS)] if has_med else [cols]
    if has_safe:
        blocks.append(list(SAFE_COLS))
    if fmt == "json":
        obj = next(iter(rows.values())) if len(rows) == 1 else rows
        return json.dumps(obj, indent=2, sort_keys=True)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        flat = [c for block in blocks for c in block]
        w.writerow(["split", *flat])
        for split, m in rows.items():
            w.writerow([split, *(m.get(c, "") for c in flat)])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise DataError(f"unknown format; expected one of {FORMATS}", field="--format")
    lines: list[str] = []
    for block in blocks:
        width = max(11, *(len(c) + 2 for c in block))  # two spaces between long names
        lines.append(f"{'split':<6}" + "".join(f"{c:>{width}}" for c in block))
        for split, m in rows.items():
            lines.append(f"{split:<6}" + "".join(f"{m.get(c, float('nan')):>{width}.4f}"
                                                 for c in block))
    return "\n".join(lines)
