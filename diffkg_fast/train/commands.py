"""``diffkg-fast train`` and ``diffkg-fast evaluate``: the code behind the two commands.

:mod:`diffkg_fast.cli` only wires argparse to :func:`cmd_train` and :func:`cmd_evaluate`.
Bad input (unknown or mistyped config key, unreadable file, incompatible checkpoint) raises
:class:`DataError`, which the CLI prints as one ``error:`` line with exit status 2.

Config precedence (:mod:`diffkg_fast.train.config_io`): :class:`DiffKGConfig` defaults, then
``--preset NAME`` (:mod:`diffkg_fast.model.presets`), then ``--config FILE`` (``.yaml``/``.yml``
read as YAML, anything else as JSON), then every ``--set key=value``, then ``--device``.
Progress bars, ``curves.png`` and TensorBoard logs come from :mod:`diffkg_fast.train.report`.

A run directory (``--out DIR``) holds what :func:`diffkg_fast.train.train` writes
(``checkpoint.pt``, ``config.json``, ``log.csv``) plus ``data.json``: which dataset the run used
and its fingerprint, so that ``evaluate`` and ``--resume`` find it again and refuse another one.
:func:`load_run` rebuilds a run's best state for ``evaluate`` and ``recommend``
(:mod:`diffkg_fast.train.recommend`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffkg_fast.data.build import build_dataset, parse_sets
from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.model.config import DiffKGConfig
from diffkg_fast.model.diffkg import DiffKG, LightGCN, MostPop
from diffkg_fast.ops.graph import KGCSR, norm_adjacency
from diffkg_fast.train.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    kg_from_tensor,
    load_checkpoint,
)
from diffkg_fast.train.config_io import resolve_config
from diffkg_fast.train.evaluation import KS, evaluate_split
from diffkg_fast.train.report import RunReporter
from diffkg_fast.train.trainer import patient_codes, train
from diffkg_fast.utils.io import atomic_write

__all__ = ["DATA_FILE", "LoadedRun", "cmd_evaluate", "cmd_train", "dataset_fingerprint",
           "evaluate_run", "format_metrics", "load_data", "load_run", "parse_sets",
           "resolve_config"]

DATA_FILE = "data.json"
SYNTHETIC = "synthetic"
FORMATS = ("table", "json", "csv")
# The medication metrics of a visit-split evaluation (evaluation.py), in table order.
MED_COLS = ("med_jaccard", "med_f1", "med_prauc", "med_ddi_rate", "med_avg_meds")


# ------------------------------------------------------------------ data
def load_data(spec: str) -> KGDataset:
    """``"synthetic"`` builds the default synthetic cohort; anything else is a dataset file."""
    return build_dataset(SYNTHETIC) if spec == SYNTHETIC else KGDataset.load(spec)


def dataset_fingerprint(ds: KGDataset) -> str:
    """SHA-256 of the splits and the KG: what a trained state depends on."""
    h = hashlib.sha256(f"{ds.n_users}:{ds.n_items}:{ds.n_entities}".encode())
    for m in (ds.train, ds.valid, ds.test):
        h.update(np.ascontiguousarray(m.indptr, dtype=np.int64).data)
        h.update(np.ascontiguousarray(m.indices, dtype=np.int64).data)
    h.update(np.ascontiguousarray(ds.kg, dtype=np.int64).data)
    return h.hexdigest()


def _run_info(run_dir: Path, override: str | None) -> tuple[KGDataset, dict[str, Any]]:
    """The dataset of a run (``override`` or the one ``data.json`` names, fingerprint checked)
    and the run's ``data.json`` (empty when it has none)."""
    info: dict[str, Any] = {}
    if (run_dir / DATA_FILE).is_file():
        info = json.loads((run_dir / DATA_FILE).read_text(encoding="utf-8"))
    spec = override or info.get("data")
    if spec is None:
        raise DataError(f"{run_dir / DATA_FILE} is missing: pass --data FILE|synthetic",
                        field="--data")
    ds = load_data(spec)
    if "fingerprint" in info and dataset_fingerprint(ds) != info["fingerprint"]:
        raise CheckpointError(f"dataset {spec!r} is not the one this run was trained on",
                              path=run_dir / DATA_FILE)
    return ds, info


# ------------------------------------------------------------------ output
def format_metrics(rows: dict[str, dict[str, float]], fmt: str = "table") -> str:
    """Recall and NDCG @ 10/20/40 of each split (the seed paper's Table 3 columns), plus the
    medication metrics :data:`MED_COLS` when the rows hold ``med_*`` keys (visit-split data):
    an aligned table (the medication columns as a second block under the first, so that lines
    stay readable), JSON (every key) or CSV (one row per split, medication columns appended).

    JSON of a single split is its flat metrics dict (``{"recall@20": …}``); of several, one
    dict per split.
    """
    cols = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg")]
    has_med = any(k.startswith("med_") for m in rows.values() for k in m)
    blocks = [cols, list(MED_COLS)] if has_med else [cols]
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


# ------------------------------------------------------------------ evaluate
@dataclass
class LoadedRun:
    """A trained run ready to score: its config, dataset, best-state model and that state's KG.

    Shared by ``evaluate`` and ``recommend`` (and built from a :class:`TrainResult` at the end of
    ``train``), so that every consumer scores with exactly the graph the best state used.
    """

    cfg: DiffKGConfig
    ds: KGDataset
    model: DiffKG | LightGCN | MostPop
    kg: KGCSR | None


