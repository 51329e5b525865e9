"""Sampled diffusion loss: DiffKG's denoiser loss for a KG row at O((deg + n)·H), not O(E·H).

The exact loss (:func:`diffkg_fast.ops.diffusion.diffusion_loss`, the oracle) of a KG row ``x0``
(binary over the E entities, support ``S`` of ``d`` edges) costs O(E·H) per row: its input is a
dense noisy row and its output ``x̂ = W2 a + b2`` has E columns (``p`` = the input dropout,
``λ`` = ``e_loss``, ``V = Rᵀ U``, I × d_emb)::

    x_t  = α x0 + σ ε,   α = sqrt(abar_t), σ = sqrt(1 - abar_t),  ε ~ N(0, I_E)
    z    = W1 (m ⊙ x_t) / ((1-p) ‖x_t‖),   m_j ~ Bern(1-p)           (normalize, then dropout)
    a    = tanh(z + c_t),   x̂ = W2 a + b2                            (W1 = the x columns)
    SE   = ‖x0 - x̂‖² = Σ_{j∈S} (1 - x̂_j)² + Σ_{j∉S} x̂_j²
    loss = (1-λ) mean_b[w_t SE_b / E] + λ mean_b[‖x̂[:I]ᵀ V - e_b‖² / d_emb]

Here every term is computed from the row's ``d`` support columns and ``n`` sampled columns,
drawn iid from a proposal ``q`` (uniform: ``q = 1/E``) once per batch and shared by its rows,
each with the importance weight ``ω_k = 1 / (n q(j_k))`` (uniform: ``E / n``).

**Output: an unbiased estimator.** With negatives ``j_1 … j_n``::

    SÊ = Σ_{j∈S} (1 - x̂_j)² + Σ_k ω_k 1[j_k ∉ S] x̂_{j_k}²

Each draw's term has expectation ``Σ_j q(j) / (n q(j)) 1[j ∉ S] x̂_j²``, so ``E[SÊ | a] = SE``
wherever ``q > 0`` (uniform covers every column). The loss is linear in ``SE`` and the draws do
not depend on the weights, so the sampled loss and its gradient are unbiased for the exact ones
at the same hidden activations ``a``. For uniform ``q`` and one row::

    Var(SÊ | a) = (1/n) [E Σ_{j∉S} x̂_j⁴ - (Σ_{j∉S} x̂_j²)²]

driven by how unevenly the off-support reconstruction energy ``x̂_j²`` spreads over columns (a few
hub columns predicted large dominate it); the relative s.d. is ``sqrt((E Σx̂⁴ / (Σx̂²)² - 1) / n)``,
about ``sqrt(2/n)`` for Gaussian-like ``x̂``. The batch's rows share the draws, so the variance of
the batch mean does not fall as ``1/B``.

The **CKGC term**: ``x̂[:I]ᵀ V = aᵀ M + c`` with the H × d_emb product ``M = W2[:I]ᵀ V`` and
``c = b2[:I]ᵀ V``. Exact by default: formed once per step from every item (I·H·d_emb), then
H·d_emb per row. With ``ckgc_samples = m`` (``batch.ckgc_cols``: m items, uniform, with
replacement) the step reads ``M`` and ``c`` from an :class:`ItemProduct` kept current across the
pass's steps (formed once per pass, then moved by each step's item rows), so the term's value
and its gradient in ``a`` stay exact; only the gradient in the items' rows of ``W2`` and ``b2``
is sampled, the m rows taking ``(I/m)·`` their exact gradients (:func:`_ckgc`): unbiased.

An exact form of ``‖x̂‖²`` exists too, through the H × H Gram ``G = W2ᵀ W2`` (the hidden-space
sampler's algebra): ``‖x̂‖² = aᵀ G a + 2 aᵀ W2ᵀ b2 + ‖b2‖²``. But ``G`` changes with every Adam
step: forming it and its backward cost ~2·E·H² MACs per step, E²·H²·2/B per epoch, still
quadratic in E (0.4·H/B of the exact mode's GEMMs, 0.4 at H = 1000, B = 1024); it is the tests'
oracle, not a mode.

**Input: moment-matched, not exact in law.** The exact pre-activation splits as
``z = [Σ_{j∈S} m_j x_t,j W1_j + σ ν] / ((1-p) ‖x_t‖)``, ``ν = Σ_{j∉S} m_j ε_j W1_j``. The support
part is computed exactly; ``ν`` (E - d columns) is replaced by a sketch over ``n`` more columns
``j'_k ~ q``, with fresh ``ξ_k ~ N(0, 1)`` and ``m'_k ~ Bern(1-p)``::

    ν̂ = Σ_k sqrt(ω_k) 1[j'_k ∉ S] m'_k ξ_k W1_{j'_k}
    E[ν̂] = 0 = E[ν],    E[ν̂ ν̂ᵀ] = (1-p) Σ_{j∉S} W1_j W1_jᵀ = E[ν νᵀ]

the same mean and covariance, not the same law: given the columns, ``ν̂`` is Gaussian of rank at
most ``n`` with a random covariance whose spread (``∝ 1/n``) is the sketch's error. The norm
``‖x_t‖² = Σ_{j∈S} x_t,j² + σ² χ``, ``χ = Σ_{j∉S} ε_j² ~ χ²_{E-d}``, takes ``χ`` from Wilson and
Hilferty's cube of a normal (:func:`chi2_wilson_hilferty`), independently of ``ν̂``; in the exact
model they share ``ε``: uncorrelated, dependent only through the H of E directions ``W1`` spans.
What the input sketch changes in accuracy is measured (parity runs), not argued.

**Cost** per row, in multiply-adds: about ``6 (d + n)·H`` (the support's and the sampled
columns' products, forward and backward) + ``3 H·d_emb`` (CKGC), against ``5 E·H`` exactly (two
forward GEMMs, three backward): ~11× fewer at the medication KG (E = 3,573, n = 256), ~280× at
Alibaba's (E = 89,196). Per step also: ``2 n`` row gathers of ``H``, the CKGC product
``I·H·d_emb``, and, as in the exact mode, the dense gradient fill and Adam over the ``2 E·H``
weights: O(E·H) per step, so O(E²·H / B) per epoch remains (``docs/large-kg.md``: the
measured split, and what is pending).

**Identity.** With ``n = E``, ``j_k = j'_k = k`` (every column once, ``ω = 1``), ``ξ`` the
exact draw's ``ε`` off ``S``, ``χ = Σ_{j∉S} ε_j²`` and the exact draw's masks, the sampled loss IS
the exact loss (``tests/test_large_kg.py`` checks values and gradients in float64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from diffkg_fast.ops.backend import register, resolve
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    _gen_device,
    csr_row_entries,
    step_weights_of,
)
from diffkg_fast.ops.graph import csr_offsets
from diffkg_fast.ops.rows import rows as take_rows

__all__ = ["EntityWeights", "ItemProduct", "SampledBatch", "chi2_wilson_hilferty",
           "diffusion_loss_sampled", "draw_sampled", "edge_keys", "entity_weights", "is_edge",
           "sampled_preactivation", "touched"]

_NORM_EPS = 1e-12  # F.normalize's default, as the exact denoiser's input


class SampledBatch(NamedTuple):
    """The support of ``B`` KG rows and every draw of one sampled step (module docstring).

    ``edge_*`` (nnz,): the rows' support entries in CSR order; ``*_keep``: 0/1 dropout draws, or
    ``None`` without dropout; ``*_off`` (B × n) bool: the sampled column is not an edge of the
    row; ``*_weight`` (n,): the importance weights ``ω``."""

    t: Tensor  # (B,) int64 diffusion steps
    edge_rowptr: Tensor  # (B + 1,) CSR offsets of the support entries
    edge_row: Tensor  # (nnz,) position in the batch of each entry
    edge_col: Tensor  # (nnz,) its column (the edge's tail)
    edge_eps: Tensor  # (nnz,) ε at the support columns
    edge_keep: Tensor | None  # (nnz,) m at the support columns
    off_energy: Tensor  # (B,) χ = Σ_{j∉S} ε_j², as drawn
    noise_cols: Tensor  # (n,) the sketch's columns j'
    noise_weight: Tensor  # (n,)
    noise_eps: Tensor  # (B, n) ξ
    noise_keep: Tensor | None  # (B, n) m'
    noise_off: Tensor  # (B, n)
    neg_cols: Tensor  # (n,) the output's negatives j
    neg_weight: Tensor  # (n,)
    neg_off: Tensor  # (B, n)
    ckgc_cols: Tensor | None = None  # (m,) the CKGC's item sample, or None: exact CKGC


class EntityWeights(NamedTuple):
    """The denoiser's per-entity weights as a sampled step reads them, at the entities
    ``index`` (sorted, unique): W1's entity columns (as rows), W2's rows and b2, and W1's
    time-embedding columns.

    :func:`entity_weights` makes compact leaf copies of the entities a step touches, so that
    backward fills K × H gradients, not E × H ones, and the optimiser can move those rows only
    (``denoiser_adam='lazy'``); without it the loss reads the denoiser's own weights (views:
    gradients reach its parameters, as the tests' gradchecks need)."""

    index: Tensor  # (K,) entity ids
    w1: Tensor  # (K, H)
    w2: Tensor  # (K, H)
    b2: Tensor  # (K,)
    w1_time: Tensor  # (H, emb)

    def at(self, cols: Tensor) -> Tensor:
        """Positions of the entity ids ``cols`` in ``index`` (each must be there)."""
        return torch.searchsorted(self.index, cols)


