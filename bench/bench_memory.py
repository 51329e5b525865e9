"""Benchmark: peak memory of DiffKG training on the CPU at Alibaba-iFashion's shape (< 8 GiB).

Two configurations (``MODES``): DiffKG's defaults (the exact model) and every large-KG option of
docs/large-kg.md; each also prints its phases' seconds extrapolated to a full epoch.

Run ``OMP_NUM_THREADS=1 pytest bench/bench_memory.py --benchmark-only -s`` (two steps a loop,
extrapolated). The complete epoch, every batch of every phase (about an hour at two threads)::

    BENCH_FULL_EPOCH=1 BENCH_THREADS=2 pytest bench/bench_memory.py --benchmark-only -s -k exact

The graph: Alibaba-iFashion as DiffKG uses it has 114,737 users, 30,040 items, 89,196 entities,
~558k KG triplets and 1,781,093 interactions; DiffKG's public code densifies the
entity x entity matrix on the host (89,196^2 float64 = 63.6 GB). The synthetic medication builder
reaches that shape with the ``alibaba`` cohort preset plus more codes (44,000 diagnoses + 15,156
procedures, so 30,040 + 59,156 = 89,196 entities; synthetic drugs have no ATC classes) and a
slightly lower ``med_scale`` (1,781,611 interactions), and with the co-occurrence thresholds
``cooc_min_count=4``, ``cooc_top_k_code=15`` (558,924 triplets; the defaults give 404k). No
hand-made KG is needed.

How it is measured: the dataset is built and saved in this process (``dataset_build_s`` and
``dataset_save_s`` are reported apart); a FRESH child process (``subprocess``,
``OMP_NUM_THREADS=BENCH_THREADS``, default 1) loads it and runs ``train`` for 1 epoch with the
``Params.py`` defaults.
Peak memory is the child's peak RSS (``VmHWM``). The child resets its high-water mark
(``/proc/self/clear_refs``) at each phase boundary, so every phase reports its own peak
(including what is already resident); the overall peak is their maximum (``ru_maxrss`` of a child
also carries the forking parent's peak, hence not used).

Work is limited with ``limit_batches=LIMIT`` only. Measured on one core of the CI machine: a
diffusion step (5 GEMMs of 1,024 x 89,196 x 1,000 and the B x E element-wise work) ~35 s, a
rebuild batch (10 such GEMMs) ~49 s, a recommender step ~15 s: the complete epoch (88 + 88
batches, 1,382 recommender steps) would take ~8 hours. Every limited loop repeats the same shapes
batch after batch, so its memory is that of one batch once the optimiser state exists (after the
first step); 2 steps reach that steady state. Validation and the final test ranking stay
complete (every user row is scored).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.medkg import build_medication_dataset
from diffkg_fast.data.synthetic import synthetic_records_scaled
from diffkg_fast.train.config import RunConfig, make_config
from diffkg_fast.utils.epoch_batch import epoch_batch

ALIBABA = {"n_users": 114_737, "n_items": 30_040, "n_entities": 89_196}
COHORT = {"n_diag": 44_000, "n_proc": 15_156, "med_scale": 0.2485}  # over the "alibaba" preset
KG_OPTIONS = {"cooc_min_count": 4, "cooc_top_k_code": 15}
# BENCH_FULL_EPOCH=1: no limit_batches (the epoch as a user runs it); else 2 batches a loop.
FULL_EPOCH = os.environ.get("BENCH_FULL_EPOCH") == "1"
LIMIT = None if FULL_EPOCH else 2
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
BUDGET_GIB = 8.0
CHILD_TIMEOUT_S = 4 * 3600 if FULL_EPOCH else 1800
MIB = 2**20

_CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[4]))
from diffkg_fast.utils.allocator import keep_freed_memory, keep_requested
if keep_requested():
    keep_freed_memory()  # as the CLI does, and with the CLI's switch
import diffkg_fast.train.sampling as sampling
import diffkg_fast.train.trainer as tr
from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.model.diffkg import KGDiffusion
from diffkg_fast.train.config import make_config


def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


phases = []
cur = {"name": "interpreter + imports", "t": t_start}
can_reset = True


def mark(name):
    # Close the current phase (its peak RSS, RSS at its end, seconds) and open `name`.
    global can_reset
    now = time.perf_counter()
    phases.append({"phase": cur["name"], "peak_mb": status_mb("VmHWM"),
                   "rss_end_mb": status_mb("VmRSS"), "s": now - cur["t"]})
    can_reset = reset_peak() and can_reset
    cur["name"], cur["t"] = name, time.perf_counter()


def wrap(owner, attr, before, after=None):
    real = getattr(owner, attr)

    def inner(*args, **kw):
        mark(before() if callable(before) else before)
        out = real(*args, **kw)
        if after:
            mark(after)
        return out

    setattr(owner, attr, inner)


evals = iter(["validation ranking (all users)", "test ranking (all users)"])
wrap(sampling, "sample_negatives", "negative sampling", after="recommender steps")
wrap(KGDiffusion, "train_pass", "diffusion training")
wrap(KGDiffusion, "rebuild", "rebuild")
wrap(tr, "evaluate_split", lambda: next(evals))

mark("load dataset")
ds = KGDataset.load(sys.argv[1])
mark("train set-up (graphs, model, denoiser, optimisers)")
cfg = make_config(epoch=1, **json.loads(sys.argv[3]))
t0 = time.perf_counter()
limit = int(sys.argv[2])
res = tr.train(ds, cfg, log=lambda s: print(s, file=sys.stderr, flush=True),
               limit_batches=limit if limit > 0 else None)
train_s = time.perf_counter() - t0
mark("end")
den = res.model.diffusion.denoiser
print(json.dumps({
    "phases": phases,
    "can_reset_peak": can_reset,
    "train_s": train_s,
    "time": res.history[0]["time"],
    "kg_edges": res.history[0]["info"]["kg_edges"],
    "val_users": res.val.get("n_users"),
    "model_params": sum(p.numel() for p in res.model.encoder.parameters()),
    "denoiser_params": sum(p.numel() for p in den.parameters()),
    "torch": torch.__version__,
}))
"""


