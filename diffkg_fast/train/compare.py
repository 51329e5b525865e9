"""``diffkg-fast compare``: every registered model on one dataset and split, over a list of
seeds, in one table (the seed paper's Table 3 columns and more).

Rows: one per registered model under its defaults (the preset's keys it takes), plus DiffKG's
variants (:data:`DIFFKG_ROWS`: as published, with patient codes, each with and without
diffusion). Every run is the trainer's (selection on validation, test ranked once). The
comparison resumes: ``OUT/compare.json`` holds every finished run, rewritten atomically after
each, and a run already in it is not trained again. ``OUT/compare.md`` holds the tables (mean ±
std over seeds) and ``OUT/compare.png`` a bar chart of validation and test Recall@20 and NDCG@20
with one-std error bars.

A model that cannot score patients it has never seen (the visit split's held-out patients) is
not trained there: its row says so instead of printing a number.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from diffkg_fast.data.build import parse_sets
from diffkg_fast.data.errors import DataError, cut, excerpt
from diffkg_fast.data.open import SYNTHETIC, open_dataset
from diffkg_fast.model.registry import MODELS
from diffkg_fast.train.config import RunConfig, config_defaults, resolve_config
from diffkg_fast.train.run_folder import RunFolder, dataset_fingerprint
from diffkg_fast.train.selection import SelectionError
from diffkg_fast.train.trainer import train
from diffkg_fast.utils.io import atomic_write, read_bounded, writing

__all__ = ["DIFFKG_ROWS", "cmd_compare", "compare", "configs", "format_tables", "rows"]

# DiffKG as published (ID embeddings only) and with patient codes, each with its ablation.
DIFFKG_ROWS: dict[str, dict[str, Any]] = {
    "DiffKG": {"model": "diffkg"},
    "DiffKG without diffusion": {"model": "diffkg", "use_diffusion": False},
    "DiffKG as published (no patient codes)": {"model": "diffkg", "patient_codes": False},
    "DiffKG as published, without diffusion": {"model": "diffkg", "patient_codes": False,
                                               "use_diffusion": False},
}
RANK_COLS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "recall@40", "ndcg@40")
# Visit-split data only: the set rule chosen on validation (med_) and its DDI-aware twin (safe_;
# docs/medication-safety.md).
MED_COLS = ("med_jaccard", "med_f1", "med_prauc", "med_ddi_rate", "med_avg_meds",
            "safe_jaccard", "safe_f1", "safe_ddi_rate", "safe_avg_meds")
REFUSED = "cannot score patients it has never seen"


def rows() -> dict[str, dict[str, Any]]:
    """Every row a comparison can run: each registered model but DiffKG by its name, then
    DiffKG's variants."""
    out = {cls.__name__: {"model": name} for name, cls in sorted(MODELS.items())
           if name != "diffkg"}
    return {**out, **DIFFKG_ROWS}


def _inputs(cls_name: str, run: dict[str, Any]) -> str:
    """What the row's model knows of a patient, for the table."""
    cfg = run.get("config") or {}
    if cfg.get("patient_codes"):
        return "codes + id"
    return {"MostPop": "none"}.get(cls_name, "history" if run.get("reads_meds") else "id")