class ItemProduct(NamedTuple):
    """The CKGC's ``M = W2[:I]ᵀ V`` (H × d_emb) and ``c = b2[:I]ᵀ V`` (d_emb,) at the denoiser's
    current weights, for a sampled CKGC (module docstring): formed once (:meth:`of`, I·H·d_emb),
    then kept current by :meth:`moved` after each step, at (moved item rows)·H·d_emb."""

    w: Tensor
    b: Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, w2: Tensor, b2: Tensor, v: Tensor) -> ItemProduct:
        """From the output layer's weight ``w2`` (E × H), bias ``b2`` (E,) and ``V`` (I × d)."""
        n = v.shape[0]
        return cls(w2[:n].T @ v, b2[:n] @ v)

    @torch.no_grad()
    def moved(self, rows: Tensor, before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor],
              v: Tensor) -> ItemProduct:
        """The product after a step moved the item rows ``rows`` (ids < I) of W2 and b2 from
        ``before`` to ``after`` (each ``(W2 rows, b2 entries)``); every other row unchanged."""
        vr = v[rows]
        return ItemProduct(self.w + (after[0] - before[0]).T @ vr,
                           self.b + (after[1] - before[1]) @ vr)


def _own_weights(denoiser: Denoiser) -> EntityWeights:
    w1, n = denoiser.in_layer.weight, denoiser.n_entities
    return EntityWeights(torch.arange(n, device=w1.device), w1[:, :n].t(),
                         denoiser.out_layer.weight, denoiser.out_layer.bias, w1[:, n:])


