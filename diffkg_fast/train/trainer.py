"""The training loop of DiffKG and of the baselines, with validation-based model selection.

Epoch order (``shared/reference/diffkg-reference.md``, with a validation split added):

1. negative sampling: one uniform negative per training interaction, vectorised;
2. one diffusion pass over every entity row (shuffled, ``batch`` rows, the denoiser's own Adam);
3. rebuild: top-``rebuild_k`` of every denoised row, reverses added, intersected with the
   original edges, each kept with probability ``keepRate``: the denoised KG of this epoch;
4. BPR + contrastive pass (two graph forwards per step); view 1 (BPR) is the denoised KG with
   ``cl_pattern = 0``, the original (``triplet_num``-sampled) KG with ``cl_pattern = 1``;
   view 2 the other one;
5. validation ranking (training items excluded) with the view-1 KG of the epoch.

The best validation recall@``topk`` epoch (state and KG) is kept; ``patience`` epochs without
improvement stop the run; the test split is ranked ONCE, at the end, with that state (training
and validation items excluded). The test split never influences any choice.

Randomness: ``seed_everything(cfg.seed)`` (the denoiser's dropout uses the global RNG) and
one CPU ``torch.Generator`` per purpose, each seeded from ``cfg.seed``; on a GPU the diffusion
noise comes from a device generator seeded by the CPU one at each pass (see ``train_pass``).

Run directory (``out_dir``): after every epoch ``checkpoint.pt``, ``config.json`` and ``log.csv``
are rewritten atomically (:mod:`diffkg_fast.train.checkpoint`); ``resume=True`` continues from
the checkpoint and ends bitwise equal to an uninterrupted run with the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.model.config import DiffKGConfig
from diffkg_fast.model.diffkg import DiffKG, LightGCN, MostPop
from diffkg_fast.model.patients import patient_code_matrix
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    diffusion_loss,
    draw_timesteps_noise,
    kg_rows,
    sample_topk,
)
from diffkg_fast.ops.graph import KGCSR, norm_adjacency, torch_csr
from diffkg_fast.ops.rebuild import rebuild_kg
from diffkg_fast.train.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    check_config,
    get_rng_state,
    kg_from_tensor,
    kg_to_tensor,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    write_config_json,
    write_log_csv,
)
from diffkg_fast.train.evaluation import evaluate_split
from diffkg_fast.train.report import RunReporter
from diffkg_fast.train.report import progress as progress_bar
from diffkg_fast.utils.seed import seed_everything

__all__ = ["TrainResult", "sample_negatives", "train"]

PHASES = ("diffusion", "rebuild", "recommender", "evaluation")
_GENERATORS = ("init", "neighbours", "dropout", "diffusion", "rebuild", "negatives", "shuffle")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``history``: one dict per epoch run (``epoch``, ``loss`` parts, ``kg_edges`` of the KG the
    recommender trained on, ``val`` metrics, ``time`` in seconds per phase of :data:`PHASES`).
    ``val``: the metrics of ``best_epoch``; ``test``: the single test evaluation of that state.
    ``model`` holds the best state; ``kg`` is the graph it is scored with (``None`` without KG).
    """

    config: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    model: nn.Module
    kg: KGCSR | None = None
    total_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def sample_negatives(users: Tensor, pos_keys: Tensor, n_items: int,
                     generator: torch.Generator | None = None, max_rounds: int = 100_000,
                     ) -> Tensor:
    """One uniform non-positive item per entry of ``users`` (n,) int64 → (n,) int64.

    ``pos_keys``: the SORTED keys ``user * n_items + item`` of all positives. Every entry draws
    uniformly in ``[0, n_items)``; collisions with a positive are found with one
    ``searchsorted`` over the keys and only those are redrawn, round after round, so the result
    is uniform over each user's non-positive items. A round costs O(n_left log nnz); at
    density p the number left shrinks by ~p per round (synthetic default: 142k interactions,
    density 0.2, 0.03 s in all). A user whose positives cover every item raises ``ValueError``.
    """
    users = users.to(torch.int64)
    if users.numel() == 0:
        return users.clone()
    deg = torch.bincount(pos_keys // n_items, minlength=int(users.max()) + 1)
    if bool((deg[users] >= n_items).any()):
        raise ValueError("a user has every item as a positive: no negative exists")
    neg = torch.randint(n_items, users.shape, generator=generator)
    todo = torch.arange(users.numel())
    last = pos_keys.numel() - 1
    for _ in range(max_rounds):
        keys = users[todo] * n_items + neg[todo]
        pos = torch.searchsorted(pos_keys, keys).clamp_(max=last)
        todo = todo[pos_keys[pos] == keys]
        if todo.numel() == 0:
            return neg
        neg[todo] = torch.randint(n_items, (todo.numel(),), generator=generator)
    raise RuntimeError(f"negative sampling did not converge in {max_rounds} rounds")


def _interactions(train: sp.spmatrix) -> tuple[Tensor, Tensor, Tensor]:
    """``(users, items, sorted keys user * n_items + item)`` of the binary training matrix."""
    m = sp.csr_matrix(train, copy=True)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    users = torch.from_numpy(np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)))
    items = torch.from_numpy(m.indices.astype(np.int64))
    return users, items, users * m.shape[1] + items  # canonical CSR: keys already sorted


