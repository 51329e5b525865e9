"""Per-visit medication metrics, as SafeDrug / GAMENet compute them (``multi_label_metric``).

For visit ``v`` with true set ``Y_v`` and predicted set ``Ŷ_v``:

- Jaccard ``|Y ∩ Ŷ| / |Y ∪ Ŷ|`` (0 when both are empty; SafeDrug would divide by zero);
- precision ``|Y ∩ Ŷ| / |Ŷ|`` (0 for an empty prediction), recall ``|Y ∩ Ŷ| / |Y|`` (0 for an
  empty truth), F1 ``2 p r / (p + r)`` (0 when ``p + r = 0``), computed per visit;
- PRAUC: average precision of the visit's scores against ``Y_v`` (sklearn's
  ``average_precision_score``: ``AP = Σ_n (R_n − R_{n−1}) P_n`` over distinct score thresholds,
  tied scores forming one threshold; 0 for a visit with no true medication);

each averaged over visits. Pooled over all visits instead:

- DDI rate ``Σ_v #{i < j in Ŷ_v : (i, j) interact} / Σ_v |Ŷ_v| (|Ŷ_v| − 1) / 2`` (0 when no visit
  has two medications, as SafeDrug's ``ddi_rate_score``);
- ``avg_meds``: mean ``|Ŷ_v|``.

Decision rule (how scores become a predicted set), the harness default:

- a model that outputs probabilities (a sigmoid per medication, as SafeDrug / GAMENet):
  :func:`predict_threshold` with ``p >= 0.5`` (:data:`DEFAULT_THRESHOLD`, SafeDrug's rule);
- a ranking model (DiffKG and the other recommenders output unbounded scores):
  :func:`predict_topk` with ``k = default_k(training visit sizes)``, the rounded mean number of
  medications per training visit. :func:`decide` picks between the two.

Everything is vectorised over a dense ``visits × medications`` boolean matrix (15k × 131 is 2 MB);
DDI pairs are counted with one matrix product, never a loop over pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.dataset import VisitFeatures

DEFAULT_THRESHOLD = 0.5
MedSets = sp.spmatrix | np.ndarray | Sequence[Iterable[int]]


def as_matrix(sets: MedSets, n_meds: int | None = None) -> np.ndarray:
    """Dense boolean ``visits × n_meds`` matrix from a CSR, a 0/1 array or a list of id sets."""
    if sp.issparse(sets):
        m = sp.csr_matrix(sets)
        if not m.has_canonical_format:  # duplicates would let a stored 0 overwrite a 1
            m = m.copy()
            m.sum_duplicates()
        out = np.zeros((m.shape[0], n_meds if n_meds is not None else m.shape[1]), dtype=bool)
        if n_meds is not None and n_meds < m.shape[1] and m.nnz and m.indices.max() >= n_meds:
            raise ValueError(f"medication id {m.indices.max()} outside [0, {n_meds})")
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        out[rows, m.indices] = m.data != 0
        return out
    if isinstance(sets, np.ndarray) and sets.ndim == 2:
        if n_meds is not None and sets.shape[1] != n_meds:
            raise ValueError(f"matrix has {sets.shape[1]} columns, expected {n_meds}")
        return sets.astype(bool)
    lists = [np.asarray(list(s), dtype=np.int64) for s in sets]
    ids = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    n = n_meds if n_meds is not None else (int(ids.max()) + 1 if len(ids) else 0)
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"medication id outside [0, {n})")
    out = np.zeros((len(lists), n), dtype=bool)
    out[np.repeat(np.arange(len(lists)), [len(x) for x in lists]), ids] = True
    return out


def _n_cols(sets: MedSets) -> int | None:
    if sp.issparse(sets) or (isinstance(sets, np.ndarray) and sets.ndim == 2):
        return int(sets.shape[1])
    return None


def visit_med_matrix(visits: VisitFeatures, n_meds: int, split: int | None = 2) -> sp.csr_matrix:
    """Medications of the visits in ``split`` (0/1/2; ``None``: all), one CSR row per visit."""
    keep = np.arange(visits.n_visits) if split is None else np.flatnonzero(visits.split == split)
    ptr = np.asarray(visits.med_ptr, dtype=np.int64)
    sizes = ptr[keep + 1] - ptr[keep]
    # Gather each kept visit's slice of `med` without a Python loop.
    starts = np.repeat(ptr[keep] - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
    idx = np.asarray(visits.med, dtype=np.int64)[starts + np.arange(int(sizes.sum()))]
    indptr = np.concatenate(([0], np.cumsum(sizes)))
    m = sp.csr_matrix((np.ones(len(idx), np.float32), idx, indptr), shape=(len(keep), n_meds))
    m.sum_duplicates()
    return m


def ddi_matrix(ddi_pairs: np.ndarray, n_meds: int) -> np.ndarray:
    """Symmetric 0/1 ``n_meds × n_meds`` interaction matrix, zero diagonal (no self-pairs)."""
    pairs = np.asarray(ddi_pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n_meds):
        raise ValueError(f"DDI pair id outside [0, {n_meds})")
    a = np.zeros((n_meds, n_meds), dtype=np.float64)
    a[pairs[:, 0], pairs[:, 1]] = 1.0
    a[pairs[:, 1], pairs[:, 0]] = 1.0
    np.fill_diagonal(a, 0.0)
    return a


def ddi_rate(sets: MedSets, ddi_pairs: np.ndarray, n_meds: int | None = None) -> float:
    """Pooled DDI rate (module docstring) of any sets: predictions or the ground truth.

    ``#interacting pairs in visit v = (P_v A P_vᵀ) / 2`` for the 0/1 row ``P_v`` and the
    symmetric, zero-diagonal ``A``; summing ``(P A) ⊙ P`` counts every pair twice.
    """
    pairs = np.asarray(ddi_pairs, dtype=np.int64).reshape(-1, 2)
    p = as_matrix(sets, n_meds).astype(np.float64)
    if n_meds is None and _n_cols(sets) is None:
        # Width inferred from the largest id in the sets: a pair beyond it occurs in no visit.
        pairs = pairs[(pairs < p.shape[1]).all(axis=1)]
    s = p.sum(axis=1)
    all_pairs = float(np.sum(s * (s - 1) / 2))
    if all_pairs == 0:
        return 0.0
    bad = float(np.sum((p @ ddi_matrix(pairs, p.shape[1])) * p) / 2)
    return bad / all_pairs


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-row average precision (sklearn's definition, ties as one threshold); 0 for no positive.

    Sort each row by score descending; a positive at position ``i`` adds ``1/|Y|`` recall at the
    precision of the *last* position of its tie group, ``TP(end) / (end + 1)``.
    """
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal 2-D shapes")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_rows, m = s.shape
    if m == 0:
        return np.zeros(n_rows)
    order = np.argsort(-s, axis=1, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=1)
    y_sorted = np.take_along_axis(y, order, axis=1)
    tp = np.cumsum(y_sorted, axis=1)
    precision = tp / np.arange(1, m + 1)
    pos = np.arange(m)
    is_end = np.ones((n_rows, m), dtype=bool)
    is_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    # End of each position's tie group: the next group end at or after it (reverse running min).
    end = np.minimum.accumulate(np.where(is_end, pos, m)[:, ::-1], axis=1)[:, ::-1]
    contrib = np.where(y_sorted, np.take_along_axis(precision, end, axis=1), 0.0).sum(axis=1)
    n_pos = y.sum(axis=1)
    return np.where(n_pos > 0, contrib / np.maximum(n_pos, 1), 0.0)


