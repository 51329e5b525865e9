"""SafeDrug's controllable DDI loss, for models trained by BPR over rankings.

SafeDrug (Yang, Xiao, Ma, Glass, Sun, IJCAI 2021, section 3.4; code: ycq091044/SafeDrug,
``src/models.py`` ``batch_neg`` and ``src/SafeDrug.py``'s training loop) adds to its multi-label
loss a penalty on the predicted probabilities of interacting drugs, switched on by the DDI rate
of the visit's predicted set::

    L_DDI = Σ_i Σ_j A_ij p_i p_j                 (ordered pairs: each interaction counted twice)
    L     = β L_acc + (1 − β) c L_DDI
    β     = 1                                    if DDI' <= γ
            max(0, 1 − (DDI' − γ) / K_p)         otherwise

with ``p_i`` the sigmoid probability of drug ``i``, the predicted set ``{i : p_i >= 0.5}``, its
DDI rate ``DDI'``, the target ``γ`` (``target_ddi``, 0.06 in SafeDrug's script) and ``K_p``
(``kp``, 0.05). ``c`` is the script's constant 0.0005 (``ddi_scale``, the default here). One
training step of SafeDrug is one visit; here a step is a batch of BPR triples, and the switch
stays per patient: each distinct patient ``u`` of the batch has its own set, rate ``DDI'_u``
and ``β_u``, and::

    L = mean_b β_{u_b} bpr_b  +  mean_u (1 − β_u) c L_DDI,u

over the batch's triples ``b`` (patient ``u_b``) and its distinct patients ``u``: an unsafe
patient's ranking is penalised, a safe one's is not. (PyHealth's batched SafeDrug layer,
``sunlabuiuc/PyHealth`` ``pyhealth/models/safedrug.py``, pools one rate over the batch instead;
the pooled rate of ~900 patients sits at the population's, so every batch gets nearly the same
``β``.) ``max(0, …)`` is PyHealth's too; SafeDrug's script
has ``min(0, …)``, which gives ``β <= 0`` (a NEGATIVE weight on the accuracy loss) whenever a
rate exceeds the target, where ``β`` must lie in ``[0, 1]`` to weigh two losses.

Probabilities from a ranking. DiffKG and LightGCN are trained by BPR, ``σ(y_ui − y_uj)``: only
score differences mean anything, and no sigmoid of a raw score is a probability. The predicted
set of a ranking model is its top ``k`` (``k``: the rounded mean training visit size, the
evaluation's default rule), so the probability is the BPR sigmoid of a score against the set's
boundary::

    p_ui = σ(y_ui − τ_u),   τ_u = (y_u(k) + y_u(k+1)) / 2   (detached: a boundary, not a target)

with ``y_u(k)`` the ``k``-th best score of patient ``u``. Then ``{p >= 0.5}`` is exactly the top
``k``, as SafeDrug's set is ``{p >= 0.5}``, ``DDI'_u`` is its interacting share of the
``k (k − 1) / 2`` pairs, and the gradient of ``L_DDI`` lowers the scores of interacting drugs
near and inside the set, in BPR's own units. ``L_acc`` is the model's BPR term (its L2 and
contrastive terms are regularisers and keep their weights).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffkg_fast.data.errors import DataError
from diffkg_fast.ops.rows import rows
from diffkg_fast.utils.distributed import SINGLE, Dist, Span, whole_batch

__all__ = ["DDI_DEFAULTS", "DDILoss", "controlled", "ddi_pairs_of", "has_ddi", "set_size_of"]

# SafeDrug's defaults (src/SafeDrug.py argparse: target_ddi 0.06, kp 0.05; models.py 0.0005).
DDI_DEFAULTS = {"ddi_loss": False, "target_ddi": 0.06, "kp": 0.05, "ddi_scale": 5e-4}


def has_ddi(ds: Any) -> bool:
    """Whether the dataset's KG has a ``ddi`` relation with at least one pair (a relation
    declared but empty, as ``data build --set ddi=false`` leaves it, checks nothing)."""
    return "ddi" in ds.relation_names and len(ds.triplets_of("ddi")) > 0


def ddi_pairs_of(ds: Any, option: str = "ddi_loss") -> np.ndarray:
    """The dataset's ``ddi`` pairs (medication ids); a dataset without them is a
    :class:`DataError` naming ``option``: a DDI option never silently does nothing."""
    if not has_ddi(ds):
        have = "an empty one" if "ddi" in ds.relation_names else "none"
        raise DataError(f"needs the KG's 'ddi' relation, and dataset {ds.name!r} has {have} "
                        f"(relations: {list(ds.relation_names)})", field=option)
    return np.asarray(ds.triplets_of("ddi"), dtype=np.int64).reshape(-1, 2)


def set_size_of(ds: Any) -> int:
    """The predicted set's size: rounded (half up) mean training visit size, or mean training
    items per patient for data without visits; at least 1."""
    if ds.visits is not None and (np.asarray(ds.visits.split) == 0).any():
        sizes = np.diff(np.asarray(ds.visits.med_ptr))[np.asarray(ds.visits.split) == 0]
    else:
        sizes = np.diff(ds.train.tocsr().indptr)
        sizes = sizes[sizes > 0]
    return max(1, int(np.floor(float(np.mean(sizes)) + 0.5))) if len(sizes) else 1


class DDILoss(nn.Module):
    """The controlled loss (module docstring) for ``n_items`` medications interacting by
    ``pairs`` (``(n, 2)`` item ids), predicted sets of ``set_size``."""

    def __init__(self, pairs: np.ndarray, n_items: int, set_size: int, *, target_ddi: float,
                 kp: float, ddi_scale: float) -> None:
        super().__init__()
        if n_items < 2:
            raise ValueError(f"a DDI loss needs at least two medications, got {n_items}")
        p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if len(p) and (p.min() < 0 or p.max() >= n_items):
            raise ValueError(f"DDI pair id outside [0, {n_items})")
        adj = torch.zeros(n_items, n_items)
        adj[p[:, 0], p[:, 1]] = 1.0
        adj[p[:, 1], p[:, 0]] = 1.0
        adj.fill_diagonal_(0.0)
        # Not persistent: rebuilt from the dataset, so a checkpoint does not carry it.
        self.register_buffer("adj", adj, persistent=False)
        # k + 1 scores are read per patient, so the set leaves one medication out.
        self.k = max(1, min(int(set_size), n_items - 1))
        self.target_ddi, self.kp, self.scale = target_ddi, kp, ddi_scale

    def probabilities(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """``(p, in_set)``: ``σ(y − τ)`` and the top-``k`` mask, each ``U × n_items``."""
        top = scores.detach().topk(self.k + 1, dim=1)
        tau = (top.values[:, self.k - 1] + top.values[:, self.k]) / 2
        in_set = torch.zeros_like(scores, dtype=torch.bool)
        in_set.scatter_(1, top.indices[:, : self.k], True)
        return torch.sigmoid(scores - tau.unsqueeze(1)), in_set

    def rates(self, in_set: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Each set's DDI rate: interacting pairs over its ``k (k − 1) / 2`` pairs."""
        m = in_set.to(dtype)
        bad = ((m @ self.adj.to(dtype)) * m).sum(1) / 2
        n = m.sum(1)
        pairs = n * (n - 1) / 2
        return torch.where(pairs > 0, bad / pairs.clamp(min=1), torch.zeros_like(bad))

    def beta(self, rate: Tensor) -> Tensor:
        """SafeDrug's switch: 1 at or under the target, falling linearly to 0 at
        ``target + kp``."""
        return torch.where(rate <= self.target_ddi, torch.ones_like(rate),
                           (1.0 - (rate - self.target_ddi) / self.kp).clamp(min=0.0))

    def forward(self, rec: Tensor, owner: Tensor, scores: Tensor
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """The controlled loss of the recommendation terms ``rec`` (``B``: one per triple,
        ``owner`` its patient's row of ``scores``) and the patients' scores (``U × n_items``);
        the parts ``ddi`` (mean ``L_DDI``), ``ddi_beta`` (mean ``β``) and ``ddi_rate`` (the
        pooled DDI rate of the ``U`` sets), detached."""
        p, in_set = self.probabilities(scores)
        penalty = ((p @ self.adj.to(p.dtype)) * p).sum(1)
        rate = self.rates(in_set, p.dtype)
        beta = self.beta(rate)
        loss = (beta[owner] * rec).mean() + ((1.0 - beta) * self.scale * penalty).mean()
        k_pairs = self.k * (self.k - 1) / 2
        pooled = rate.mean() if k_pairs else torch.zeros((), device=rate.device)
        return loss, {"ddi": penalty.mean().detach(), "ddi_beta": beta.mean().detach(),
                      "ddi_rate": pooled.detach()}


def controlled(ddi: DDILoss | None, rec: Tensor, user_table: Tensor, items: Tensor,
               users: Tensor, parts: dict[str, Tensor], prefix: str = "", *,
               span: Span | None = None, dist: Dist = SINGLE) -> Tensor:
    """The loss of the per-triple terms ``rec`` (``B``) of ``users``: their mean without
    ``ddi``; with it, the controlled loss, the batch's distinct patients ranked by
    ``user_table @ items.T``. The DDI parts go into ``parts`` under ``prefix``.

    In a data-parallel step (``span``, ``dist``) the patients' term is over the WHOLE batch's
    distinct patients (their ids gathered; ``user_table`` is the same on every rank): a term
    of the whole batch, computed alike on every rank, as the single process computes it."""
    if ddi is None:
        return rec.mean()
    who = whole_batch(users, span, dist).unique()
    owner = torch.searchsorted(who, users)
    loss, mine = ddi(rec, owner, rows(user_table, who) @ items.T)
    parts.update({prefix + k: v for k, v in mine.items()})
    return loss