def _sparse_t(train: sp.spmatrix, device: torch.device) -> Tensor:
    """``R^T`` (I × U) binary float32 torch sparse CSR, for ``R^T U_emb`` once per pass."""
    return torch_csr((sp.csr_matrix(train) != 0).T.astype(np.float32), device)


def _evaluate(model: nn.Module, kg: KGCSR | None, ds: KGDataset, split: str,
              cfg: DiffKGConfig) -> dict[str, float]:
    return evaluate_split(model, kg, ds, split, batch_size=cfg.test_batch, device=cfg.device)


def patient_codes(ds: KGDataset, cfg: DiffKGConfig) -> Tensor | None:
    """The training code matrix of DiffKG's patients, or ``None`` (disabled / no visits)."""
    if cfg.model != "diffkg" or not cfg.patient_codes or ds.visits is None:
        return None
    return torch_csr(patient_code_matrix(ds.visits, ds.n_users, ds.n_entities, (0,)),
                     cfg.device)


class _Diffusion:
    """The denoiser, its optimiser and the graphs of the diffusion side (DiffKG only)."""

    def __init__(self, ds: KGDataset, cfg: DiffKGConfig, kg_full: KGCSR,
                 gens: dict[str, torch.Generator], dev: torch.device) -> None:
        self.cfg, self.kg, self.gens = cfg, kg_full, gens
        self.n_items = ds.n_items
        self.denoiser = Denoiser(ds.n_entities, cfg.dims[0], cfg.d_emb_size, norm=cfg.norm,
                                 dropout=cfg.denoiser_dropout, generator=gens["init"],
                                 device=dev)
        self.opt = torch.optim.Adam(self.denoiser.parameters(), lr=cfg.lr)
        self.schedule = DiffusionSchedule(cfg.steps, cfg.noise_scale, cfg.noise_min,
                                          cfg.noise_max)
        self.rt = _sparse_t(ds.train, dev)
        self.rows = torch.arange(ds.n_entities, device=dev)

    def train_pass(self, model: DiffKG, limit: int | None = None) -> dict[str, float]:
        """One pass over every entity row (shuffled; the first ``limit`` batches only, for
        benchmarks); returns the mean loss parts."""
        cfg, kg = self.cfg, self.kg
        self.denoiser.train()
        with torch.no_grad():
            r_t_u = torch.sparse.mm(self.rt, model.user.detach())  # I × d, once per pass
            ent = model.entity.detach()
        perm = torch.randperm(kg.n_entities, generator=self.gens["diffusion"]).to(ent.device)
        gen = self.gens["diffusion"]
        if ent.device.type != "cpu":
            # Off the CPU the B × E noise is drawn on the device, from a generator seeded by the
            # CPU one once per pass (so a seed and a resume still fix it): on the host one
            # Alibaba-size batch of noise takes 1.5 s to draw here (1024 × 89,196 normals, two
            # threads), ~80× the denoiser's GEMMs of that batch on an H200 (estimated from the
            # card's fp32 rate, not measured), plus a 365 MB copy.
            gen = torch.Generator(ent.device).manual_seed(
                int(torch.randint(2**62, (1,), generator=gen)))
        sums = {"diff_loss": 0.0, "diff": 0.0, "ckgc": 0.0}
        n_batches = 0
        for start in range(0, kg.n_entities, cfg.batch):
            if limit is not None and n_batches >= limit:
                break
            rows = perm[start:start + cfg.batch]
            x0 = kg_rows(kg.rowptr, kg.col, rows, kg.n_entities)
            t, noise = draw_timesteps_noise(x0, cfg.steps, gen)
            loss, parts = diffusion_loss(self.denoiser, x0, t, noise, self.schedule,
                                         self.n_items, r_t_u, ent[rows], cfg.e_loss,
                                         precision=cfg.diffusion_precision)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            sums["diff_loss"] += float(loss.detach())
            sums["diff"] += float(parts["diff"])
            sums["ckgc"] += float(parts["ckgc"])
            n_batches += 1
        return {k: v / max(n_batches, 1) for k, v in sums.items()}

    def rebuild(self, limit: int | None = None) -> KGCSR:
        """The denoised KG of this epoch (a subset of the original edges, with their relations).

        ``limit`` (benchmarks): denoise only the first ``limit`` batches of rows."""
        cfg, kg = self.cfg, self.kg
        self.denoiser.eval()
        rows = self.rows if limit is None else self.rows[:limit * cfg.batch]
        _, idx = sample_topk(self.denoiser, kg.rowptr, kg.col, rows, self.schedule,
                             cfg.rebuild_k, batch_size=cfg.batch,
                             sampling_steps=cfg.sampling_steps, generator=self.gens["rebuild"],
                             precision=cfg.diffusion_precision)
        h, t, rel = rebuild_kg(idx, (kg.row, kg.col, kg.rel), cfg.keepRate,
                               self.gens["rebuild"], rows=rows, n_entities=kg.n_entities)
        return KGCSR.from_triplets(torch.stack((h, rel, t), 1), kg.n_entities, kg.n_relations)


