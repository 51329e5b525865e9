"""Medication SETS from a ranking model's scores: the decision rule, plain or DDI-aware.

A ranking model scores every medication of a visit; a clinician receives a set. A rule has a
base (how large the set is) and a DDI mode (how the KG's ``ddi`` relation shapes it). Scores are
first standardised per visit, ``z = (s − mean_v) / std_v`` over the medications, so that one
threshold or one penalty weight means the same for every visit and every model.

Base rules:

- ``topk:K``: the ``K`` best medications;
- ``threshold:T``: every medication with ``z >= T`` (a per-visit size read off the scores);
- ``visit_size:C``: the visit's ``round(C · (a + b · n_codes))`` best, at least 1, where
  ``n_codes`` is the visit's number of diagnoses and procedures and ``a + b·n`` the least-squares
  line of the training visits' medication counts on their code counts (:func:`fit_visit_size`;
  the two correlate at .75 on the default synthetic cohort: sicker visits get more drugs).

DDI modes, with ``A`` the symmetric 0/1 interaction matrix:

- ``off``: the base set, a prefix of the ranking (ties: the lower id first, as
  :func:`~diffkg_fast.eval.medication.predict_topk`);
- ``penalty=W``: greedy: repeatedly add the medication with the best ``z_i − W·c_i``, ``c_i`` the
  number of already chosen medications it interacts with, until the base size is reached (size
  rules) or the best value drops below ``T`` (threshold); ``W`` is in units of the visit's score
  standard deviation. ``W = 0`` is the base set exactly;
- ``avoid``: ``W = ∞``: greedy in score order, skipping a medication that interacts with one
  already chosen; the set ends smaller than the base size when no safe medication is left.

The greedy is the one used everywhere (evaluation, ``recommend``); :func:`exact_penalty_set`
solves the same objective ``max Σ z_i x_i − W Σ_{i<j} A_ij x_i x_j, Σ x = k`` exactly as a
mixed-integer programme, for the measurement that chose the greedy
(``bench/bench_ddi_sets.py``, ``docs/medication-safety.md``). Everything is vectorised over
visits: one greedy step is one ``visits × medications`` operation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diffkg_fast.data.dataset import VisitFeatures
from diffkg_fast.data.errors import DataError

__all__ = ["BASE_KINDS", "DDI_MODES", "SetRule", "displaced", "exact_penalty_set",
           "fit_visit_size", "parse_ddi", "select_sets", "standardise", "visit_code_counts"]

BASE_KINDS = ("topk", "threshold", "visit_size")
DDI_MODES = ("off", "penalty", "avoid")


@dataclass(frozen=True)
class SetRule:
    """One decision rule (module docstring): ``kind`` and its ``param`` (K, T or C), the DDI
    ``mode`` and its penalty ``weight``, and ``fit = (a, b)`` of ``visit_size``."""

    kind: str = "topk"
    param: float = 10
    mode: str = "off"
    weight: float = 0.0
    fit: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.kind not in BASE_KINDS:
            raise ValueError(f"set rule kind must be one of {BASE_KINDS}, got {self.kind!r}")
        if self.mode not in DDI_MODES:
            raise ValueError(f"DDI mode must be one of {DDI_MODES}, got {self.mode!r}")
        if not math.isfinite(self.param) or (self.kind != "threshold" and self.param <= 0):
            raise ValueError(f"{self.kind} needs a finite positive parameter, got {self.param}")
        if self.mode == "penalty" and not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"penalty weight must be a finite number >= 0, got {self.weight}")

    def with_ddi(self, mode: str, weight: float = 0.0) -> SetRule:
        """The same base with another DDI mode."""
        return SetRule(self.kind, self.param, mode, weight if mode == "penalty" else 0.0,
                       self.fit)

    def describe(self) -> str:
        """``topk:20``, ``threshold:1.25, penalty=2``, ``visit_size:0.9, avoid``."""
        base = f"{self.kind}:{self.param:g}"
        if self.mode == "off":
            return base
        return base + (", avoid" if self.mode == "avoid" else f", penalty={self.weight:g}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fit": list(self.fit)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SetRule:
        a, b = d.get("fit", (0.0, 0.0))
        return cls(str(d["kind"]), float(d["param"]), str(d.get("mode", "off")),
                   float(d.get("weight", 0.0)), (float(a), float(b)))


def parse_ddi(text: str) -> tuple[str, float]:
    """``off`` / ``avoid`` / ``penalty=W`` (the ``recommend --ddi`` value) → ``(mode, W)``."""
    t = text.strip().lower()
    if t in ("off", "avoid"):
        return t, 0.0
    name, sep, value = t.partition("=")
    if name == "penalty" and sep:
        try:
            w = float(value)
        except ValueError:
            w = math.nan
        if math.isfinite(w) and w >= 0:
            return "penalty", w
    raise DataError(f"expected off, avoid or penalty=W with a number W >= 0, got {text!r}",
                    field="--ddi")


# ------------------------------------------------------------------ sizes
def standardise(scores: np.ndarray) -> np.ndarray:
    """``(s − row mean) / row std`` (population std; a constant row gives zeros). Monotone in
    ``s`` per row, so a threshold on ``z`` keeps a prefix of the ranking."""
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    sd = s.std(axis=1, keepdims=True)
    return (s - s.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def fit_visit_size(visits: VisitFeatures) -> tuple[float, float]:
    """``(a, b)`` of the least-squares line ``n_meds ≈ a + b · n_codes`` over training visits
    (split 0); ``(mean, 0)`` when every training visit has the same number of codes."""
    train = np.asarray(visits.split) == 0
    if not train.any():
        raise ValueError("no training visits to fit the visit-size rule")
    n = visit_code_counts(visits)[train].astype(np.float64)
    m = np.diff(np.asarray(visits.med_ptr))[train].astype(np.float64)
    if np.ptp(n) == 0:
        return float(m.mean()), 0.0
    b, a = np.polyfit(n, m, 1)
    return float(a), float(b)


def visit_code_counts(visits: VisitFeatures, split: int | None = None) -> np.ndarray:
    """Diagnoses + procedures of each visit (of ``split`` only, when given)."""
    n = np.diff(np.asarray(visits.diag_ptr)) + np.diff(np.asarray(visits.proc_ptr))
    return n if split is None else n[np.asarray(visits.split) == split]


def base_sizes(rule: SetRule, z: np.ndarray, n_codes: np.ndarray | None = None) -> np.ndarray:
    """The base set size of every visit (``int64``, in ``[0, n_meds]``)."""
    v, m = z.shape
    if rule.kind == "topk":
        return np.full(v, min(int(rule.param), m), dtype=np.int64)
    if rule.kind == "threshold":
        return (z >= rule.param).sum(axis=1).astype(np.int64)
    if n_codes is None or len(n_codes) != v:
        raise ValueError("visit_size needs every visit's number of codes")
    a, b = rule.fit
    k = np.floor(rule.param * (a + b * np.asarray(n_codes, dtype=np.float64)) + 0.5)
    return np.clip(k, 1, m).astype(np.int64)


# ------------------------------------------------------------------ selection
def _ranks(scores: np.ndarray) -> np.ndarray:
    """Each medication's position in its visit's ranking (score desc, id asc)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    return rank


