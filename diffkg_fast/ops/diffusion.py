"""Diffusion over the KG (DiffKG): schedule, dense KG rows, denoiser, loss and sampling.

Reference implementations in plain, vectorized PyTorch: the specification and the oracle of the
kernels. x0-prediction Gaussian diffusion over rows ``x0`` of the binary entity × entity KG
adjacency (``abar`` = alphas_cumprod, ``f`` = denoiser, ``λ`` = ``e_loss``)::

    x_t     = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                      (q_sample)
    x̂0      = f(x_t, t)
    loss    = (1-λ) mean_b[w_t ‖x0 - x̂0‖² / E] + λ mean_b[‖x̂0[:, :I] (Rᵀ U) - E_b‖² / d]
    w_t     = SNR(t-1) - SNR(t), w_0 = 1,  SNR(t) = abar_t / (1 - abar_t)
    x_{t-1} = c1_t f(x_t, t) + c2_t x_t,  t = T-1 … 0, no noise          (sample)

DiffRec (:mod:`diffkg_fast.model.diffrec`) runs the same schedule, denoiser, loss and sampler on
user × item rows, with what DiffKG does not need: a ``"linear"`` schedule and its own ``beta_0``
(:class:`DiffusionSchedule`), per-row loss weights and per-step weights in
:func:`diffusion_loss` (importance sampling, ``reweight``), the per-row losses in its parts,
and the denoiser's dropout drawn from a generator; the importance sampler of ``t`` is
:mod:`diffkg_fast.ops.diffusion_importance`. Each defaults to DiffKG's behaviour, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkg_fast.ops.backend import register, resolve

_MAX_BETA = 0.999  # DiffRec / DiffKG clip of beta_t ("linear-var")
_BETA_0 = 1e-4  # DiffKG's "beta_fixed": beta_0 is overwritten with this value (DiffRec: 1e-5)
SCHEDULES = ("linear-var", "linear")


@dataclass(frozen=True)
class DiffusionSchedule:
    """DiffKG's "linear-var" noise schedule (float64, CPU), and DiffRec's "linear" one.

    ``var = linspace(noise_scale·noise_min, noise_scale·noise_max, steps)``;
    ``beta_0 = var_0``, ``beta_t = min(1 - (1 - var_t)/(1 - var_{t-1}), 0.999)``; then
    ``beta_0 := 1e-4``, and ``abar_t = prod_{s<=t} (1 - beta_s)`` is RECOMPUTED from the betas.
    So ``abar_t != 1 - var_t``: unclipped, the product telescopes to
    ``abar_t = (1 - 1e-4)(1 - var_t)/(1 - var_0)``. This is the definition that reproduces
    DiffKG's numbers (defaults: SNR weights ≈ [1, 8326, 760, 285, 149.5]); ``abar = 1 - var``
    would give [1, 98030, 975, 330, 166] instead.

    For DiffRec (YiyanXu/DiffRec ``gaussian_diffusion.py``, RecBole's ``diffrec.py``):
    ``noise_schedule="linear"`` takes the betas as the linspace itself (``beta_t = var_t``, no
    clip), and ``beta_0`` is the value ``beta_0`` is overwritten with (DiffRec's
    ``beta_fixed=True`` writes 1e-5; ``None``: not overwritten, DiffRec's ``beta_fixed=False``).
    """

    steps: int = 5
    noise_scale: float = 0.1
    noise_min: float = 1e-4
    noise_max: float = 0.02
    noise_schedule: str = "linear-var"
    beta_0: float | None = _BETA_0
    betas: Tensor = field(init=False, repr=False, compare=False)
    alphas_cumprod: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.noise_scale <= 0:
            # DiffKG builds no schedule at noise_scale == 0 (and then cannot sample).
            raise ValueError(f"need steps >= 1 and noise_scale > 0, got {self}")
        if self.noise_schedule not in SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {SCHEDULES}, got {self}")
        if self.beta_0 is not None and not 0.0 < self.beta_0 < 1.0:
            raise ValueError(f"beta_0 must be in (0, 1) or None, got {self}")
        var = torch.linspace(
            self.noise_scale * self.noise_min, self.noise_scale * self.noise_max, self.steps,
            dtype=torch.float64,
        )
        if self.noise_schedule == "linear":
            betas = var.clone()
        else:
            abar = 1.0 - var
            betas = torch.empty_like(var)
            betas[1:] = (1.0 - abar[1:] / abar[:-1]).clamp(max=_MAX_BETA)
            betas[0] = 1.0 - abar[0]
        if self.beta_0 is not None:
            betas[0] = self.beta_0
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, 0))

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """``abar_{t-1}`` with ``abar_{-1} = 1`` (steps,)."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    def snr(self) -> Tensor:
        """``SNR(t) = abar_t / (1 - abar_t)`` (steps,)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def snr_weights(self) -> Tensor:
        """Loss weight per step: ``SNR(t-1) - SNR(t)``, and 1 at ``t = 0`` (steps,)."""
        s = self.snr()
        return torch.cat([s.new_ones(1), s[:-1] - s[1:]])

    def posterior_coefs(self) -> tuple[Tensor, Tensor]:
        """``(c1, c2)`` with ``mean(x_{t-1} | x_t, x0) = c1_t x0 + c2_t x_t`` (each (steps,)).

        ``c1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t)``,
        ``c2 = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)``; ``c1_0 = 1``, ``c2_0 = 0``.
        """
        prev, one_m = self.alphas_cumprod_prev, 1.0 - self.alphas_cumprod
        c1 = self.betas * prev.sqrt() / one_m
        c2 = (1.0 - prev) * (1.0 - self.betas).sqrt() / one_m
        return c1, c2


def _per_row(arr: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
    """``arr[t]`` cast to ``like``'s dtype, shaped to broadcast over rows ((B, 1) or scalar)."""
    if isinstance(t, int):
        return like.new_tensor(float(arr[t]))
    return arr.to(like.device)[t].to(like.dtype).unsqueeze(-1)


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # Draw on the generator's device and move: a CPU generator then gives the same numbers
    # whatever device the model lives on (the reference stays an oracle across devices).
    return generator.device if generator is not None else device


