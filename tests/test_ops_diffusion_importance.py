"""What DiffRec added to the shared diffusion ops: the schedule flags, the loss's row and step
weights and per-row losses, the denoiser's dropout generator, and the importance sampler of t
(``diffkg_fast.ops.diffusion_importance``); DiffKG's values pinned where they were touched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    diffusion_loss,
    draw_timesteps_noise,
)
from diffkg_fast.ops.diffusion_importance import ImportanceSampler
from diffkg_fast.ops.diffusion_loss_fused import diffusion_loss_fused

from helpers import needs_interpreter

# -- schedule ------------------------------------------------------------------------------------

# DiffKG's schedules as main computed them before DiffRec's flags (float64, printed to round-trip):
# the flags must not move a bit of them.
DIFFKG_SCHEDULES = {
    (): ([0.0001, 0.0004975049750497451, 0.0004977526094492868, 0.000498000490492867,
          0.0004982486185494128],
         [0.9999, 0.9994025447754478, 0.9989050895508955, 0.9984076343263434,
          0.9979101791017911]),
    (7, 0.5, 1e-3, 0.05): ([0.0001, 0.004085376021344067, 0.004102134784428668,
                            0.004119031607262902, 0.004136068202920562, 0.004153246312934344,
                            0.004170567707890038],
                           [0.9999, 0.995815032516258, 0.9917300650325162, 0.9876450975487743,
                            0.9835601300650324, 0.9794751625812905, 0.9753901950975487]),
}


@pytest.mark.parametrize("args", list(DIFFKG_SCHEDULES))
def test_diffkg_schedule_values_did_not_move(args) -> None:
    betas, abar = DIFFKG_SCHEDULES[args]
    s = DiffusionSchedule(*args)
    assert torch.equal(s.betas, torch.tensor(betas, dtype=torch.float64))
    assert torch.equal(s.alphas_cumprod, torch.tensor(abar, dtype=torch.float64))


def literal_diffrec_betas(kind: str, steps: int, scale: float, lo: float, hi: float,
                          beta_fixed: bool) -> np.ndarray:
    """DiffRec's ``get_betas`` + ``beta_fixed``, step by step in numpy."""
    var = np.linspace(scale * lo, scale * hi, steps, dtype=np.float64)
    if kind == "linear":
        betas = list(var)
    else:
        abar = 1 - var
        betas = [1 - abar[0]]
        for i in range(1, steps):
            betas.append(min(1 - abar[i] / abar[i - 1], 0.999))
    betas = np.array(betas)
    if beta_fixed:
        betas[0] = 1e-5
    return betas


@pytest.mark.parametrize("kind", ["linear", "linear-var"])
@pytest.mark.parametrize("beta_fixed", [True, False])
def test_diffrec_schedules_match_the_literal_definition(kind, beta_fixed) -> None:
    args = (6, 0.3, 2e-3, 0.04)
    s = DiffusionSchedule(*args, noise_schedule=kind, beta_0=1e-5 if beta_fixed else None)
    betas = literal_diffrec_betas(kind, *args, beta_fixed)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-13, atol=0)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar, rtol=1e-13)
    prev = np.concatenate([[1.0], abar[:-1]])
    c1, c2 = s.posterior_coefs()  # DiffRec's posterior_mean_coef1 / coef2
    np.testing.assert_allclose(c1.numpy(), betas * np.sqrt(prev) / (1 - abar), rtol=1e-12)
    np.testing.assert_allclose(c2.numpy(), (1 - prev) * np.sqrt(1 - betas) / (1 - abar),
                               rtol=1e-12)


def test_schedule_rejects_unknown_kinds_and_betas() -> None:
    with pytest.raises(ValueError, match="noise_schedule"):
        DiffusionSchedule(noise_schedule="cosine")
    with pytest.raises(ValueError, match="beta_0"):
        DiffusionSchedule(beta_0=0.0)


# -- loss: row weights, step weights, per-row losses, dropout generator --------------------------


