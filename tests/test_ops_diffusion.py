"""Reference diffusion ops against literal, loop-per-row forms of DiffKG's computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    diffusion_loss,
    draw_timesteps_noise,
    kg_rows,
    q_sample,
    sample,
    sample_topk,
    time_embedding,
)


def random_csr(n_rows: int, n_cols: int, density: float, seed: int) -> sp.csr_matrix:
    m = sp.random(n_rows, n_cols, density=density, format="csr", random_state=seed)
    m.data[:] = 1.0
    return m


def csr_tensors(m: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int64))


def literal_forward(model: Denoiser, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DiffKG's forward, verbatim in structure: concat[x, emb(t)] → Linear → tanh → Linear."""
    emb = model.emb_layer(time_embedding(t, model.emb_size, x.dtype))
    h = torch.cat([F.normalize(x), emb], dim=-1)
    return model.out_layer(torch.tanh(model.in_layer(h)))


# -- schedule ------------------------------------------------------------------------------------


def test_schedule_reproduces_diffkg_numbers() -> None:
    s = DiffusionSchedule(steps=5, noise_scale=0.1, noise_min=1e-4, noise_max=0.02)
    assert s.betas.dtype == torch.float64
    np.testing.assert_allclose(s.betas, [1e-4, 4.975e-4, 4.9775e-4, 4.98e-4, 4.9825e-4], rtol=1e-3)
    # Each value matches the documented one to the digits it is printed with (half a unit).
    w = s.snr_weights().numpy()
    assert np.all(np.abs(w - [1, 8326, 760, 285, 149.5]) <= [0, 0.5, 0.5, 0.5, 0.05])
    c1, c2 = s.posterior_coefs()
    np.testing.assert_allclose(c1, [1, 0.8327, 0.4545, 0.3126, 0.2382], atol=5e-5)
    np.testing.assert_allclose(c2, [0, 0.1673, 0.5455, 0.6874, 0.7618], atol=5e-5)
    # abar is recomputed from the betas after beta_0 := 1e-4: it telescopes to this closed form,
    var = np.linspace(1e-5, 2e-3, 5)
    np.testing.assert_allclose(s.alphas_cumprod, (1 - 1e-4) * (1 - var) / (1 - var[0]), rtol=1e-12)
    # while abar = 1 - var would not give DiffKG's weights.
    snr = (1 - var) / var
    assert abs((snr[0] - snr[1]) - 8326) > 1e4


def test_schedule_rejects_zero_noise() -> None:
    with pytest.raises(ValueError):
        DiffusionSchedule(noise_scale=0.0)


# -- kg_rows -------------------------------------------------------------------------------------


def test_kg_rows_matches_scipy_dense_rows() -> None:
    m = random_csr(61, 97, 0.08, seed=1).tolil()
    m[5, :] = 0  # an isolated row
    m = m.tocsr()
    m.eliminate_zeros()
    assert m[5].nnz == 0
    rowptr, col = csr_tensors(m)
    rows = torch.tensor([5, 0, 60, 7, 7, 33])  # repeated and isolated rows
    got = kg_rows(rowptr, col, rows, 97, backend="reference")
    assert got.dtype == torch.float32 and got.shape == (6, 97)
    np.testing.assert_array_equal(got.numpy(), m.toarray()[rows.numpy()])
    assert kg_rows(rowptr, col, rows[:0], 97).shape == (0, 97)


def test_kg_rows_duplicate_entries_stay_binary() -> None:
    rowptr, col = torch.tensor([0, 3, 4]), torch.tensor([2, 2, 0, 1])
    got = kg_rows(rowptr, col, torch.tensor([0, 1]), 3, dtype=torch.float64)
    np.testing.assert_array_equal(got.numpy(), [[1, 0, 1], [0, 1, 0]])


# -- denoiser ------------------------------------------------------------------------------------


def test_time_embedding_cos_then_sin() -> None:
    emb = time_embedding(torch.tensor([0, 3]), 10, torch.float64)
    np.testing.assert_array_equal(emb[0].numpy(), [1] * 5 + [0] * 5)
    f = np.exp(-math.log(10000) * np.arange(5) / 5)
    np.testing.assert_allclose(emb[1].numpy(), np.r_[np.cos(3 * f), np.sin(3 * f)], rtol=1e-12)
    assert time_embedding(torch.tensor([1]), 7).shape == (1, 7)


