"""The large-KG scaling table and log-log plot from ``bench/bench_large_kg.py`` JSON files.

Run ``python bench/large_kg_scaling.py RESULTS.json [MORE.json ...] --png
docs/large-kg-scaling.png``: prints a markdown table (per size and mode: the training pass and
the rebuild, seconds per epoch, and peak RSS) and, per mode and hidden size with at least two
sizes, the fitted exponent ``b`` of ``seconds ∝ E^b`` (least squares on the logs); writes the
plot (needs matplotlib, the ``viz`` extra).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """Every result without an error, from each file's ``results``."""
    out = []
    for p in paths:
        out += [r for r in json.loads(p.read_text())["results"] if "error" not in r]
    return out


def full(r: dict[str, Any], part: str) -> float:
    """A pass's seconds per epoch: measured, or extrapolated from a limited run."""
    return r.get(f"{part}_full_s_extrapolated", r[f"{part}_s"])


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / \
        sum((x - mx) ** 2 for x in xs)


def curves(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], list[tuple[float, float]]]:
    """``(mode, hidden, part) -> [(entities, seconds per epoch)]``, sorted by size."""
    out: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        for part in ("train", "rebuild"):
            out[(r["mode"], r["hidden"], part)].append((r["n_entities"], full(r, part)))
    return {k: sorted(v) for k, v in out.items()}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| entities | mode | H | training pass (s) | rebuild (s) | peak RSS (MB) | batches "
             "run |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["hidden"], r["mode"], r["n_entities"])):
        ext = "" if r["batches_run"] == r["batches_full"] else " (extrapolated)"
        lines.append(f"| {r['n_entities']:,} | {r['mode']} | {r['hidden']} | "
                     f"{full(r, 'train'):.1f}{ext} | {full(r, 'rebuild'):.1f}{ext} | "
                     f"{r['peak_rss_mb']:.0f} | {r['batches_run']} of {r['batches_full']} |")
    return "\n".join(lines)


def loglog(lines: list[tuple[str, str, list[tuple[float, float]]]], ylabel: str,
           png: Path) -> None:
    """A log-log plot of ``(label, matplotlib style, [(entities, seconds)])`` lines, each label
    with its fitted slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, style, pts in lines:
        xs, ys = zip(*pts, strict=True)
        ax.loglog(xs, ys, style, label=f"{label} (slope {slope(pts):.2f})")
    ax.set_xlabel("KG entities (Alibaba-iFashion's proportions)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def plot(cs: dict[tuple[str, int, str], list[tuple[float, float]]], png: Path) -> None:
    loglog([(f"{mode}, H={hidden}, {part}", "o-" if part == "train" else "s--", pts)
            for (mode, hidden, part), pts in sorted(cs.items()) if len(pts) >= 2],
           "seconds per epoch (one thread)", png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--png", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = load(a.results)
    print(table(rows))
    cs = curves(rows)
    for (mode, hidden, part), pts in sorted(cs.items()):
        if len(pts) >= 2:
            print(f"{mode} H={hidden} {part}: seconds ∝ E^{slope(pts):.2f} "
                  f"({len(pts)} sizes, {pts[0][0]:,.0f}-{pts[-1][0]:,.0f} entities)")
    if a.png:
        plot(cs, a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