def alibaba_shaped(seed: int = 0) -> KGDataset:
    """The synthetic medication dataset of Alibaba-iFashion's shape (module docstring)."""
    rec = synthetic_records_scaled("alibaba", seed=seed, **COHORT)
    return build_medication_dataset(rec, seed=seed, name="alibaba-shaped", **KG_OPTIONS)


def expected_sizes_mb(ds: KGDataset, cfg: RunConfig, model_params: int,
                      denoiser_params: int) -> dict[str, float]:
    """Where the memory should go: the big tensors, computed from the shapes (float32)."""
    B, E, U, n_i = cfg["batch"], ds.n_entities, ds.n_users, ds.n_items
    f32 = 4 / MIB
    return {
        # [W_x | W_e] (hidden x (E + emb)) and W_out (E x hidden), plus biases.
        "denoiser_params": denoiser_params * f32,
        "denoiser_grads": denoiser_params * f32,
        "denoiser_adam_moments": 2 * denoiser_params * f32,
        "recommender_params_grads_adam": 4 * model_params * f32,
        # One dense B x E block (KG rows x0, the noise, x_t, the dropout output, x0_hat and its
        # gradient are each one such block in a diffusion step; rebuild holds a few per step).
        "dense_kg_row_block_BxE": B * E * f32,
        # InfoNCE logits of one step: B x U (users) + B x I (items); logsumexp's backward holds
        # a second copy of each.
        "infonce_logits_user_BxU": B * U * f32,
        "infonce_logits_item_BxI": B * n_i * f32,
        "eval_scores_block_test_batch_x_I": cfg["test_batch"] * n_i * f32,
        "kg_csr_with_inverses": 2 * ds.n_triplets * 3 * 8 / MIB,
        "public_code_dense_ExE_float64": E * E * 8 / MIB,
    }


