"""The generic trainer: any registered model, epochs, validation-based selection, one test.

An epoch of a model (:class:`~diffkg_fast.model.base.Recommender`):

1. ``model.on_epoch_start(epoch)``: the phases the model owns (DiffKG: one diffusion pass over
   the KG rows, then the rebuild of this epoch's denoised KG);
2. the batch loop (the sampler of the model's ``batch_kind``, :mod:`~diffkg_fast.train.sampling`:
   BPR triples or users with their rows), each step ``model(batch)`` → loss;
3. ``model.on_epoch_end(epoch)`` (a KG phase, an attention refresh);
4. validation ranking, every ``eval_every`` epochs and after the last one.

The best validated epoch's scoring state is kept (:mod:`~diffkg_fast.train.selection`);
``patience`` validations without improvement stop the run; the test split is ranked ONCE, at the
end, with that state (training and validation items excluded). The test split never influences
any choice.

Randomness: ``seed_everything(seed)``, then every draw from a named stream of the seed (the
model's own, the sampler's ``negatives`` and ``shuffle``). With ``out_dir`` the run folder
(:mod:`~diffkg_fast.train.run_folder`) is rewritten after every epoch, and ``resume=True``
continues from its checkpoint to the same bits as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.model.base import Recommender
from diffkg_fast.train.checkpoint import CheckpointError, get_rng_state, set_rng_state
from diffkg_fast.train.config import RunConfig, TrainConfig
from diffkg_fast.train.evaluation import evaluate_split
from diffkg_fast.train.report import RunReporter, epoch_line, progress
from diffkg_fast.train.run_folder import CHECKPOINT, RunFolder, check_resume, dataset_fingerprint
from diffkg_fast.train.sampling import SAMPLERS, PairSampler, UserSampler
from diffkg_fast.train.selection import Selection, SelectionError
from diffkg_fast.utils.seed import seed_everything

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``history``: one dict per epoch run (``epoch``, ``loss`` parts, ``info`` such as
    ``kg_edges`` of the KG the recommender trained on, ``val`` metrics (empty where not
    validated), ``time`` in seconds per phase). ``val``: the metrics of ``best_epoch``;
    ``test``: the single test evaluation of that state; ``model`` holds the best state.
    """

    config: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    model: Recommender
    total_time: float = 0.0