def configs(labels: list[str], seeds: list[int], preset: str | None,
            sets: dict[str, Any]) -> dict[tuple[str, int], RunConfig]:
    """Every run's config, checked (a :class:`DataError` naming the key): each row takes the
    ``sets`` keys its model has; a key no model takes (a typo) is an error, as ``seed`` is
    (``--seeds``)."""
    table = rows()
    models = [table[label].get("model", "diffkg") for label in labels]
    taken = set().union(*(config_defaults(m) for m in MODELS))
    for key in sets:
        if key == "seed":
            raise DataError("give the seeds with --seeds", field=key)
        if key not in taken:  # the keys of all models are too many to list
            close = difflib.get_close_matches(key, sorted(taken), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise DataError(f"no model takes this key{hint}", field=key)
    out = {}
    for seed in seeds:
        for label, model in zip(labels, models, strict=True):
            keys = config_defaults(model)
            values = {k: v for k, v in {**sets, **table[label]}.items() if k in keys}
            out[(label, seed)] = resolve_config(None, {**values, "seed": seed}, None, preset)
    return out


def _run_one(ds, label: str, cfg: RunConfig, seed: int, log) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = train(ds, cfg, log=lambda _: None)
    except SelectionError as exc:
        if "cannot score a patient" not in str(exc):
            raise
        log(f"seed {seed} {label}: {REFUSED}")
        return {"row": label, "seed": seed, "refused": str(exc), "config": cfg.to_dict()}
    secs = time.perf_counter() - t0
    log(f"seed {seed} {label}: val R@20 {res.val['recall@20']:.4f} test R@20 "
        f"{res.test['recall@20']:.4f} (best epoch {res.best_epoch} of {len(res.history)}, "
        f"{secs:.0f} s)")
    epoch_s = [sum(h["time"].values()) for h in res.history]
    return {"row": label, "seed": seed, "best_epoch": res.best_epoch,
            "epochs": len(res.history), "seconds": secs,
            "epoch_seconds": statistics.median(epoch_s), "val": res.val, "test": res.test,
            "config": cfg.to_dict(), "reads_meds": "meds" in res.model.patient_inputs}


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _read_runs(path: Path) -> list[dict[str, Any]]:
    """The runs of ``path`` (none when it does not exist), each of the form :func:`compare`
    writes; anything else is a :class:`DataError` naming the file."""
    if not path.exists():
        return []
    try:
        runs = json.loads(read_bounded(path, 64 << 20, "compare.json"))
    except (ValueError, RecursionError) as exc:  # DataError (too large) is a ValueError
        raise DataError(f"not a readable compare.json: {cut(str(exc))}", path=path) from exc

    def metrics(d: Any) -> bool:
        return isinstance(d, dict) and all(isinstance(k, str) and _is_num(v)
                                           for k, v in d.items())

    def finished(r: dict[str, Any]) -> bool:
        return (all(metrics(r.get(k)) for k in ("val", "test"))
                and all(_is_num(r.get(k)) for k in ("best_epoch", "epochs", "seconds",
                                                    "epoch_seconds")))

    for i, r in enumerate(runs if isinstance(runs, list) else [None]):
        ok = (isinstance(r, dict) and isinstance(r.get("row"), str)
              and isinstance(r.get("seed"), int) and isinstance(r.get("config"), dict)
              and (isinstance(r.get("refused"), str) or finished(r)))
        if not ok:
            raise DataError(f"run {i} is {excerpt(r)}: not a run of diffkg-fast compare",
                            path=path)
    return runs


def _same_run(old: dict[str, Any], cfg: RunConfig, fingerprint: str, path: Path) -> None:
    """Refuse to reuse a finished run of another dataset or config: it would be reported as
    this comparison's."""
    where = f"its run of {old['row']!r} at seed {old['seed']}"
    if old.get("data") != fingerprint:
        raise DataError(f"{where} is of another dataset; give another --out or delete the "
                        "file", path=path)
    # A key the run predates counts as its default: a new option's default is the old
    # behaviour (results do not move), so the run is still this config's.
    default = config_defaults(cfg["model"])
    was = {k: old.get("config", {}).get(k, default.get(k)) for k in cfg.to_dict()}
    diff = [f"{k}: {excerpt(was[k])} vs now {excerpt(v)}"
            for k, v in cfg.to_dict().items() if was[k] != v]
    if diff:
        raise DataError(f"{where} has another config ({'; '.join(diff[:3])}); give another "
                        "--out or delete the file", path=path)


def compare(ds, labels: list[str], seeds: list[int], out_dir: Path, *, preset: str | None,
            sets: dict[str, Any], log=print) -> list[dict[str, Any]]:
    """Train every (row, seed) not yet in ``out_dir/compare.json``; returns all runs. A run
    already there is reused only if it was trained on this dataset with this config."""
    cfgs = configs(labels, seeds, preset, sets)
    fingerprint = dataset_fingerprint(ds)
    path = out_dir / "compare.json"
    runs = _read_runs(path)
    done = {(r["row"], r["seed"]): r for r in runs}
    for seed in seeds:
        for label in labels:
            cfg = cfgs[(label, seed)]
            if (label, seed) in done:
                _same_run(done[(label, seed)], cfg, fingerprint, path)
                continue
            runs.append({**_run_one(ds, label, cfg, seed, log), "data": fingerprint})
            with writing(path), atomic_write(path, "w") as f:
                json.dump(runs, f, indent=1)
    return runs


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def format_tables(runs: list[dict[str, Any]], labels: list[str], seeds: list[int]) -> str:
    """Markdown: the validation and test tables, mean ± std over ``seeds``."""
    done = [r for r in runs if "refused" not in r and r["seed"] in seeds]
    med = [c for c in MED_COLS if done and c in done[0]["test"]]
    out = []
    for split in ("val", "test"):
        cols = list(RANK_COLS) + (med if split == "test" else [])
        head = ["model", "inputs", *cols, "best epoch / epochs", "s / epoch", "s / run"]
        out += [f"**{'validation' if split == 'val' else 'test'}** (seeds {seeds})", "",
                "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for label in labels:
            mine = [r for r in runs if r["row"] == label and r["seed"] in seeds]
            if not mine:
                continue
            if any("refused" in r for r in mine):
                out.append(f"| {label} | | {REFUSED} |")
                continue
            cells = [_cell([r[split][c] for r in mine]) for c in cols]
            epochs = " ".join(f"{r['best_epoch']}/{r['epochs']}" for r in mine)
            out.append(f"| {label} | {_inputs(label, mine[0])} | " + " | ".join(cells)
                       + f" | {epochs} | {statistics.mean(r['epoch_seconds'] for r in mine):.1f}"
                       f" | {statistics.mean(r['seconds'] for r in mine):.0f} |")
        out.append("")
    out.append("inputs: what a row's model knows of a patient (id: its ID embedding; history: "
               "its known medications; codes: its diagnoses and procedures). The baselines use "
               "no patient codes.")
    return "\n".join(out)


def plot(runs: list[dict[str, Any]], labels: list[str], seeds: list[int], path: Path) -> bool:
    """Bars of val / test Recall@20 and NDCG@20 per row with one-std error bars; ``False``
    (nothing written) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    import numpy as np

    shown = [lb for lb in labels
             if any(r["row"] == lb and "refused" not in r for r in runs)]
    metrics = [("val", "recall@20"), ("test", "recall@20"), ("val", "ndcg@20"),
               ("test", "ndcg@20")]
    fig = Figure(figsize=(max(8, 1.1 * len(shown) + 3), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    for k, (split, m) in enumerate(metrics):
        vals = [[r[split][m] for r in runs if r["row"] == lb and r["seed"] in seeds
                 and "refused" not in r] for lb in shown]
        mean = [statistics.mean(v) for v in vals]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(np.arange(len(shown)) + (k - 1.5) * width, mean, width, yerr=std, capsize=2,
               label=f"{split} {m}")
    ax.set_xticks(np.arange(len(shown)), shown, rotation=25, ha="right", fontsize="small")
    ax.set_ylabel(f"mean over seeds {seeds} (± 1 std)")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.subplots_adjust(bottom=0.3, left=0.07, right=0.99, top=0.97)
    with writing(path), atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    return True


def cmd_compare(args: argparse.Namespace) -> int:
    """``diffkg-fast compare``: run (or resume) the comparison, write and print the tables.
    Every row's config is checked before the data loads; ``--out`` is locked while it runs."""
    table = rows()
    labels = args.rows or list(table)
    unknown = [lb for lb in labels if lb not in table]
    if unknown:
        raise DataError(f"unknown rows {unknown}; rows: {list(table)}", field="--rows")
    sets = parse_sets(args.set)
    configs(labels, args.seeds, args.preset, sets)  # the data's preset comes later (train's)
    spec = SYNTHETIC if args.data is None else args.data
    out = Path(args.out)
    created = not out.exists()
    try:
        with RunFolder(out).lock():
            return _compare_in(args, spec, labels, sets, out)
    finally:
        if created:  # a folder this command made and left empty
            with contextlib.suppress(OSError):
                out.rmdir()


def _compare_in(args: argparse.Namespace, spec: str, labels: list[str], sets: dict[str, Any],
                out: Path) -> int:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ds = open_dataset(spec)
    preset = args.preset or ("medication" if ds.visits is not None else "diffkg")
    runs = compare(ds, labels, args.seeds, out, preset=preset, sets=sets)
    text = (f"{spec}: {ds.n_users} patients, {ds.n_items} medications; "
            f"preset {preset}; {torch.get_num_threads()} thread(s)\n\n"
            + format_tables(runs, labels, args.seeds))
    with writing(out / "compare.md"), atomic_write(out / "compare.md", "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    if not plot(runs, labels, args.seeds, out / "compare.png"):
        print("note: matplotlib is not installed: no compare.png (pip install 'diffkg-fast[viz]')")
    return 0
