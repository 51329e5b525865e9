"""The parity table of docs/parity.md from a ``bench/parity.sh`` folder: each model natively and
in RecBole 1.2.1, mean ± std over the seeds both sides finished, and the gap in units of the
larger seed-to-seed std (a gap within about 2 of those is seed noise at three seeds).

    python bench/parity_table.py OUT
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METRICS = ("recall@20", "ndcg@20", "recall@10", "ndcg@10")


def _cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _gap(ours: list[float], ref: list[float]) -> str:
    diff = statistics.mean(ours) - statistics.mean(ref)
    if len(ours) < 2 or len(ref) < 2:
        return f"{diff:+.4f}"
    spread = max(statistics.stdev(ours), statistics.stdev(ref), 1e-12)
    return f"{diff:+.4f} ({diff / spread:+.1f} σ)"


def table(out: Path) -> str:
    """Markdown rows: model, split, metric, native, RecBole, gap. Every ``recbole*.jsonl`` of
    ``out`` is read; a RecBole variant named ``"MODEL (…)"`` is held against native ``MODEL``."""
    ref = [json.loads(line) for f in sorted(out.glob("recbole*.jsonl"))
           for line in f.read_text().splitlines()]
    native = json.loads((out / "native" / "compare.json").read_text())
    lines = ["| model | split | metric | native | RecBole 1.2.1 | native − RecBole | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for model in dict.fromkeys(r["model"] for r in ref):
        row = model.split(" (")[0]
        mine = {r["seed"]: r for r in native if r["row"] == row and "refused" not in r}
        theirs = {r["seed"]: r for r in ref if r["model"] == model}
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            continue
        for split, key in (("valid", "val"), ("test", "test")):
            for m in METRICS:
                a = [mine[s][key][m] for s in seeds]
                b = [theirs[s][split][m] for s in seeds]
                lines.append(f"| {model} | {split} | {m} | {_cell(a)} | {_cell(b)} | "
                             f"{_gap(a, b)} | {' '.join(map(str, seeds))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
