"""Choosing the set rule of a run on its validation visits (:mod:`diffkg_fast.eval.sets`).

Two choices, both on the VALIDATION visits of a ``visit``-split dataset; the test split is then
evaluated once with what they chose:

1. the plain rule: the base rule with the best validation Jaccard among the grids
   ``topk:K`` (``K = 1 … min(n_meds, 3·k0)``, ``k0`` the rounded mean training visit size),
   ``threshold:T`` (``T = −1.00, −0.95 … 4.00``) and ``visit_size:C`` (``C = 0.50, 0.55 …
   1.50``); ties go to the earlier candidate in that order (a fixed ``K`` first, smaller values
   first). Jaccard is the protocol's first metric (GAMENet, SafeDrug, MoleRec).
2. the DDI-aware rule: that base with ``penalty=W`` for ``W`` in :data:`PENALTY_WEIGHTS` (``0``
   is the plain rule) or ``avoid``: the best validation Jaccard among the candidates whose
   validation DDI rate is ``<= target_ddi`` (SafeDrug's ``target_ddi``, 0.06 by default); when
   none is, the lowest DDI rate (and the criterion says so).

The record (:class:`SetChoice`) keeps both rules and the validation numbers of every DDI
candidate and of the best of each base kind, so a run says what was chosen and over what.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffkg_fast.eval.medication import ddi_rate
from diffkg_fast.eval.sets import SetRule, base_sizes, select_sets, standardise

__all__ = ["PENALTY_WEIGHTS", "SetChoice", "choose_rules", "jaccard_of_sizes"]

# Dense below 0.5: on the default cohort the DDI rate falls from .074 to .037 between W = .1 and
# .2 (a threshold rule's set also shrinks as W grows), so a coarse grid misses the target.
PENALTY_WEIGHTS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3,
                   0.4, 0.5, 0.75, 1.0, 2.0, 4.0)
THRESHOLDS = tuple(round(-1.0 + 0.05 * i, 2) for i in range(101))
SCALES = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))


@dataclass
class SetChoice:
    """The rules a run uses: ``plain`` (no DDI graph) and ``safe`` (DDI-aware), how they were
    chosen (``criterion``) and the validation numbers behind it (``table``: dicts with
    ``rule``, ``jaccard``, ``ddi_rate``, ``avg_meds``)."""

    plain: SetRule
    safe: SetRule
    target_ddi: float
    criterion: str
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"plain": self.plain.to_dict(), "safe": self.safe.to_dict(),
                "target_ddi": self.target_ddi, "criterion": self.criterion,
                "table": [dict(r) for r in self.table]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SetChoice:
        return cls(SetRule.from_dict(d["plain"]), SetRule.from_dict(d["safe"]),
                   float(d["target_ddi"]), str(d["criterion"]), list(d.get("table", [])))


def jaccard_of_sizes(csum: np.ndarray, n_true: np.ndarray, sizes: np.ndarray) -> float:
    """Mean Jaccard of prefix sets: visit ``v`` predicts its ``sizes[v]`` best medications;
    ``csum[v, j]`` = true medications among its ``j`` best (``csum[:, 0] = 0``)."""
    inter = csum[np.arange(len(sizes)), sizes]
    union = sizes + n_true - inter
    return float(np.mean(np.divide(inter, union, out=np.zeros(len(sizes)), where=union > 0)))


def _row(rule: SetRule, sets: np.ndarray, truth: np.ndarray, adj: np.ndarray) -> dict[str, Any]:
    inter = (sets & truth).sum(axis=1)
    union = sets.sum(axis=1) + truth.sum(axis=1) - inter
    jac = np.divide(inter, union, out=np.zeros(len(union)), where=union > 0)
    pairs = np.argwhere(np.triu(adj > 0, 1))
    return {"rule": rule.describe(), "jaccard": float(jac.mean()),
            "ddi_rate": ddi_rate(sets, pairs, sets.shape[1]),
            "avg_meds": float(sets.sum(axis=1).mean())}


def _best_plain(scores: np.ndarray, truth: np.ndarray, n_codes: np.ndarray,
                fit: tuple[float, float], k0: int) -> tuple[SetRule, list[SetRule]]:
    """The best base rule by validation Jaccard, and the best of each kind."""
    s = np.asarray(scores, dtype=np.float64)
    v, m = s.shape
    order = np.argsort(-s, axis=1, kind="stable")
    hits = np.take_along_axis(truth, order, axis=1)
    csum = np.concatenate([np.zeros((v, 1)), np.cumsum(hits, axis=1)], axis=1)
    n_true = truth.sum(axis=1)
    z = standardise(s)
    grids = (("topk", range(1, min(m, 3 * k0) + 1)), ("threshold", THRESHOLDS),
             ("visit_size", SCALES))
    best_of_kind = []
    for kind, grid in grids:
        rules = [SetRule(kind, float(p), fit=fit) for p in grid]
        jac = [jaccard_of_sizes(csum, n_true, base_sizes(r, z, n_codes)) for r in rules]
        best_of_kind.append((max(jac), -len(best_of_kind), rules[int(np.argmax(jac))]))
    best = max(best_of_kind, key=lambda t: (t[0], t[1]))[2]
    return best, [r for _, _, r in best_of_kind]


def choose_rules(scores: np.ndarray, truth: np.ndarray, adj: np.ndarray | None,
                 n_codes: np.ndarray, fit: tuple[float, float], k0: int,
                 target_ddi: float) -> SetChoice:
    """Both rules (module docstring) from validation ``scores`` and true sets ``truth`` (bool,
    ``visits × meds``); ``adj``: the interaction matrix, ``None`` without a ``ddi`` relation
    (then the DDI-aware rule is the plain one)."""
    truth = np.asarray(truth, dtype=bool)
    if truth.shape[0] == 0:
        raise ValueError("no validation visits to choose a set rule on")
    plain, kinds = _best_plain(scores, truth, n_codes, fit, k0)
    a = np.zeros((truth.shape[1],) * 2) if adj is None else np.asarray(adj)
    table = [_row(r, select_sets(scores, r, None, n_codes), truth, a) for r in kinds]
    if adj is None:
        return SetChoice(plain, plain, target_ddi, "no ddi relation: the plain rule", table)
    cands = [plain.with_ddi("penalty", w) if w > 0 else plain for w in PENALTY_WEIGHTS]
    cands.append(plain.with_ddi("avoid"))
    rows = [_row(r, select_sets(scores, r, a, n_codes), truth, a) for r in cands]
    table += rows
    ok = [i for i, r in enumerate(rows) if r["ddi_rate"] <= target_ddi]
    if ok:
        pick = max(ok, key=lambda i: (rows[i]["jaccard"], -i))
        crit = f"best validation Jaccard with validation DDI rate <= {target_ddi:g}"
    else:
        pick = min(range(len(rows)), key=lambda i: (rows[i]["ddi_rate"], -rows[i]["jaccard"]))
        crit = (f"no candidate reached validation DDI rate <= {target_ddi:g}: the lowest "
                "validation DDI rate")
    return SetChoice(plain, cands[pick], target_ddi, crit, table)
