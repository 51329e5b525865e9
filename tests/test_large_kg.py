"""The large-KG mode's estimators (issue 21 §2) against the exact computations.

- exact identities, to float64 round-off: the sampled diffusion loss with every column listed
  once IS the exact loss (values and gradients); the Gram form of ``‖x̂‖²``; sampled InfoNCE
  with every node listed IS InfoNCE;
- unbiased estimators by their mean over many draws against the exact value. Tolerance: 5
  standard errors of that mean, the standard error taken from the draws' own sample variance
  (``_SIGMAS``); for a mean of a few thousand i.i.d. draws the CLT makes a false failure
  ~6e-7 per compared value (the draws are seeded, so each run is the same run);
- float64 ``gradcheck`` of both sampled losses;
- a configuration the data cannot support is an error naming the option.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model.base import PairBatch
from diffkg_fast.model.diffkg import DiffKG
from diffkg_fast.model.losses import info_nce, info_nce_in_batch, info_nce_sampled
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    csr_row_entries,
    diffusion_loss,
    draw_timesteps_noise,
    kg_rows,
)
from diffkg_fast.ops.diffusion_sampled import (
    SampledBatch,
    chi2_wilson_hilferty,
    diffusion_loss_sampled,
    draw_sampled,
    edge_keys,
    is_edge,
    sampled_preactivation,
)
from diffkg_fast.ops.graph import KGCSR, csr_offsets
from diffkg_fast.train import make_config

F64 = torch.float64
N_ENT, HIDDEN, N_ITEMS, D = 37, 6, 11, 5
ROWS = torch.tensor([3, 0, 36, 12, 5, 7, 30, 1, 2])  # 36 has no edge: an empty support
_SIGMAS = 5.0


def _kg() -> KGCSR:
    rng = np.random.default_rng(0)
    kg = np.stack([rng.integers(0, 30, 60), rng.integers(0, 3, 60), rng.integers(0, 30, 60)], 1)
    return KGCSR.from_kg(kg, N_ENT, 3)


def _denoiser(norm: bool = True, dropout: float = 0.3) -> Denoiser:
    return Denoiser(N_ENT, HIDDEN, 4, norm=norm, dropout=dropout, dtype=F64,
                    generator=torch.Generator().manual_seed(1),
                    dropout_generator=torch.Generator().manual_seed(5))


def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(N_ITEMS, D, generator=g, dtype=F64),
            torch.randn(len(ROWS), D, generator=g, dtype=F64))


def _every_column(kg: KGCSR, noise: torch.Tensor, keep: torch.Tensor, t: torch.Tensor,
                  ) -> SampledBatch:
    """The sampled batch that lists every column once (ω = 1), with the exact draw's ε, its
    masks and its χ: the identity of the module docstring."""
    er, pos = csr_row_entries(kg.rowptr, ROWS)
    ec = kg.col[pos]
    off = kg_rows(kg.rowptr, kg.col, ROWS, N_ENT, dtype=F64) == 0
    cols, ones = torch.arange(N_ENT), torch.ones(N_ENT, dtype=F64)
    return SampledBatch(t, csr_offsets(er, len(ROWS)), er, ec, noise[er, ec], keep[er, ec],
                        (noise.pow(2) * off).sum(1), cols, ones, noise, keep, off, cols, ones,
                        off)


def _exact_setup(norm: bool = True, dropout: float = 0.3):
    kg, den = _kg(), _denoiser(norm, dropout)
    x0 = kg_rows(kg.rowptr, kg.col, ROWS, N_ENT, dtype=F64)
    t, noise = draw_timesteps_noise(x0, 5, torch.Generator().manual_seed(2))
    # The denoiser's dropout draws its B × E mask from generator 5: the same draw, as 0/1.
    keep = torch.empty(len(ROWS), N_ENT, dtype=F64).bernoulli_(
        1.0 - dropout, generator=torch.Generator().manual_seed(5))
    return kg, den, x0, t, noise, _every_column(kg, noise, keep, t)


# --------------------------------------------------------------------- exact identities
@pytest.mark.parametrize(("norm", "training"), [(True, True), (False, True), (True, False)])
def test_sampled_loss_with_every_column_is_the_exact_loss(norm: bool, training: bool) -> None:
    _, den, x0, t, noise, batch = _exact_setup(norm)
    den.train(training)
    v, e_b = _tables()
    sch = DiffusionSchedule()
    want, want_parts = diffusion_loss(den, x0, t, noise, sch, N_ITEMS, v, e_b, 0.5,
                                      backend="reference")
    want_grads = torch.autograd.grad(want, list(den.parameters()))
    got, parts = diffusion_loss_sampled(den, batch, sch, N_ITEMS, v, e_b, 0.5)
    grads = torch.autograd.grad(got, list(den.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for k in ("diff", "ckgc", "rows"):
        torch.testing.assert_close(parts[k], want_parts[k], rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


def test_gram_form_of_the_squared_error() -> None:
    """``SE = Σ_S [(1-x̂)² - x̂²] + aᵀGa + 2aᵀW2ᵀb2 + ‖b2‖²``, G = W2ᵀW2: the exact oracle the
    docstring names, equal to the dense ``‖x0 - x̂‖²``."""
    _, den, x0, t, _, batch = _exact_setup()
    den.eval()
    with torch.no_grad():
        a = torch.tanh(sampled_preactivation(den, batch, DiffusionSchedule())
                       + den.time_bias(t))
        w2, b2 = den.out_layer.weight, den.out_layer.bias
        x_hat = a @ w2.T + b2
        dense = (x0 - x_hat).pow(2).sum(1)
        gram = ((a @ (w2.T @ w2)) * a).sum(1) + 2 * a @ (w2.T @ b2) + b2 @ b2
        sup = ((1 - x_hat).pow(2) - x_hat.pow(2)) * x0
        torch.testing.assert_close(sup.sum(1) + gram, dense, rtol=1e-12, atol=1e-12)


def test_is_edge_and_keys_against_a_set() -> None:
    kg = _kg()
    edges = set(zip(kg.row.tolist(), kg.col.tolist(), strict=True))
    keys = edge_keys(kg.rowptr, kg.col, N_ENT)
    cols = torch.arange(N_ENT)
    got = is_edge(keys, N_ENT, ROWS, cols)
    want = torch.tensor([[(int(r), c) in edges for c in range(N_ENT)] for r in ROWS])
    assert torch.equal(got, want)
    empty = edge_keys(torch.zeros(N_ENT + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      N_ENT)
    assert not is_edge(empty, N_ENT, ROWS, cols).any()


def test_info_nce_sampled_with_every_node_is_info_nce() -> None:
    g = torch.Generator().manual_seed(4)
    v1, v2 = torch.randn(23, 4, generator=g, dtype=F64), torch.randn(23, 4, generator=g, dtype=F64)
    nodes = torch.tensor([0, 5, 5, 22, 9])
    want = info_nce(v1, v2, nodes, 0.2)
    torch.testing.assert_close(info_nce_sampled(v1, v2, nodes, 0.2, torch.arange(23)), want,
                               rtol=1e-12, atol=1e-12)
    # In-batch: a literal loop over the batch's distinct nodes.
    u = sorted(set(nodes.tolist()))
    z1 = torch.nn.functional.normalize(v1, dim=1) / 0.2
    z2 = torch.nn.functional.normalize(v2, dim=1)
    lit = np.mean([float(torch.logsumexp(torch.stack([z1[n] @ z2[m] for m in u]), 0)
                         - z1[n] @ z2[n]) for n in u])
    assert float(info_nce_in_batch(v1, v2, nodes, 0.2)) == pytest.approx(lit, rel=1e-12)


# --------------------------------------------------------------------- unbiased estimators
def _within(mean: torch.Tensor, se: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    err = (mean - exact).abs()
    bad = err > _SIGMAS * se + 1e-12
    assert not bad.any(), (f"{what}: |mean - exact| {err[bad].tolist()} > {_SIGMAS} SE "
                           f"{(se[bad] * _SIGMAS).tolist()}")


def test_output_estimator_is_unbiased_in_value_and_gradient() -> None:
    """The input held fixed (every column, one draw), only the negatives redrawn: the mean
    of the per-row squared-error estimate and of the gradient of W2 over 2,000 draws of
    n = 8 of 37 columns are the exact ones within 5 standard errors; the measured variance
    of the row estimate is the docstring's ``(E Σx̂⁴ - (Σx̂²)²) / n`` within 5 standard errors
    of a sample variance (``sqrt((μ4 - σ⁴) / M)``, from the draws' 4th central moment)."""
    kg, den, x0, t, _, full = _exact_setup()
    v, e_b = _tables()
    sch, keys, n, m = DiffusionSchedule(), edge_keys(kg.rowptr, kg.col, N_ENT), 8, 2000
    w2 = den.out_layer.weight
    with torch.no_grad():  # x̂ of order 1 off the support, so the sampled part dominates SE
        w2.mul_(3.0)
        den.out_layer.bias.copy_(torch.randn(N_ENT, generator=torch.Generator().manual_seed(6),
                                             dtype=F64))
    scale = sch.snr_weights()[t] / N_ENT  # rows = w_t SE / E

    def rows_and_grad(batch: SampledBatch) -> tuple[torch.Tensor, torch.Tensor]:
        loss, parts = diffusion_loss_sampled(den, batch, sch, N_ITEMS, v, e_b, 0.0)
        return parts["rows"] / scale, torch.autograd.grad(loss, w2)[0]

    # The exact values from the dense x̂ (the input part is the identity test's, shared).
    a = torch.tanh(sampled_preactivation(den, full, sch) + den.time_bias(t))
    dense = (x0 - (a @ w2.T + den.out_layer.bias)).pow(2).sum(1)
    exact_se = dense.detach()
    exact_grad = torch.autograd.grad((scale * dense).mean(), w2)[0]
    g = torch.Generator().manual_seed(7)
    ses, grads = [], []
    for _ in range(m):
        cols = torch.randint(N_ENT, (n,), generator=g)
        ses_k, grad_k = rows_and_grad(full._replace(
            neg_cols=cols, neg_weight=torch.full((n,), N_ENT / n, dtype=F64),
            neg_off=~is_edge(keys, N_ENT, ROWS, cols)))
        ses.append(ses_k)
        grads.append(grad_k)
    ses_t, grads_t = torch.stack(ses), torch.stack(grads)
    _within(ses_t.mean(0), ses_t.std(0) / math.sqrt(m), exact_se, "row squared error")
    # Pooled over the rows (5 SE here is ~4% of the total, 85% of it sampled; a 5% error in
    # the weights fails the per-row check above: tried).
    pooled = ses_t.sum(1)
    _within(pooled.mean(), pooled.std() / math.sqrt(m), exact_se.sum(), "pooled squared error")
    _within(grads_t.mean(0), grads_t.std(0) / math.sqrt(m), exact_grad, "dL/dW2")
    # The variance formula, from the exact x̂ off the support.
    with torch.no_grad():
        x_off = (a @ w2.T + den.out_layer.bias).pow(2) * (x0 == 0)
    var = (N_ENT * x_off.pow(2).sum(1) - x_off.sum(1).pow(2)) / n
    c = ses_t - ses_t.mean(0)
    var_se = ((c.pow(4).mean(0) - c.pow(2).mean(0).pow(2)) / m).sqrt()
    _within(ses_t.var(0), var_se, var, "Var of the row estimate")


def test_input_sketch_matches_the_first_two_moments() -> None:
    """The support draws and χ held fixed, the sketch redrawn 4,000 times (n = 8 of 37
    columns, dropout 0.3): the mean of ``z`` is the support part, and the mean of each
    product ``(z - z_S)_i (z - z_S)_l`` is ``σ² / ((1-p) ‖x_t‖²) Σ_{j∉S} W1_ij W1_lj``, within 5
    standard errors."""
    kg, den, x0, t, noise, full = _exact_setup()
    sch, keys, n, m, p = DiffusionSchedule(), edge_keys(kg.rowptr, kg.col, N_ENT), 8, 4000, 0.3
    b = len(ROWS)
    no_noise = full._replace(noise_eps=torch.zeros_like(full.noise_eps))
    with torch.no_grad():
        z_s = sampled_preactivation(den, no_noise, sch)
        g = torch.Generator().manual_seed(8)
        dev = []
        for _ in range(m):
            cols = torch.randint(N_ENT, (n,), generator=g)
            draw = full._replace(
                noise_cols=cols, noise_weight=torch.full((n,), N_ENT / n, dtype=F64),
                noise_eps=torch.randn(b, n, generator=g, dtype=F64),
                noise_keep=torch.bernoulli(torch.full((b, n), 1 - p, dtype=F64), generator=g),
                noise_off=~is_edge(keys, N_ENT, ROWS, cols))
            dev.append(sampled_preactivation(den, draw, sch) - z_s)
        dev_t = torch.stack(dev)  # m × B × H
        abar = sch.alphas_cumprod[t]
        x_t = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * noise
        norm2 = (x_t.pow(2) * (x0 > 0)).sum(1) + (1 - abar) * full.off_energy
        w1 = den.in_layer.weight[:, :N_ENT]
        cov = torch.einsum("ij,lj,bj->bil", w1, w1, (x0 == 0).to(F64))
        cov = cov * ((1 - abar) / ((1 - p) * norm2))[:, None, None]
    _within(dev_t.mean(0), dev_t.std(0) / math.sqrt(m), torch.zeros_like(z_s), "E[z] - z_S")
    # The traces pooled over the rows: the sharpest check (5 SE here is ~5.5% of the trace; a
    # 5% error in the sketch's amplitude, 10% in the trace, fails it: tried).
    energy = dev_t.pow(2).sum((1, 2))
    _within(energy.mean(), energy.std() / math.sqrt(m),
            torch.diagonal(cov, dim1=1, dim2=2).sum(), "pooled E[‖z - z_S‖²]")
    prod = dev_t[:, :, :, None] * dev_t[:, :, None, :]
    _within(prod.mean(0), prod.std(0) / math.sqrt(m), cov, "E[(z - z_S)(z - z_S)ᵀ]")


@pytest.mark.parametrize("df", [50.0, 5000.0])
def test_chi2_draw_mean_and_variance(df: float) -> None:
    """Wilson–Hilferty: mean ``df (1 - c³)``, variance within 5 SE of ``2 df`` (its own
    variance is ``2 df (1 + O(1/df))``: the O(1/df) term is < 1% at df = 50, inside 5 SE)."""
    m = 20000
    x = chi2_wilson_hilferty(torch.full((m,), df), torch.Generator().manual_seed(9))
    c = 2 / (9 * df)
    _within(x.mean(), x.std() / math.sqrt(m), torch.tensor(df * (1 - c**3), dtype=F64), "mean")
    k4 = 12 * df**2 + 48 * df  # the χ²'s 4th central moment
    _within(x.var(), torch.tensor(math.sqrt((k4 - 4 * df**2) / m), dtype=F64),
            torch.tensor(2 * df, dtype=F64), "variance")
    assert float(chi2_wilson_hilferty(torch.zeros(3))[0]) == 0.0


def test_info_nce_sampled_denominator_unbiased_log_biased_low() -> None:
    """For one node at a time the sampled loss is ``log Ŝ - s_nn``: over 4,000 draws of k = 6
    of 30 nodes, the mean of ``Ŝ`` is ``S`` within 5 SE (unbiased), and the mean of ``log Ŝ``
    falls short of ``log S`` by the delta method's ``Var(Ŝ) / 2S²`` within 5 SE plus 30% of it
    (the remainder is O(k⁻²))."""
    g = torch.Generator().manual_seed(10)
    n_nodes, k, m, temp = 30, 6, 4000, 0.5
    v1, v2 = torch.randn(n_nodes, 4, generator=g, dtype=F64), torch.randn(n_nodes, 4, generator=g,
                                                                           dtype=F64)
    z1 = torch.nn.functional.normalize(v1, dim=1) / temp
    z2 = torch.nn.functional.normalize(v2, dim=1)
    for node in (0, 7, 19):
        nodes = torch.tensor([node])
        s = z1[node] @ z2.T
        exact = s.exp().sum()
        others = torch.cat([s[:node], s[node + 1:]]).exp()
        var = (n_nodes * others.pow(2).sum() - others.sum().pow(2)) / k
        log_s = torch.stack([info_nce_sampled(v1, v2, nodes, temp,
                                              torch.randint(n_nodes, (k,), generator=g))
                             for _ in range(m)]) + s[node]
        est = log_s.exp()
        _within(est.mean(), est.std() / math.sqrt(m), exact, f"S of node {node}")
        bias = -var / (2 * exact**2)
        gap = (log_s.mean() - exact.log() - bias).abs()
        assert gap <= _SIGMAS * log_s.std() / math.sqrt(m) + 0.3 * bias.abs(), (node, gap, bias)
        assert log_s.mean() < exact.log()  # biased low: Jensen


# --------------------------------------------------------------------- gradients
class _Wrapped(nn.Module):
    """The sampled loss as a module's forward, so ``functional_call`` swaps its weights."""

    def __init__(self, den: Denoiser, batch: SampledBatch, v: torch.Tensor, e_b: torch.Tensor):
        super().__init__()
        self.den, self.batch, self.v, self.e_b = den, batch, v, e_b

    def forward(self) -> torch.Tensor:
        return diffusion_loss_sampled(self.den, self.batch, DiffusionSchedule(), N_ITEMS,
                                      self.v, self.e_b, 0.5)[0]


def test_gradcheck_float64() -> None:
    kg, den = _kg(), _denoiser()
    den.train()
    batch = draw_sampled(kg.rowptr, kg.col, edge_keys(kg.rowptr, kg.col, N_ENT), ROWS, N_ENT, 5,
                         7, 0.3, torch.Generator().manual_seed(11))
    v, e_b = _tables()
    mod = _Wrapped(den, batch, v, e_b)
    names = [k for k, _ in mod.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in mod.parameters())
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(mod, dict(zip(names, ps, strict=True)), ()),
        params)
    g = torch.Generator().manual_seed(12)
    v1 = torch.randn(9, 3, generator=g, dtype=F64, requires_grad=True)
    v2 = torch.randn(9, 3, generator=g, dtype=F64, requires_grad=True)
    nodes, neg = torch.tensor([1, 4, 4, 8]), torch.tensor([0, 4, 2, 2, 7])
    assert torch.autograd.gradcheck(lambda a, b: info_nce_sampled(a, b, nodes, 0.3, neg),
                                    (v1, v2))
    assert torch.autograd.gradcheck(lambda a, b: info_nce_in_batch(a, b, nodes, 0.3), (v1, v2))


