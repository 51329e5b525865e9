"""DiffKG against its baselines and its ablations in one harness: the README's results table.

    python bench/compare_models.py [--seeds 421 422 423] [--preset medication] [--threads 2]
                                   [--set key=value ...] [--out bench/results/compare.json]

Every model trains on the same dataset (the default synthetic cohort unless ``--data``) with the
same preset and seed (a preset's keys a model does not take are skipped, and so are ``--set``
keys); selection on validation Recall@20, test ranked once. Rows: MostPop,
LightGCN (BPR; at the preset's epochs and to convergence), DiffKG, DiffKG without diffusion
(the ablation), DiffKG without patient codes (DiffKG as published). Prints one markdown table
(mean ± std over seeds when several) and writes every run's metrics and timings as JSON
(atomically).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from diffkg_fast.data.build import parse_sets
from diffkg_fast.data.open import open_dataset
from diffkg_fast.train import train
from diffkg_fast.train.config import config_defaults, resolve_config
from diffkg_fast.train.selection import SelectionError
from diffkg_fast.utils.io import atomic_write

ROWS: dict[str, dict[str, Any]] = {
    "MostPop": {"model": "mostpop"},
    "LightGCN": {"model": "lightgcn"},
    # The same baseline trained to convergence, so that no gain is an under-trained baseline's.
    "LightGCN, 60 epochs": {"model": "lightgcn", "epoch": 60, "patience": 5},
    "DiffKG": {},
    "DiffKG without diffusion": {"use_diffusion": False},
    "DiffKG without patient codes": {"patient_codes": False},
}
COLS = ("recall@20", "ndcg@20")
MED_COLS = ("med_jaccard", "med_f1", "med_prauc", "med_ddi_rate", "med_avg_meds")


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--seeds", type=int, nargs="+", default=[421])
    ap.add_argument("--preset", default="medication")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                    help=f"rows to run (default: all): {list(ROWS)}")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = open_dataset(args.data)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for row in args.rows:
            # --set values reach the rows whose model takes them (ssl_reg: not LightGCN).
            keys = config_defaults(ROWS[row].get("model", "diffkg"))
            extra = {k: v for k, v in parse_sets(args.set).items() if k in keys}
            sets = {**extra, **ROWS[row], "seed": seed}
            cfg = resolve_config(None, sets, None, preset=args.preset)
            t0 = time.perf_counter()
            try:
                res = train(ds, cfg, log=lambda _: None)
            except SelectionError as exc:  # e.g. LightGCN on the visit split's new patients
                runs.append({"row": row, "seed": seed, "refused": str(exc)})
                print(f"seed {seed} {row:<30} refused: {exc}", flush=True)
                continue
            secs = time.perf_counter() - t0
            runs.append({"row": row, "seed": seed, "best_epoch": res.best_epoch,
                         "epochs": len(res.history), "seconds": secs, "val": res.val,
                         "test": res.test, "config": cfg.to_dict()})
            print(f"seed {seed} {row:<30} val R@20 {res.val['recall@20']:.4f} "
                  f"test R@20 {res.test['recall@20']:.4f} (best epoch {res.best_epoch} of "
                  f"{len(res.history)}, {secs:.0f} s)", flush=True)
    print(f"\n{args.data}, preset {args.preset}, seeds {args.seeds}, {args.threads} thread(s)\n")
    done = [r for r in runs if "refused" not in r]
    med = [c for c in MED_COLS if done and c in done[0]["test"]]  # visit-split data only
    head = [f"{s} {n}" for s in ("val", "test") for n in ("Recall@20", "NDCG@20")]
    head += [f"test {c[4:]}" for c in med]
    print("| model | " + " | ".join(head) + " | best epoch / epochs | s / run |")
    print("|" + " --- |" * (len(head) + 3))
    for row in args.rows:
        mine = [r for r in runs if r["row"] == row]
        if any("refused" in r for r in mine):
            print(f"| {row} | cannot score patients it has never seen (no number) |")
            continue
        cells = [_cell([r[split][c] for r in mine]) for split in ("val", "test") for c in COLS]
        cells += [_cell([r["test"][c] for r in mine]) for c in med]
        epochs = " ".join(f"{r['best_epoch']}/{r['epochs']}" for r in mine)
        print(f"| {row} | " + " | ".join(cells)
              + f" | {epochs} | {statistics.mean(r['seconds'] for r in mine):.0f} |")
    if args.out:
        with atomic_write(args.out, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
