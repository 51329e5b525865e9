"""A run folder (``train --out DIR``): the files of one run, owned by this module alone.

    DIR/data.json       the dataset (``--data`` spec), its fingerprint, the preset used and the
                        world size (processes) of the latest session
    DIR/config.json     the resolved config (loadable by ``--config``)
    DIR/checkpoint.pt   everything an exact resume needs, with the config and the dataset
                        fingerprint inside, and a digest (:mod:`diffkg_fast.train.checkpoint`)
    DIR/log.csv         one row per epoch
    DIR/sets.json       the medication set rules chosen on validation (visit-split data; the
                        checkpoint holds the same record under "sets", which is what is used)
    DIR/curves.png, DIR/tb/   what :mod:`diffkg_fast.train.report` draws
    DIR/.lock           while a process trains in it

``train``, ``--resume``, ``evaluate`` and ``recommend`` all go through :class:`RunFolder`, so a
run folder can never report another run: the checkpoint's own config and fingerprint are
checked on every load, against the dataset given and against ``data.json``; a second process
training into the same folder is refused while the first holds the lock (a lock left by a killed
process is detected and taken over); every file is written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError, excerpt
from diffkg_fast.data.open import open_dataset
from diffkg_fast.eval.set_choice import SetChoice
from diffkg_fast.model.base import Recommender
from diffkg_fast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffkg_fast.train.config import RunConfig
from diffkg_fast.utils.io import atomic_write, read_bounded, writing

__all__ = ["CHECKPOINT", "CONFIG", "DATA_FILE", "LOG", "SETS", "LoadedRun", "RunFolder",
           "check_resume", "dataset_fingerprint", "load_run"]

CHECKPOINT = "checkpoint.pt"
SETS = "sets.json"
CONFIG = "config.json"
DATA_FILE = "data.json"
LOG = "log.csv"
LOCK = ".lock"
# Folders whose lock this process holds, with the depth: `train --out` takes the lock before it
# writes data.json, and the trainer inside takes it again.
_HELD: dict[Path, int] = {}
# Keys a resumed run may change: where it runs, and (raised) how many epochs it trains.
RESUMABLE = frozenset({"device", "epoch"})


def dataset_fingerprint(ds: KGDataset) -> str:
    """SHA-256 of the splits and the KG: what a trained state depends on."""
    h = hashlib.sha256(f"{ds.n_users}:{ds.n_items}:{ds.n_entities}".encode())
    for m in (ds.train, ds.valid, ds.test):
        h.update(np.ascontiguousarray(m.indptr, dtype=np.int64).data)
        h.update(np.ascontiguousarray(m.indices, dtype=np.int64).data)
    h.update(np.ascontiguousarray(ds.kg, dtype=np.int64).data)
    return h.hexdigest()


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], epochs_run: int,
                 path: str | os.PathLike[str] | None = None) -> None:
    """Refuse (:class:`CheckpointError`, naming every key) a resume whose config differs from
    the run's own in anything but the device or a larger ``epoch`` (to train a finished run
    further); ``epoch`` below the ``epochs_run`` already trained is refused too."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE)
    diff = [f"{k}: run {saved.get(k, '<missing>')!r} vs now {current.get(k, '<missing>')!r}"
            for k in keys if saved.get(k, "<missing>") != current.get(k, "<missing>")]
    if diff:
        raise CheckpointError(f"cannot resume with a different config ({', '.join(diff)}); "
                              "only device and a larger epoch may change", path=path)
    if current.get("epoch", 0) < epochs_run:
        raise CheckpointError(f"cannot resume with epoch={current['epoch']}: the run already "
                              f"trained {epochs_run} epochs", path=path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunFolder:
    """The run folder at ``path`` (``DIR/checkpoint.pt`` is taken as ``DIR``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        self.path = path.parent if path.name == CHECKPOINT and path.is_file() else path

    def file(self, name: str) -> Path:
        return self.path / name

    def holds_run(self) -> bool:
        return self.file(CHECKPOINT).exists()

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``DIR/.lock`` while training; a live holder is refused by name, a dead one's
        lock is taken over. Leftover temporaries of a killed write are removed. Re-entrant in
        one process."""
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        lock = self.file(LOCK)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale(lock)
                continue
            except OSError as exc:  # a read-only folder
                raise DataError(f"cannot write: {exc.strerror}", path=lock) from exc
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as exc:  # a full disk: no lock of nobody left behind
                lock.unlink(missing_ok=True)
                raise DataError(f"cannot write: {exc.strerror}", path=lock) from exc
            break
        else:
            raise DataError("could not take the run folder's lock", path=lock)
        _HELD[key] = 1
        try:
            self._remove_temporaries()
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def _check_stale(self, lock: Path) -> None:
        """Raise if the lock's holder lives; remove the lock if it is dead (or unreadable and
        older than a minute: a holder writes its line at once)."""
        try:  # at most 4 KB: a lock someone left may be anything, /dev/zero included
            holder = json.loads(read_bounded(lock, 4096, "lock file"))
            pid, host, since = int(holder["pid"]), str(holder["host"]), str(holder["since"])
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - lock.stat().st_mtime > 60:
                    lock.unlink()
            return
        if host != socket.gethostname() or _pid_alive(pid):
            raise DataError(f"is in use: process {pid} on {host} has trained in it since "
                            f"{since} (if that process is gone, delete {lock})", path=self.path)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()

    def _remove_temporaries(self) -> None:
        # atomic_write's temporaries are ".NAME.XXXX.tmp": one left behind means a killed write.
        for tmp in self.path.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def discard(self) -> None:
        """Remove the files a run writes before its first checkpoint (``data.json``,
        ``config.json``, ``log.csv``, ``curves.png``): a run that never checkpointed leaves
        none (the checkpoint is written first, so these never outlive it)."""
        for name in (DATA_FILE, CONFIG, LOG, "curves.png"):
            with contextlib.suppress(FileNotFoundError):
                self.file(name).unlink()

    # ------------------------------------------------------------------ data.json
    def write_data_info(self, spec: str, fingerprint: str, preset: str | None) -> None:
        with writing(self.file(DATA_FILE)), atomic_write(self.file(DATA_FILE), "w") as f:
            json.dump({"data": spec, "fingerprint": fingerprint, "preset": preset}, f, indent=2)

    def record_world_size(self, world: int) -> None:
        """Set ``data.json``'s ``world_size``: how many processes the latest session trained
        with (``torchrun``; 1 without). Its epochs' ``world_size`` column in ``log.csv`` says
        which epochs ran data-parallel. Nothing to do without a data.json (the Python API)."""
        if not self.file(DATA_FILE).is_file():
            return
        info = self.read_data_info()
        if info.get("world_size") == world:
            return
        info["world_size"] = world
        with writing(self.file(DATA_FILE)), atomic_write(self.file(DATA_FILE), "w") as f:
            json.dump(info, f, indent=2)

    def read_data_info(self) -> dict[str, Any]:
        """``data.json``'s content (empty when the folder has none)."""
        path = self.file(DATA_FILE)
        if not path.is_file():
            return {}
        try:
            info = json.loads(read_bounded(path, 1 << 20, "data.json"))
        except (ValueError, RecursionError) as exc:  # DataError (too large) is a ValueError
            raise DataError(f"not a readable data.json: {str(exc)[:200]}", path=path) from exc
        if not isinstance(info, dict):
            raise DataError("data.json holds one JSON object", path=path)
        for key, kind, what in (("data", str, "a dataset spec"), ("fingerprint", str, "a digest"),
                                ("preset", str | None, "a preset name or null")):
            if key in info and not isinstance(info[key], kind):
                raise DataError(f"expected {what}, got {excerpt(info[key])}", path=path,
                                field=key)
        return info

    def dataset(self, override: str | None, fingerprint: str) -> KGDataset:
        """The run's dataset (``override`` or ``data.json``'s spec), refused unless its
        fingerprint is ``fingerprint`` (the checkpoint's)."""
        spec = override if override is not None else self.read_data_info().get("data")
        if spec is None:
            raise DataError(f"{self.file(DATA_FILE)} is missing: pass --data FILE|synthetic",
                            field="--data")
        ds = open_dataset(spec)
        if dataset_fingerprint(ds) != fingerprint:
            raise CheckpointError(f"dataset {spec!r} is not the one this run was trained on",
                                  path=self.file(CHECKPOINT))
        return ds

    # ------------------------------------------------------------------ other files
    def write_config(self, config: Mapping[str, Any]) -> None:
        with writing(self.file(CONFIG)), atomic_write(self.file(CONFIG), "w") as f:
            f.write(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")

    def write_log(self, history: list[dict[str, Any]]) -> None:
        """One row per epoch: epoch, loss parts, epoch facts (``kg_edges``), validation
        metrics, phase seconds; columns are the union over epochs in first-seen order."""
        groups = ("loss", "info", "val", "time")
        cols: dict[str, None] = {"epoch": None}
        for h in history:
            for g in groups:
                cols.update({_column(g, k): None for k in h.get(g, {})})
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(cols))
        for h in history:
            flat = {"epoch": h["epoch"]}
            for g in groups:
                flat.update({_column(g, k): v for k, v in h.get(g, {}).items()})
            w.writerow(["" if flat.get(c) is None else flat[c] for c in cols])
        with writing(self.file(LOG)), atomic_write(self.file(LOG), "w") as f:
            f.write(buf.getvalue())

    def record_sets(self, sets: dict[str, Any]) -> None:
        """Add the chosen set rules to the checkpoint (``"sets"``) and write ``sets.json``: the
        checkpoint first, so that the readable copy never claims a rule the run does not use.
        """
        ck = self.load_checkpoint()
        ck["sets"] = sets
        self.save_checkpoint(ck)
        with writing(self.file(SETS)), atomic_write(self.file(SETS), "w") as f:
            f.write(json.dumps(sets, indent=2) + "\n")

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        with writing(self.file(CHECKPOINT)):
            save_checkpoint(self.file(CHECKPOINT), state)

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint, its digest checked and every field's type: a file with a valid
        digest may still have been crafted, and must fail here, naming the field."""
        path = self.file(CHECKPOINT)
        ck = load_checkpoint(path)
        check_run_state(ck, path)
        return ck


# The fields of a run checkpoint and their types; a history record's groups map names to
# numbers (info: to numbers, text or null). Before the first validation the selection has no
# best epoch (-1) and no state.
_STATE = {"config": dict, "data_fingerprint": str, "epoch": int, "history": list,
          "selection": dict, "model": dict}
_SELECTION = {"best_epoch": int, "best_value": float | int, "bad": int, "stopped": bool}
_NUMBER = float | int  # bool included: an info flag
_GROUPS = {"loss": _NUMBER, "val": _NUMBER, "time": _NUMBER, "info": _NUMBER | str | None}


def check_run_state(ck: dict[str, Any], path: Path) -> None:
    """Refuse (:class:`CheckpointError` naming the field) a checkpoint whose fields are not
    those the trainer writes: a wrong type would surface as a traceback epochs later."""
    def need(ok: bool, field: str, value: Any, what: str) -> None:
        if not ok:
            raise CheckpointError(f"not a run checkpoint: {field} is {excerpt(value)}, "
                                  f"expected {what}", path=path)

    def is_a(value: Any, kind: Any) -> bool:  # a bool is no count here
        return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))

    for key, kind in _STATE.items():
        need(is_a(ck.get(key), kind), key, ck.get(key), kind.__name__)
    history = ck["history"]
    need(len(history) == ck["epoch"] + 1, "epoch", ck["epoch"],
         f"the last of the {len(history)} epochs in history")
    for i, rec in enumerate(history):
        need(isinstance(rec, dict) and is_a(rec.get("epoch"), int), f"history[{i}]", rec,
             "an epoch record")
        for group, kind in _GROUPS.items():
            values = rec.get(group, {})
            need(isinstance(values, dict) and all(
                isinstance(k, str) and isinstance(v, kind) for k, v in values.items()),
                f"history[{i}][{group!r}]", values, "names mapped to numbers")
    sel = ck["selection"]
    for key, kind in _SELECTION.items():
        need(is_a(sel.get(key), kind), f"selection[{key!r}]", sel.get(key), "a number")
    best, state = sel["best_epoch"], sel.get("best_state")
    need(-1 <= best < len(history) and isinstance(state, dict) == (best >= 0)
         and (best < 0 or bool(history[best].get("val"))),
         "selection['best_epoch']", best, "a validated epoch of the history, with its state")
    try:
        RunConfig(ck["config"])
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's config is not valid: {exc}", path=path) from exc


def _column(group: str, key: str) -> str:
    return key if group == "info" else f"{group}_{key}"


@dataclass
class LoadedRun:
    """A trained run ready to score: its config, its dataset and its best state's model."""

    config: RunConfig
    ds: KGDataset
    model: Recommender
    sets: SetChoice | None = None


def load_run(run_dir: str | os.PathLike[str], data: str | None = None,
             device: str | None = None) -> LoadedRun:
    """The best state of the run in ``run_dir`` (or its ``checkpoint.pt``), on ``device``
    (default: the run's), with the run's dataset (``data`` overrides ``data.json``; either is
    checked against the checkpoint's fingerprint)."""
    folder = RunFolder(run_dir)
    path = folder.file(CHECKPOINT)
    ck = folder.load_checkpoint()
    values = dict(ck["config"])
    if device is not None:
        values["device"] = device
    if str(values.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
        raise DataError("the run used CUDA, which this machine lacks: pass --device cpu",
                        field="device")
    try:
        config = RunConfig(values)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's config is not valid: {exc}", path=path) from exc
    ds = folder.dataset(data, ck["data_fingerprint"])
    if ck["selection"]["best_state"] is None:
        raise CheckpointError("the run has no validated epoch yet: nothing to score", path=path)
    model = config.model_cls.from_dataset(ds, **config.model_options())
    try:
        model.load_scoring_state(ck["selection"]["best_state"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint does not fit the model: {str(exc)[:300]}",
                              path=path) from exc
    try:
        sets = None if ck.get("sets") is None else SetChoice.from_dict(ck["sets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's set rules are not valid: {str(exc)[:200]}",
                              path=path) from exc
    return LoadedRun(config, ds, model, sets)