def touched(batch: SampledBatch, item_count: int) -> Tensor:
    """The entities (sorted) whose weights a step on ``batch`` reads: the support, the sketch's
    and the negatives' columns, and the CKGC's items (all ``item_count`` when exact)."""
    items = batch.ckgc_cols
    if items is None:
        items = torch.arange(item_count, device=batch.edge_col.device)
    return torch.unique(torch.cat([batch.edge_col, batch.noise_cols, batch.neg_cols,
                                   items.reshape(-1)]))


@torch.no_grad()
def entity_weights(denoiser: Denoiser, batch: SampledBatch, item_count: int,
                   index: Tensor | None = None) -> EntityWeights:
    """Leaf copies of the weights of the entities a step on ``batch`` touches (``index``, or
    :func:`touched`); after backward their ``.grad`` are the step's gradients at those entities
    (:meth:`~diffkg_fast.model.diffkg.lazy_adam.LazyAdam.step` takes them)."""
    idx = touched(batch, item_count) if index is None else index
    w1, n = denoiser.in_layer.weight, denoiser.n_entities
    leaves = (w1.index_select(1, idx).t().contiguous(), denoiser.out_layer.weight[idx],
              denoiser.out_layer.bias[idx], w1[:, n:].clone())
    return EntityWeights(idx, *(x.requires_grad_() for x in leaves))


def edge_keys(rowptr: Tensor, col: Tensor, n_cols: int) -> Tensor:
    """Sorted int64 keys ``row · n_cols + col`` of a CSR's entries, for :func:`is_edge`."""
    if n_cols >= 2**31:
        raise ValueError(f"edge keys overflow int64 at {n_cols} columns")
    row = torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=rowptr.device),
                                  rowptr.diff(), output_size=col.numel())
    return torch.sort(row * n_cols + col).values