def test_bias_form_equals_literal_concat() -> None:
    model = Denoiser(97, hidden=33, dtype=torch.float64).eval()
    x = torch.rand(13, 97, dtype=torch.float64)
    t = torch.randint(0, 5, (13,))
    torch.testing.assert_close(model(x, t), literal_forward(model, x, t), rtol=1e-12, atol=1e-12)
    # One int step for every row broadcasts the same bias.
    torch.testing.assert_close(model(x, 3), literal_forward(model, x, torch.full((13,), 3)))


def test_init_statistics_and_seeded_determinism() -> None:
    model = Denoiser(300, hidden=200, generator=torch.Generator().manual_seed(3))
    assert model.in_layer.weight.shape == (200, 310)
    for layer in (model.in_layer, model.out_layer):
        std = math.sqrt(2 / sum(layer.weight.shape))
        assert abs(layer.weight.std().item() / std - 1) < 0.03
        assert abs(layer.bias.std().item() / 1e-3 - 1) < 0.25
    again = Denoiser(300, hidden=200, generator=torch.Generator().manual_seed(3))
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_dropout_only_when_training() -> None:
    model = Denoiser(50, hidden=8)
    x = torch.rand(4, 50)
    assert not torch.equal(model(x, 1), model(x, 1, dropout=False))
    model.eval()
    assert torch.equal(model(x, 1), model(x, 1))


# -- q_sample and loss ---------------------------------------------------------------------------


def test_q_sample_statistics() -> None:
    s = DiffusionSchedule(noise_scale=1.0, noise_min=0.05, noise_max=0.5)
    x0 = torch.rand(1, 8, dtype=torch.float64).expand(20000, 8)
    g = torch.Generator().manual_seed(0)
    t, noise = draw_timesteps_noise(x0, s.steps, g)
    assert set(t.tolist()) == set(range(5))
    x_t = q_sample(x0, t, noise, s)
    for step in range(5):
        sel = x_t[t == step]
        ab = float(s.alphas_cumprod[step])
        n = sel.shape[0]
        tol = 5 * math.sqrt((1 - ab) / n)
        assert (sel.mean(0) - math.sqrt(ab) * x0[0]).abs().max() < tol
        assert (sel.std(0) / math.sqrt(1 - ab) - 1).abs().max() < 5 / math.sqrt(2 * n)


def literal_loss(model, x0, t, noise, s, R, U, E_b, e_loss):
    """DiffKG's training_losses row by row, with the CKGC in its direct form (R X̂ᵀ)ᵀ U."""
    abar = s.alphas_cumprod.numpy()
    x_t = torch.stack([
        math.sqrt(abar[i]) * x0[b] + math.sqrt(1 - abar[i]) * noise[b]
        for b, i in enumerate(t.tolist())
    ])
    out = literal_forward(model, x_t, t)
    snr = abar / (1 - abar)
    diff, ckgc = [], []
    e_hat = (R @ out[:, : R.shape[1]].T).T @ U
    for b, i in enumerate(t.tolist()):
        w = 1.0 if i == 0 else snr[i - 1] - snr[i]
        diff.append(w * ((x0[b] - out[b]) ** 2).mean())
        ckgc.append(((e_hat[b] - E_b[b]) ** 2).mean())
    return (1 - e_loss) * torch.stack(diff).mean() + e_loss * torch.stack(ckgc).mean()