def draw_timesteps_noise(
    x0: Tensor, steps: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Training draws: ``t`` uniform in ``{0 … steps-1}`` (B,) and ``eps ~ N(0, 1)`` like ``x0``."""
    dev = _gen_device(generator, x0.device)
    t = torch.randint(steps, (x0.shape[0],), generator=generator, device=dev)
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    return t.to(x0.device), noise.to(x0.device)


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``x0``, ``noise`` (B, E), ``t`` (B,)."""
    abar = schedule.alphas_cumprod
    return _per_row(abar.sqrt(), t, x0) * x0 + _per_row((1.0 - abar).sqrt(), t, x0) * noise


def csr_row_entries(rowptr: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The entries of the CSR rows ``rows``: ``(row_of, pos)``, each (nnz of those rows,), the
    position in ``rows`` and the CSR position of every entry, in row order."""
    dev = rowptr.device
    rows = rows.to(dev)
    start = rowptr[rows]
    counts = rowptr[rows + 1] - start
    total = int(counts.sum())
    row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=dev), counts,
                                     output_size=total)
    # CSR position of every entry: its row's start + its rank inside the row.
    first = torch.cumsum(counts, 0) - counts
    pos = torch.arange(total, device=dev) - first[row_of] + start[row_of]
    return row_of, pos


def check_sampling_steps(schedule: DiffusionSchedule, sampling_steps: int) -> None:
    if not 0 <= sampling_steps <= schedule.steps:
        raise ValueError(f"sampling_steps={sampling_steps} not in [0, {schedule.steps}]")


@register("kg_rows", "reference")
def _kg_rows_reference(
    rowptr: Tensor, col: Tensor, rows: Tensor, n_cols: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    row_of, pos = csr_row_entries(rowptr, rows)
    out = torch.zeros(rows.numel(), n_cols, dtype=dtype, device=rowptr.device)
    out[row_of, col[pos]] = 1  # assignment, not add: duplicate entries stay binary
    return out


def kg_rows(
    rowptr: Tensor, col: Tensor, rows: Tensor, n_cols: int, *,
    dtype: torch.dtype = torch.float32, backend: str = "auto",
) -> Tensor:
    """Dense binary rows ``A[rows]`` (B × n_cols) of the KG adjacency given as CSR.

    ``rowptr`` (n_rows + 1,), ``col`` (nnz,) int64 on the model's device; ``rows`` (B,) int64.
    Built on the device by one scatter: the entity × entity matrix is never materialised.
    """
    return resolve("kg_rows", backend, rowptr.device)(rowptr, col, rows, n_cols, dtype=dtype)


def dropout_mask(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """The inverted-dropout mask for ``x``: ``bernoulli(1-p) / (1-p)``, zeros at ``p >= 1``.

    Without ``generator``: drawn from torch's default generator, the very draw ``F.dropout``
    makes on a CPU (DiffKG). With one: drawn on the generator's device and moved to ``x``'s, so
    a CPU stream gives the same mask wherever the model lives (DiffRec).
    """
    if p >= 1:
        return torch.zeros_like(x)
    keep = 1.0 - p
    if generator is None:
        return torch.empty_like(x).bernoulli_(keep).div_(keep)
    mask = torch.empty(x.shape, dtype=x.dtype, device=generator.device)
    return mask.bernoulli_(keep, generator=generator).div_(keep).to(x.device)


def time_embedding(t: Tensor, size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding (B, size): ``[cos(t f_j), sin(t f_j)]``, ``f_j = 10000^(-2j/size)``."""
    half = size // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype, device=t.device) / half)
    arg = t[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    return F.pad(emb, (0, size % 2))  # odd size: a zero column, as DiffRec


class Denoiser(nn.Module):
    """DiffKG's denoiser ``f(x_t, t) ≈ x0``: ``Linear(E+emb, hidden) → tanh → Linear(hidden, E)``.

    The first layer keeps DiffKG's single weight ``W = [W_x | W_e]`` (hidden × (E + emb)) over
    ``concat[x, emb(t)]``, but is computed as ``x W_xᵀ + (emb(t) W_eᵀ + b)``: the time embedding is
    the same for all rows at one step, so it is a per-step bias and the concat is never built.
    Input rows are L2-normalized (``norm``) and dropped out (p = ``dropout``) when training,
    the mask drawn from ``dropout_generator`` (default ``None``: torch's default generator,
    through ``F.dropout``, as DiffKG).
    """

    def __init__(
        self, n_entities: int, hidden: int = 1000, emb_size: int = 10, *, norm: bool = True,
        dropout: float = 0.5, generator: torch.Generator | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        dropout_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.n_entities, self.hidden, self.emb_size = n_entities, hidden, emb_size
        self.norm, self.dropout = norm, dropout
        self.dropout_generator = dropout_generator
        # A mask the caller drew (a data-parallel rank: its rows of the whole batch's draw, so
        # that it trains on the single process's masks); used instead of drawing while set.
        self.preset_mask: Tensor | None = None
        kw = {"device": device, "dtype": dtype}
        self.emb_layer = nn.Linear(emb_size, emb_size, **kw)
        self.in_layer = nn.Linear(n_entities + emb_size, hidden, **kw)
        self.out_layer = nn.Linear(hidden, n_entities, **kw)
        self.reset_parameters(generator)

    @contextlib.contextmanager
    def masked(self, mask: Tensor | None) -> Iterator[None]:
        """Train with the caller's dropout ``mask`` (the rows of a whole-batch draw, on a
        data-parallel rank) instead of drawing one, while the block runs."""
        self.preset_mask = mask
        try:
            yield
        finally:
            self.preset_mask = None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Weights ``N(0, sqrt(2 / (fan_in + fan_out)))``, biases ``N(0, 0.001)`` (DiffKG)."""
        for layer in (self.emb_layer, self.in_layer, self.out_layer):
            for p, std in ((layer.weight, math.sqrt(2.0 / sum(layer.weight.shape))),
                           (layer.bias, 1e-3)):
                dev = _gen_device(generator, p.device)
                p.copy_(torch.randn(p.shape, generator=generator, device=dev, dtype=p.dtype) * std)

    def time_bias(self, t: Tensor, w_e: Tensor | None = None) -> Tensor:
        """The time embedding's share of the first layer, ``emb(t) W_eᵀ + b`` (len(t) × hidden);
        ``w_e``: the time columns to use instead of the layer's own (a compact copy)."""
        w = self.in_layer.weight
        emb = self.emb_layer(time_embedding(t, self.emb_size, w.dtype))
        return F.linear(emb, w[:, self.n_entities:] if w_e is None else w_e, self.in_layer.bias)

    def forward(self, x: Tensor, t: Tensor | int, dropout: bool | None = None) -> Tensor:
        """``x`` (B, E), ``t`` (B,) or one int step for all rows → ``x0_hat`` (B, E).

        ``dropout=None`` follows ``self.training``; sampling passes ``False``.
        """
        if isinstance(t, int):  # one step for all rows: a (1, hidden) bias, broadcast
            t = torch.tensor([t], device=x.device)
        if self.norm:
            x = F.normalize(x, dim=-1)
        if self.training if dropout is None else dropout:
            if self.preset_mask is not None:
                x = x * self.preset_mask
            elif self.dropout_generator is None:
                x = F.dropout(x, self.dropout, training=True)
            elif self.dropout > 0:
                x = x * dropout_mask(x, self.dropout, self.dropout_generator)
        h = F.linear(x, self.in_layer.weight[:, : self.n_entities]) + self.time_bias(t)
        return self.out_layer(torch.tanh(h))


def step_weights_of(schedule: DiffusionSchedule, step_weights: Tensor | None, t: Tensor,
                    like: Tensor) -> Tensor:
    """Each row's step weight ``w_t`` (B,) in ``like``'s dtype: ``step_weights`` (steps,) or,
    by default, the schedule's SNR weights."""
    w = schedule.snr_weights() if step_weights is None else step_weights
    return w.to(like.device)[t].to(like.dtype)


@register("diffusion_loss", "reference")
def _diffusion_loss_reference(
    denoiser: Denoiser, x0: Tensor, t: Tensor, noise: Tensor, schedule: DiffusionSchedule,
    item_count: int, R_T_U: Tensor, E_batch: Tensor, e_loss: float, *,
    row_weights: Tensor | None = None, step_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    if R_T_U.shape[0] != item_count:
        raise ValueError(f"R_T_U has {R_T_U.shape[0]} rows, expected item_count={item_count}")
    x0_hat = denoiser(q_sample(x0, t, noise, schedule), t)
    w = step_weights_of(schedule, step_weights, t, x0)
    rows = w * (x0 - x0_hat).pow(2).mean(-1)
    diff = (rows if row_weights is None else rows * row_weights.to(rows.dtype)).mean()
    # CKGC, reassociated: (R X̂ᵀ)ᵀ U = X̂ (Rᵀ U); never forms the U × B matrix.
    e_hat = x0_hat[:, :item_count] @ R_T_U.detach()
    ckgc = (e_hat - E_batch.detach()).pow(2).mean(-1).mean()
    loss = (1.0 - e_loss) * diff + e_loss * ckgc
    return loss, {"diff": diff.detach(), "ckgc": ckgc.detach(), "rows": rows.detach()}


def diffusion_loss(
    denoiser: Denoiser, x0: Tensor, t: Tensor, noise: Tensor, schedule: DiffusionSchedule,
    item_count: int, R_T_U: Tensor, E_batch: Tensor, e_loss: float, *, backend: str = "auto",
    precision: str = "fp32", row_weights: Tensor | None = None,
    step_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffKG's diffusion + CKGC loss on one batch of KG rows → ``(loss, {"diff", "ckgc"})``.

    ``x0``, ``noise`` (B, E); ``t`` (B,) int64; ``R_T_U = Rᵀ U_emb`` (I × d, computed once per
    pass from the training user–item matrix R (U × I) and the user table); ``E_batch`` (B × d)
    the entity embeddings of the batch rows. Both tables are detached: only the denoiser learns.
    ``loss = (1-e_loss) mean_b(w_t mse_b) + e_loss mean_b(mean_d (X̂[:, :I] Rᵀ U - E_b)²)``.
    Dropout follows ``denoiser.training``. ``precision`` (``"fp32"``, ``"tf32"``, ``"bf16"``)
    needs a fused backend (:mod:`diffkg_fast.ops.diffusion_loss_fused`).

    DiffRec's extensions (default ``None``: DiffKG's loss): ``step_weights`` (steps,) replace
    the SNR weights ``w_t`` (ones: DiffRec's ``reweight=False``); ``row_weights`` (B,) scale
    each row's term, ``mean_b(row_weights_b w_t mse_b)`` (DiffRec's ``1 / pt``). The parts hold
    ``"rows"`` too: each row's ``w_t mse_b`` (B,), unscaled by ``row_weights`` (what DiffRec's
    importance sampler records). With ``e_loss = 0`` and zero tables (``R_T_U`` I × 1,
    ``E_batch`` B × 1) the CKGC term is exactly 0: the plain weighted x0 MSE.
    """
    fn = resolve("diffusion_loss", backend, x0.device)
    # Passed only when set, so that DiffKG's calls stay the calls they were.
    extra = {k: v for k, v in (("row_weights", row_weights), ("step_weights", step_weights))
             if v is not None}
    return fn(denoiser, x0, t, noise, schedule, item_count, R_T_U, E_batch, e_loss, **extra,
              **_precision_kw("diffusion_loss", fn, precision))


def _precision_kw(op: str, fn, precision: str) -> dict[str, str]:
    """``{"precision": p}`` for a fused backend; the reference computes in its inputs' dtype
    only, so another precision there is an error naming the op."""
    if precision == "fp32":
        return {}
    if getattr(fn, "takes_precision", False):
        return {"precision": precision}
    raise ValueError(f"precision={precision!r} of op {op!r} needs a fused backend "
                     "(backend='auto' on a CPU or CUDA device), not the reference")


@register("diffusion_sample", "reference")
@torch.no_grad()
def _sample_reference(
    denoiser: Denoiser, x_start: Tensor, schedule: DiffusionSchedule, sampling_steps: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_sampling_steps(schedule, sampling_steps)
    x = x_start
    if sampling_steps > 0:
        _, noise = draw_timesteps_noise(x_start, 1, generator)
        x = q_sample(x_start, sampling_steps - 1, noise, schedule)
    c1, c2 = schedule.posterior_coefs()
    # DiffKG walks all `steps` steps back whatever `sampling_steps` is.
    for t in range(schedule.steps - 1, -1, -1):
        x = float(c1[t]) * denoiser(x, t, dropout=False) + float(c2[t]) * x
    return x


def sample(
    denoiser: Denoiser, x_start: Tensor, schedule: DiffusionSchedule, sampling_steps: int = 0, *,
    generator: torch.Generator | None = None, backend: str = "auto",
) -> Tensor:
    """Denoise ``x_start`` (B, E) → (B, E), no gradient, no dropout.

    ``sampling_steps = 0`` starts from ``x_start`` itself; otherwise from
    ``q_sample(x_start, sampling_steps - 1, eps)`` (``eps`` from ``generator``). Then for
    ``t = steps-1 … 0``: ``x_{t-1} = c1_t f(x_t, t) + c2_t x_t`` (no noise; ``c1_0 = 1``,
    ``c2_0 = 0``, so the result is the last ``f`` output).
    """
    fn = resolve("diffusion_sample", backend, x_start.device)
    return fn(denoiser, x_start, schedule, sampling_steps, generator)


@register("diffusion_sample_topk", "reference")
@torch.no_grad()
def _sample_topk_reference(
    denoiser: Denoiser, rowptr: Tensor, col: Tensor, rows: Tensor, schedule: DiffusionSchedule,
    k: int, batch_size: int = 1024, sampling_steps: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    dtype = denoiser.in_layer.weight.dtype
    vals, idx = [], []
    for start in range(0, rows.numel(), batch_size):  # a loop over batches, not rows
        x0 = _kg_rows_reference(rowptr, col, rows[start : start + batch_size],
                                denoiser.n_entities, dtype=dtype)
        x = _sample_reference(denoiser, x0, schedule, sampling_steps, generator)
        v, i = torch.topk(x, k, dim=-1)
        vals.append(v)
        idx.append(i)
    if not vals:
        empty = torch.empty(0, k, device=rowptr.device)
        return empty.to(dtype), empty.long()
    return torch.cat(vals), torch.cat(idx)


def sample_topk(
    denoiser: Denoiser, rowptr: Tensor, col: Tensor, rows: Tensor, schedule: DiffusionSchedule,
    k: int, *, batch_size: int = 1024, sampling_steps: int = 0,
    generator: torch.Generator | None = None, backend: str = "auto", precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Top-``k`` of the denoised KG rows ``rows`` (n,) → ``(values, indices)``, each (n, k).

    Rows are built from the CSR (``rowptr``, ``col``), denoised by :func:`sample` and reduced to
    their top-k ``batch_size`` rows at a time: no more than one B × E output exists at once.
    The rebuild's candidates are ``(rows[i], indices[i, j])``. ``precision`` as in
    :func:`diffusion_loss`.
    """
    fn = resolve("diffusion_sample_topk", backend, rowptr.device)
    return fn(denoiser, rowptr, col, rows, schedule, k, batch_size, sampling_steps, generator,
              **_precision_kw("diffusion_sample_topk", fn, precision))