def _mostpop(ds: KGDataset, cfg: DiffKGConfig, log: Callable[[str], Any],
             t_start: float, out_dir: Path | None) -> TrainResult:
    model = MostPop(ds.train).to(cfg.device)
    t0 = time.perf_counter()
    val = _evaluate(model, None, ds, "valid", cfg)
    t_eval = time.perf_counter() - t0
    test = _evaluate(model, None, ds, "test", cfg)
    log(f"mostpop val recall@20 {val['recall@20']:.4f} test recall@20 {test['recall@20']:.4f}")
    hist = [{"epoch": 0, "loss": {}, "kg_edges": None, "val": val,
             "time": {p: (t_eval if p == "evaluation" else 0.0) for p in PHASES}}]
    if out_dir is not None:  # nothing is trained: the checkpoint only records the run
        write_config_json(out_dir, cfg.to_dict())
        write_log_csv(out_dir, hist)
        save_checkpoint(out_dir / CHECKPOINT, {
            "config": cfg.to_dict(), "epoch": 0, "stopped": True, "history": hist,
            "best_epoch": 0, "best_state": model.state_dict(), "best_kg": None})
    return TrainResult(cfg.to_dict(), hist, 0, val, test, model, None,
                       time.perf_counter() - t_start)


def train(ds: KGDataset, cfg: DiffKGConfig, *, log: Callable[[str], Any] = print,
          out_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
          reporter: RunReporter | None = None,
          limit_batches: int | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``ds``, select on validation, test once (see module docstring).

    ``out_dir``: the run directory written after every epoch (``None``: nothing is written).
    ``resume``: continue from ``out_dir/checkpoint.pt``; a config differing in any key but
    ``device`` is refused (:class:`~diffkg_fast.train.checkpoint.CheckpointError`).
    ``progress``: a progress bar (stderr, TTY only) over the recommender batches of an epoch.
    ``reporter``: given the history after every epoch (plot, TensorBoard). Neither changes a
    result: both only observe.
    ``limit_batches``: benchmarks only: at most this many diffusion batches, rebuild batches and
    recommender steps per epoch (evaluation stays complete); ``None`` = all.
    """
    t_start = time.perf_counter()
    cfg.validate()
    if limit_batches is not None and limit_batches < 1:
        raise ValueError(f"limit_batches must be >= 1 or None, got {limit_batches}")
    out_dir = None if out_dir is None else Path(out_dir)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    # Read (and check) the checkpoint before any work, so a refusal costs nothing.
    # On the CPU: generator and RNG states must be CPU tensors; load_state_dict moves the rest.
    ck = load_checkpoint(out_dir / CHECKPOINT) if resume and out_dir else None
    if ck is not None:
        check_config(ck["config"], cfg.to_dict(), out_dir / CHECKPOINT)
    seed_everything(cfg.seed)
    if cfg.model == "mostpop":
        res = _mostpop(ds, cfg, log, t_start, out_dir)
        if reporter is not None:
            reporter.epoch_end(res.history)
        return res
    if cfg.epoch < 1:
        raise ValueError(f"a trained model needs epoch >= 1, got {cfg.epoch}")
    dev = torch.device(cfg.device)
    gens = {name: torch.Generator().manual_seed(cfg.seed + 7919 * i)
            for i, name in enumerate(_GENERATORS)}
    adj = norm_adjacency(ds.train, ds.n_users, ds.n_items).to(dev)
    diffusion: _Diffusion | None = None
    kg_orig: KGCSR | None = None
    model: DiffKG | LightGCN
    if cfg.model == "diffkg":
        kg_full = KGCSR.from_kg(ds.kg, ds.n_entities, ds.n_relations).to(dev)
        # The attention edge set is sampled once at model build, as DiffKG does.
        kg_orig = kg_full.sample_neighbours(cfg.triplet_num, gens["neighbours"])
        model = DiffKG(ds.n_users, ds.n_items, ds.n_entities, kg_full.n_relations, adj, cfg,
                       generator=gens["init"], codes=patient_codes(ds, cfg)).to(dev)
        if cfg.use_diffusion:
            diffusion = _Diffusion(ds, cfg, kg_full, gens, dev)
    else:
        model = LightGCN(ds.n_users, ds.n_items, adj, cfg, generator=gens["init"]).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    users, items, pos_keys = _interactions(ds.train)
    key = f"recall@{cfg.topk}"
    history: list[dict[str, Any]] = []
    best_epoch, best_val, best_state, best_kg = -1, None, None, None
    bad, start, stopped = 0, 0, False
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if diffusion is not None:
            diffusion.denoiser.load_state_dict(ck["denoiser"])
            diffusion.opt.load_state_dict(ck["denoiser_opt"])
        if set(ck["generators"]) != set(gens):
            raise CheckpointError("generator set differs", path=out_dir / CHECKPOINT)
        for name, g in gens.items():
            g.set_state(ck["generators"][name])
        n_rel = 0 if kg_orig is None else kg_orig.n_relations
        kg_orig = kg_from_tensor(ck["kg_orig"], ds.n_entities, n_rel, dev)
        history, bad, stopped = ck["history"], ck["bad"], ck["stopped"]
        best_epoch, best_state = ck["best_epoch"], ck["best_state"]
        best_val = history[best_epoch]["val"][key]
        best_kg = kg_from_tensor(ck["best_kg"], ds.n_entities, n_rel, dev)
        start = ck["epoch"] + 1
        set_rng_state(ck["rng"])  # last: everything above must not move a global RNG after it
        log(f"resumed from {out_dir / CHECKPOINT} after epoch {ck['epoch']}")
    elif out_dir is not None:
        write_config_json(out_dir, cfg.to_dict())
    for epoch in range(start, 0 if stopped else cfg.epoch):
        times = dict.fromkeys(PHASES, 0.0)
        losses: dict[str, float] = {}
        t0 = time.perf_counter()
        neg = sample_negatives(users, pos_keys, ds.n_items, gens["negatives"])
        times["recommender"] += time.perf_counter() - t0

        kg_den = kg_orig
        if diffusion is not None:
            t0 = time.perf_counter()
            losses.update(diffusion.train_pass(model, limit_batches))
            times["diffusion"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            kg_den = diffusion.rebuild(limit_batches)
            times["rebuild"] = time.perf_counter() - t0
        kg1, kg2 = (kg_den, kg_orig) if cfg.cl_pattern == 0 else (kg_orig, kg_den)

        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(users.numel(), generator=gens["shuffle"])
        sums = {"total": 0.0, "bpr": 0.0, "reg": 0.0, "cl": 0.0}
        n_steps = 0
        batches = range(0, users.numel(), cfg.batch)[:limit_batches]
        for start in progress_bar(batches, len(batches), f"epoch {epoch}", progress):
            b = perm[start:start + cfg.batch]
            loss, parts = model.loss(users[b].to(dev), items[b].to(dev), neg[b].to(dev),
                                     kg1, kg2, gens["dropout"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["total"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
        losses.update({k: v / max(n_steps, 1) for k, v in sums.items()})
        times["recommender"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        val = _evaluate(model, kg1, ds, "valid", cfg)
        times["evaluation"] = time.perf_counter() - t0
        history.append({"epoch": epoch, "loss": losses,
                        "kg_edges": None if kg1 is None else kg1.n_edges,
                        "val": val, "time": times})
        if reporter is not None:
            reporter.epoch_end(history)
        # RecBole's epoch line first, then the details of this trainer.
        log(f"epoch {epoch}  train_loss: {losses['total']:.4f}  valid {key}: {val[key]:.4f} "
            f"ndcg@{cfg.topk}: {val[f'ndcg@{cfg.topk}']:.4f}  ({sum(times.values()):.1f} s)  "
            f"[bpr {losses['bpr']:.4f} "
            + (f"code_bpr {losses['code_bpr']:.4f} " if "code_bpr" in losses else "")
            + f"cl {losses['cl']:.4f} "
            f"diff {losses.get('diff_loss', float('nan')):.4f} "
            f"kg_edges {history[-1]['kg_edges']} | "
            + " ".join(f"{p} {times[p]:.2f}s" for p in PHASES) + "]")
        if best_val is None or val[key] > best_val:  # a NaN never beats the first epoch
            best_epoch, best_val, best_kg = epoch, val[key], kg1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bad = 0
        else:
            bad += 1
            stopped = bool(cfg.patience and bad >= cfg.patience)
        if out_dir is not None:
            write_log_csv(out_dir, history)
            save_checkpoint(out_dir / CHECKPOINT, {
                "config": cfg.to_dict(), "epoch": epoch, "stopped": stopped,
                "history": history, "bad": bad, "best_epoch": best_epoch,
                "best_state": best_state, "best_kg": kg_to_tensor(best_kg),
                "model": model.state_dict(), "opt": opt.state_dict(),
                "denoiser": None if diffusion is None else diffusion.denoiser.state_dict(),
                "denoiser_opt": None if diffusion is None else diffusion.opt.state_dict(),
                "generators": {name: g.get_state() for name, g in gens.items()},
                "kg_orig": kg_to_tensor(kg_orig), "rng": get_rng_state()})
        if stopped:
            log(f"early stop after epoch {epoch}: no better val {key} for {bad} epochs")
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    test = _evaluate(model, best_kg, ds, "test", cfg)
    log(f"best epoch {best_epoch}: val {key} {history[best_epoch]['val'][key]:.4f} "
        f"test {key} {test[key]:.4f} ndcg@{cfg.topk} {test[f'ndcg@{cfg.topk}']:.4f}")
    return TrainResult(cfg.to_dict(), history, best_epoch, history[best_epoch]["val"], test,
                       model, best_kg, time.perf_counter() - t_start,
                       {"denoiser": None if diffusion is None else diffusion.denoiser})
