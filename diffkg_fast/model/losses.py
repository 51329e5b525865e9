"""Losses shared by the embedding recommenders: BPR, L2 and InfoNCE.

- BPR (Rendle et al., UAI 2009): ``-mean log sigmoid(<u, i+> - <u, i->)``;
- L2: ``reg * sum ||theta||^2`` (DiffKG's ``calcRegLoss`` times ``args.reg``);
- RecBole's embedding norm: ``sum_k ||E_k||_F / B`` over a batch's embeddings (KGAT, KGIN, KGCN);
- InfoNCE (the contrastive loss of DiffKG, Jiang et al., WSDM 2024; as in SGL, Wu et al.,
  SIGIR 2021): agreement of each node's two views against every other node of view 2; for
  large graphs its denominator over sampled nodes (:func:`info_nce_sampled`, an importance-
  weighted estimate, biased low in log space: the bias is stated there) or over the batch's own
  nodes (:func:`info_nce_in_batch`, SimGCL's loss, a different objective).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffkg_fast.ops.contrastive import logsumexp_mm, sampled_logsumexp
from diffkg_fast.ops.rows import rows
from diffkg_fast.utils.distributed import SINGLE, Dist, Span, global_sum

__all__ = ["bpr_loss", "emb_norm_reg", "info_nce", "info_nce_in_batch", "info_nce_sampled",
           "l2_reg"]


def bpr_loss(u: Tensor, pos: Tensor, neg: Tensor, reduce: bool = True) -> Tensor:
    """``-mean log sigmoid(<u, pos> - <u, neg>)`` over the batch (each argument B × d); with
    ``reduce=False`` the ``B`` terms (their mean is the loss, bit for bit).

    ``softplus(-x) = -log sigmoid(x)`` without the underflow of ``log(sigmoid(x))``.
    """
    terms = F.softplus(-((u * pos).sum(-1) - (u * neg).sum(-1)))
    return terms.mean() if reduce else terms


def l2_reg(params: Iterable[Tensor], reg: float) -> Tensor:
    """``reg * sum ||theta||^2`` over ``params``."""
    params = list(params)
    return reg * sum(p.pow(2).sum() for p in params)


def info_nce(view1: Tensor, view2: Tensor, nodes: Tensor, temp: float) -> Tensor:
    """InfoNCE of ``nodes`` between two embedding tables (N × d each).

    With row-normalised ``z1``, ``z2``: ``-mean_n log( exp(<z1_n, z2_n>/temp) /
    sum_m exp(<z1_n, z2_m>/temp) )``, the denominator over ALL ``N`` rows of view 2. Computed as
    ``logsumexp - positive`` (stable for any ``temp``); the only large temporary is the
    ``len(nodes) × N`` logit matrix (1,024 × 6,350 floats = 26 MB at the default sizes), one
    buffer for forward and backward (:func:`~diffkg_fast.ops.contrastive.logsumexp_mm`).
    """
    # 1/temp folded into the B × d side: dividing the B × N logits (and its backward) cost
    # ~20 ms of a 260 ms step at the default size.
    # rows(), not view1[nodes]: the indexing backward sums at two threads in timing order.
    z1 = F.normalize(rows(view1, nodes), dim=-1) / temp
    z2 = F.normalize(view2, dim=-1)
    pos = (z1 * rows(z2, nodes)).sum(-1)
    return (logsumexp_mm(z1, z2) - pos).mean()


def info_nce_sampled(view1: Tensor, view2: Tensor, nodes: Tensor, temp: float,
                     negatives: Tensor) -> Tensor:
    """:func:`info_nce` with its denominator estimated from ``negatives`` (k,), row ids of view
    2 drawn iid uniform from its ``N`` rows and shared by the batch: O(k·d) per node, not O(N·d).

    With ``s_nm = <z1_n, z2_m> / temp``, ``S_n = Σ_m exp(s_nm)`` (the exact denominator)::

        Ŝ_n  = exp(s_nn) + (N / k) Σ_i 1[m_i ≠ n] exp(s_{n m_i})
        loss = mean_n (log Ŝ_n - s_nn)        (a logsumexp over [s_nn, s_{n m_i} + log(N/k)])

    ``Ŝ_n`` is unbiased for ``S_n``: each draw hits ``m ≠ n`` with probability ``1/N`` and
    weight ``N/k``, and the positive enters exactly. Its log is not: log is concave, so
    ``E[log Ŝ_n] <= log S_n`` (Jensen), and by the delta method::

        E[log Ŝ_n] - log S_n = -Var(Ŝ_n) / (2 S_n²) + O(k⁻²)
        Var(Ŝ_n) = (1/k) [N Σ_{m≠n} exp(2 s_nm) - (Σ_{m≠n} exp(s_nm))²]

    The loss is biased low by about ``Var / 2S²``, which falls as ``1/k`` and grows with the
    spread of ``exp(s)`` over the nodes (at ``temp = 0.1`` the terms span up to ``e^20``, so a
    few close nodes dominate it); the gradient, the self-normalised softmax over the sample, is
    biased by O(1/k) likewise. How it is handled: the positive is never sampled (``Ŝ_n >=
    exp(s_nn)``, the loss stays ``>= 0`` and the sum is never empty); the bias is not corrected
    (a first-order ``+ Var̂ / 2Ŝ²`` needs a per-node sample variance as noisy as the bias it
    removes); ``k`` trades cost for bias, and its effect on accuracy is measured by parity runs
    (docs/large-kg.md). With ``negatives = arange(N)`` it is :func:`info_nce` exactly.
    """
    n, k = view2.shape[0], negatives.numel()
    if k < 1:
        raise ValueError("info_nce_sampled needs at least one negative")
    z1 = F.normalize(rows(view1, nodes), dim=-1) / temp
    pos = (z1 * F.normalize(rows(view2, nodes), dim=-1)).sum(-1)
    # A draw of the node itself is its positive, already counted exactly: dropped (its logit
    # -inf); one B × k block for forward and backward (sampled_logsumexp).
    lse = sampled_logsumexp(z1, F.normalize(rows(view2, negatives), dim=-1), pos, nodes,
                            negatives, math.log(n / k))
    return (lse - pos).mean()


def info_nce_in_batch(view1: Tensor, view2: Tensor, nodes: Tensor, temp: float) -> Tensor:
    """InfoNCE over the batch's distinct ``nodes``, each against the others' view 2 (SimGCL's
    loss, Yu et al., SIGIR 2022): O(B·d) per node. A different objective, not an estimate of
    :func:`info_nce`: the batch's nodes are drawn by interaction, so popular nodes are
    over-represented among the negatives, and nothing reweights them."""
    u = torch.unique(nodes)
    z1 = F.normalize(rows(view1, u), dim=-1) / temp
    z2 = F.normalize(rows(view2, u), dim=-1)
    return (torch.logsumexp(z1 @ z2.T, -1) - (z1 * z2).sum(-1)).mean()


def emb_norm_reg(*embeddings: Tensor, span: Span | None = None, dist: Dist = SINGLE,
                 ) -> Tensor:
    """RecBole's ``EmbLoss`` (``require_pow=False``, its default): ``sum_k ||E_k||_F / B``, the
    Frobenius norms (not squared) of the batch's embedding tables over the batch size ``B``
    (rows of the last table). KGAT, KGIN and KGCN regularise with it, times ``reg_weight``.

    In a data-parallel step (``span``, ``dist``) each rank holds ``b`` of the batch's ``B``
    rows. The norms are of the WHOLE batch, ``||E_k|| = sqrt(S_k)`` with ``S_k = Σ_r s_rk`` the
    ranks' sums of squares (all-reduced, detached), and the value is the single process's on
    every rank. The gradient comes from the surrogate ``Σ_k s_k / (2 ||E_k|| b)``: its
    gradient on this rank's rows is ``(B/b)`` times theirs in ``R = Σ_k sqrt(S_k)/B``, which the
    trainer's weight ``W b / B`` and DDP's average ``1/W`` bring back to exactly ``∂R``."""
    if span is None or not dist.active:
        return sum(e.norm(p=2) for e in embeddings) / embeddings[-1].shape[0]
    squares = torch.stack([e.pow(2).sum() for e in embeddings]) * float(span.real)
    norms = global_sum(squares, dist).sqrt()
    value = norms.sum() / span.total
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))  # a zero norm: zero gradient
    surrogate = (squares / (2 * safe)).sum() / max(span.rows, 1)
    return surrogate + (value - surrogate).detach()
