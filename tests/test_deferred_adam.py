"""The deferred Adam (``denoiser_adam='deferred'``): dense Adam, its zero-gradient steps made up
in closed form when a row is next read (``diffkg_fast/model/diffkg/lazy_adam.py``).

- against ``torch.optim.Adam`` fed the same row gradients scattered into full ones (zero
  elsewhere), float64: at ``eps = 0`` the closed form is exact (to rounding) at every step's
  read and after a flush, through gaps longer than the sum's cut and full-tensor updates; at
  torch's ``eps`` within the bound the docstring derives;
- ``state_dict`` is dense Adam's (flushed), and a fresh optimiser loaded from it goes on as
  torch's Adam does;
- in the model: a pass moves the denoiser as the dense Adam pass does (where the lazy pass
  does not), the sampled CKGC's item product stays current, and a run resumes bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from test_large_kg_steps import _model, tiny  # noqa: F401 (a fixture)
from trainer_checks import assert_resumes_exactly

from diffkg_fast.model.diffkg import lazy_adam
from diffkg_fast.model.diffkg.lazy_adam import DeferredAdam, LazyAdam
from diffkg_fast.ops.diffusion_sampled import ItemProduct
from diffkg_fast.train import make_config

F64 = torch.float64
ROWS, COLS, LR = 40, 6, 0.01


def _touches(steps: int, seed: int) -> list[torch.Tensor]:
    """Which rows each step's gradient reaches: every row at step 1 (so that no moment stays
    zero, where torch's Adam at eps = 0 would divide 0 by 0), then a few, with rows 0 and 1
    left alone for 400 steps (a gap past the closed form's 352 terms)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.arange(ROWS)]
    for t in range(1, steps):
        idx = torch.unique(torch.randint(ROWS, (4,), generator=g))
        out.append(idx[idx > 1] if 1 <= t <= 400 else idx)
    return out


def _run(eps: float, steps: int = 600, seed: int = 0, full_every: int = 0, lazy: bool = False,
         ) -> tuple[float, float, torch.optim.Adam, DeferredAdam, list[torch.Tensor]]:
    """torch's Adam and the deferred one on the same gradients to a ROWS × COLS weight (rows)
    and its transpose (columns); the largest difference seen at a read (the rows a step reads,
    after catch_up) and after the final flush. ``lazy``: a LazyAdam instead (the check's
    mutant)."""
    g = torch.Generator().manual_seed(seed + 1)
    w0 = torch.randn(ROWS, COLS, generator=g, dtype=F64)
    ref = [w0.clone().requires_grad_(), w0.t().clone().requires_grad_()]
    mine = [w0.clone(), w0.t().clone()]
    opt_ref = torch.optim.Adam(ref, lr=LR, eps=eps, foreach=False)
    opt = (LazyAdam if lazy else DeferredAdam)(mine, lr=LR, eps=eps)
    at_read = 0.0
    for t, idx in enumerate(_touches(steps, seed)):
        grad = torch.randn(idx.numel(), COLS, generator=g, dtype=F64)
        for p, dim, gr in ((ref[0], 0, grad), (ref[1], 1, grad.t())):
            p.grad = torch.zeros_like(p).index_copy_(dim, idx, gr)
        if isinstance(opt, DeferredAdam):
            opt.catch_up({mine[0]: (0, idx), mine[1]: (1, idx)})
        at_read = max(at_read, (mine[0][idx] - ref[0].detach()[idx]).abs().max().item(),
                      (mine[1][:, idx] - ref[1].detach()[:, idx]).abs().max().item())
        opt_ref.step()
        if full_every and t % full_every == full_every - 1:  # the transpose moved by .grad
            mine[1].grad = ref[1].grad.clone()
            opt.step({mine[0]: (0, idx, grad)})
            mine[1].grad = None
        else:
            opt.step({mine[0]: (0, idx, grad), mine[1]: (1, idx, grad.t())})
    if isinstance(opt, DeferredAdam):
        opt.flush()
    after = max((a - b.detach()).abs().max().item() for a, b in zip(mine, ref, strict=True))
    return at_read, after, opt_ref, opt, mine


@pytest.mark.parametrize(("full_every", "block"), [(0, None), (7, None), (0, 3)])
def test_deferred_adam_at_eps_zero_is_torch_adam(full_every: int, block: int | None,
                                                 monkeypatch) -> None:
    """Rows read at a step are dense Adam's rows, and every row after a flush, to float64
    rounding (their movement is ~LR per step, ~1 in all); also with rows made up 3 at a time
    (a flush's blocks)."""
    if block:
        monkeypatch.setattr(lazy_adam, "_CATCH_UP_ROWS", block)
    at_read, after, opt_ref, opt, mine = _run(0.0, full_every=full_every)
    assert at_read < 1e-12 and after < 1e-12, (at_read, after)
    for p, q in zip(mine, opt_ref.param_groups[0]["params"], strict=True):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt.state[p][k], opt_ref.state[q][k], rtol=1e-12, atol=0)


