"""The large-KG mode's step and rebuild (issue 21 §2): compact entity weights, the lazy Adam,
the sampled CKGC term and the candidate rebuild, against the dense computations they replace.

- the compact step (leaf copies of the touched entities' weights) gives the dense step's loss,
  gradients and, with ``denoiser_adam='dense'``, its Adam update;
- ``LazyAdam`` is ``torch.optim.Adam`` where every row is touched, and a literal per-row loop
  where not (untouched rows keep weights and moments);
- the sampled CKGC: at each of 200 draws its value and its gradient in the hidden activations
  are the exact ones and each item row gets ``(I/m)·count`` times its exact gradient (unbiased,
  as the draws' mean count, within 5 standard errors, confirms); with every item drawn once it
  is the exact CKGC; the item product stays current over a pass, lazy and dense; float64
  gradcheck;
- the candidate rebuild with every column as a competitor is the exact top-k, and with sampled
  competitors keeps every edge the exact one keeps;
- a run with all the options is seeded and resumes bit for bit (their bad values:
  tests/test_large_kg.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_large_kg import F64, N_ENT, N_ITEMS, ROWS, _denoiser, _kg, _tables, _within
from trainer_checks import assert_resumes_exactly, quiet

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model.diffkg import DiffKG
from diffkg_fast.model.diffkg.diffusion import row_grads
from diffkg_fast.model.diffkg.lazy_adam import LazyAdam
from diffkg_fast.ops.diffusion import Denoiser, DiffusionSchedule, sample_topk
from diffkg_fast.ops.diffusion_sampled import (
    ItemProduct,
    diffusion_loss_sampled,
    draw_sampled,
    edge_keys,
    entity_weights,
    touched,
)
from diffkg_fast.ops.rebuild_sampled import sample_topk_candidates
from diffkg_fast.train import make_config, train


def _product(den: Denoiser, v: torch.Tensor) -> ItemProduct:
    return ItemProduct.of(den.out_layer.weight, den.out_layer.bias, v)


def _batch(ckgc: int = 0, seed: int = 11):
    kg = _kg()
    return draw_sampled(kg.rowptr, kg.col, edge_keys(kg.rowptr, kg.col, N_ENT), ROWS, N_ENT, 5,
                        4, 0.3, torch.Generator().manual_seed(seed), ckgc_samples=ckgc,
                        item_count=N_ITEMS)


# --------------------------------------------------------------------- compact weights
@pytest.mark.parametrize("ckgc", [0, 3])
def test_compact_step_has_the_dense_step_loss_and_gradients(ckgc: int) -> None:
    """Leaf copies of the K touched entities: the same loss, and their gradients scattered into
    full ones are the denoiser's own gradients (zero at every untouched entity)."""
    den, batch = _denoiser(), _batch(ckgc)
    den.train()
    v, e_b = _tables()
    sch = DiffusionSchedule()
    prod = _product(den, v)
    want, _ = diffusion_loss_sampled(den, batch, sch, N_ITEMS, v, e_b, 0.5, item_product=prod)
    want.backward()
    ew = entity_weights(den, batch, N_ITEMS)
    assert ew.index.numel() < N_ENT  # the test touches only some entities
    got, _ = diffusion_loss_sampled(den, batch, sch, N_ITEMS, v, e_b, 0.5, weights=ew,
                                    item_product=prod)
    assert torch.allclose(got, want, rtol=1e-13, atol=0)
    got.backward()
    for p, (dim, idx, g) in row_grads(den, ew).items():
        full = torch.zeros_like(p).index_copy_(dim, idx, g)
        assert torch.allclose(full, p.grad, rtol=1e-12, atol=1e-15)
    if ckgc:  # the sampled CKGC touches only its items: most items untouched
        assert touched(batch, N_ITEMS).numel() < touched(batch._replace(ckgc_cols=None),
                                                         N_ITEMS).numel()


