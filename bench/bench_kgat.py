"""Benchmark: KGAT's three kinds of work at the default cohort's size, ours vs plain PyTorch.

Run ``OMP_NUM_THREADS=1 pytest bench/bench_kgat.py --benchmark-only`` (one torch thread: the CPU
machine is shared). The default synthetic cohort (6,350 patients, 112 medications, 3,573
entities): the CKG has 9,923 nodes and 312,892 edges (2 × 141,831 interactions, 2 × 14,615 KG
triplets), 9 relations; KGAT's defaults (d = k = 64, layers 64-32-16, bi-interaction).

Groups and providers:

- ``kgat-cf-step``: one CF step (propagation over the whole CKG, BPR + EmbLoss on a batch of
  1,024 training pairs, backward, Adam step). ``ours``: ``csr_spmm``'s C++ kernel (its backward
  on ``A^T``, built once per attention state, i.e. in the untimed warm-up); ``reference``: every
  op's plain-PyTorch backend (``torch.sparse.mm``).
- ``kgat-attention``: one attention refresh (``pi`` for every CKG edge, softmax per head).
  ``ours``: per relation ``P = e W_r`` and ``T = tanh(P + e_r)`` once per node the relation
  touches, ``pi`` as the SDDMM ``T P^T`` at its edges (``torch.sparse.sampled_addmm``), then
  ``segment_softmax`` over the head CSR; ``recbole``: RecBole's ``update_attentive_A`` in plain
  PyTorch (``W_r`` applied per edge end, a COO tensor, ``torch.sparse.softmax``).
- ``kgat-kg-step``: one TransR step on 1,024 KG triplets. ``ours``: the batch sorted by
  relation, one matrix product per relation; ``recbole``: RecBole's per-triplet ``bmm`` with
  gathered ``W_r``.

Each test checks its provider's output against the other's before timing.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from _graphs import default_cohort, first_pairs

from diffkg_fast.model.kgat import KGAT
from diffkg_fast.model.losses import emb_norm_reg
from diffkg_fast.ops._extension import extension_available
from diffkg_fast.train.sampling import sample_negatives


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    extension_available()  # build (or load) the extension before anything is timed
    yield



def _model() -> KGAT:
    m = KGAT.from_dataset(default_cohort())
    m.configure_optimizer(1e-3)
    m.train()
    return m



def _info(benchmark, m: KGAT) -> None:
    benchmark.extra_info.update({"threads": torch.get_num_threads(), "nodes": m.ckg.n_entities,
                                 "edges": m.ckg.n_edges, "relations": m.ckg.n_relations})


# ---------------------------------------------------------------------- CF step
@pytest.mark.parametrize("provider", ["ours", "reference"])
def test_cf_step(benchmark, request, provider: str) -> None:
    benchmark.group = "kgat-cf-step"
    m = _model()
    m.mess_dropout = 0.0  # the same loss for both providers, step after step
    batch = first_pairs()
    if provider == "reference":
        ours = float(m(batch)[0])
        request.getfixturevalue("reference_ops")  # from here on every op's reference
        assert float(m(batch)[0]) == pytest.approx(ours, rel=1e-5)
    opt = m._optimizer
    assert opt is not None

    def step() -> None:
        loss, _ = m(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: the CSR parts and A^T of this attention state
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    _info(benchmark, m)


# ---------------------------------------------------------------------- attention refresh
@torch.no_grad()
def recbole_update_attention(m: KGAT) -> torch.Tensor:
    """RecBole's ``update_attentive_A`` on our CKG: per relation, ``W_r`` applied to every
    edge's head and tail rows, ``pi``, one COO tensor, ``torch.sparse.softmax``; the values come
    back in CSR (head, tail) order."""
    ego = torch.cat([m.user_embedding, m.entity_embedding])
    w = m.trans_w.view(-1, m.d, m.k)
    rows, cols, scores = [], [], []
    for r in range(m.ckg.n_relations):
        idx = torch.where(m.ckg.rel == r)[0]
        hs, ts = m.ckg.row[idx], m.ckg.col[idx]
        h_e, t_e = ego[hs] @ w[r], ego[ts] @ w[r]
        scores.append((t_e * torch.tanh(h_e + m.relation_embedding[r])).sum(1))
        rows.append(hs)
        cols.append(ts)
    n = m.ckg.n_entities
    a = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]),
                                torch.cat(scores), (n, n), check_invariants=False)
    return torch.sparse.softmax(a, dim=1).coalesce().values()


@pytest.mark.parametrize("provider", ["ours", "recbole"])
def test_attention_refresh(benchmark, provider: str) -> None:
    benchmark.group = "kgat-attention"
    m = _model()
    m.update_attention()
    torch.testing.assert_close(m.attention, recbole_update_attention(m), rtol=1e-4,
                               atol=1e-6)
    fn = m.update_attention if provider == "ours" else functools.partial(
        recbole_update_attention, m)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    _info(benchmark, m)


# ---------------------------------------------------------------------- KG step
def recbole_kg_loss(m: KGAT, h, r, t, neg) -> torch.Tensor:
    """RecBole's ``calculate_kg_loss``: ``bmm`` of each triplet's rows with its gathered
    ``W_r``."""
    w = m.trans_w[r].view(-1, m.d, m.k)

    def proj(ent):
        return torch.bmm(m.entity_embedding[ent].unsqueeze(1), w).squeeze(1)

    eh, et, en = proj(h), proj(t), proj(neg)
    er = m.relation_embedding[r]
    loss = F.softplus((eh + er - et).pow(2).sum(1) - (eh + er - en).pow(2).sum(1)).mean()
    return loss + m.reg_weight * emb_norm_reg(eh, er, et, en)


def _kg_batch(m: KGAT):
    g = torch.Generator().manual_seed(0)
    tri = m.kg_triplets[torch.randperm(len(m.kg_triplets), generator=g)[:1024]]
    neg = sample_negatives(tri[:, 0], m.kg_keys, m.n_entities, g)
    return tri[:, 0], tri[:, 1], tri[:, 2], neg


@pytest.mark.parametrize("provider", ["ours", "recbole"])
def test_kg_step(benchmark, provider: str) -> None:
    benchmark.group = "kgat-kg-step"
    m = _model()
    batch = _kg_batch(m)
    assert float(m.kg_loss(*batch)[0]) == pytest.approx(float(recbole_kg_loss(m, *batch)),
                                                        rel=1e-5)
    opt = m._optimizer
    assert opt is not None

    def step() -> None:
        loss = m.kg_loss(*batch)[0] if provider == "ours" else recbole_kg_loss(m, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
    _info(benchmark, m)

