"""Benchmark: one KGIN training step at the default cohort's size, ours vs plain PyTorch.

Run ``OMP_NUM_THREADS=1 pytest bench/bench_kgin.py --benchmark-only`` (one torch thread: the CPU
machine is shared). The default synthetic cohort (6,350 patients, 112 medications, 3,573
entities, 14,615 KG triplets), KGIN's RecBole defaults (d = 64, 3 hops, 4 intents), a batch of
1,024 training pairs: the whole-graph propagation, BPR + EmbLoss + the intent independence
loss, backward, Adam step.

Providers (group ``kgin-step``): ``ours``, the user mean of every hop as one CSR product
through ``csr_spmm``'s C++ kernel (forward and the backward on ``Aᵀ``); ``reference``, every
op's plain-PyTorch backend (``torch.sparse.mm``). The KG side (relational path-aware mean) is
``index_add_`` in both: RecBole's ``scatter_mean`` written without torch_scatter, no kernel of
ours applies. Both run without dropout (``node_dropout_rate`` 1 keeps every KG edge,
``mess_dropout_rate`` 0), so they compute the same loss, checked before timing.

KGCN has no benchmark here: its receptive field is a dense ``B × k^h`` gather of sampled
neighbours per batch (no sparse product, no segment softmax), so no kernel of ours applies.
"""

from __future__ import annotations

import pytest
import torch
from _graphs import default_cohort, first_pairs

from diffkg_fast.model.kgin import KGIN
from diffkg_fast.ops._extension import extension_available


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    extension_available()  # build (or load) the extension before anything is timed
    yield




@pytest.mark.parametrize("provider", ["ours", "reference"])
def test_train_step(benchmark, request, provider: str) -> None:
    benchmark.group = "kgin-step"
    m = KGIN.from_dataset(default_cohort(), node_dropout_rate=1.0, mess_dropout_rate=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.train()
    batch = first_pairs()
    if provider == "reference":
        ours = float(m(batch)[0])
        request.getfixturevalue("reference_ops")  # from here on every op's reference
        assert float(m(batch)[0]) == pytest.approx(ours, rel=1e-5)

    def step() -> None:
        loss, _ = m(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: the CSR parts of the interaction matrix and its transpose
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"threads": torch.get_num_threads(),
                                 "entities": default_cohort().n_entities})