def loss_inputs(n_users=11, n_items=9, n_ent=23, batch=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = (torch.rand(n_users, n_items, generator=g) < 0.3).double()
    U = torch.randn(n_users, d, generator=g, dtype=torch.float64)
    E_b = torch.randn(batch, d, generator=g, dtype=torch.float64)
    x0 = (torch.rand(batch, n_ent, generator=g) < 0.2).double()
    t = torch.arange(batch) % 5
    noise = torch.randn(batch, n_ent, generator=g, dtype=torch.float64)
    return R, U, E_b, x0, t, noise


def test_ckgc_reassociation_equals_direct_form() -> None:
    R, U, _, _, _, _ = loss_inputs()
    X_hat = torch.randn(6, 23, dtype=torch.float64)[:, :9]
    direct = (R.to_sparse() @ X_hat.T).T @ U
    torch.testing.assert_close(X_hat @ (R.T @ U), direct, rtol=1e-12, atol=1e-12)


def test_loss_equals_literal_per_row_computation() -> None:
    s = DiffusionSchedule()
    R, U, E_b, x0, t, noise = loss_inputs()
    model = Denoiser(23, hidden=17, dtype=torch.float64).eval()
    loss, parts = diffusion_loss(model, x0, t, noise, s, 9, R.T @ U, E_b, 0.3,
                                 backend="reference")
    want = literal_loss(model, x0, t, noise, s, R, U, E_b, 0.3)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(0.7 * parts["diff"] + 0.3 * parts["ckgc"], loss.detach())


def test_loss_gradcheck_float64() -> None:
    s = DiffusionSchedule()
    R, U, E_b, x0, t, noise = loss_inputs(n_users=5, n_items=4, n_ent=7, batch=5, d=3)
    model = Denoiser(7, hidden=5, dtype=torch.float64).eval()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def f(*ps):
        state = dict(zip(names, ps, strict=True))

        def denoiser(x, t):  # the module with its parameters swapped for the gradcheck inputs
            return torch.func.functional_call(model, state, (x, t))

        return diffusion_loss(denoiser, x0, t, noise, s, 4, R.T @ U, E_b, 0.4,
                              backend="reference")[0]

    assert torch.autograd.gradcheck(f, params)


# -- sampling ------------------------------------------------------------------------------------


def literal_sample(model, x, s, steps):
    betas = s.betas.numpy()
    abar = np.cumprod(1 - betas)
    prev = np.r_[1.0, abar[:-1]]
    for i in reversed(range(steps)):
        out = literal_forward(model, x, torch.full((x.shape[0],), i))
        c1 = betas[i] * math.sqrt(prev[i]) / (1 - abar[i])
        c2 = (1 - prev[i]) * math.sqrt(1 - betas[i]) / (1 - abar[i])
        x = c1 * out + c2 * x
    return x


def test_sample_equals_literal_loop() -> None:
    s = DiffusionSchedule(steps=7, noise_scale=0.5, noise_min=1e-3, noise_max=0.05)
    model = Denoiser(31, hidden=12, dtype=torch.float64)  # training mode: sample drops no input
    x0 = (torch.rand(9, 31) < 0.2).double()
    for backend in ("reference", "auto"):  # auto: the fused hidden-space sampler on a CPU
        got = sample(model, x0, s, backend=backend)
        assert not got.requires_grad
        torch.testing.assert_close(got, literal_sample(model, x0, s, 7), rtol=1e-11,
                                   atol=1e-12)


def test_sample_with_noise_is_seeded() -> None:
    s = DiffusionSchedule()
    model = Denoiser(31, hidden=12)
    x0 = (torch.rand(9, 31) < 0.2).float()
    a = sample(model, x0, s, 3, generator=torch.Generator().manual_seed(5), backend="reference")
    b = sample(model, x0, s, 3, generator=torch.Generator().manual_seed(5), backend="reference")
    assert torch.equal(a, b) and not torch.equal(a, sample(model, x0, s, backend="reference"))
    with pytest.raises(ValueError):
        sample(model, x0, s, 6, backend="reference")


@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_sample_topk_equals_topk_of_full_sample(batch_size: int) -> None:
    s = DiffusionSchedule()
    m = random_csr(97, 97, 0.05, seed=2)
    rowptr, col = csr_tensors(m)
    model = Denoiser(97, hidden=40, generator=torch.Generator().manual_seed(1))
    rows = torch.randperm(97)[:50]
    full = sample(model, kg_rows(rowptr, col, rows, 97), s, backend="reference")
    want_v, want_i = torch.topk(full, 3, dim=-1)
    v, i = sample_topk(model, rowptr, col, rows, s, 3, batch_size=batch_size,
                       backend="reference")
    assert torch.equal(i, want_i)
    torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-6)


def test_sample_topk_empty_and_backend_errors() -> None:
    model = Denoiser(5, hidden=3)
    rowptr, col = torch.zeros(6, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    for backend in ("reference", "auto"):
        v, i = sample_topk(model, rowptr, col, torch.zeros(0, dtype=torch.long),
                           DiffusionSchedule(), 2, backend=backend)
        assert v.shape == i.shape == (0, 2) and i.dtype == torch.long
    with pytest.raises(ValueError, match="triton"):
        kg_rows(rowptr, col, torch.tensor([0]), 5, backend="triton")