def _fmt_phases(phases: list[dict[str, Any]]) -> str:
    lines = [f"{'phase':<52}{'peak RSS':>12}{'RSS at end':>12}{'seconds':>10}",
             "-" * 86]
    for p in phases:
        lines.append(f"{p['phase']:<52}{p['peak_mb']:>9.0f} MB{p['rss_end_mb']:>9.0f} MB"
                     f"{p['s']:>10.1f}")
    return "\n".join(lines)


# The configurations measured: DiffKG's defaults (the exact model), and every large-KG option
# (docs/large-kg.md) with the contrastive loss's denominators sampled.
MODES: dict[str, dict[str, Any]] = {
    "exact": {},
    "large-kg": {"diffusion_mode": "sampled", "diffusion_negatives": 256, "ckgc_samples": 256,
                 "denoiser_adam": "lazy", "rebuild_mode": "sampled", "cl_mode": "sampled",
                 "cl_negatives": 1024},
}


def _extrapolated(time_s: dict[str, float], ds: KGDataset, cfg: RunConfig) -> dict[str, float]:
    """The trainer's phase seconds scaled to a full epoch (module docstring: ``LIMIT``)."""
    if LIMIT is None:
        return {**time_s, "total": round(sum(time_s.values()), 1)}
    n_kg, n_rec = _batches(ds, cfg)
    scale = {"diffusion": n_kg / LIMIT, "rebuild": n_kg / LIMIT, "recommender": n_rec / LIMIT}
    out = {k: round(v * scale.get(k, 1.0), 1) for k, v in time_s.items()}
    out["total"] = round(sum(out.values()), 1)
    return out