def select_sets(scores: np.ndarray, rule: SetRule, adj: np.ndarray | None = None,
                n_codes: np.ndarray | None = None) -> np.ndarray:
    """``visits × meds`` boolean sets of ``rule`` for ``scores`` (module docstring); ``adj``
    (``meds × meds`` 0/1, symmetric) is needed unless ``rule.mode == "off"``."""
    s = np.asarray(scores, dtype=np.float64)
    z = standardise(s)
    sizes = base_sizes(rule, z, n_codes)
    rank = _ranks(s)
    if rule.mode == "off":
        return rank < sizes[:, None]
    if adj is None:
        raise ValueError(f"DDI mode {rule.mode!r} needs the interaction matrix")
    weight = math.inf if rule.mode == "avoid" else rule.weight
    stop = None if rule.kind != "threshold" else rule.param
    return _greedy(z, rank, np.asarray(adj, dtype=np.float64), sizes, stop, weight)


def _greedy(z: np.ndarray, rank: np.ndarray, adj: np.ndarray, sizes: np.ndarray,
            threshold: float | None, weight: float) -> np.ndarray:
    """The penalised greedy of every visit at once; ``threshold=None``: stop at ``sizes``."""
    v, m = z.shape
    chosen = np.zeros((v, m), dtype=bool)
    hits = np.zeros((v, m))  # c_i: chosen medications each one interacts with
    active = sizes > 0 if threshold is None else np.ones(v, dtype=bool)
    rows = np.arange(v)
    for step in range(m):
        if not active.any():
            break
        if math.isinf(weight):
            value = np.where(hits > 0, -np.inf, z)
        else:
            value = z - weight * hits
        value[chosen] = -np.inf
        best = value.max(axis=1)
        # Ties go to the better-ranked medication, so that W = 0 is the base set exactly.
        pick = np.where(value == best[:, None], rank, m).argmin(axis=1)
        ok = active & np.isfinite(best)
        ok &= (step < sizes) if threshold is None else (best >= threshold)
        chosen[rows[ok], pick[ok]] = True
        hits[ok] += adj[pick[ok]]
        # A visit that stops stays stopped: values only fall as the set grows.
        active = ok
    return chosen