# --------------------------------------------------------------------- the options
@pytest.fixture(scope="module")
def tiny():
    return build_dataset("synthetic", n_patients=60, n_diag=40, n_proc=20, n_med=15, seed=0)


@pytest.mark.parametrize(("bad", "needle"), [
    ({"diffusion_mode": "fast"}, "diffusion_mode"),
    ({"diffusion_negatives": 0}, "diffusion_negatives"),
    ({"diffusion_negatives": -4}, "diffusion_negatives"),
    ({"diffusion_negatives": 2.5}, "diffusion_negatives"),
    ({"cl_negatives": 0}, "cl_negatives"),
    ({"cl_mode": "some"}, "cl_mode"),
    ({"diffusion_mode": "sampled", "diffusion_precision": "bf16"}, "diffusion_precision"),
    ({"ckgc_samples": -1}, "ckgc_samples"),
    ({"ckgc_samples": 1.5}, "ckgc_samples"),
    ({"denoiser_adam": "sparse"}, "denoiser_adam"),
    ({"rebuild_mode": "fast"}, "rebuild_mode"),
    ({"rebuild_mode": "sampled", "sampling_steps": 2}, "sampling_steps=0"),
    ({"rebuild_mode": "sampled", "diffusion_precision": "bf16"}, "diffusion_precision"),
    ({"rebuild_mode": "sampled", "rebuild_k": 9, "diffusion_negatives": 8}, "rebuild_k=9"),
])
def test_bad_options_name_the_option(bad: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        DiffKG.check_options({**DiffKG.options(), **bad})
    with pytest.raises(ValueError, match=needle):
        make_config(model="diffkg", **bad)


@pytest.mark.parametrize(("bad", "needle"), [
    ({"diffusion_mode": "sampled", "diffusion_negatives": 10_000}, "diffusion_negatives=10000"),
    ({"diffusion_mode": "sampled", "use_diffusion": False}, "use_diffusion"),
    ({"cl_mode": "sampled", "cl_negatives": 60}, "cl_negatives=60"),
    ({"ckgc_samples": 4}, "ckgc_samples=4 needs diffusion_mode='sampled'"),
    ({"denoiser_adam": "lazy"}, "denoiser_adam='lazy' needs diffusion_mode='sampled'"),
    ({"denoiser_adam": "deferred"}, "denoiser_adam='deferred' needs diffusion_mode='sampled'"),
    ({"diffusion_mode": "sampled", "ckgc_samples": 15}, "ckgc_samples=15 >= the 15 items"),
    ({"rebuild_mode": "sampled", "diffusion_negatives": 10**9}, "diffusion_negatives=1000000000"),
    ({"rebuild_mode": "sampled", "use_diffusion": False}, "rebuild_mode='sampled' needs use_d"),
])
def test_a_mode_the_data_cannot_support_is_an_error(tiny, bad: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        DiffKG.from_dataset(tiny, **bad)
    kg = _kg()
    with pytest.raises(ValueError, match="diffusion_negatives"):
        draw_sampled(kg.rowptr, kg.col, edge_keys(kg.rowptr, kg.col, N_ENT), ROWS, N_ENT, 5, 0)


def test_modes_train_and_keep_their_stream(tiny) -> None:
    """One denoiser pass and one step in each mode: finite losses; the InfoNCE stream exists
    (and is state) only in the sampled mode, so a default model's state is what it was."""
    opts = {"latdim": 8, "dims": [16], "batch": 32, "seed": 1}
    plain = DiffKG.from_dataset(tiny, **opts)
    assert plain.cl_generator is None and "cl_negatives" not in plain.get_extra_state()
    model = DiffKG.from_dataset(tiny, **opts, diffusion_mode="sampled", diffusion_negatives=16,
                                cl_mode="sampled", cl_negatives=20)
    report = model.on_epoch_start(0)
    assert all(math.isfinite(v) for v in report.loss.values())
    users = torch.tensor([0, 1, 2, 3])
    loss, parts = model(PairBatch(users, torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])))
    assert math.isfinite(float(loss.detach())) and float(parts["cl"]) > 0
    state = model.get_extra_state()["cl_negatives"]
    other = DiffKG.from_dataset(tiny, **opts, cl_mode="sampled", cl_negatives=20)
    other.set_extra_state(model.get_extra_state())
    assert torch.equal(other.cl_generator.get_state(), state)