# --------------------------------------------------------------------- lazy Adam
def test_lazy_adam_with_every_row_is_torch_adam() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g)
    b = a.clone()
    opt_a, opt_b = torch.optim.Adam([a], lr=0.01), LazyAdam([b], lr=0.01)
    every = torch.arange(7)
    for _ in range(6):
        grad = torch.randn(7, 5, generator=g)
        a.grad = grad.clone()
        opt_a.step()
        opt_b.step({b: (0, every, grad)})
    assert torch.equal(a, b)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt_a.state[a][k], opt_b.state[b][k]), k


def test_lazy_adam_against_a_literal_loop() -> None:
    """Rows of a 4 × 2 weight (and columns of its transpose) touched by some steps only: each
    touched row follows Adam with the parameter's global step count; an untouched row keeps
    its weight and moments."""
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    w0 = torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0], [-1.0, 2.0]], dtype=F64)
    steps = [([0, 2], [[1.0, 2.0], [-3.0, 0.5]]), ([2], [[4.0, -1.0]]),
             ([1, 3], [[0.2, 0.1], [1.0, 1.0]])]
    w, m, v = w0.tolist(), [[0.0] * 2 for _ in w0], [[0.0] * 2 for _ in w0]
    for s, (idx, grads) in enumerate(steps, start=1):
        for r, gr in zip(idx, grads, strict=True):
            for j in range(2):
                m[r][j] = b1 * m[r][j] + (1 - b1) * gr[j]
                v[r][j] = b2 * v[r][j] + (1 - b2) * gr[j] ** 2
                w[r][j] -= lr * (m[r][j] / (1 - b1**s)) / (math.sqrt(v[r][j] / (1 - b2**s)) + eps)
    rows, cols = w0.clone(), w0.t().clone().contiguous()
    opt = LazyAdam([rows, cols], lr=lr)
    for idx, grads in steps:
        i, gr = torch.tensor(idx), torch.tensor(grads, dtype=F64)
        opt.step({rows: (0, i, gr), cols: (1, i, gr.t())})
    want = torch.tensor(w, dtype=F64)
    assert torch.allclose(rows, want, rtol=1e-12) and torch.allclose(cols.t(), want, rtol=1e-12)
    assert torch.allclose(opt.state[rows]["exp_avg"], torch.tensor(m, dtype=F64), rtol=1e-12)
    assert torch.allclose(opt.state[rows]["exp_avg_sq"], torch.tensor(v, dtype=F64),
                          rtol=1e-12)
    assert rows[0].tolist() == w[0] and w[0] != w0[0].tolist()  # row 0: moved at step 1 only


@pytest.fixture(scope="module")
def tiny():
    return build_dataset("synthetic", n_patients=60, n_diag=40, n_proc=20, n_med=15, seed=0)


def _model(tiny, **kw) -> DiffKG:
    return DiffKG.from_dataset(tiny, latdim=8, dims=[16], batch=32, seed=1,
                               diffusion_mode="sampled", diffusion_negatives=16, **kw)


def test_lazy_first_pass_step_is_the_dense_one(tiny) -> None:
    """At the first Adam step the moments are zero, so an untouched row does not move under
    dense Adam either: one batch of each moves the denoiser identically (up to the order of
    float operations); after a whole pass the untouched-row drift separates them."""
    dense, lazy = _model(tiny), _model(tiny, denoiser_adam="lazy")
    dense.on_epoch_start(0, limit_batches=1)
    lazy.on_epoch_start(0, limit_batches=1)
    for (k, a), b in zip(dense.diffusion.denoiser.state_dict().items(),
                         lazy.diffusion.denoiser.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), k
    assert isinstance(lazy.diffusion.opt, LazyAdam)


# --------------------------------------------------------------------- sampled CKGC
def _ckgc_parts(den: Denoiser, e_b: torch.Tensor, items: torch.Tensor | None):
    """The CKGC term alone (``e_loss = 1``): its value and its gradients in W2, b2 and W1."""
    v, _ = _tables()
    batch = _batch()._replace(ckgc_cols=items)
    loss, parts = diffusion_loss_sampled(den, batch, DiffusionSchedule(), N_ITEMS, v, e_b, 1.0,
                                         item_product=_product(den, v))
    grads = torch.autograd.grad(loss, (den.out_layer.weight, den.out_layer.bias,
                                       den.in_layer.weight))
    return parts["ckgc"], grads


