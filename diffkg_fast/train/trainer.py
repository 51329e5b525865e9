"""The generic trainer: any registered model, epochs, validation-based selection, one test.

An epoch of a model (:class:`~diffkg_fast.model.base.Recommender`):

1. ``model.on_epoch_start(epoch)``: the phases the model owns (DiffKG: one diffusion pass over
   the KG rows, then the rebuild of this epoch's denoised KG);
2. the batch loop (the sampler of the model's ``batch_kind``, :mod:`~diffkg_fast.train.sampling`:
   BPR triples or users with their rows; ``batch`` rows a step, grown to bound the epoch at
   ``max_epoch_steps`` steps), each step ``model(batch)`` → loss;
3. ``model.on_epoch_end(epoch)`` (a KG phase, an attention refresh);
4. validation ranking, every ``eval_every`` epochs and after the last one (of every user with
   a validation target, or of a fixed sample of ``valid_users`` of them).

The best validated epoch's scoring state is kept (:mod:`~diffkg_fast.train.selection`);
``patience`` validations without improvement stop the run. On a ``visit``-split dataset the
medication set rules (plain and DDI-aware) are then chosen on the validation visits with that
state (:func:`~diffkg_fast.train.evaluation.choose_sets`), recorded in the checkpoint and in
``sets.json``; the test split is ranked ONCE, at the end, with that state and those rules
(training and validation items excluded). The test split never influences any choice.

Randomness: ``seed_everything(seed)``, then every draw from a named stream of the seed (the
model's own, the sampler's ``negatives`` and ``shuffle``, the validation sample's
``valid_users``). With ``out_dir`` the run folder
(:mod:`~diffkg_fast.train.run_folder`) is rewritten after every epoch, and ``resume=True``
continues from its checkpoint to the same bits as an uninterrupted run.

Data-parallel (``torchrun``, or any initialised default process group;
:mod:`~diffkg_fast.train.distributed`): the recommender runs in ``DistributedDataParallel`` and
every rank steps through its part of each global batch (the loss scaled so
that DDP's average is the global batch's mean: ``batch_part``), so ``N`` ranks follow the
single process's trajectory up to float reduction order; the model shards its own phases
(``Recommender.distribute``); validation and test are sharded by users and their sums reduced;
rank 0 alone logs, shows progress and writes the run folder (every rank holds the same state,
so its checkpoint resumes at any world size).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.eval.set_choice import SetChoice
from diffkg_fast.model.base import Recommender
from diffkg_fast.train.checkpoint import CheckpointError, get_rng_state, set_rng_state
from diffkg_fast.train.config import RunConfig, TrainConfig
from diffkg_fast.train.distributed import wrap
from diffkg_fast.train.evaluation import (
    choose_sets,
    evaluate_split,
    has_visit_split,
    visit_metrics,
)
from diffkg_fast.train.report import RunReporter, epoch_line, progress
from diffkg_fast.train.run_folder import CHECKPOINT, RunFolder, check_resume, dataset_fingerprint
from diffkg_fast.train.sampling import SAMPLERS, PairSampler, UserSampler
from diffkg_fast.train.selection import Selection, SelectionError
from diffkg_fast.utils.distributed import Dist, current, sum_across
from diffkg_fast.utils.memory_check import check_memory
from diffkg_fast.utils.seed import rng_stream, seed_everything

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``history``: one dict per epoch run (``epoch``, ``loss`` parts, ``info`` such as
    ``kg_edges`` of the KG the recommender trained on, ``val`` metrics (empty where not
    validated), ``time`` in seconds per phase). ``val``: the metrics of ``best_epoch`` (its
    ``med_*`` with the chosen set rule, ``safe_*`` with the DDI-aware one); ``test``: the single
    test evaluation of that state; ``model`` holds the best state; ``sets``: the set rules
    chosen on validation (``None`` without a visit split).
    """

    config: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    model: Recommender
    total_time: float = 0.0
    sets: SetChoice | None = None


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
    dist: Dist = field(default_factory=Dist)
    # What each training step calls: the model, or its DistributedDataParallel wrapper.
    step: torch.nn.Module | None = None
    # The users validation ranks (``valid_users``): None, every user with a target.
    valid_users: np.ndarray | None = None

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


def batch_lr(cfg: TrainConfig, sampler: PairSampler | UserSampler | None) -> float:
    """The batch loop's learning rate: ``lr``, or under ``batch_lr_scaling=sqrt``
    ``lr · sqrt(B' / B)`` where ``max_epoch_steps`` grew the batch from ``B`` to ``B'``: the
    square-root rule that Malladi, Lyu, Panigrahi and Arora's SDE analysis of Adam gives ("On the
    SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022; they also adjust
    Adam's betas and eps, which is not done here)."""
    if sampler is None or cfg.batch_lr_scaling == "none":
        return cfg.lr
    return cfg.lr * math.sqrt(sampler.batch / cfg.batch)