def predict_threshold(scores: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """SafeDrug's rule: medication ``j`` is predicted when its probability ``p_j >= threshold``."""
    return np.asarray(scores) >= threshold


def predict_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scoring medications per visit (ties: lower id first), as a bool matrix."""
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    k = max(0, min(int(k), s.shape[1]))
    out = np.zeros(s.shape, dtype=bool)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    np.put_along_axis(out, top, True, axis=1)
    return out


def default_k(train_visit_sizes: Sequence[int] | np.ndarray) -> int:
    """Rounded (half up) mean number of medications per training visit, at least 1."""
    sizes = np.asarray(train_visit_sizes, dtype=np.float64)
    if sizes.size == 0:
        raise ValueError("no training visits to size the top-k rule")
    return max(1, int(np.floor(sizes.mean() + 0.5)))


def decide(scores: np.ndarray, *, probabilities: bool, k: int | None = None,
           threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The harness's default rule: threshold probabilities, top-``k`` raw ranking scores."""
    if probabilities:
        return predict_threshold(scores, threshold)
    if k is None:
        raise ValueError("a ranking model needs k (see default_k)")
    return predict_topk(scores, k)


def medication_metrics(
    pred: MedSets,
    target: MedSets,
    ddi_pairs: np.ndarray,
    scores: np.ndarray | None = None,
    n_meds: int | None = None,
) -> dict[str, float]:
    """Jaccard, F1 (with its precision / recall), PRAUC, DDI rate and mean set size.

    ``pred`` / ``target``: one set per visit, as a CSR, a 0/1 ``visits × meds`` array or a list
    of id lists. ``scores`` (``visits × meds``, probabilities or raw scores — AP only uses their
    order) give PRAUC; without them ``prauc`` is ``nan``. With no visit every metric is ``nan``.
    """
    if n_meds is None:
        cands = [_n_cols(pred), _n_cols(target)]
        if scores is not None:
            cands.append(int(np.asarray(scores).shape[1]))
        known = [c for c in cands if c is not None]
        n_meds = max(known) if known else None
        if n_meds is None:
            n_meds = max(as_matrix(pred).shape[1], as_matrix(target).shape[1])
            pairs = np.asarray(ddi_pairs, dtype=np.int64).reshape(-1, 2)
            if len(pairs):
                n_meds = max(n_meds, int(pairs.max()) + 1)
    p = as_matrix(pred, n_meds)
    y = as_matrix(target, n_meds)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predicted visits but {y.shape[0]} true ones")
    n = p.shape[0]
    nan = float("nan")
    if n == 0:
        return {"jaccard": nan, "f1": nan, "precision": nan, "recall": nan, "prauc": nan,
                "ddi_rate": nan, "avg_meds": nan, "n_visits": 0}
    inter = (p & y).sum(axis=1).astype(np.float64)
    n_pred = p.sum(axis=1).astype(np.float64)
    n_true = y.sum(axis=1).astype(np.float64)
    union = n_pred + n_true - inter

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    jac = ratio(inter, union)
    prec = ratio(inter, n_pred)
    rec = ratio(inter, n_true)
    f1 = ratio(2 * prec * rec, prec + rec)
    prauc = nan
    if scores is not None:
        s = np.asarray(scores)
        if s.shape != y.shape:
            raise ValueError(f"scores have shape {s.shape}, visits × meds is {y.shape}")
        prauc = float(average_precision(y, s).mean())
    return {
        "jaccard": float(jac.mean()),
        "f1": float(f1.mean()),
        "precision": float(prec.mean()),
        "recall": float(rec.mean()),
        "prauc": prauc,
        "ddi_rate": ddi_rate(p, ddi_pairs),
        "avg_meds": float(n_pred.mean()),
        "n_visits": n,
    }