@pytest.mark.parametrize("target", ["zero", "entities"])
def test_sampled_ckgc_is_exact_in_value_and_unbiased_in_its_item_rows(target: str) -> None:
    """m = 6 of 11 items, with replacement, 200 draws: at every draw the value and the
    gradient of W1 (through the hidden activations) are the exact term's, and each item row of
    W2 and b2 gets ``(I/m)·c_i`` times its exact gradient, ``c_i`` its count in the draw, no
    other row any: unbiased, since ``E[c_i] = m/I`` (the draws' mean count is checked too).
    An identity per draw, so a 5% error in the weight ``I/m`` fails it. With a zero target
    the term is all ``‖u‖²``; with the entities' embeddings the cross term is in it too."""
    den = _denoiser(dropout=0.0)
    den.eval()
    e_b = _tables()[1]
    e_b = torch.zeros_like(e_b) if target == "zero" else e_b
    exact, (ew2, eb2, ew1) = _ckgc_parts(den, e_b, None)
    assert ew2[:N_ITEMS].abs().min() > 0  # the exact gradient reaches every item row
    g, m, draws, counts = torch.Generator().manual_seed(21), 6, 200, []
    for _ in range(draws):
        items = torch.randint(N_ITEMS, (m,), generator=g)
        val, (w2, b2, w1) = _ckgc_parts(den, e_b, items)
        c = torch.bincount(items, minlength=N_ITEMS).to(F64) * N_ITEMS / m
        assert torch.allclose(val, exact, rtol=1e-12, atol=0)
        assert torch.allclose(w1, ew1, rtol=1e-10, atol=1e-14)
        assert torch.allclose(w2[:N_ITEMS], c[:, None] * ew2[:N_ITEMS], rtol=1e-10, atol=1e-14)
        assert torch.allclose(b2[:N_ITEMS], c * eb2[:N_ITEMS], rtol=1e-10, atol=1e-14)
        assert not w2[N_ITEMS:].any() and not b2[N_ITEMS:].any()
        counts.append(c)
    c_t = torch.stack(counts)
    _within(c_t.mean(0), c_t.std(0) / math.sqrt(draws), torch.ones(N_ITEMS, dtype=F64),
            "the items' weighted counts")


def test_sampled_ckgc_with_every_item_once_is_the_exact_ckgc() -> None:
    den = _denoiser(dropout=0.0)
    den.eval()
    e_b = _tables()[1]
    exact, want = _ckgc_parts(den, e_b, None)
    val, got = _ckgc_parts(den, e_b, torch.arange(N_ITEMS))
    assert torch.allclose(val, exact, rtol=1e-12, atol=0)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_sampled_ckgc_needs_the_item_product() -> None:
    den, batch = _denoiser(), _batch(ckgc=3)
    v, e_b = _tables()
    with pytest.raises(ValueError, match="item_product"):
        diffusion_loss_sampled(den, batch, DiffusionSchedule(), N_ITEMS, v, e_b, 0.5)