def load_run(run_dir: str | Path, data: str | None = None,
             device: str | None = None) -> LoadedRun:
    """The best state (and its KG) of the checkpoint in ``run_dir``, on ``device`` (default:
    the run's), with the run's dataset (``data`` overrides ``data.json``; fingerprint checked).
    """
    run_dir = Path(run_dir)
    ck = load_checkpoint(run_dir / CHECKPOINT)
    cfg_dict = dict(ck["config"])
    if device is not None:
        cfg_dict["device"] = device
    if cfg_dict["device"].startswith("cuda") and not torch.cuda.is_available():
        raise DataError("the run used CUDA, which this machine lacks: pass --device cpu",
                        field="device")
    cfg = DiffKGConfig(**cfg_dict)
    ds, _ = _run_info(run_dir, data)
    dev = torch.device(cfg.device)
    model: DiffKG | LightGCN | MostPop
    n_rel = 2 * ds.n_relations  # the KG with inverses, as the trainer builds it
    if cfg.model == "mostpop":
        model = MostPop(ds.train).to(dev)
    else:
        adj = norm_adjacency(ds.train, ds.n_users, ds.n_items).to(dev)
        model = (DiffKG(ds.n_users, ds.n_items, ds.n_entities, n_rel, adj, cfg,
                        codes=patient_codes(ds, cfg))
                 if cfg.model == "diffkg" else LightGCN(ds.n_users, ds.n_items, adj, cfg))
        try:
            model.to(dev).load_state_dict(ck["best_state"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint does not fit the dataset: {exc}",
                                  path=run_dir / CHECKPOINT) from exc
    kg = kg_from_tensor(ck["best_kg"], ds.n_entities, n_rel, dev)
    return LoadedRun(cfg, ds, model, kg)


def evaluate_run(run_dir: str | Path, split: str = "test", data: str | None = None,
                 device: str | None = None) -> dict[str, float]:
    """Rank ``split`` with the best state (and its KG) of the checkpoint in ``run_dir``.

    The test split excludes training and validation items, the validation split training
    items, exactly as the trainer does, so ``split="test"`` reproduces the run's test metrics.
    """
    run = load_run(run_dir, data, device)
    return evaluate_split(run.model, run.kg, run.ds, split, batch_size=run.cfg.test_batch,
                          device=run.cfg.device)


# ------------------------------------------------------------------ commands
def default_preset(ds: KGDataset) -> str:
    """``medication`` for a dataset with visits (the medication graph), else ``diffkg``."""
    return "medication" if ds.visits is not None else "diffkg"


def cmd_train(args: argparse.Namespace) -> int:
    """``diffkg-fast train``: resolve the config, train (or resume), print the results table."""
    sets = parse_sets(args.set)
    out = Path(args.out) if args.out else None
    if args.resume and out is None:
        raise DataError("--resume needs --out DIR (the run to continue)", field="--resume")
    if args.tensorboard and out is None:  # the event files need a folder to go to
        raise DataError("--tensorboard needs --out DIR (logs go to DIR/tb)",
                        field="--tensorboard")
    if out is not None and not args.resume and (out / CHECKPOINT).exists():
        # Never overwrite a run by accident.
        raise DataError("already holds a run; pass --resume to continue it or choose another "
                        "--out", path=out)
    # Built before any work so that a missing tensorboard package is refused up front; it
    # writes nothing until the first epoch ends. Without --out there is no folder for
    # curves.png or tb/: no reporter at all.
    reporter = (None if out is None else
                RunReporter(out, tensorboard=args.tensorboard, plot=not args.no_plot))
    if args.resume:
        ds, info = _run_info(out, args.data)
        name = args.preset or info.get("preset") or default_preset(ds)
        cfg = resolve_config(args.config, sets, args.device, name)
    else:
        data = args.data or SYNTHETIC
        ds = load_data(data)
        name = args.preset or default_preset(ds)
        cfg = resolve_config(args.config, sets, args.device, name)
        if out is not None:
            spec = data if data == SYNTHETIC else str(Path(data).resolve())
            with atomic_write(out / DATA_FILE, "w") as f:
                json.dump({"data": spec, "fingerprint": dataset_fingerprint(ds),
                           "preset": name}, f, indent=2)
    print(f"data {ds.name}: {ds.n_users} users, {ds.n_items} items, {ds.n_entities} entities; "
          f"model {cfg.model}, preset {name}"
          + ("" if args.preset else " (the default for this data; --preset diffkg: Params.py)"))
    try:
        res = train(ds, cfg, log=print, out_dir=out, resume=args.resume,
                    progress=not args.no_progress, reporter=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    print(f"\nbest epoch {res.best_epoch} ({len(res.history)} epochs, "
          f"{res.total_time:.1f} s this session)")
    print(format_metrics({"valid": res.val, "test": res.test}, "table"))
    # Imported here: recommend.py imports LoadedRun / load_run from this module.
    from diffkg_fast.train.recommend import format_example
    print(format_example(LoadedRun(cfg, ds, res.model, res.kg)))
    if out is not None:
        print(f"run saved in {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``diffkg-fast evaluate DIR``: metrics of the run's best state on one split."""
    metrics = evaluate_run(args.run_dir, args.split, args.data, args.device)
    print(format_metrics({args.split: metrics}, args.format))
    return 0
