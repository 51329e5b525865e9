"""Benchmark: InfoNCE's denominator ``logsumexp_mm(z1, z2)``, and the whole BPR step around it.

Run ``pytest bench/bench_contrastive.py --benchmark-only`` (CPU; ``OMP_NUM_THREADS=2``).

- ``logsumexp_mm-medication``: forward + backward at the medication preset's user view, B = 1,024
  batch users against all N = 6,350 users, d = 64. Providers ``reference``
  (``torch.logsumexp(a @ bᵀ)`` through autograd) and ``cpu_kernel`` (the one-buffer backend of
  :mod:`diffkg_fast.ops.contrastive`: the logits kept, the exponentials in a cache-sized scratch).
- ``sampled_logsumexp-300k``: forward + backward of the sampled InfoNCE denominator of the
  large-KG regime at 300k entities (a batch of 33,796 users grown by ``max_epoch_steps``, 1,024
  sampled negatives): ``reference`` (autograd through the shifted, masked, concatenated logits)
  and ``cpu_kernel`` (one B × k block).
- ``bpr_step-medication``: one training step of the medication preset's DiffKG (both KG views,
  LightGCN, code term, BPR, InfoNCE, backward), as the trainer runs it, on the default cohort.
  ``reference``: every kernel backend off, as ``bench_epoch.py``'s ``reference``;
  ``cpu_kernel``: ``backend="auto"``.

``extra_info``: ``flop`` (the op's compulsory three GEMMs), ``minor_faults`` (page faults per
call, ``getrusage``: ~8,000 a call for the reference op's fresh blocks against 2, ~21,500 a step
against ~340). Figures: ``bench/results/cpu-contrastive.txt``.
"""

from __future__ import annotations

import functools
import resource

import pytest
import torch

from diffkg_fast.ops.contrastive import logsumexp_mm, sampled_logsumexp

B, N, D = 1024, 6350, 64


def _timed(benchmark, run, rounds: int) -> None:
    """``benchmark.pedantic`` plus the page faults per call."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    benchmark.extra_info["minor_faults"] = round(faults / (rounds + 2))


@pytest.mark.parametrize("provider", ["reference", "cpu_kernel"])
def test_logsumexp_mm(benchmark, provider: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).div_(0.1)
    b = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    a.requires_grad_(True)
    b.requires_grad_(True)
    backend = "reference" if provider == "reference" else "cpu"

    def run():
        a.grad = b.grad = None
        logsumexp_mm(a, b, backend=backend).sum().backward()

    benchmark.group = "logsumexp_mm-medication"
    # Both run the compulsory three GEMMs (the forward's, the backward's two); "bytes": the
    # inputs and their gradients (the B × N logits are the op's own traffic, not compulsory).
    benchmark.extra_info.update(flop=3 * 2 * B * N * D, bytes=4 * (B * D + N * D) * 2)
    _timed(benchmark, run, 10)


# The large-KG regime's sampled denominator at 300k entities (max_epoch_steps=128: a batch of
# 33,796 users against cl_negatives = 1,024 sampled ones; docs/large-kg-epochs.md).
B_LARGE, K_LARGE = 33_796, 1_024


@pytest.mark.parametrize("provider", ["reference", "cpu_kernel"])
def test_sampled_logsumexp(benchmark, provider: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(B_LARGE, D, generator=g), dim=-1).div_(0.1)
    b = torch.nn.functional.normalize(torch.randn(K_LARGE, D, generator=g), dim=-1)
    pos = (a * torch.nn.functional.normalize(torch.randn(B_LARGE, D, generator=g),
                                             dim=-1)).sum(-1)
    nodes = torch.randint(0, 385_904, (B_LARGE,), generator=g)
    negatives = torch.randint(0, 385_904, (K_LARGE,), generator=g)
    leaves = [t.requires_grad_(True) for t in (a, b, pos)]
    backend = "reference" if provider == "reference" else "cpu"

    def run():
        for t in leaves:
            t.grad = None
        sampled_logsumexp(*leaves, nodes, negatives, 5.9, backend=backend).sum().backward()

    benchmark.group = "sampled_logsumexp-300k"
    benchmark.extra_info.update(flop=3 * 2 * B_LARGE * K_LARGE * D,
                                bytes=4 * (B_LARGE * D + K_LARGE * D + B_LARGE) * 2)
    _timed(benchmark, run, 5)


@functools.lru_cache(maxsize=1)
def _medication_step():
    """DiffKG with the medication preset on the default cohort, and one training batch."""
    from diffkg_fast.data.build import build_dataset
    from diffkg_fast.model import DiffKG
    from diffkg_fast.train.config import resolve_config
    from diffkg_fast.train.sampling import PairSampler

    ds = build_dataset("synthetic")
    cfg = resolve_config(preset="medication")
    model = DiffKG.from_dataset(ds, **cfg.model_options())
    sampler = PairSampler(ds.train, cfg["batch"], seed=0)
    batch = next(sampler.batches(sampler.negatives()))
    return model, batch


@pytest.mark.parametrize("provider", ["reference", "cpu_kernel"])
def test_bpr_step(benchmark, request, provider: str) -> None:
    if provider == "reference":
        request.getfixturevalue("reference_ops")
    model, batch = _medication_step()
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        loss, _ = model(batch)
        loss.backward()

    benchmark.group = "bpr_step-medication"
    _timed(benchmark, run, 10)
