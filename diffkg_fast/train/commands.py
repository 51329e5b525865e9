"""``diffkg-fast train`` and ``diffkg-fast evaluate``: the code behind the two commands.

:mod:`diffkg_fast.cli` wires argparse to :func:`cmd_train` and :func:`cmd_evaluate`, and takes
the model flags from :func:`add_model_flags`. Bad input (unknown or mistyped config key,
unreadable file, incompatible checkpoint) raises :class:`DataError`, which the CLI prints as one
``error:`` line with exit status 2.

Config: every config key is a flag of its own name (``--reg 1e-5``, the same as
``--set reg=1e-5``), so DiffKG's published command lines run with only the entry point changed;
DiffKG's other ``Params.py`` flags map to this tool's (:data:`PARAMS_ALIASES`). Precedence is
:mod:`diffkg_fast.train.config`'s. A run folder (``--out DIR``) is
:mod:`diffkg_fast.train.run_folder`'s: ``--resume`` continues it from its own config and data.

Under ``torchrun`` (:mod:`diffkg_fast.train.distributed`) every rank runs :func:`cmd_train`;
rank 0 alone holds the run folder's lock, writes it and prints; ``data.json`` records the world
size of the latest session.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from diffkg_fast.data.build import parse_sets, parse_value
from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.open import SYNTHETIC, open_dataset, resolve_spec
from diffkg_fast.model.registry import MODELS
from diffkg_fast.train import distributed as launch
from diffkg_fast.train.config import (
    TRAIN_KEYS,
    RunConfig,
    config_defaults,
    explicit_values,
    resolve_config,
)
from diffkg_fast.train.evaluation import evaluate_split
from diffkg_fast.train.output import format_metrics
from diffkg_fast.train.recommend import format_example
from diffkg_fast.train.report import RunReporter
from diffkg_fast.train.run_folder import (
    CHECKPOINT,
    LoadedRun,
    RunFolder,
    dataset_fingerprint,
    load_run,
)
from diffkg_fast.train.trainer import train

__all__ = ["PARAMS_ALIASES", "add_model_flags", "cmd_evaluate", "cmd_train", "evaluate_run"]

# DiffKG's Params.py flags whose value this tool takes under another name.
PARAMS_ALIASES = {"tstBat": "test_batch", "tstEpoch": "eval_every"}
# Params.py defines it; DiffKG's code never reads it (its diffusion loader uses --batch).
UNUSED_PARAMS = ("kg_batch",)


def flag_keys() -> list[str]:
    """Every config key of every registered model, in a stable order: one flag each."""
    keys: dict[str, None] = dict.fromkeys(TRAIN_KEYS)
    for name in sorted(MODELS):
        keys.update(dict.fromkeys(config_defaults(name)))
    return [k for k in keys if k not in ("model", "device")]  # both have flags of their own


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--model`` and one ``--KEY VALUE`` flag per config key, plus DiffKG's own flags."""
    g = parser.add_argument_group(
        "config keys as flags (the same as --set KEY=VALUE; DiffKG's Params.py names)")
    g.add_argument("--model", choices=sorted(MODELS), help="the model to train (default diffkg)")
    for key in flag_keys():
        g.add_argument(f"--{key}", dest=f"opt_{key}", metavar="VALUE", help=argparse.SUPPRESS)
    for alias, key in PARAMS_ALIASES.items():
        g.add_argument(f"--{alias}", dest=f"opt_{key}", metavar="VALUE",
                       help=f"DiffKG's name of --{key}")
    g.add_argument("--gpu", metavar="ID", help="DiffKG's GPU index: --device cuda:ID")
    g.add_argument("--save_path", metavar="DIR", help="DiffKG's name of --out")
    g.add_argument("--load_model", metavar="DIR", help="DiffKG's: --out DIR --resume")
    for key in UNUSED_PARAMS:
        g.add_argument(f"--{key}", dest=f"unused_{key}", metavar="VALUE",
                       help="accepted for DiffKG's command lines; unused (as in DiffKG)")