def validation_users(ds: KGDataset, cfg: TrainConfig) -> np.ndarray | None:
    """The users validation ranks: ``None`` (every user with a validation target), or under
    ``valid_users = N`` a uniform sample of N of them without replacement, sorted, drawn once
    from the run's ``valid_users`` stream (the same every epoch and on resume).

    Why: ranking a user costs a score for every item, so validating every user of a large
    dataset every epoch is U × I work (an hour an epoch at a million users and 337k items on
    this CPU). The sample's mean metric is an unbiased estimate of the all-users mean with
    standard error ``s / sqrt(N) · sqrt(1 − N/U)`` (s the per-user metric's spread), and every
    epoch is compared on the same users."""
    candidates = np.flatnonzero(ds.valid.getnnz(axis=1) > 0)
    if cfg.valid_users == 0 or cfg.valid_users >= len(candidates):
        return None
    pick = torch.randperm(len(candidates), generator=rng_stream(cfg.seed, "valid_users"))
    return np.sort(candidates[pick[:cfg.valid_users].numpy()])


def _build(ds: KGDataset, config: RunConfig) -> _Run:
    cfg = config.train
    seed_everything(cfg.seed)
    model = config.model_cls.from_dataset(ds, **config.model_options())
    kind = SAMPLERS.get(model.batch_kind)
    sampler = (None if kind is None
               else kind(ds.train, cfg.batch, cfg.seed, cfg.max_epoch_steps))
    optimizer = model.configure_optimizer(batch_lr(cfg, sampler))
    return _Run(config, ds, model, optimizer, sampler,
                Selection(f"{cfg.valid_metric}@{cfg.topk}", cfg.patience), [],
                valid_users=validation_users(ds, cfg))


