"""Losses shared by the embedding recommenders: BPR, L2 and InfoNCE.

- BPR (Rendle et al., UAI 2009): ``-mean log sigmoid(<u, i+> - <u, i->)``;
- L2: ``reg * sum ||theta||^2`` (DiffKG's ``calcRegLoss`` times ``args.reg``);
- RecBole's embedding norm: ``sum_k ||E_k||_F / B`` over a batch's embeddings (KGAT, KGIN, KGCN);
- InfoNCE (the contrastive loss of DiffKG, Jiang et al., WSDM 2024; as in SGL, Wu et al.,
  SIGIR 2021): agreement of each node's two views against every other node of view 2.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor

from diffkg_fast.ops.contrastive import logsumexp_mm
from diffkg_fast.ops.rows import rows

__all__ = ["bpr_loss", "emb_norm_reg", "info_nce", "l2_reg"]


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


def emb_norm_reg(*embeddings: Tensor) -> Tensor:
    """RecBole's ``EmbLoss`` (``require_pow=False``, its default): ``sum_k ||E_k||_F / B``, the
    Frobenius norms (not squared) of the batch's embedding tables over the batch size ``B``
    (rows of the last table). KGAT and KGIN regularise with it, times ``reg_weight``."""
    return sum(e.norm(p=2) for e in embeddings) / embeddings[-1].shape[0]
