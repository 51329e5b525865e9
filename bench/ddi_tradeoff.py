"""Medication safety on the visit split: Jaccard, F1, PRAUC, DDI rate and set size per model, and
the Jaccard-against-DDI-rate curve over the set rule's penalty weight.

    diffkg-fast data build --source synthetic --set split=visit --out visit.npz
    python bench/ddi_tradeoff.py --data visit.npz --seeds 421 422 423 --threads 1 \\
        [--rows ROW ...] [--curve-rows ROW ...] [--set key=value ...] [--runs DIR] \\
        [--out bench/results/ddi-tradeoff.json] [--png docs/medication-safety-tradeoff.png]

Per row and seed: train with the preset (``medication``: Params.py with 6 epochs), select the
epoch on validation Recall@20, choose the set rules on the validation visits (the plain rule by
Jaccard; the DDI-aware one by Jaccard under ``target_ddi``, :mod:`diffkg_fast.eval.set_choice`)
and evaluate the test visits once with them. The curve rows add, on the test visits, the whole
penalty family of their chosen base rule (``W`` in :data:`CURVE_W`, then ``avoid``): no choice
is made from it. Prints the table (mean ± std over seeds) and writes every run's numbers as
JSON and the curve as a PNG, both atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from diffkg_fast.data.build import parse_sets
from diffkg_fast.data.open import open_dataset
from diffkg_fast.eval.medication import ddi_rate, visit_med_matrix
from diffkg_fast.eval.set_choice import PENALTY_WEIGHTS
from diffkg_fast.eval.sets import SetRule
from diffkg_fast.train import train
from diffkg_fast.train.config import config_defaults, resolve_config
from diffkg_fast.train.evaluation import SPLIT_ID, set_metrics, visit_arrays
from diffkg_fast.train.selection import SelectionError
from diffkg_fast.utils.io import atomic_write

ROWS: dict[str, dict[str, Any]] = {
    "MostPop": {"model": "mostpop"},
    "LightGCN": {"model": "lightgcn"},
    "LightGCN + DDI loss": {"model": "lightgcn", "ddi_loss": True},
    "DiffKG": {},
    "DiffKG + DDI loss": {"ddi_loss": True},
    # SafeDrug's constant 0.0005 was set for its own BCE loss; 100 times it, to see the option
    # act on a BPR model (docs/medication-safety.md).
    "DiffKG + DDI loss, ddi_scale 0.05": {"ddi_loss": True, "ddi_scale": 0.05},
    # Table 3 baselines that score unseen patients from their known medications.
    "MultiVAE": {"model": "multivae"},
    "CDAE": {"model": "cdae"},
    "DiffRec": {"model": "diffrec"},
}
CURVE_W = PENALTY_WEIGHTS  # the choice's own grid
METRICS = ("jaccard", "f1", "prauc", "ddi_rate", "avg_meds")
# SafeDrug's published test figures (Yang et al., IJCAI 2021, Table 2: SafeDrug on the
# SafeDrug-processed MIMIC-III): another cohort, drawn for orientation only.
SAFEDRUG = {"jaccard": 0.5213, "f1": 0.6768, "prauc": 0.7647, "ddi_rate": 0.0589}


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _one(ds: Any, row: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    keys = config_defaults(ROWS[row].get("model", "diffkg"))
    extra = {k: v for k, v in parse_sets(args.set).items() if k in keys}
    cfg = resolve_config(None, {**extra, **ROWS[row], "seed": seed}, None, preset=args.preset)
    t0 = time.perf_counter()
    out = None if args.runs is None else f"{args.runs}/{row.replace(' ', '_')}-{seed}"
    try:
        res = train(ds, cfg, log=lambda _: None, out_dir=out)
    except SelectionError as exc:  # a model that cannot score the held-out patients
        if "cannot score a patient" not in str(exc):
            raise
        print(f"seed {seed} {row:<22} refused: {exc}", flush=True)
        return {"row": row, "seed": seed, "refused": str(exc)}
    secs = time.perf_counter() - t0
    assert res.sets is not None, "the trade-off needs a visit-split dataset"
    rec: dict[str, Any] = {"row": row, "seed": seed, "seconds": secs,
                           "best_epoch": res.best_epoch, "val": res.val, "test": res.test,
                           "sets": res.sets.to_dict(), "config": cfg.to_dict()}
    if row in args.curve_rows:
        v = visit_arrays(res.model, ds, "test", cfg["test_batch"])
        base = res.sets.plain
        rules = [base.with_ddi("penalty", w) if w else base for w in CURVE_W]
        rules.append(base.with_ddi("avoid"))
        rec["curve"] = [{"rule": r.describe(), **{k: set_metrics(v, ds, r)[k] for k in METRICS}}
                        for r in rules]
    print(f"seed {seed} {row:<22} set {res.sets.plain.describe():<18} DDI-aware "
          f"{res.sets.safe.describe():<28} test jaccard {res.test['med_jaccard']:.4f} "
          f"ddi {res.test['med_ddi_rate']:.4f} -> {res.test.get('safe_jaccard', float('nan')):.4f}"
          f" ddi {res.test.get('safe_ddi_rate', float('nan')):.4f} ({secs:.0f} s)", flush=True)
    return rec


def _table(runs: list[dict[str, Any]], rows: list[str]) -> list[str]:
    out = ["| model | set rule (chosen on validation) | Jaccard | F1 | PRAUC | DDI rate | "
           "avg meds |", "|" + " --- |" * 7]
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        if any("refused" in r for r in mine):
            out.append(f"| {row} | cannot score patients it has never seen | | | | | |")
            continue
        for prefix, which in (("med", "plain"), ("safe", "safe")):
            rules = Counter(_describe(r["sets"][which]) for r in mine)
            rule = ", ".join(f"{k} ({n}/{len(mine)})" for k, n in rules.most_common())
            cells = [_cell([r["test"][f"{'med' if m == 'prauc' else prefix}_{m}"] for r in mine])
                     for m in METRICS]
            label = "plain: " if which == "plain" else "DDI-aware: "
            out.append(f"| {row} | {label}{rule} | " + " | ".join(cells) + " |")
    return out


def _describe(d: dict[str, Any]) -> str:
    return SetRule.from_dict(d).describe()


def _plot(runs: list[dict[str, Any]], truth_rate: float, target: float, path: str,
          labelled: str = "DiffKG") -> None:
    """Mean Jaccard against mean DDI rate over the seeds, one line per curve row (error bars:
    one std over seeds, both axes), its validated choice starred, the ``W`` of ``labelled``'s
    points written, SafeDrug's published point and the two reference rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in dict.fromkeys(r["row"] for r in runs if "curve" in r):  # refused rows have none
        mine = [r for r in runs if r["row"] == row and "curve" in r]
        ddi = np.array([[c["ddi_rate"] for c in r["curve"]] for r in mine])
        jac = np.array([[c["jaccard"] for c in r["curve"]] for r in mine])
        many = len(mine) > 1
        line = ax.errorbar(ddi.mean(0), jac.mean(0), xerr=ddi.std(0, ddof=1) if many else None,
                           yerr=jac.std(0, ddof=1) if many else None, marker="o", ms=3,
                           capsize=0, lw=1.2, elinewidth=0.6, ecolor=(0, 0, 0, 0.25),
                           label=f"{row}: penalty W")
        chosen = [(r["test"]["safe_ddi_rate"], r["test"]["safe_jaccard"]) for r in mine]
        ax.scatter(*zip(*chosen, strict=True), marker="*", s=110, color=line[0].get_color(),
                   edgecolor="black", linewidth=0.4, zorder=5,
                   label=f"{row}: W chosen on validation (each seed)")
        if row != labelled:
            continue
        names = [c["rule"].split(", ")[-1] for c in mine[0]["curve"]]
        for x, y, t in zip(ddi.mean(0), jac.mean(0), names, strict=True):
            if t in ("penalty=0.1", "penalty=0.2", "penalty=0.5", "penalty=1", "avoid") \
                    or ":" in t:
                ax.annotate("W=0" if ":" in t else t.replace("penalty=", "W="), (x, y),
                            fontsize=7, xytext=(5, 4), textcoords="offset points")
    ax.scatter([SAFEDRUG["ddi_rate"]], [SAFEDRUG["jaccard"]], marker="D", color="black")
    ax.annotate("SafeDrug as published: MIMIC-III,\nanother cohort's figure",
                (SAFEDRUG["ddi_rate"], SAFEDRUG["jaccard"]), fontsize=7, xytext=(7, -3),
                textcoords="offset points", va="top")
    ax.set_xlim(-0.003, max(ax.get_xlim()[1], truth_rate, SAFEDRUG["ddi_rate"]) * 1.12)
    bottom = ax.get_ylim()[0]
    ax.axvline(truth_rate, ls=":", color="gray")
    ax.text(truth_rate, bottom, " prescriptions'\n own DDI rate", fontsize=7, color="gray",
            va="bottom")
    ax.axvline(target, ls="--", color="gray", lw=0.8)
    ax.text(target, bottom, "target_ddi ", fontsize=7, color="gray", va="bottom", ha="right")
    ax.set_xlabel("DDI rate of the recommended sets (test visits; lower is safer)")
    ax.set_ylabel("Jaccard (test visits)")
    ax.set_title("Default synthetic cohort, visit split: Jaccard against DDI rate "
                 f"(mean of {len({r['seed'] for r in runs})} seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=130)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a visit-split dataset (.npz)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[421])
    ap.add_argument("--preset", default="medication")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    ap.add_argument("--include", nargs="*", default=[], metavar="JSON",
                    help="earlier --out files whose runs join the table and the plot (rows "
                         "already there are not trained again)")
    ap.add_argument("--curve-rows", nargs="*", metavar="ROW",
                    default=["MostPop", "DiffKG", "DiffKG + DDI loss",
                             "DiffKG + DDI loss, ddi_scale 0.05"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runs", default=None, help="keep every run folder under this directory")
    ap.add_argument("--out", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = open_dataset(args.data)
    runs: list[dict[str, Any]] = []
    for path in args.include:
        with open(path, encoding="utf-8") as f:
            runs += json.load(f)["runs"]
    done = {(r["row"], r["seed"]) for r in runs}
    runs += [_one(ds, row, seed, args) for seed in args.seeds for row in args.rows
             if (row, seed) not in done]
    shown = list(dict.fromkeys([r["row"] for r in runs] + args.rows))
    assert ds.visits is not None
    # The prescriptions' own rate: where a model that copied clinicians would sit.
    truth_rate = ddi_rate(visit_med_matrix(ds.visits, ds.n_items, SPLIT_ID["test"]),
                          ds.triplets_of("ddi"), ds.n_items)
    target = next(r["sets"]["target_ddi"] for r in runs if "sets" in r)
    print(f"\n{args.data}, preset {args.preset}, seeds {args.seeds}, {args.threads} thread(s)"
          f"{' with ' + ', '.join(args.include) if args.include else ''}; "
          f"test prescriptions' DDI rate {truth_rate:.4f}; target_ddi {target}\n")
    print("\n".join(_table(runs, shown)))
    if args.out:
        with atomic_write(args.out, "w") as f:
            json.dump({"truth_ddi_rate": truth_rate, "runs": runs}, f, indent=2)
    if args.png:
        _plot(runs, truth_rate, target, args.png)


if __name__ == "__main__":
    main()