def _batches(run: _Run, epoch: int, limit: int | None, show: bool) -> dict[str, float]:
    """The epoch's batch loop; the mean loss parts. On one rank of several: this rank's part of
    every global batch, its loss scaled by the part's factor (``batch_part``) through the DDP
    wrapper, and the logged parts the global batches' (each rank adds ``factor / W`` of its
    own, summed over ranks once per epoch)."""
    assert run.sampler is not None and run.optimizer is not None and run.step is not None
    d = run.dist
    neg = run.sampler.negatives()
    parts_of = (run.sampler.part_batches(neg, d, limit) if d.active
                else ((b, 1.0) for b in run.sampler.batches(neg, limit)))
    run.model.train()
    total = min(len(run.sampler), limit) if limit else len(run.sampler)
    sums: dict[str, float] = {"total": 0.0}
    n_steps = 0
    for batch, factor in progress(parts_of, total, f"epoch {epoch}", show):
        loss, parts = run.step(batch.to(run.cfg.device))
        run.optimizer.zero_grad(set_to_none=True)
        (loss * factor if d.active else loss).backward()
        run.optimizer.step()
        share = factor / d.world
        sums["total"] += share * float(loss.detach())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + share * float(v)
        n_steps += 1
    sums = sum_across(sums, d)
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
                             device=run.cfg.device, dist=run.dist, users=run.valid_users)
        times["evaluation"] = time.perf_counter() - t0
    info = {**report.info, **end.info, **run.model.epoch_info()}
    if run.dist.active:  # only then, so that a single-process log keeps its columns
        info["world_size"] = run.dist.world
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
          limit_batches: int | None = None, dist: Dist | None = None) -> TrainResult:
    """Train ``config``'s model on ``ds``, select on validation, test once (module docstring).

    ``out_dir``: the run folder, locked and rewritten after every epoch (``None``: nothing is
    written). ``resume``: continue from ``out_dir``'s checkpoint; the config must be the run's
    own but for ``device`` or a larger ``epoch``. ``progress``: a progress bar (stderr, TTY only)
    over the batches of an epoch. ``reporter``: given the history after every epoch (plot,
    TensorBoard). Neither changes a result. ``limit_batches``: benchmarks only: at most this
    many batches in every loop of an epoch (evaluation stays complete); ``None`` = all.
    ``dist``: this process's place in a data-parallel run (default: the initialised default
    process group's, else the single process); only rank 0 logs, shows progress, reports and
    writes ``out_dir`` (the other ranks read its checkpoint to resume: a shared folder).
    """
    if limit_batches is not None and limit_batches < 1:
        raise ValueError(f"limit_batches must be >= 1 or None, got {limit_batches}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    d = current() if dist is None else dist
    if not d.is_main:
        log, progress, reporter = _silent, False, None
    folder = None if out_dir is None else RunFolder(out_dir)
    with contextlib.nullcontext() if folder is None or not d.is_main else folder.lock():
        return _train(ds, config, log, folder, resume, progress, reporter, limit_batches, d)


def _silent(_: str) -> None:
    """The log of ranks other than 0."""


def _train(ds: KGDataset, config: RunConfig, log: Callable[[str], Any],
           folder: RunFolder | None, resume: bool, show: bool, reporter: RunReporter | None,
           limit: int | None, d: Dist) -> TrainResult:
    t_start = time.perf_counter()
    _check_validation(ds)
    check_memory(ds, config)
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
    if run.valid_users is not None:
        log(f"validation ranks a fixed sample of {len(run.valid_users):,} users "
            f"(valid_users={config['valid_users']}); the test ranking is complete")
    if run.sampler is not None and run.sampler.batch != config["batch"]:
        log(f"training batch {run.sampler.batch:,} (max_epoch_steps={config['max_epoch_steps']}: "
            f"{len(run.sampler):,} steps an epoch), learning rate "
            f"{batch_lr(run.cfg, run.sampler):g}")
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
    elif folder is not None and d.is_main:
        folder.write_config(config.to_dict())
    if ck is not None and d.active:
        _same_cuda_stream(ck, d)
    # After the restore: every rank holds the same state when DDP first broadcasts rank 0's.
    run.dist = d
    if d.active:
        run.model.distribute(d)
        log(f"data-parallel over {d.world} processes (rank 0 logs and writes)")
    run.step = wrap(run.model, run.optimizer, d)
    if not d.is_main:
        folder = None  # rank 0 alone writes the run folder
    metric = run.selection.metric
    for epoch in range(start, 0 if run.selection.stopped else run.epochs()):
        record = _epoch(run, epoch, limit, show)
        run.history.append(record)
        if reporter is not None:
            reporter.epoch_end(run.history)
        log(epoch_line(record, metric))
        if record["val"]:
            run.selection.update(epoch, record["val"], run.model.scoring_state)
        # Taken on every rank: a sharded model gathers its full tensors collectively.
        state = run.state(epoch, fingerprint) if folder is not None or d.active else None
        if folder is not None:  # the checkpoint first: the log never runs ahead of it
            folder.save_checkpoint(state)
            folder.write_config(config.to_dict())
            folder.write_log(run.history)
        if run.selection.stopped:
            log(f"early stop after epoch {epoch}: no better val {metric} for "
                f"{run.selection.bad} validations")
            break
    return _finish(run, log, t_start, folder)


def _same_cuda_stream(ck: dict[str, Any], d: Dist) -> None:
    """Give this rank's GPU the global CUDA generator state of the GPU that wrote ``ck``.

    Each rank draws its global-generator numbers (DiffKG's denoiser dropout) on its own GPU,
    all of them seeded alike, so they stay in step; but a checkpoint holds rank 0's view, where
    only its own GPU's generator advanced. Restoring every device's entry would put rank k's
    GPU back to its seed state. (Not run yet: no machine with several GPUs was available.)"""
    saved = ck.get("rng", {}).get("cuda")
    if not saved or not d.device.startswith("cuda") or not torch.cuda.is_available():
        return
    device = str(ck["config"].get("device", "cuda"))
    index = int(device.split(":")[1]) if ":" in device else 0
    if index < len(saved):
        torch.cuda.set_rng_state(saved[index], device=d.device)


def _finish(run: _Run, log: Callable[[str], Any], t_start: float,
            folder: RunFolder | None) -> TrainResult:
    """Load the best state, choose the set rules on validation, rank the test split once."""
    sel, cfg = run.selection, run.cfg
    run.model.load_scoring_state(sel.best_state)
    val = dict(run.history[sel.best_epoch]["val"])
    sets = None
    if has_visit_split(run.ds):
        sets = choose_sets(run.model, run.ds, target_ddi=cfg.target_ddi,
                           batch_size=cfg.test_batch, dist=run.dist)
        # The epoch's med_* used the default rule; the chosen one replaces it.
        val.update(visit_metrics(run.model, run.ds, "valid", cfg.test_batch, sets,
                                 dist=run.dist))
        log(f"set rule chosen on validation: {sets.plain.describe()}; DDI-aware: "
            f"{sets.safe.describe()} ({sets.criterion})")
        if folder is not None:
            folder.record_sets(sets.to_dict())
    test = evaluate_split(run.model, run.ds, "test", batch_size=cfg.test_batch,
                          device=cfg.device, sets=sets, dist=run.dist)
    k = sel.metric.split("@")[1]
    log(f"best epoch {sel.best_epoch}: val {sel.metric} {val[sel.metric]:.4f}  test "
        f"recall@{k} {test[f'recall@{k}']:.4f} ndcg@{k} {test[f'ndcg@{k}']:.4f}")
    return TrainResult(run.config.to_dict(), run.history, sel.best_epoch, val, test, run.model,
                       time.perf_counter() - t_start, sets)