def test_sampled_mode_refuses_data_parallel(tiny) -> None:
    """The sampled pass draws per batch on one process; under torchrun it would not follow the
    single process, so it says so instead of running."""
    from diffkg_fast.utils.distributed import Dist

    model = DiffKG.from_dataset(tiny, latdim=8, dims=[16], seed=1, diffusion_mode="sampled",
                                diffusion_negatives=16)
    with pytest.raises(ValueError, match="diffusion_mode='sampled'"):
        model.diffusion.distribute(Dist(rank=0, world=2))


# --------------------------------------------------------------------- on a GPU (skipped here)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("more", [{}, {"denoiser_adam": "lazy", "ckgc_samples": 4,
                                      "rebuild_mode": "sampled"},
                                  {"denoiser_adam": "deferred", "ckgc_samples": 4}])
def test_sampled_modes_train_on_cuda_as_on_the_cpu(tiny, more: dict) -> None:
    """The large-KG mode's code paths on a GPU (issue 21 §5): one epoch of DiffKG with the
    sampled diffusion and sampled InfoNCE on CUDA follows the CPU run. Every draw of the mode
    comes from the CPU streams and is moved to the device, so the two runs see the same
    samples; float order differs (CUDA ``index_add`` accumulates with atomics), hence the
    tolerances: losses to 1e-4 relative, Recall@10 to 0.02 (a few of 60 patients' ranks)."""
    from diffkg_fast.train import train

    opts = {"model": "diffkg", "epoch": 1, "latdim": 8, "dims": [16], "batch": 32, "seed": 1,
            "diffusion_mode": "sampled", "diffusion_negatives": 16, "cl_mode": "sampled",
            "cl_negatives": 20, **more}
    cpu = train(tiny, make_config(**opts), log=lambda _: None)
    gpu = train(tiny, make_config(**opts, device="cuda"), log=lambda _: None)
    for k, v in cpu.history[0]["loss"].items():
        assert gpu.history[0]["loss"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    # recall@10: the tiny cohort has 15 medications, so every list of 20 holds them all.
    assert gpu.val["recall@10"] == pytest.approx(cpu.val["recall@10"], abs=0.02)