def displaced(plain: np.ndarray, safe: np.ndarray,
              adj: np.ndarray) -> list[tuple[int, list[int]]]:
    """What the DDI mode changed in one visit: each medication of the ``plain`` set (1-D bool)
    missing from the ``safe`` one, with the ``safe`` medications it interacts with (the reason
    it was displaced), in id order."""
    a = np.asarray(adj) > 0
    out = []
    for i in np.flatnonzero(plain & ~safe):
        out.append((int(i), [int(j) for j in np.flatnonzero(safe & a[i])]))
    return out


def exact_penalty_set(z: Sequence[float], adj: np.ndarray, k: int | None, weight: float,
                      time_limit: float = 10.0) -> np.ndarray:
    """The exact optimum of ``max Σ z_i x_i − W Σ_{i<j} A_ij x_i x_j`` over sets of size ``k``
    (one visit; ``k=None``: any size, the threshold rule's programme with ``z − T`` for ``z``),
    as a MILP (``scipy.optimize.milp``, HiGHS): a ``y_ij >= x_i + x_j − 1`` per interacting
    pair linearises the product. A bool vector."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    zz = np.asarray(z, dtype=np.float64)
    m = len(zz)
    iu, ju = np.nonzero(np.triu(np.asarray(adj) > 0, 1))
    p = len(iu)
    c = np.concatenate([-zz, np.full(p, float(weight))])
    rows, lo, hi = [], [], []
    if k is not None:
        k = max(0, min(int(k), m))
        rows.append(np.concatenate([np.ones(m), np.zeros(p)]))
        lo.append(k)
        hi.append(k)
    for n, (i, j) in enumerate(zip(iu, ju, strict=True)):
        r = np.zeros(m + p)
        r[i] = r[j] = 1.0
        r[m + n] = -1.0
        rows.append(r)
        lo.append(-np.inf)
        hi.append(1.0)
    cons = LinearConstraint(np.array(rows), lo, hi) if rows else None
    res = milp(c, constraints=cons, integrality=np.ones(m + p), bounds=Bounds(0, 1),
               options={"time_limit": time_limit})
    if res.x is None:
        raise RuntimeError(f"MILP found no solution: {res.message}")
    return res.x[:m] > 0.5
