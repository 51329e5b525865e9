"""Benchmark: the losses' row lookups, ``table[index]`` against :func:`diffkg_fast.ops.rows.rows`.

Run ``OMP_NUM_THREADS=2 pytest bench/bench_rows.py --benchmark-only`` (CPU).

``rows`` (``F.embedding``) replaced ``table[index]`` so that two runs of one seed at two threads
end bitwise equal (issue 20 §4): the indexing backward adds repeated rows with atomic float adds
in the threads' timing order, ``rows``'s adds each table row's gradients in index order.

- ``rows-medication``: the 10 lookups of one DiffKG training step at the medication preset's
  shapes, forward + backward: a batch of B = 1,024 (user, positive, negative) triples into the
  user and code tables (6,350 × 64) and the item table (112 × 64): BPR 3, code BPR 3, InfoNCE 4.
- ``bpr_step-rows``: one training step of the medication preset's DiffKG on the default cohort
  (``bench_contrastive.py``'s ``bpr_step``, every kernel on), with the losses' lookups done
  either way: what the change costs a step.

Figures: ``bench/results/cpu-rows.txt``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from diffkg_fast.ops.rows import rows

B, N_USERS, N_ITEMS, D = 1024, 6350, 112, 64


def _indexing(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return table[index]


PROVIDERS = {"indexing": _indexing, "rows": rows}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_lookups(benchmark, provider: str) -> None:
    lookup = PROVIDERS[provider]
    g = torch.Generator().manual_seed(0)
    users, codes = (torch.randn(N_USERS, D, generator=g).requires_grad_() for _ in range(2))
    items = torch.randn(N_ITEMS, D, generator=g).requires_grad_()
    u = torch.randint(0, N_USERS, (B,), generator=g)
    pos, neg = (torch.randint(0, N_ITEMS, (B,), generator=g) for _ in range(2))

    def run():
        for t in (users, codes, items):
            t.grad = None
        out = [lookup(users, u), lookup(items, pos), lookup(items, neg),  # BPR
               lookup(codes, u), lookup(items, pos), lookup(items, neg),  # code BPR
               lookup(users, u), lookup(users, u), lookup(items, pos), lookup(items, pos)]
        sum(x.sum() for x in out).backward()

    benchmark.group = "rows-medication"
    if provider == "indexing":  # the baseline of bench/summarize.py's ratio column
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=3)


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


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bpr_step(benchmark, monkeypatch, provider: str) -> None:
    import diffkg_fast.model.diffkg.model as model_mod
    import diffkg_fast.model.losses as losses_mod

    for mod in (model_mod, losses_mod):  # the modules that look rows() up at call time
        monkeypatch.setattr(mod, "rows", PROVIDERS[provider])
    model, batch = _medication_step()
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        loss, _ = model(batch)
        loss.backward()

    benchmark.group = "bpr_step-rows"
    if provider == "indexing":
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
