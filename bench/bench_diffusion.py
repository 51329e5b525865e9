"""Benchmark: the diffusion side of a DiffKG epoch: a rebuild pass and a diffusion training pass
over all entity rows, and the sampler's last GEMM + top-k alone.

Run ``pytest bench/bench_diffusion.py --benchmark-only`` (on a CPU: ``OMP_NUM_THREADS=2``; on a
GPU machine ``bench/gpu_suite.sh`` runs it). DiffKG's denoiser (``dims=[1000]``, 5 steps,
``Params.py``), batch 1024, ``rebuild_k = 1``, keepRate 0.5, d = 64; synthetic Zipf KGs:

- ``medication``: 3,573 entities, 29,230 edges (the default cohort's KG with inverses), 112
  items, 6,350 users;
- ``alibaba`` (Alibaba-iFashion): 89,196 entities, 558,310 edges, 30,040 items, 114,737 users.
  On a CPU only the first ``CPU_ALIBABA_BATCHES`` batches of each pass run (the reference's
  rebuild pass would take ~25 min here); ``extra_info`` says so (``batches_run`` of
  ``batches_full``).

Groups ``diffusion-<shape>-<pass>``, pass ``rebuild`` (denoise every row, top-1, intersect with
the KG, keepRate mask) or ``train`` (q_sample, denoiser forward / backward, Adam step per
batch). Providers:

- ``reference``: the plain-PyTorch ops (``backend="reference"``): ten ``B × E × H`` GEMMs per
  rebuild batch, autograd through the reference loss;
- ``cpu_kernel`` (CPU) / ``triton`` (CUDA): ``backend="auto"``: the hidden-space sampler
  (``ops/diffusion_sample_fused.py``; the Triton GEMM + top-k on CUDA) and the fused loss
  (``ops/diffusion_loss_fused.py``; Triton row kernels on CUDA), float32;
  ``triton_tf32`` / ``triton_bf16``: the same with ``precision="tf32"`` / ``"bf16"``;
- ``public_loop`` (medication only, it is slow): the structure of DiffKG's public code: the
  KG adjacency dense on the host in float64, each batch's rows sliced there and copied to the
  device, the denoiser stepped in a Python loop, and the rebuild's candidates checked one by
  one in Python (``.item()`` per edge).

``extra_info``: ``flop`` = the GEMM FLOPs of the reference's pass (2·B·E·H per ``B × E × H``
GEMM: 10 per rebuild batch, 5 per training batch: forward 2, backward 3), so
``flop / time`` is the effective rate of the pass (``summarize.py``'s TFLOP/s; the hidden-space
sampler executes fewer: ``executed_flop``); GPU: ``peak_bytes`` as in bench_attention.py.
The ``gemm_topk`` group times the sampler's last ``1024 × 1000 × E`` GEMM with its top-k:
``torch.addmm`` + ``torch.topk`` (``reference``) against the fused Triton kernel; its ``flop``
is the GEMM's own. The ``sampler_steps`` group (CUDA) times the sampler's reverse loop alone,
each step's element-wise work as torch ops (``torch_steps``) or as one Triton kernel
(``triton``, the default on CUDA), to show whether the kernel pays.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from _graphs import zipf_kg

from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    diffusion_loss,
    draw_timesteps_noise,
    kg_rows,
    sample_topk,
)
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.ops.rebuild import rebuild_kg

SHAPES = {"medication": (3_573, 29_230, 112), "alibaba": (89_196, 558_310, 30_040)}
HIDDEN, BATCH, D, STEPS = 1000, 1024, 64, 5
CPU_ALIBABA_BATCHES = 2
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PROVIDERS = (("reference", "triton", "triton_tf32", "triton_bf16", "public_loop") if CUDA
             else ("reference", "cpu_kernel", "public_loop"))
PRECISION = {"triton_tf32": "tf32", "triton_bf16": "bf16"}


@functools.lru_cache(maxsize=2)
def kg_graph(shape: str) -> KGCSR:
    n, nnz, _ = SHAPES[shape]
    return zipf_kg(n, nnz, 8, DEVICE)


def n_batches(shape: str) -> tuple[int, int]:
    """(batches run, batches of a full pass)."""
    full = math.ceil(SHAPES[shape][0] / BATCH)
    return (min(full, CPU_ALIBABA_BATCHES) if shape == "alibaba" and not CUDA else full), full


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def rebuild_pass(den, kg: KGCSR, rows: torch.Tensor, backend: str, precision: str) -> int:
    sched = DiffusionSchedule(STEPS)
    _, idx = sample_topk(den, kg.rowptr, kg.col, rows, sched, 1, batch_size=BATCH,
                         backend=backend, precision=precision)
    h, _, _ = rebuild_kg(idx, (kg.row, kg.col, kg.rel), 0.5, torch.Generator().manual_seed(0),
                         rows=rows, n_entities=kg.n_entities)
    return h.numel()


def train_pass(den, opt, kg: KGCSR, rows, r_t_u, ent, n_items, backend, precision) -> float:
    sched = DiffusionSchedule(STEPS)
    gen = torch.Generator(DEVICE).manual_seed(0)
    total = 0.0
    for start in range(0, rows.numel(), BATCH):
        batch = rows[start:start + BATCH]
        x0 = kg_rows(kg.rowptr, kg.col, batch, kg.n_entities)
        t, noise = draw_timesteps_noise(x0, STEPS, gen)
        loss, _ = diffusion_loss(den, x0, t, noise, sched, n_items, r_t_u, ent[batch], 0.5,
                                 backend=backend, precision=precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total


def public_rebuild(den, dense_host: np.ndarray, kg: KGCSR, rows) -> int:
    """DiffKG's rebuild structure: host rows, a Python step loop, a Python loop per edge."""
    sched = DiffusionSchedule(STEPS)
    c1, c2 = sched.posterior_coefs()
    edges = set(zip(kg.row.tolist(), kg.col.tolist(), strict=True))
    kept = 0
    with torch.no_grad():
        for start in range(0, rows.numel(), BATCH):
            batch = rows[start:start + BATCH]
            x = torch.from_numpy(dense_host[batch.cpu().numpy()]).float().to(DEVICE)
            for step in range(STEPS - 1, -1, -1):
                x = float(c1[step]) * den(x, step, dropout=False) + float(c2[step]) * x
            idx = torch.topk(x, 1, dim=-1).indices
            for i, h in enumerate(batch.tolist()):
                t = int(idx[i, 0].item())  # a device sync per candidate, as DiffKG does
                kept += ((h, t) in edges) + ((t, h) in edges)
    return kept