def test_deferred_adam_at_torch_eps_is_within_the_bound() -> None:
    """With eps each deferred term's relative difference is below eps / sqrt(v̂) (module
    docstring); here sqrt(v̂) stays above 1e-2 (unit gradients, v decays by at most 0.999^400),
    so the total, over ~600 · LR of movement, is below 600 · LR · 1e-6."""
    at_read, after, *_ = _run(1e-8)
    assert at_read < 600 * LR * 1e-6 and after < 600 * LR * 1e-6, (at_read, after)
    assert after > 0  # eps is taken once per gap, not per term: not torch's bits


def test_the_check_fails_without_the_deferred_steps() -> None:
    """The same check with a LazyAdam (no deferred steps): the rows a step reads lag dense
    Adam's by their skipped steps' momentum, by far more than rounding."""
    at_read, after, *_ = _run(0.0, lazy=True)
    assert at_read > 1e-3 and after > 1e-3, (at_read, after)


def test_state_dict_is_dense_adams_and_resumes_as_torch_adam() -> None:
    *_, opt_ref, opt, mine = _run(0.0, steps=120)
    state = opt.state_dict()
    ref_state = opt_ref.state_dict()
    for i in (0, 1):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(state["state"][i][k], ref_state["state"][i][k], rtol=1e-12)
    copy = [p.detach().clone() for p in mine]
    again = DeferredAdam(copy, lr=LR, eps=0.0)
    again.load_state_dict(state)
    g = torch.Generator().manual_seed(5)
    ref = opt_ref.param_groups[0]["params"]
    for _ in range(30):
        idx = torch.unique(torch.randint(ROWS, (3,), generator=g))
        grad = torch.randn(idx.numel(), COLS, generator=g, dtype=F64)
        ref[0].grad = torch.zeros_like(ref[0]).index_copy_(0, idx, grad)
        ref[1].grad = torch.zeros_like(ref[1]).index_copy_(1, idx, grad.t())
        opt_ref.step()
        again.step({copy[0]: (0, idx, grad), copy[1]: (1, idx, grad.t())})
    again.flush()
    for a, b in zip(copy, ref, strict=True):
        assert torch.allclose(a, b.detach(), rtol=0, atol=1e-12)


# --------------------------------------------------------------------- in the model
def _denoiser_gap(a, b) -> float:
    sa, sb = a.diffusion.denoiser.state_dict(), b.diffusion.denoiser.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def test_a_deferred_pass_moves_the_denoiser_as_the_dense_pass(tiny) -> None:  # noqa: F811
    """A whole pass: the deferred denoiser is the dense one up to float32 rounding and eps;
    the lazy one is not (its untouched rows did not drift)."""
    dense, deferred, lazy = (_model(tiny, denoiser_adam=a) for a in ("dense", "deferred",
                                                                      "lazy"))
    for m in (dense, deferred, lazy):
        m.on_epoch_start(0)
    assert isinstance(deferred.diffusion.opt, DeferredAdam)
    assert not deferred.diffusion.opt._current or all(
        (c == int(deferred.diffusion.opt.state[p]["step"])).all()
        for p, (_, c) in deferred.diffusion.opt._current.items())  # flushed at the pass end
    near, far = _denoiser_gap(dense, deferred), _denoiser_gap(dense, lazy)
    assert near < 1e-5 and far > 100 * near, (near, far)


def test_deferred_item_product_stays_current_over_a_pass(tiny) -> None:  # noqa: F811
    model = _model(tiny, ckgc_samples=4, denoiser_adam="deferred")
    d = model.diffusion
    model.on_epoch_start(0)
    assert d._item_product is not None
    v = torch.sparse.mm(d.rt, model.encoder.user.detach())
    want = ItemProduct.of(d.denoiser.out_layer.weight, d.denoiser.out_layer.bias, v)
    assert torch.allclose(d._item_product.w, want.w, rtol=1e-4, atol=1e-5)
    assert torch.allclose(d._item_product.b, want.b, rtol=1e-4, atol=1e-5)


def test_deferred_run_resumes_exactly(tiny, tmp_path) -> None:  # noqa: F811
    cfg = make_config(model="diffkg", epoch=3, latdim=8, dims=[16], batch=32, seed=1,
                      diffusion_mode="sampled", diffusion_negatives=16, ckgc_samples=4,
                      denoiser_adam="deferred", rebuild_mode="sampled")
    assert_resumes_exactly(tiny, cfg, tmp_path)
