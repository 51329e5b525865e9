"""Relation-aware graph attention (RGAT): DiffKG's knowledge-graph encoder.

One layer, for entity table ``E`` (N × d), relation table ``Rel`` (R' × d, R' = 2R with inverses),
weight ``W = [W1; W2]`` (2d × d, ``W1 = W[:d]``, ``W2 = W[d:]``) and the CSR edge set of
:class:`~diffkg_fast.ops.graph.KGCSR` (edge ``h -> t`` with relation ``r``)::

    s(h,t)     = ([e_h ‖ e_t] W) · rel_r = <e_h, P1[r]> + <e_t, P2[r]>,
                 P1 = Rel W1^T, P2 = Rel W2^T                         (R' × d, computed once)
    logit(h,t) = LeakyReLU_0.2(s(h,t))
    alpha(h,t) = exp(logit(h,t) - m_h) / sum_{t'} exp(logit(h,t') - m_h),
                 m_h = max_{t'} logit(h,t')                           (segment softmax per row)
    agg_h      = e_h + sum_t alpha(h,t) e_t                          (self residual; no edge: e_h)
    out_h      = agg_h * mask_h / (1 - p)    if training and p > 0    (inverted dropout)
    e_h'       = out_h / max(||out_h||_2, 1e-12)                      if normalize

The relation enters only the logit, never the message. The reference below is the specification
and the oracle of the fused kernels: plain differentiable torch ops, so the backward is autograd's
(the row max ``m_h`` is detached: softmax is shift-invariant, so its gradient is exactly zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffkg_fast.ops.backend import register, resolve
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.ops.rows import rows

__all__ = ["dropout_mask", "rgat_aggregate", "rgat_forward", "segment_softmax"]

NEG_SLOPE = 0.2  # DiffKG's nn.LeakyReLU(0.2)
NORM_EPS = 1e-12  # F.normalize's default, as in DiffKG


def segment_softmax(logits: Tensor, row: Tensor, n_rows: int) -> Tensor:
    """Softmax of ``logits`` (n_edges,) within each group of equal ``row`` (n_edges,) ids.

    Subtracting the per-row max (``scatter_reduce(amax)``) keeps ``exp`` finite for any logit
    magnitude; the denominator is at least 1 (the max element contributes ``exp(0)``).
    """
    m = torch.full((n_rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
    m = m.scatter_reduce(0, row, logits.detach(), reduce="amax", include_self=True)
    ex = torch.exp(logits - m[row])
    den = torch.zeros(n_rows, dtype=logits.dtype, device=logits.device).index_add(0, row, ex)
    # rows() of a column, not den[row]: the same bits on every run at a fixed thread count
    # (diffkg_fast/ops/rows.py).
    return ex / rows(den.unsqueeze(1), row).squeeze(1)


def dropout_mask(shape: tuple[int, ...], p: float, generator: torch.Generator | None,
                 device: torch.device, dtype: torch.dtype) -> Tensor:
    """Inverted-dropout multiplier: ``1/(1-p)`` with probability ``1-p``, else 0.

    Drawn with ``torch.rand(generator=...)`` rather than ``F.dropout`` so a seeded generator
    reproduces the mask (and a fused kernel can be tested against the same mask).
    """
    if p >= 1.0:
        return torch.zeros(shape, dtype=dtype, device=device)
    gdev = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gdev).to(device)
    return (u >= p).to(dtype) / (1.0 - p)


def _check(E: Tensor, Rel: Tensor, W: Tensor, kg: KGCSR) -> None:
    n, d = E.shape
    if n != kg.n_entities:
        raise ValueError(f"E has {n} rows, the graph has {kg.n_entities} entities")
    if Rel.ndim != 2 or Rel.shape[1] != d or Rel.shape[0] < kg.n_relations:
        raise ValueError(f"Rel must be (>= {kg.n_relations}) × {d}, got {tuple(Rel.shape)}")
    if W.shape != (2 * d, d):
        raise ValueError(f"W must be {2 * d} × {d}, got {tuple(W.shape)}")
    if kg.col.device != E.device:
        raise ValueError(f"graph on {kg.col.device}, E on {E.device}: move it with kg.to()")
    if not (E.dtype == Rel.dtype == W.dtype):
        raise ValueError(f"dtypes differ: E {E.dtype}, Rel {Rel.dtype}, W {W.dtype}")


@register("rgat_aggregate", "reference")
def _rgat_aggregate_reference(
    E: Tensor,
    Rel: Tensor,
    W: Tensor,
    kg: KGCSR,
    *,
    dropout: float = 0.0,
    training: bool = False,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    d = E.shape[1]
    row, col, rel = kg.row, kg.col, kg.rel
    # Per-relation projections (R' × d) instead of a per-edge (2d × d) product: the E × 2d
    # concat of DiffKG's code becomes two gathers and two row dots.
    p1 = Rel @ W[:d].T
    p2 = Rel @ W[d:].T
    # rows(), not E[row]: the same bits on every run at a fixed thread count (ops/rows.py).
    s = (rows(E, row) * rows(p1, rel)).sum(-1) + (rows(E, col) * rows(p2, rel)).sum(-1)
    alpha = segment_softmax(F.leaky_relu(s, NEG_SLOPE), row, kg.n_entities)
    # index_add onto E itself is the self residual: heads without edges keep e_h.
    agg = E.index_add(0, row, alpha.unsqueeze(1) * rows(E, col))
    if training and dropout > 0.0:
        agg = agg * dropout_mask(tuple(agg.shape), dropout, generator, agg.device, agg.dtype)
    if normalize:
        agg = F.normalize(agg, p=2.0, dim=1, eps=NORM_EPS)
    return agg


def rgat_aggregate(
    E: Tensor,
    Rel: Tensor,
    W: Tensor,
    kg: KGCSR,
    *,
    dropout: float = 0.0,
    training: bool = False,
    normalize: bool = True,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """One RGAT layer (math in the module docstring).

    Args:
        E: ``(n_entities, d)`` entity table (float).
        Rel: ``(n_rel, d)`` relation table, ``n_rel >= kg.n_relations`` (2R with inverses).
        W: ``(2d, d)`` attention weight ``[W1; W2]``.
        kg: head-sorted edge set on ``E``'s device.
        dropout: drop probability ``p`` in ``[0, 1]``, applied only when ``training``.
        training: apply dropout.
        normalize: L2-normalise each output row (eps 1e-12).
        generator: RNG of the dropout mask (``None``: torch's global RNG).
        backend: ``"auto"``, ``"reference"`` or a kernel backend (see ``ops.backend``).

    Returns:
        ``(n_entities, d)`` new entity table, differentiable in ``E``, ``Rel`` and ``W``.
    """
    _check(E, Rel, W, kg)
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    impl = resolve("rgat_aggregate", backend, E.device)
    return impl(E, Rel, W, kg, dropout=dropout, training=training, normalize=normalize,
                generator=generator)


def rgat_forward(
    E: Tensor,
    Rel: Tensor,
    W: Tensor,
    kg: KGCSR,
    layers: int,
    res_lambda: float,
    *,
    dropout: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """DiffKG's KG encoder: ``layers`` normalised RGAT layers with a decaying residual sum::

        e^(0) = E,  e^(l) = rgat_aggregate(e^(l-1), normalize=True)
        res^(0) = E,  res^(l) = res_lambda * res^(l-1) + e^(l)

    ``res_lambda = 0`` returns the last layer only; ``layers = 0`` returns ``E``.
    Shapes as :func:`rgat_aggregate`; returns ``(n_entities, d)``.
    """
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    res, x = E, E
    for _ in range(layers):
        x = rgat_aggregate(x, Rel, W, kg, dropout=dropout, training=training, normalize=True,
                           generator=generator, backend=backend)
        res = res_lambda * res + x
    return res