def public_train(den, opt, dense_host: np.ndarray, rows, r_t_u, ent, n_items) -> float:
    sched = DiffusionSchedule(STEPS)
    gen = torch.Generator(DEVICE).manual_seed(0)
    total = 0.0
    for start in range(0, rows.numel(), BATCH):
        batch = rows[start:start + BATCH]
        x0 = torch.from_numpy(dense_host[batch.cpu().numpy()]).float().to(DEVICE)
        t, noise = draw_timesteps_noise(x0, STEPS, gen)
        loss, _ = diffusion_loss(den, x0, t, noise, sched, n_items, r_t_u, ent[batch], 0.5,
                                 backend="reference")
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total


# The two cheap GPU groups first: gpu_suite.sh gives this file a time limit, and the Alibaba
# passes of test_diffusion below take most of it.
@pytest.mark.skipif(not CUDA, reason="the fused GEMM + top-k kernel is the CUDA path")
@pytest.mark.parametrize("provider", ["reference", "triton", "triton_tf32", "triton_bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemm_topk(benchmark, shape: str, provider: str) -> None:
    from diffkg_fast.kernels.diffusion import linear_topk

    n_ent = SHAPES[shape][0]
    gen = torch.Generator(DEVICE).manual_seed(0)
    a = torch.tanh(torch.randn(BATCH, HIDDEN, device=DEVICE, generator=gen))
    w = torch.randn(n_ent, HIDDEN, device=DEVICE, generator=gen) / HIDDEN**0.5
    b = torch.randn(n_ent, device=DEVICE, generator=gen) * 1e-3
    if provider == "reference":
        def run():
            torch.topk(torch.addmm(b, a, w.T), 1, dim=-1)
            _sync()
    else:
        low = provider == "triton_bf16"
        a_, w_ = (a.bfloat16(), w.bfloat16()) if low else (a, w)

        def run():
            linear_topk(a_, w_, b, 1.0, 1, tf32=provider == "triton_tf32")
            _sync()
    benchmark.group = f"gemm_topk-{shape}"
    benchmark.extra_info.update(flop=2 * BATCH * HIDDEN * n_ent, device=DEVICE,
                                bytes=4 * (BATCH * HIDDEN + n_ent * HIDDEN + n_ent))
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.skipif(not CUDA, reason="the fused step kernel is the CUDA path")
@pytest.mark.parametrize("provider", ["torch_steps", "triton"])
def test_sampler_steps(benchmark, provider: str) -> None:
    """The hidden-space reverse loop of one rebuild batch (B = 1024, H = 1000, 5 steps) from its
    start summaries to the last activation: per step one ``B × H × 2H`` GEMM and either ~33
    small torch launches (``torch_steps``) or one Triton row kernel (``triton``). E does not
    enter the loop; the medication denoiser keeps the factors cheap to build."""
    from diffkg_fast.ops.diffusion_sample_fused import SamplerFactors, _last_hidden

    n_ent = SHAPES["medication"][0]
    den = Denoiser(n_ent, HIDDEN, 10, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    fac = SamplerFactors.build(den, DiffusionSchedule(steps=STEPS))
    gen = torch.Generator(DEVICE).manual_seed(0)
    start = [torch.randn(BATCH, HIDDEN, device=DEVICE, generator=gen) for _ in range(2)]
    start += [torch.rand(BATCH, device=DEVICE, generator=gen) * 50,
              torch.randn(BATCH, device=DEVICE, generator=gen)]
    fused = provider == "triton"

    def run():
        _last_hidden(fac, *(t.clone() for t in start), fused_steps=fused)  # it works in place
        _sync()
    benchmark.group = "sampler_steps-b1024-h1000"
    benchmark.extra_info.update(flop=(STEPS - 1) * 2 * BATCH * HIDDEN * 2 * HIDDEN,
                                device=DEVICE, baseline=not fused)
    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["rebuild", "train"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_diffusion(benchmark, shape: str, pass_: str, provider: str) -> None:
    if provider == "public_loop" and shape != "medication":
        pytest.skip("the public-code loop only at the medication size (it is slow)")
    n_ent, _, n_items = SHAPES[shape]
    kg = kg_graph(shape)
    run_b, full_b = n_batches(shape)
    rows = torch.arange(min(n_ent, run_b * BATCH), device=DEVICE)
    # A generator on the device: 178M host normals at Alibaba size would cost seconds per case.
    den = Denoiser(n_ent, HIDDEN, 10, generator=torch.Generator(DEVICE).manual_seed(0),
                   device=DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(1)
    r_t_u = torch.randn(n_items, D, device=DEVICE, generator=gen)
    ent = torch.randn(n_ent, D, device=DEVICE, generator=gen)
    backend = "reference" if provider in ("reference", "public_loop") else "auto"
    precision = PRECISION.get(provider, "fp32")
    dense = None
    if provider == "public_loop":  # the host float64 adjacency, built once as DiffKG does
        dense = np.zeros((n_ent, n_ent))
        dense[kg.row.cpu().numpy(), kg.col.cpu().numpy()] = 1.0
    if pass_ == "rebuild":
        den.eval()
        if dense is not None:
            fn = functools.partial(public_rebuild, den, dense, kg, rows)
        else:
            fn = functools.partial(rebuild_pass, den, kg, rows, backend, precision)
    else:
        den.train()
        opt = torch.optim.Adam(den.parameters(), lr=1e-3)
        if dense is not None:
            fn = functools.partial(public_train, den, opt, dense, rows, r_t_u, ent, n_items)
        else:
            fn = functools.partial(train_pass, den, opt, kg, rows, r_t_u, ent, n_items,
                                   backend, precision)

    def run():
        fn()
        _sync()

    n_rows = rows.numel()
    gemm = 2 * n_rows * n_ent * HIDDEN
    flop = gemm * (2 * STEPS if pass_ == "rebuild" else 5)
    executed = flop
    if pass_ == "rebuild" and backend == "auto":  # hidden-space sampler: see its docstring
        executed = (2 * 2 * n_ent * HIDDEN**2 + (STEPS - 1) * 2 * n_rows * HIDDEN * 2 * HIDDEN
                    + gemm)
    benchmark.group = f"diffusion-{shape}-{pass_}"
    benchmark.extra_info.update(
        entities=n_ent, edges=kg.n_edges, hidden=HIDDEN, batch=BATCH, steps=STEPS,
        device=DEVICE, precision=precision, threads=torch.get_num_threads(), rows=n_rows,
        batches_run=run_b, batches_full=full_b, flop=flop, executed_flop=executed)
    if run_b < full_b:
        benchmark.extra_info["note"] = (f"CPU: the first {run_b} of {full_b} batches of the "
                                        "pass (the hidden-space sampler's two H x E x H "
                                        "products are paid once per pass, not per batch)")
    if CUDA:
        _sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    slow = not CUDA and (shape == "alibaba" or provider == "public_loop")
    # GPU: the Alibaba reference rebuild is ~160 TFLOP of fp32 GEMMs (~3 s a round on an H200,
    # estimated): 2 rounds keep this file inside its share of gpu_suite.sh's 9 minutes.
    rounds = 1 if slow else (2 if CUDA and shape == "alibaba" else 3)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0 if slow else 1)