@pytest.mark.parametrize("adam", ["lazy", "dense"])
def test_item_product_stays_current_over_a_pass(tiny, adam: str) -> None:
    """After a pass of sampled-CKGC steps (lazy: moved row by row; dense: formed anew), the
    product the next step would read is ``W2[:I]ᵀ V`` at the denoiser's weights."""
    model = _model(tiny, ckgc_samples=4, denoiser_adam=adam)
    d = model.diffusion
    before = d.denoiser.out_layer.weight.detach().clone()
    model.on_epoch_start(0)
    assert d._item_product is not None
    w2, b2 = d.denoiser.out_layer.weight, d.denoiser.out_layer.bias
    assert not torch.equal(w2[:d.n_items], before[:d.n_items])  # the item rows moved
    v = torch.sparse.mm(d.rt, model.encoder.user.detach())  # V as the pass formed it
    want = ItemProduct.of(w2, b2, v)
    assert torch.allclose(d._item_product.w, want.w, rtol=1e-4, atol=1e-5)
    assert torch.allclose(d._item_product.b, want.b, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64_compact_and_sampled_ckgc() -> None:
    """With a sampled CKGC the loss is a surrogate in W2 and b2 (their gradient is sampled, the
    value exact: tested above): gradcheck takes W1's entity and time columns, whose gradient
    is the value's."""
    den, batch = _denoiser(), _batch(ckgc=3)
    den.train()
    v, e_b = _tables()
    ew = entity_weights(den, batch, N_ITEMS)
    prod = _product(den, v)

    def loss(w1, w1t):
        return diffusion_loss_sampled(den, batch, DiffusionSchedule(), N_ITEMS, v, e_b, 0.5,
                                      weights=ew._replace(w1=w1, w1_time=w1t),
                                      item_product=prod)[0]

    assert torch.autograd.gradcheck(loss, (ew.w1, ew.w1_time))


# --------------------------------------------------------------------- candidate rebuild
def _rebuild_setup():
    kg = _kg()
    den = Denoiser(N_ENT, 6, 4, generator=torch.Generator().manual_seed(1))
    den.eval()
    return kg, den, edge_keys(kg.rowptr, kg.col, N_ENT), torch.arange(N_ENT)


@pytest.mark.parametrize("k", [1, 3])
def test_candidate_rebuild_with_every_column_is_the_exact_top_k(k: int) -> None:
    kg, den, keys, rows = _rebuild_setup()
    sch = DiffusionSchedule()
    v0, i0 = sample_topk(den, kg.rowptr, kg.col, rows, sch, k, batch_size=8)
    v1, i1 = sample_topk_candidates(den, kg.rowptr, kg.col, keys, rows, sch, k, N_ENT,
                                    batch_size=8, competitors=torch.arange(N_ENT))
    assert torch.equal(i0, i1)
    assert torch.allclose(v0, v1, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_candidate_rebuild_keeps_every_edge_the_exact_one_keeps(k: int) -> None:
    """Sampled competitors (4 of 37 columns, 20 draws): every exact top-k pick that is an edge
    of its row is among the candidate picks; and the candidate picks are not all the exact
    ones (the rule is looser: the test would pass vacuously otherwise)."""
    kg, den, keys, rows = _rebuild_setup()
    sch = DiffusionSchedule()
    _, exact = sample_topk(den, kg.rowptr, kg.col, rows, sch, k, batch_size=8)
    edges = {(int(h), int(t)) for h, t in zip(kg.row, kg.col, strict=True)}
    g, looser = torch.Generator().manual_seed(3), False
    for _ in range(20):
        _, got = sample_topk_candidates(den, kg.rowptr, kg.col, keys, rows, sch, k, 4,
                                        batch_size=8, generator=g)
        for h in range(N_ENT):
            want = {int(t) for t in exact[h] if (h, int(t)) in edges}
            have = {int(t) for t in got[h] if (h, int(t)) in edges}
            assert want <= have, (h, want, have)
            looser |= have != want
    assert looser


# --------------------------------------------------------------------- runs and options
def test_large_kg_run_is_seeded_and_resumes(tiny, tmp_path) -> None:
    """Every large-KG option at once: two runs equal, a crashed run resumes bit for bit, and
    the denoised KG is a subset of the KG."""
    cfg = make_config(model="diffkg", epoch=3, latdim=8, dims=[16], batch=32, seed=1,
                      diffusion_mode="sampled", diffusion_negatives=16, ckgc_samples=4,
                      denoiser_adam="lazy", rebuild_mode="sampled")
    a, b = train(tiny, cfg, log=quiet), train(tiny, cfg, log=quiet)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(math.isfinite(v) for h in a.history for v in h["loss"].values())
    assert_resumes_exactly(tiny, cfg, tmp_path)
    kg = a.model.kg_full
    full = set(zip(kg.row.tolist(), kg.col.tolist(), kg.rel.tolist(), strict=True))
    den = a.model.kg_denoised
    assert den is not None and den.n_edges > 0
    assert set(zip(den.row.tolist(), den.col.tolist(), den.rel.tolist(), strict=True)) <= full