def _toy(dtype=torch.float64, dropout=0.0, gen=None):
    g = torch.Generator().manual_seed(0)
    model = Denoiser(11, 6, 10, norm=False, dropout=dropout, generator=g, dtype=dtype,
                     dropout_generator=gen)
    x0 = (torch.rand(5, 11, generator=g) < 0.3).to(dtype)
    t, noise = draw_timesteps_noise(x0, 5, g)
    return model, x0, t, noise


def _no_kg(x0):
    return x0.new_zeros(x0.shape[1], 1), x0.new_zeros(x0.shape[0], 1)


def test_weighted_loss_and_rows_against_a_row_loop() -> None:
    """``mean_b(rw_b w_t mse_b)`` and ``rows_b = w_t mse_b``, one row at a time; both backends."""
    s = DiffusionSchedule(noise_schedule="linear", beta_0=1e-5)
    model, x0, t, noise = _toy()
    rw = torch.tensor([1.0, 0.5, 2.0, 3.0, 0.25], dtype=torch.float64)
    steps_w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    for sw in (None, steps_w):
        w_all = s.snr_weights() if sw is None else sw
        rows, total = [], 0.0
        for b in range(5):
            tb = int(t[b])
            ab = float(s.alphas_cumprod[tb])
            xt = math.sqrt(ab) * x0[b] + math.sqrt(1 - ab) * noise[b]
            with torch.no_grad():
                out = model(xt[None], torch.tensor([tb]))[0]
            mse = float(((x0[b] - out) ** 2).mean())
            rows.append(float(w_all[tb]) * mse)
            total += float(rw[b]) * rows[-1] / 5
        for backend in ("reference", "cpu"):
            loss, parts = diffusion_loss(model, x0, t, noise, s, 11, *_no_kg(x0), 0.0,
                                         row_weights=rw, step_weights=sw, backend=backend)
            assert float(loss.detach()) == pytest.approx(total, rel=1e-12)
            assert float(parts["diff"]) == pytest.approx(total, rel=1e-12)
            assert float(parts["ckgc"]) == 0.0
            np.testing.assert_allclose(parts["rows"].numpy(), rows, rtol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_fused_gradients_with_weights_match_the_reference(dropout) -> None:
    """The fused backward with row / step weights and a generator-drawn dropout mask equals
    autograd through the reference (float64; the same mask from the same generator state)."""
    s = DiffusionSchedule(noise_schedule="linear", beta_0=1e-5)
    rw = torch.tensor([1.0, 0.5, 2.0, 3.0, 0.25], dtype=torch.float64)
    grads = []
    for fn in (lambda *a, **k: diffusion_loss(*a, **k, backend="reference"), diffusion_loss_fused):
        model, x0, t, noise = _toy(dropout=dropout, gen=torch.Generator().manual_seed(9))
        loss, parts = fn(model, x0, t, noise, s, 11, *_no_kg(x0), 0.0, row_weights=rw,
                         step_weights=torch.arange(1.0, 6.0, dtype=torch.float64))
        loss.backward()
        grads.append([loss.detach(), parts["rows"]] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_interpreter
def test_triton_row_kernels_with_weights_match_torch() -> None:
    """The Triton path (interpreted on a CPU) with row and step weights and the per-row losses."""
    s = DiffusionSchedule(noise_schedule="linear", beta_0=1e-5)
    rw = torch.tensor([1.0, 0.5, 2.0, 3.0, 0.25])
    out = []
    for use_triton in (False, True):
        model, x0, t, noise = _toy(dtype=torch.float32, dropout=0.3,
                                   gen=torch.Generator().manual_seed(2))
        loss, parts = diffusion_loss_fused(model, x0, t, noise, s, 11, *_no_kg(x0), 0.0,
                                           row_weights=rw, step_weights=torch.ones(5),
                                           use_triton=use_triton)
        loss.backward()
        out.append([loss.detach(), parts["rows"]] + [p.grad for p in model.parameters()])
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_generator_draws_the_mask_and_leaves_the_global_rng_alone() -> None:
    model, x0, t, _ = _toy(dtype=torch.float32, dropout=0.5,
                           gen=torch.Generator().manual_seed(4))
    model.train()
    state = torch.get_rng_state()
    a = model(x0, t)
    assert torch.equal(torch.get_rng_state(), state)
    model.dropout_generator.manual_seed(4)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(model(x0, t), a)
    # The mask: bernoulli(1 - p) / (1 - p) drawn from the generator, on the input row.
    g = torch.Generator().manual_seed(4)
    mask = torch.empty(x0.shape).bernoulli_(0.5, generator=g) / 0.5
    w = model.in_layer.weight[:, :11]
    h = (x0 * mask) @ w.T + model.time_bias(t)
    torch.testing.assert_close(a, model.out_layer(torch.tanh(h)))


# -- the importance sampler ----------------------------------------------------------------------


class LiteralHistory:
    """DiffRec's ``update_Lt_history`` and ``sample_timesteps``, transcribed row by row."""

    def __init__(self, steps: int, per_step: int) -> None:
        self.steps, self.per_step = steps, per_step
        self.history = np.zeros((steps, per_step))
        self.count = np.zeros(steps, dtype=np.int64)

    def record(self, ts, losses) -> None:
        for t, loss in zip(ts, losses, strict=True):
            if self.count[t] == self.per_step:
                self.history[t, :-1] = self.history[t, 1:].copy()
                self.history[t, -1] = loss
            else:
                self.history[t, self.count[t]] = loss
                self.count[t] += 1

    def probs(self, uniform_prob: float = 0.001) -> np.ndarray:
        lt = np.sqrt(np.mean(self.history ** 2, axis=-1))
        return lt / lt.sum() * (1 - uniform_prob) + uniform_prob / self.steps


def test_history_records_like_diffrecs_row_loop() -> None:
    rng = np.random.default_rng(0)
    sampler, literal = ImportanceSampler(4, 6), LiteralHistory(4, 6)
    for batch in range(12):  # from empty, through partly full, to shifting every step
        ts = rng.integers(0, 4 if batch % 3 else 2, size=rng.integers(1, 9))
        losses = rng.random(ts.size) * 10
        sampler.record(torch.from_numpy(ts), torch.from_numpy(losses).float())
        literal.record(ts, losses.astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(sampler.count.numpy(), literal.count)
        np.testing.assert_array_equal(sampler.history.numpy(), literal.history)
        assert sampler.ready == bool((literal.count == 6).all())
    assert sampler.ready
    np.testing.assert_allclose(sampler.probs().numpy(), literal.probs(), rtol=1e-14)


def test_draws_uniform_until_full_then_by_importance() -> None:
    sampler = ImportanceSampler(3, 2)
    x0 = torch.zeros(4000, 2)
    g, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t, pt, noise = sampler.draw(x0, g)
    t2, noise2 = draw_timesteps_noise(x0, 3, g2)  # not full: DiffKG's uniform draw, pt = 1
    assert torch.equal(t, t2) and torch.equal(noise, noise2) and bool((pt == 1).all())
    sampler.record(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([1.0, 1.0, 2.0, 2.0, 4.0]))
    assert not sampler.ready  # step 2 has one loss of two
    sampler.record(torch.tensor([2]), torch.tensor([4.0]))
    p = sampler.probs()
    want = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) / 7 * 0.999 + 0.001 / 3
    torch.testing.assert_close(p, want, rtol=1e-14, atol=0)
    t, pt, noise = sampler.draw(x0, g)
    torch.testing.assert_close(pt, p[t] * 3, rtol=0, atol=0)
    freq = torch.bincount(t, minlength=3).double() / t.numel()
    assert torch.allclose(freq, p, atol=0.03)
    # t first, then the noise, from the one generator (DiffRec's order).
    g2 = torch.Generator().manual_seed(0)
    g2.set_state(g.get_state())
    t3, _, noise3 = sampler.draw(x0, g)
    t4 = torch.multinomial(p, 4000, replacement=True, generator=g2)
    assert torch.equal(t3, t4) and torch.equal(noise3, torch.randn(x0.shape, generator=g2))


def test_sampler_state_round_trip() -> None:
    a = ImportanceSampler(3, 2)
    a.record(torch.tensor([0, 2, 2, 2]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = ImportanceSampler(3, 2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.history, b.history) and torch.equal(a.count, b.count)
    with pytest.raises(ValueError, match="shape"):
        ImportanceSampler(4, 2).load_state_dict(a.state_dict())