def _batches(ds: KGDataset, cfg: RunConfig) -> tuple[int, int]:
    """An epoch's diffusion (and rebuild) batches and its recommender steps (the batch grown
    as the trainer grows it under ``max_epoch_steps``)."""
    T = int(ds.train.nnz)
    return (-(-ds.n_entities // cfg["batch"]),
            -(-T // epoch_batch(T, cfg["batch"], cfg["max_epoch_steps"])))


def machine_rates(threads: int) -> dict[str, float]:
    """This machine's GEMM rate (GFLOP/s, the diffusion's own 1,024 x 89,196 x 1,000 shape, best
    of 3) and copy bandwidth (GB/s, read + write of a 365 MB block, best of 5) at ``threads``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, ALIBABA["n_entities"]), torch.randn(ALIBABA["n_entities"], 1000)
        out = torch.empty(1024, 1000)
        gemm = min(_timed_once(lambda: torch.mm(a, b, out=out)) for _ in range(3))
        dst = torch.empty_like(a)
        copy = min(_timed_once(lambda: dst.copy_(a)) for _ in range(5))
    finally:
        torch.set_num_threads(n)
    return {"gemm_gflops": 2 * a.shape[0] * a.shape[1] * b.shape[1] / gemm / 1e9,
            "copy_gbps": 2 * a.numel() * 4 / copy / 1e9}


def _timed_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compulsory_work(ds: KGDataset, cfg: RunConfig) -> dict[str, dict[str, float]]:
    """The exact model's compulsory FLOPs and bytes of each phase of one epoch (float32).

    diffusion: 5 B x E x H GEMMs a batch (x W1, the output layer, its three gradients) over all
    E rows, 10 E^2 H; bytes: Adam over the 2 E H denoiser weights each step (read weight,
    gradient, two moments; write three: 28 B a weight). rebuild (the hidden-space sampler): the
    last B x H x E GEMM, 2 E^2 H; a B x H x 2H GEMM a step, 4 steps E H^2; the factors M, G once,
    4 E H^2. recommender, per step: InfoNCE's three GEMMs over users and items, 6 B (U + I) d;
    per view (two) and LightGCN layer, forward and two backward products, 2 nnz d FLOP each, and
    the CSR (12 B an entry) plus the table read and written once (8 (U + I) d B); Adam over the
    embeddings (28 B a weight). evaluation: validation and test score every user against every
    item, 2 x 2 U I d. The RGAT layer (triplet_num-capped KG) and elementwise work are left out:
    a lower bound."""
    E, H, B, d = ds.n_entities, cfg["dims"][-1], cfg["batch"], cfg["latdim"]
    U, n_i, T, S = ds.n_users, ds.n_items, int(ds.train.nnz), cfg["steps"]
    n_kg, n_rec = _batches(ds, cfg)
    nnz = 2 * T + U + n_i  # the symmetric user-item adjacency with self-loops
    layers, views = cfg["gnn_layer"], 2
    sparse_passes = views * layers * 3
    return {
        "diffusion": {"flop": 10 * E * E * H, "bytes": n_kg * 28 * 2 * E * H},
        "rebuild": {"flop": 2 * E * E * H + 4 * S * E * H * H + 4 * E * H * H, "bytes": 0},
        "recommender": {
            "flop": n_rec * (6 * B * (U + n_i) * d + sparse_passes * 2 * nnz * d),
            "bytes": n_rec * (sparse_passes * (12 * nnz + 8 * (U + n_i) * d)
                              + 28 * (U + E) * d)},
        "evaluation": {"flop": 2 * 2 * U * n_i * d, "bytes": 0},
    }


def _bounds_table(time_s: dict[str, float], work: dict[str, dict[str, float]],
                  rates: dict[str, float]) -> str:
    lines = [f"{'phase':<14}{'measured s':>12}{'TFLOP':>9}{'GB':>9}{'bound s':>10}{'ratio':>8}"]
    for phase, w in work.items():
        bound = w["flop"] / (rates["gemm_gflops"] * 1e9) + w["bytes"] / (rates["copy_gbps"] * 1e9)
        got = time_s.get(phase, float("nan"))
        lines.append(f"{phase:<14}{got:>12,.0f}{w['flop'] / 1e12:>9.1f}{w['bytes'] / 1e9:>9.1f}"
                     f"{bound:>10,.0f}{got / bound:>8.2f}")
    return "\n".join(lines)


def _limit_note(ds: KGDataset, cfg: RunConfig) -> str:
    n_kg, n_rec = _batches(ds, cfg)
    if LIMIT is None:
        return (f"complete: diffusion and rebuild {n_kg} batches each, recommender {n_rec} "
                "steps, validation and test ranking")
    return (f"diffusion and rebuild ran {LIMIT} of {n_kg} batches, recommender {LIMIT} of "
            f"{n_rec} steps; validation and test ranking complete")


@pytest.mark.benchmark(group="memory_alibaba_shape")
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", list(MODES))
def test_peak_memory_alibaba_shape(benchmark, tmp_path: Path, mode: str) -> None:
    t = time.perf_counter()
    ds = alibaba_shaped()
    build_s = time.perf_counter() - t
    assert (ds.n_users, ds.n_items, ds.n_entities) == (
        ALIBABA["n_users"], ALIBABA["n_items"], ALIBABA["n_entities"])
    n_inter = int(ds.train.nnz + ds.valid.nnz + ds.test.nnz)
    assert abs(ds.n_triplets - 558_000) < 0.01 * 558_000, ds.n_triplets
    assert abs(n_inter - 1_781_093) < 0.01 * 1_781_093, n_inter
    path = tmp_path / "alibaba-shaped.npz"
    t = time.perf_counter()
    ds.save(path)
    save_s = time.perf_counter() - t

    rates = machine_rates(THREADS)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    holder: dict[str, Any] = {}

    def run_child() -> None:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(LIMIT or 0),
                              json.dumps(MODES[mode]), str(THREADS)], env=env,
                             capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        holder["process_s"] = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
        holder["res"] = json.loads(out.stdout.strip().splitlines()[-1])
        holder["log"] = out.stderr.strip().splitlines()

    benchmark.pedantic(run_child, rounds=1, iterations=1)
    res = holder["res"]
    phases = res["phases"]
    peak_mb = max(p["peak_mb"] for p in phases)
    top = max(phases, key=lambda p: p["peak_mb"])
    cfg = make_config(epoch=1, **MODES[mode])
    expected = expected_sizes_mb(ds, cfg, res["model_params"], res["denoiser_params"])
    info = {
        "dataset": {"users": ds.n_users, "items": ds.n_items, "entities": ds.n_entities,
                    "triplets": ds.n_triplets, "interactions": n_inter,
                    "train_interactions": int(ds.train.nnz), "cohort": COHORT,
                    "kg_options": KG_OPTIONS},
        "dataset_build_s": round(build_s, 1),
        "dataset_save_s": round(save_s, 1),
        "limit_batches": LIMIT,
        "limit_note": _limit_note(ds, cfg),
        "peak_rss_mb": round(peak_mb, 1),
        "peak_rss_gib": round(peak_mb / 1024, 3),
        "peak_phase": top["phase"],
        "budget_gib": BUDGET_GIB,
        "per_phase": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in p.items()}
                      for p in phases],
        "per_phase_peaks_exact": res["can_reset_peak"],
        "phase_s": {k: round(v, 1) for k, v in res["time"].items()},
        "child_process_s": round(holder["process_s"], 1),
        "model_params": res["model_params"],
        "denoiser_params": res["denoiser_params"],
        "expected_mb": {k: round(v, 1) for k, v in expected.items()},
        "threads": THREADS,
        "mode": mode,
        "options": MODES[mode],
        # Each limited phase times batches_full / batches_run (the rebuild's one-off factors,
        # 2·E·H² per rebuild, are multiplied too: an over-estimate); evaluation is complete.
        "extrapolated_epoch_s": _extrapolated(res["time"], ds, cfg),
        "machine_rates": {k: round(v, 1) for k, v in rates.items()},
        "compulsory_work": compulsory_work(ds, cfg),
    }
    benchmark.extra_info.update(info)
    print(f"\nAlibaba-iFashion-shaped dataset: {ds.n_users:,} users, {ds.n_items:,} items, "
          f"{ds.n_entities:,} entities, {ds.n_triplets:,} triplets, {n_inter:,} interactions; "
          f"built in {build_s:.1f} s, saved in {save_s:.1f} s")
    print(f"child: 1 epoch, limit_batches={LIMIT} ({info['limit_note']}), "
          f"{holder['process_s']:.0f} s; trainer phases: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in res["time"].items()))
    print(_fmt_phases(phases))
    label = "measured full epoch" if LIMIT is None else "extrapolated full epoch"
    print(f"mode {mode} {MODES[mode]}, {THREADS} thread(s); {label} (s): "
          + ", ".join(f"{k} {v:,.0f}" for k, v in info["extrapolated_epoch_s"].items()))
    print(f"PEAK RSS {peak_mb:,.0f} MB = {peak_mb / 1024:.2f} GiB (in: {top['phase']}); "
          f"budget {BUDGET_GIB} GiB; per-phase peaks exact: {res['can_reset_peak']}")
    if mode == "exact":
        print(f"compulsory work of the exact model's epoch against its phases (bound: FLOPs at "
              f"{rates['gemm_gflops']:.0f} GFLOP/s, this machine's GEMM rate, plus bytes at "
              f"{rates['copy_gbps']:.1f} GB/s, its copy rate; {THREADS} thread(s)):")
        print(_bounds_table(info["extrapolated_epoch_s"], info["compulsory_work"], rates))
    print("expected big tensors (MB): " + ", ".join(f"{k} {v:,.0f}" for k, v in expected.items()))
    for line in holder["log"]:
        if line.startswith(("epoch", "best")):
            print("  trainer: " + line)
    assert peak_mb < BUDGET_GIB * 1024, info