def _sets(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` pairs and the key flags, one dict; a key given twice with two values is an
    error naming it."""
    sets = parse_sets(args.set)
    if getattr(args, "model", None):
        sets.setdefault("model", args.model)
    for dest, text in vars(args).items():
        if dest.startswith("opt_") and text is not None:
            key, value = dest[4:], parse_value(text)
            if key in sets and sets[key] != value:
                raise DataError(f"given twice, as {sets[key]!r} and {value!r}", field=key)
            sets[key] = value
    return sets


def _normalise_params_flags(args: argparse.Namespace) -> None:
    """DiffKG's --gpu / --save_path / --load_model as this tool's --device / --out / --resume."""
    if getattr(args, "gpu", None) is not None:
        if args.device not in (None, f"cuda:{args.gpu}"):
            raise DataError("give --gpu or --device, not both", field="--gpu")
        args.device = f"cuda:{args.gpu}"
    for flag, resume in (("save_path", False), ("load_model", True)):
        value = getattr(args, flag, None)
        if value is None:
            continue
        if args.out not in (None, value):
            raise DataError(f"give --{flag} or --out, not both", field=f"--{flag}")
        args.out, args.resume = value, args.resume or resume
    for key in UNUSED_PARAMS:
        if getattr(args, f"unused_{key}", None) is not None:
            print(f"note: --{key} is accepted for DiffKG's command lines and ignored: DiffKG's "
                  "code defines it but never uses it")


def default_preset(ds: KGDataset) -> str:
    """``medication`` for a dataset with visits (the medication graph), else ``diffkg``."""
    return "medication" if ds.visits is not None else "diffkg"


def _resumed(folder: RunFolder, args: argparse.Namespace,
             sets: dict[str, Any]) -> tuple[KGDataset, RunConfig, str | None]:
    """The run's own dataset and config, with what the command line changes (checked by the
    trainer: only the device and a larger epoch may change)."""
    ck = folder.load_checkpoint()
    saved = dict(ck["config"])
    given = explicit_values(args.config, sets, args.device, args.preset, model=saved["model"])
    try:
        config = RunConfig({**saved, **given})
    except ValueError as exc:
        raise DataError(str(exc), field="config") from exc
    ds = folder.dataset(args.data, ck["data_fingerprint"])
    return ds, config, folder.read_data_info().get("preset")


def _fresh(folder: RunFolder | None, args: argparse.Namespace,
           sets: dict[str, Any], main: bool = True) -> tuple[KGDataset, RunConfig, str]:
    if folder is not None and folder.holds_run():  # never overwrite a run by accident
        raise DataError("already holds a run; pass --resume to continue it or choose another "
                        "--out", path=folder.path)
    spec = SYNTHETIC if args.data is None else args.data
    # Every key, type and range is checked before the data loads (minutes, for a large
    # folder): without --preset, with the defaults; the data's default preset only sets values
    # valid with any others (patience 3), so the check's verdict is the final one's.
    resolve_config(args.config, sets, args.device, args.preset)
    ds = open_dataset(spec)
    name = args.preset or default_preset(ds)
    config = resolve_config(args.config, sets, args.device, name)
    if folder is not None and main:
        folder.write_data_info(resolve_spec(spec), dataset_fingerprint(ds), name)
    return ds, config, name


def cmd_train(args: argparse.Namespace) -> int:
    """``diffkg-fast train``: resolve the config, train (or resume), print the results."""
    _normalise_params_flags(args)
    sets = _sets(args)
    folder = RunFolder(args.out) if args.out else None
    if args.resume and folder is None:
        raise DataError("--resume needs --out DIR (the run to continue)", field="--resume")
    if args.tensorboard and folder is None:  # the event files need a folder to go to
        raise DataError("--tensorboard needs --out DIR (logs go to DIR/tb)",
                        field="--tensorboard")
    main = launch.env_rank()[0] == 0
    if folder is None or not main:  # ranks other than 0 never write the run folder
        return _train_and_report(folder, args, sets, main)
    if args.resume and not folder.file(CHECKPOINT).is_file():  # before the lock creates DIR
        raise DataError("no checkpoint file: nothing to resume", path=folder.file(CHECKPOINT))
    created = not folder.path.exists()
    try:
        with folder.lock():  # held from data.json to the last checkpoint
            try:
                return _train_and_report(folder, args, sets, main)
            except BaseException:
                # Failed before its first checkpoint (a bad config, a full disk, Ctrl-C): no
                # run, so none of its files either.
                if not args.resume and not folder.holds_run():
                    folder.discard()
                raise
    finally:
        if created:  # a folder this command made and left empty
            with contextlib.suppress(OSError):
                folder.path.rmdir()


def _quiet(*_: Any, **__: Any) -> None:
    """``print`` on the ranks other than 0."""


def _train_and_report(folder: RunFolder | None, args: argparse.Namespace,
                      sets: dict[str, Any], main: bool = True) -> int:
    say = print if main else _quiet
    if args.resume:
        assert folder is not None
        ds, config, name = _resumed(folder, args, sets)
    else:
        ds, config, name = _fresh(folder, args, sets, main)
    d, device = launch.init(config["device"])
    try:
        if device != config["device"]:  # cuda -> cuda:LOCAL_RANK under torchrun
            config = RunConfig({**config.to_dict(), "device": device})
        if folder is not None and main:
            folder.record_world_size(d.world)
        # Built before any work so that a missing tensorboard package is refused up front; it
        # writes nothing until the first epoch ends.
        reporter = (None if folder is None or not main else
                    RunReporter(folder.path, tensorboard=args.tensorboard,
                                plot=not args.no_plot))
        say(f"data {ds.name}: {ds.n_users} users, {ds.n_items} items, {ds.n_entities} "
            f"entities; model {config['model']}, preset {name}"
            + ("" if args.preset or args.resume
               else " (the default for this data; --preset diffkg: Params.py)"))
        try:
            with launch.report_errors(d):
                res = train(ds, config, log=print,
                            out_dir=None if folder is None else folder.path,
                            resume=args.resume, progress=not args.no_progress,
                            reporter=reporter, dist=d)
        finally:
            if reporter is not None:
                reporter.close()
    finally:
        launch.shutdown(d)
    say(f"\nbest epoch {res.best_epoch} ({len(res.history)} epochs, "
        f"{res.total_time:.1f} s this session)")
    say(format_metrics({"valid": res.val, "test": res.test}, "table"))
    if main:  # it ranks the example patient: rank 0's output only
        print(format_example(LoadedRun(config, ds, res.model, res.sets)))
    if folder is not None:
        say(f"run saved in {folder.path}")
    return 0


def evaluate_run(run_dir: str | Path, split: str = "test", data: str | None = None,
                 device: str | None = None) -> dict[str, float]:
    """Rank ``split`` with the best state of the run in ``run_dir`` (the folder or its
    ``checkpoint.pt``): the test split excludes training and validation items, the validation
    split training items, as the trainer does, with the set rules the run chose on validation
    (its checkpoint's ``sets``), so ``split="test"`` reproduces its test."""
    run = load_run(run_dir, data, device)
    return evaluate_split(run.model, run.ds, split, batch_size=run.config["test_batch"],
                          device=run.config["device"], sets=run.sets)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``diffkg-fast evaluate DIR``: metrics of the run's best state on one split."""
    if not RunFolder(args.run_dir).file(CHECKPOINT).is_file() and Path(args.run_dir).is_file():
        raise DataError("expected a run folder (train --out DIR) or its checkpoint.pt",
                        path=args.run_dir)
    metrics = evaluate_run(args.run_dir, args.split, args.data, args.device)
    print(format_metrics({args.split: metrics}, args.format))
    return 0