@dataclass
class _Run:
    """What one training run carries from epoch to epoch."""

    config: RunConfig
    ds: KGDataset
    model: Recommender
    optimizer: torch.optim.Optimizer | None
    sampler: PairSampler | UserSampler | None
    selection: Selection
    history: list[dict[str, Any]]

    @property
    def cfg(self) -> TrainConfig:
        return self.config.train

    def epochs(self) -> int:
        """Epochs to run: one for a model with nothing to train (its ranking never changes)."""
        return self.cfg.epoch if self.optimizer is not None else 1

    def state(self, epoch: int, fingerprint: str) -> dict[str, Any]:
        """The checkpoint after ``epoch``: everything the next epoch depends on."""
        return {"config": self.config.to_dict(), "data_fingerprint": fingerprint,
                "epoch": epoch, "history": self.history,
                "selection": self.selection.state_dict(), "model": self.model.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "sampler": None if self.sampler is None else self.sampler.state_dict(),
                "rng": get_rng_state()}

    def restore(self, ck: dict[str, Any]) -> int:
        """Load a checkpoint's state; returns the first epoch still to run."""
        best = ck["selection"]["best_state"]
        if best is not None:  # tried now: it is loaded only when the run ends
            self.model.load_scoring_state(best)
        self.model.load_state_dict(ck["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(ck["optimizer"])
        if self.sampler is not None:
            self.sampler.load_state_dict(ck["sampler"])
        self.selection.load_state_dict(ck["selection"])
        self.history = ck["history"]
        set_rng_state(ck["rng"])  # last: nothing above may move a global RNG after it
        return int(ck["epoch"]) + 1


def _build(ds: KGDataset, config: RunConfig) -> _Run:
    cfg = config.train
    seed_everything(cfg.seed)
    model = config.model_cls.from_dataset(ds, **config.model_options())
    optimizer = model.configure_optimizer(cfg.lr)
    kind = SAMPLERS.get(model.batch_kind)
    sampler = None if kind is None else kind(ds.train, cfg.batch, cfg.seed)
    return _Run(config, ds, model, optimizer, sampler,
                Selection(f"{cfg.valid_metric}@{cfg.topk}", cfg.patience), [])


def _batches(run: _Run, epoch: int, limit: int | None, show: bool) -> dict[str, float]:
    """The epoch's batch loop; the mean loss parts."""
    assert run.sampler is not None and run.optimizer is not None
    neg = run.sampler.negatives()
    run.model.train()
    total = min(len(run.sampler), limit) if limit else len(run.sampler)
    sums: dict[str, float] = {"total": 0.0}
    n_steps = 0
    for batch in progress(run.sampler.batches(neg, limit), total, f"epoch {epoch}", show):
        loss, parts = run.model(batch.to(run.cfg.device))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        sums["total"] += float(loss.detach())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n_steps += 1
    return {k: v / max(n_steps, 1) for k, v in sums.items()}


def _epoch(run: _Run, epoch: int, limit: int | None, show: bool) -> dict[str, Any]:
    """One epoch (module docstring): its history record."""
    times = dict.fromkeys((*run.model.phases, "recommender", "evaluation"), 0.0)
    report = run.model.on_epoch_start(epoch, limit)
    times.update(report.time)
    losses = dict(report.loss)
    if run.sampler is not None:
        t0 = time.perf_counter()
        losses.update(_batches(run, epoch, limit, show))
        times["recommender"] = time.perf_counter() - t0
    end = run.model.on_epoch_end(epoch, limit)
    times.update({k: times.get(k, 0.0) + v for k, v in end.time.items()})
    losses.update(end.loss)
    val: dict[str, float] = {}
    if epoch % run.cfg.eval_every == 0 or epoch == run.epochs() - 1:
        t0 = time.perf_counter()
        val = evaluate_split(run.model, run.ds, "valid", batch_size=run.cfg.test_batch,
                             device=run.cfg.device)
        times["evaluation"] = time.perf_counter() - t0
    info = {**report.info, **end.info, **run.model.epoch_info()}
    return {"epoch": epoch, "loss": losses, "info": info, "val": val, "time": times}


def _check_validation(ds: KGDataset) -> None:
    """Refuse, before any work, a run whose validation can select nothing."""
    if ds.valid.nnz == 0:
        raise SelectionError(
            f"dataset {ds.name!r} has an empty validation split: the best epoch cannot be "
            "selected; build it with a validation split (data build carves one out of train "
            "for sources without)")


def _check_unseen(ds: KGDataset, model: Recommender, name: str) -> None:
    """Refuse a model that cannot score validation patients without training interactions:
    its validation metrics would rank untrained embeddings."""
    unseen = np.diff(sp.csr_matrix(ds.train).indptr) == 0
    if not model.scores_unseen and unseen[np.diff(sp.csr_matrix(ds.valid).indptr) > 0].any():
        raise SelectionError(
            f"model {name!r} (with these options) cannot score a patient without training "
            f"interactions, and the validation patients of dataset {ds.name!r} include such "
            "patients (the visit split's held-out patients)")


def train(ds: KGDataset, config: RunConfig, *, log: Callable[[str], Any] = print,
          out_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
          reporter: RunReporter | None = None,
          limit_batches: int | None = None) -> TrainResult:
    """Train ``config``'s model on ``ds``, select on validation, test once (module docstring).

    ``out_dir``: the run folder, locked and rewritten after every epoch (``None``: nothing is
    written). ``resume``: continue from ``out_dir``'s checkpoint; the config must be the run's
    own but for ``device`` or a larger ``epoch``. ``progress``: a progress bar (stderr, TTY only)
    over the batches of an epoch. ``reporter``: given the history after every epoch (plot,
    TensorBoard). Neither changes a result. ``limit_batches``: benchmarks only: at most this
    many batches in every loop of an epoch (evaluation stays complete); ``None`` = all.
    """
    if limit_batches is not None and limit_batches < 1:
        raise ValueError(f"limit_batches must be >= 1 or None, got {limit_batches}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    folder = None if out_dir is None else RunFolder(out_dir)
    with contextlib.nullcontext() if folder is None else folder.lock():
        return _train(ds, config, log, folder, resume, progress, reporter, limit_batches)


def _train(ds: KGDataset, config: RunConfig, log: Callable[[str], Any],
           folder: RunFolder | None, resume: bool, show: bool, reporter: RunReporter | None,
           limit: int | None) -> TrainResult:
    t_start = time.perf_counter()
    _check_validation(ds)
    fingerprint = dataset_fingerprint(ds) if folder is not None else ""
    # The checkpoint is read (and checked) before any work, so that a refusal costs nothing.
    ck = folder.load_checkpoint() if resume and folder is not None else None
    if ck is not None:
        assert folder is not None
        if ck["data_fingerprint"] != fingerprint:
            raise CheckpointError("the dataset is not the one this run was trained on",
                                  path=folder.file(CHECKPOINT))
        # The saved config with today's defaults for keys it predates, then compared.
        saved = RunConfig(ck["config"]).to_dict()
        check_resume(saved, config.to_dict(), int(ck["epoch"]) + 1, folder.file(CHECKPOINT))
    run = _build(ds, config)
    _check_unseen(ds, run.model, config["model"])
    start = 0
    if ck is not None:
        try:
            start = run.restore(ck)
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            # A state of other shapes (a crafted file: the digest and fingerprint held).
            raise CheckpointError(f"checkpoint does not fit the model: {str(exc)[:300]}",
                                  path=folder.file(CHECKPOINT)) from exc  # type: ignore
        log(f"resumed from {folder.file(CHECKPOINT)} after epoch {ck['epoch']}")  # type: ignore
        if run.selection.stopped:
            log("the run stopped early (patience): nothing more to train")
    elif folder is not None:
        folder.write_config(config.to_dict())
    metric = run.selection.metric
    for epoch in range(start, 0 if run.selection.stopped else run.epochs()):
        record = _epoch(run, epoch, limit, show)
        run.history.append(record)
        if reporter is not None:
            reporter.epoch_end(run.history)
        log(epoch_line(record, metric))
        if record["val"]:
            run.selection.update(epoch, record["val"], run.model.scoring_state)
        if folder is not None:  # the checkpoint first: the log never runs ahead of it
            folder.save_checkpoint(run.state(epoch, fingerprint))
            folder.write_config(config.to_dict())
            folder.write_log(run.history)
        if run.selection.stopped:
            log(f"early stop after epoch {epoch}: no better val {metric} for "
                f"{run.selection.bad} validations")
            break
    return _finish(run, log, t_start)


def _finish(run: _Run, log: Callable[[str], Any], t_start: float) -> TrainResult:
    """Load the best state, rank the test split once."""
    sel, cfg = run.selection, run.cfg
    run.model.load_scoring_state(sel.best_state)
    test = evaluate_split(run.model, run.ds, "test", batch_size=cfg.test_batch,
                          device=cfg.device)
    val = run.history[sel.best_epoch]["val"]
    k = sel.metric.split("@")[1]
    log(f"best epoch {sel.best_epoch}: val {sel.metric} {val[sel.metric]:.4f}  test "
        f"recall@{k} {test[f'recall@{k}']:.4f} ndcg@{k} {test[f'ndcg@{k}']:.4f}")
    return TrainResult(run.config.to_dict(), run.history, sel.best_epoch, val, test, run.model,
                       time.perf_counter() - t_start)