def is_edge(keys: Tensor, n_cols: int, rows: Tensor, cols: Tensor) -> Tensor:
    """``(len(rows), len(cols))`` bool: whether ``(rows[b], cols[k])`` is an entry of the CSR
    whose :func:`edge_keys` are ``keys`` (a binary search per pair: O(B·n·log nnz))."""
    q = rows.to(keys.device)[:, None] * n_cols + cols.to(keys.device)[None, :]
    if keys.numel() == 0:
        return torch.zeros(q.shape, dtype=torch.bool, device=keys.device)
    pos = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
    return keys[pos] == q


def chi2_wilson_hilferty(df: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One ``χ²_df`` draw per entry of ``df`` (float), as Wilson and Hilferty's
    ``df (1 - c + z sqrt(c))³``, ``c = 2 / (9 df)``, ``z ~ N(0, 1)`` from ``generator``.

    Mean ``df (1 - c³)``, variance ``2 df (1 + O(1/df))``; clamped at 0 (``z < -sqrt(9 df / 2)``:
    probability < 1e-11 for ``df >= 10``); ``df = 0`` gives 0. A normal draw, not a gamma one:
    torch's gamma sampler takes no generator, and every draw here comes from a seeded stream."""
    z = torch.randn(df.shape, generator=generator, dtype=torch.float64,
                    device=_gen_device(generator, df.device)).to(df.device)
    k = df.to(torch.float64)
    c = 2.0 / (9.0 * k.clamp(min=1.0))
    out = k * (1.0 - c + z * c.sqrt()).clamp(min=0.0).pow(3)
    return torch.where(k > 0, out, torch.zeros_like(out))


def draw_sampled(rowptr: Tensor, col: Tensor, keys: Tensor, rows: Tensor, n_entities: int,
                 steps: int, n_samples: int, dropout: float = 0.0,
                 generator: torch.Generator | None = None, *, ckgc_samples: int = 0,
                 item_count: int = 0) -> SampledBatch:
    """The support of the KG rows ``rows`` (CSR ``rowptr``, ``col``; ``keys`` its
    :func:`edge_keys`) and the draws of one sampled step, from ``generator`` in this order:
    ``t``, the support's ε, χ, the sketch's columns and ξ, the negatives, then (``dropout > 0``)
    the support's and the sketch's keep draws, then (``ckgc_samples > 0``) the CKGC's sample
    of ``ckgc_samples`` items of ``item_count``. Columns and items are uniform
    (``ω = E / n``)."""
    if n_samples < 1:
        raise ValueError(f"diffusion_negatives must be >= 1, got {n_samples}")
    dev = rowptr.device
    gdev = _gen_device(generator, dev)
    rows = rows.to(dev)
    n_rows = rows.numel()
    edge_row, pos = csr_row_entries(rowptr, rows)
    edge_col = col[pos]
    deg = rowptr[rows + 1] - rowptr[rows]

    def draw(fn, *args, **kw) -> Tensor:
        return fn(*args, generator=generator, device=gdev, **kw).to(dev)

    t = draw(torch.randint, steps, (n_rows,))
    edge_eps = draw(torch.randn, edge_col.numel())
    off_energy = chi2_wilson_hilferty((n_entities - deg).to(torch.float64), generator)
    noise_cols = draw(torch.randint, n_entities, (n_samples,))
    noise_eps = draw(torch.randn, n_rows, n_samples)
    neg_cols = draw(torch.randint, n_entities, (n_samples,))
    edge_keep = noise_keep = None
    if dropout > 0:
        keep = 1.0 - dropout
        edge_keep = torch.bernoulli(torch.full((edge_col.numel(),), keep, device=gdev),
                                    generator=generator).to(dev)
        noise_keep = torch.bernoulli(torch.full((n_rows, n_samples), keep, device=gdev),
                                     generator=generator).to(dev)
    ckgc_cols = None
    if ckgc_samples > 0:
        if item_count < 1:
            raise ValueError(f"ckgc_samples={ckgc_samples} needs item_count >= 1")
        ckgc_cols = draw(torch.randint, item_count, (ckgc_samples,))
    weight = torch.full((n_samples,), n_entities / n_samples, dtype=torch.float64, device=dev)
    return SampledBatch(
        t, csr_offsets(edge_row, n_rows), edge_row, edge_col, edge_eps, edge_keep, off_energy,
        noise_cols, weight, noise_eps, noise_keep, ~is_edge(keys, n_entities, rows, noise_cols),
        neg_cols, weight.clone(), ~is_edge(keys, n_entities, rows, neg_cols), ckgc_cols)


def _segment_sum(values: Tensor, seg: Tensor, n: int) -> Tensor:
    """``out[s] = Σ values[seg == s]`` (n, …); differentiable. ``index_add`` adds in index order
    on a CPU (no atomics), so the bits do not depend on the thread count there (on CUDA it adds
    with atomics: the order, and the last bits, may vary between runs)."""
    return values.new_zeros((n, *values.shape[1:])).index_add(0, seg, values)


def sampled_preactivation(denoiser: Denoiser, batch: SampledBatch,
                          schedule: DiffusionSchedule, weights: EntityWeights | None = None,
                          ) -> Tensor:
    """The first layer's ``x`` part ``z`` (B × H, before the time bias and tanh) of the rows of
    ``batch``: the support exactly, the off-support noise by the sketch ``ν̂`` (module
    docstring). Dropout follows ``denoiser.training``, its draws from ``batch``. ``weights``:
    the entities' weights to read (default: the denoiser's own)."""
    ew = _own_weights(denoiser) if weights is None else weights
    dtype, dev = ew.w1.dtype, ew.w1.device
    t, n_rows, er = batch.t, batch.t.numel(), batch.edge_row
    abar = schedule.alphas_cumprod.to(dev)[t]
    sa, sb = abar.sqrt().to(dtype), (1.0 - abar).sqrt().to(dtype)
    # x_t at the support columns (x0 = 1 there); the norm from the drawn χ.
    v = sa[er] + sb[er] * batch.edge_eps.to(dtype)
    if denoiser.norm:
        sq = _segment_sum(v * v, er, n_rows) + sb * sb * batch.off_energy.to(dtype)
        scale = 1.0 / sq.sqrt().clamp(min=_NORM_EPS)
    else:
        scale = torch.ones(n_rows, dtype=dtype, device=dev)
    drop = denoiser.training and denoiser.dropout > 0
    if drop:
        if batch.edge_keep is None or batch.noise_keep is None:
            raise ValueError("the denoiser is training with dropout: the batch needs keep draws")
        scale = scale / (1.0 - denoiser.dropout)
    coef = v * scale[er]
    ncoef = (sb * scale)[:, None] * batch.noise_weight.to(dtype).sqrt()[None, :] \
        * batch.noise_eps.to(dtype) * batch.noise_off.to(dtype)
    if drop:
        coef = coef * batch.edge_keep.to(dtype)
        ncoef = ncoef * batch.noise_keep.to(dtype)
    # One gather of the columns W1_j (support, then sketch): on the denoiser's own weights its
    # backward fills ONE dense gradient of W1 (each gather's backward zero-fills a whole H × E
    # one: at E = 20,000 the fills of seven separate gathers were 29% of a profiled step).
    nnz = batch.edge_col.numel()
    g1 = take_rows(ew.w1, ew.at(torch.cat([batch.edge_col, batch.noise_cols])))
    # Σ_{j∈S} coef_j W1_j per row (scaled, added into their batch row), then the sketch as one
    # (B × n) × (n × H) product.
    z = _segment_sum(coef[:, None] * g1[:nnz], er, n_rows)
    return z + ncoef @ g1[nnz:]


@register("diffusion_loss_sampled", "reference")
def _diffusion_loss_sampled_reference(
    denoiser: Denoiser, batch: SampledBatch, schedule: DiffusionSchedule, item_count: int,
    R_T_U: Tensor, E_batch: Tensor, e_loss: float, weights: EntityWeights | None = None,
    item_product: ItemProduct | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    if R_T_U.shape[0] != item_count:
        raise ValueError(f"R_T_U has {R_T_U.shape[0]} rows, expected item_count={item_count}")
    ew = _own_weights(denoiser) if weights is None else weights
    n_ent, n_rows = denoiser.n_entities, batch.t.numel()
    er, ec = batch.edge_row, batch.edge_col
    a = torch.tanh(sampled_preactivation(denoiser, batch, schedule, ew)
                   + denoiser.time_bias(batch.t, ew.w1_time))
    # Output: the support's squared errors exactly, the rest importance-weighted; one gather of
    # the rows of W2 and b2 (support, then negatives), as for W1.
    pos = ew.at(torch.cat([ec, batch.neg_cols]))
    g2, gb = take_rows(ew.w2, pos), take_rows(ew.b2[:, None], pos)[:, 0]
    nnz = ec.numel()
    x_sup = (take_rows(a, er) * g2[:nnz]).sum(-1) + gb[:nnz]
    se = _segment_sum((1.0 - x_sup).pow(2), er, n_rows)
    x_neg = a @ g2[nnz:].T + gb[nnz:]
    nw = batch.neg_weight.to(a.dtype)[None, :] * batch.neg_off.to(a.dtype)
    se = se + (nw * x_neg.pow(2)).sum(-1)
    rows_loss = step_weights_of(schedule, None, batch.t, a) * se / n_ent
    diff = rows_loss.mean()
    ckgc = _ckgc(a, ew, batch.ckgc_cols, R_T_U.detach().to(a.dtype), E_batch.detach(),
                 item_product)
    loss = (1.0 - e_loss) * diff + e_loss * ckgc
    return loss, {"diff": diff.detach(), "ckgc": ckgc.detach(), "rows": rows_loss.detach()}


def _ckgc(a: Tensor, ew: EntityWeights, items: Tensor | None, v: Tensor, e: Tensor,
          product: ItemProduct | None) -> Tensor:
    """The CKGC term ``mean_b ‖u_b - e_b‖² / d``, ``u = x̂[:, :I] V = a M + c`` (module
    docstring). Exact (``items`` None): ``M`` and ``c`` formed here from every item. Sampled:
    ``M`` and ``c`` from ``product`` (current: the value and ``∂/∂a`` are exact), and the items'
    rows of W2 and b2 get their gradient from ``m`` sampled items through
    ``M̂ = W2[items]ᵀ (I/m) V[items]``, ``ĉ = b2[items]ᵀ (I/m) V[items]``: a term ``a·(M̂ - M̂)``
    (zero in value) whose gradient in row ``i`` is ``(I/m)·#{k: items_k = i}`` times the exact
    ``G V_iᵀ`` (``G = ∂loss/∂M``), so unbiased (``E[#] = m/I``). The loss is then a surrogate:
    its gradient in those rows is not its value's (the value does not move with them)."""
    n_items = v.shape[0]
    if items is None:
        if ew.index.numel() < n_items or int(ew.index[n_items - 1]) != n_items - 1:
            raise ValueError("the exact CKGC reads every item's weights: EntityWeights must "
                             "hold entities 0 … item_count-1")
        u = a @ (ew.w2[:n_items].T @ v) + ew.b2[:n_items] @ v
        return (u - e).pow(2).mean(-1).mean()
    if product is None:
        raise ValueError("a sampled CKGC (batch.ckgc_cols) needs the item product: pass "
                         "item_product=ItemProduct.of(...) at the denoiser's current weights")
    pos, vc = ew.at(items), (n_items / items.numel()) * v[items]
    m_hat = take_rows(ew.w2, pos).T @ vc
    c_hat = ew.b2[pos] @ vc
    u = a @ product.w.to(a.dtype) + product.b.to(a.dtype) \
        + a.detach() @ (m_hat - m_hat.detach()) + (c_hat - c_hat.detach())
    return (u - e).pow(2).mean(-1).mean()


def diffusion_loss_sampled(
    denoiser: Denoiser, batch: SampledBatch, schedule: DiffusionSchedule, item_count: int,
    R_T_U: Tensor, E_batch: Tensor, e_loss: float, *, weights: EntityWeights | None = None,
    item_product: ItemProduct | None = None, backend: str = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffKG's diffusion + CKGC loss of the rows of ``batch`` (:func:`draw_sampled`), the
    off-support columns sampled (module docstring): ``(loss, {"diff", "ckgc", "rows"})`` as
    :func:`~diffkg_fast.ops.diffusion.diffusion_loss`. ``R_T_U`` (I × d) and ``E_batch``
    (B × d) as there (detached). Dropout follows ``denoiser.training``, its draws from
    ``batch``. ``weights``: the entities' weights to read (:func:`entity_weights`: compact
    leaves; default the denoiser's own). The CKGC term is exact, or, when ``batch`` carries
    ``ckgc_cols``, exact in value with its item rows' gradient sampled, from ``item_product``
    (:class:`ItemProduct` at the current weights). Only the reference exists (float32 or
    float64, the denoiser's dtype)."""
    return resolve("diffusion_loss_sampled", backend, batch.t.device)(
        denoiser, batch, schedule, item_count, R_T_U, E_batch, e_loss, weights, item_product)
