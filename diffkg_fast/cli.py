"""``diffkg-fast`` command line: ``data build|stats|export``, ``train``, ``evaluate``,
``recommend``.

Bad input ends with one ``error: …`` line naming the file, line or field, and exit status 2;
nothing half-written is left (every output is written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from diffkg_fast.data.build import SOURCES, build_dataset, parse_sets
from diffkg_fast.data.dataset import LOAD_FLOOR, LOAD_RATIO, KGDataset
from diffkg_fast.data.errors import DataError, cut
from diffkg_fast.data.export import EXPORTERS, export_dataset
from diffkg_fast.data.stats import dataset_stats, format_stats
from diffkg_fast.train.presets import PRESETS
from diffkg_fast.utils.allocator import keep_freed_memory, keep_requested
from diffkg_fast.utils.io import describe_os_error

_PRESET_NAMES = ", ".join(sorted(PRESETS))
def _positive(text: str) -> int:
    """``--max-bytes``, ``--threads``: a positive integer (argparse reports anything else as
    one line naming the option)."""
    n = int(text)
    if n < 1:
        raise ValueError(text)
    return n


_positive.__name__ = "positive integer"  # argparse's "invalid positive integer value"
MAX_BYTES_HELP = (f"the most bytes FILE's arrays may take decompressed (default: "
                  f"{LOAD_RATIO} x the file's size, at least {LOAD_FLOOR >> 20} MiB)")


def _save(ds: KGDataset, out: Path) -> None:
    try:
        ds.save(out)
    except OSError as exc:  # a full disk, no permission: the file under `out` is left as it was
        raise DataError(f"cannot write the dataset: {exc.strerror or exc}", path=out) from exc


def _cmd_build(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    if out.is_dir():  # before the build, which may take minutes
        raise DataError("is a directory; --out names the .npz file to write", path=out)
    options = parse_sets(args.set)
    if args.name:
        options["name"] = args.name
    ds = build_dataset(args.source, args.path, **options)
    _save(ds, out)
    print(f"built {args.source} dataset in {time.perf_counter() - t0:.2f} s -> {args.out}")
    print(format_stats(dataset_stats(ds)))
    if "source_stats" in ds.meta:  # what the preprocessing dropped, so that nothing goes unseen
        print("preprocessing:")
        print("  " + format_stats(ds.meta["source_stats"]).replace("\n", "\n  "))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    stats = dataset_stats(KGDataset.load(args.file, max_bytes=args.max_bytes))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    ds = KGDataset.load(args.file, max_bytes=args.max_bytes)
    out = Path(args.out) if args.out else Path(args.file).with_name(
        f"{Path(args.file).stem}_{args.format}")
    for f in export_dataset(ds, args.format, out):
        print(f)
    return 0


# train / evaluate live in diffkg_fast.train.commands, imported on use: it pulls in torch,
# which the data commands never need.
def _cmd_train(args: argparse.Namespace) -> int:
    from diffkg_fast.train.commands import cmd_train
    return cmd_train(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from diffkg_fast.train.commands import cmd_evaluate
    return cmd_evaluate(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from diffkg_fast.train.compare import cmd_compare
    return cmd_compare(args)


def _cmd_recommend(args: argparse.Namespace) -> int:
    from diffkg_fast.train.recommend import cmd_recommend
    return cmd_recommend(args)


def make_parser(model_flags: bool = True) -> argparse.ArgumentParser:
    """The whole parser; ``model_flags=False`` leaves out ``train``'s per-key flags (they need
    the model registry, hence torch)."""
    parser = argparse.ArgumentParser(prog="diffkg-fast", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", required=True)
    data = top.add_parser("data", help="build, inspect and export datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    b = sub.add_parser("build", help="build a dataset from a source and save it")
    b.add_argument("--source", required=True, choices=sorted(SOURCES))
    b.add_argument("--path", help="input directory (mimic3 defaults to the bundled demo)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="loader or KG-builder option, e.g. split=visit, seed=1, "
                        "cooc_min_count=3 (repeatable)")
    b.add_argument("--name", help="dataset name (default: the source)")
    b.add_argument("--out", required=True, help="output .npz file (written atomically)")
    b.set_defaults(func=_cmd_build)

    s = sub.add_parser("stats", help="print a dataset's statistics")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--max-bytes", type=_positive, metavar="N", help=MAX_BYTES_HELP)
    s.set_defaults(func=_cmd_stats)

    e = sub.add_parser("export", help="export a dataset for other recommender tools")
    e.add_argument("file")
    e.add_argument("--format", required=True, choices=sorted(EXPORTERS))
    e.add_argument("--out", help="output directory (default: FILE's stem + _FORMAT); all "
                                 "files are written, or none")
    e.add_argument("--max-bytes", type=_positive, metavar="N", help=MAX_BYTES_HELP)
    e.set_defaults(func=_cmd_export)

    t = top.add_parser("train", help="train a registered model on a dataset",
                       description="Train a model, select its best epoch on validation, rank "
                                   "the test split once. Every config key is also a flag of "
                                   "its own name: --reg 1e-5 is --set reg=1e-5.")
    t.add_argument("--data", help="'synthetic' (the default: the built-in cohort), a dataset "
                                  ".npz, a DiffKG or KGAT dataset folder, or a DiffKG dataset "
                                  "name under Datasets/; --resume defaults to the run's own")
    t.add_argument("--preset", metavar="NAME",
                   help=f"named hyper-parameter set under the config file: {_PRESET_NAMES} "
                        "(default: medication for data with visits, diffkg otherwise)")
    t.add_argument("--config", help="config values over the preset's: a .yaml/.yml file "
                                    "(YAML) or any other file (JSON)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config value over the file's, e.g. epoch=10, latdim=32, dims=[256], "
                        "model=lightgcn (repeatable)")
    t.add_argument("--device", help="cpu, cuda or cuda:N; overrides the config's device")
    t.add_argument("--out", help="run folder: checkpoint.pt, config.json, log.csv, "
                                 "curves.png, data.json (rewritten after every epoch)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its own "
                        "config and data (a larger --epoch trains a finished run further)")
    t.add_argument("--tensorboard", action="store_true",
                   help="log losses, validation metrics and phase times to --out/tb "
                        "(needs: pip install 'diffkg-fast[viz]')")
    t.add_argument("--no-plot", action="store_true",
                   help="do not redraw --out/curves.png after every epoch")
    t.add_argument("--no-progress", action="store_true",
                   help="no per-epoch progress bar (it is never shown when stderr is not a "
                        "terminal)")
    if model_flags:
        # Imported here: the model registry pulls in torch, which the data commands never need.
        from diffkg_fast.train.commands import add_model_flags
        add_model_flags(t)
    t.set_defaults(func=_cmd_train)

    v = top.add_parser("evaluate", help="metrics of a run's best state")
    v.add_argument("run_dir", metavar="DIR",
                   help="run folder written by train --out (or its checkpoint.pt)")
    v.add_argument("--split", choices=("test", "valid"), default="test")
    v.add_argument("--format", choices=("table", "json", "csv"), default="table")
    v.add_argument("--data", help="dataset file or 'synthetic' (default: DIR/data.json's)")
    v.add_argument("--device", help="cpu, cuda or cuda:N; overrides the run's device")
    v.set_defaults(func=_cmd_evaluate)

    c = top.add_parser("compare", help="every registered model on one dataset, over seeds",
                       description="Train every row (each registered model, DiffKG's "
                                   "variants) on one dataset and split for each seed, and "
                                   "write OUT/compare.json (resumable), compare.md, "
                                   "compare.png.")
    c.add_argument("--data", help="as train's --data (default: synthetic)")
    c.add_argument("--rows", nargs="+", metavar="ROW",
                   help="rows to run (default: all; names as printed, e.g. MultiVAE 'DiffKG')")
    c.add_argument("--seeds", nargs="+", type=int, default=[421, 422, 423])
    c.add_argument("--preset", metavar="NAME", help="as train's --preset")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config value for every row whose model takes the key")
    c.add_argument("--threads", type=_positive, help="torch threads (default: torch's)")
    c.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    c.set_defaults(func=_cmd_compare)

    r = top.add_parser("recommend", help="a run's medication set for codes and/or a patient")
    r.add_argument("run_dir", metavar="DIR",
                   help="run folder written by train --out (or its checkpoint.pt)")
    r.add_argument("--diagnoses", metavar="CODES",
                   help="comma-separated ICD-9 diagnosis codes, plain (4019) or full "
                        "(ICD9DX:4019)")
    r.add_argument("--procedures", metavar="CODES",
                   help="comma-separated ICD-9 procedure codes, plain (3893) or full")
    r.add_argument("--patient", type=int, metavar="ID",
                   help="the patient's row in the dataset (0 … n_users-1): its training codes "
                        "and ID embedding join the codes; its training medications are flagged")
    r.add_argument("--top", type=int, metavar="N",
                   help="set size before DDI changes: the N best (default: the rule the run "
                        "chose on its validation visits, else 10)")
    r.add_argument("--ddi", metavar="off|avoid|penalty=W",
                   help="how the KG's drug-drug interactions shape the set: off (the plain "
                        "ranking), avoid (skip a drug interacting with one already chosen), "
                        "penalty=W (greedy on score - W x interactions, W in score std units); "
                        "default: the run's choice on validation, else avoid")
    r.add_argument("--format", choices=("table", "json", "csv"), default="table")
    r.add_argument("--data", help="dataset file or 'synthetic' (default: DIR/data.json's)")
    r.add_argument("--device", help="cpu, cuda or cuda:N; overrides the run's device")
    r.set_defaults(func=_cmd_recommend)
    return parser


def _error(message: object) -> int:
    """``error: MESSAGE`` on one line (a message quoting torch's may span several), status 2."""
    print("error: " + re.sub(r"\s*[\n\r\t]\s*", " ", str(message)), file=sys.stderr)
    return 2


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation the machine refused: Python's MemoryError, torch's CPU allocator
    (a RuntimeError) or its CUDA one (torch.OutOfMemoryError)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser(model_flags=argv[:1] == ["train"]).parse_args(argv)
    if keep_requested():
        keep_freed_memory()  # this process is ours: big blocks reused, not faulted in each step
    try:
        return int(args.func(args))
    except DataError as exc:
        return _error(exc)
    except BrokenPipeError:
        # The reader (`| head`) left: no traceback. stdout is pointed at devnull so that the
        # interpreter's final flush cannot raise again (Python docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a full disk, a missing permission: one line, not a traceback
        return _error(describe_os_error(exc))
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        # The sizes a config asks for (latdim 10^9, KGCN's n_iter 20) are not bounded up front.
        return _error(f"out of memory: {cut(str(exc).splitlines()[0] if str(exc) else '')}; "
                      "the run asks for more memory than this machine has: lower the sizes in "
                      "its config (latdim, dims, batch, test_batch, the model's layer and "
                      "neighbourhood sizes) or use a smaller dataset")


if __name__ == "__main__":
    raise SystemExit(main())
