"""Evaluation metrics: hand-computed cases, brute-force references, invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.data.dataset import VisitFeatures
from diffkg_fast.eval.medication import (
    average_precision,
    ddi_rate,
    decide,
    default_k,
    medication_metrics,
    predict_threshold,
    predict_topk,
    visit_med_matrix,
)
from diffkg_fast.eval.ranking import ranking_metrics
from diffkg_fast.eval.topk import topk_items

INF = float("inf")


def csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    r = [i for i, row in enumerate(rows) for _ in row]
    c = [j for row in rows for j in row]
    return sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(len(rows), n_items))


def table_fn(scores: np.ndarray):
    """A score_fn reading a fixed users × items table."""
    t = torch.as_tensor(scores, dtype=torch.float32)
    return lambda u: t[u.cpu()]


# ----------------------------------------------------------------------------- brute force
def brute_ranking(scores, target, exclude, ks):
    """Pure numpy / Python reference: one full ranking per user, metrics by their definition."""
    known = sum(exclude, sp.csr_matrix(target.shape, dtype=np.float32)).tolil().rows
    trows = target.tolil().rows
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    n = 0
    for u in range(target.shape[0]):
        t = set(trows[u])
        if not t:
            continue
        n += 1
        kept = [i for i in range(target.shape[1]) if i not in set(known[u])]
        ranking = sorted(kept, key=lambda i: (-scores[u, i], i))
        for k in ks:
            hits = [int(i in t) for i in ranking[:k]]
            sums[f"recall@{k}"] += sum(hits) / len(t)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(t), k)))
            sums[f"ndcg@{k}"] += dcg / idcg
    return {key: v / n for key, v in sums.items()}, n


def random_split(rng, n_users=60, n_items=50):
    """Scores rounded to one decimal (many ties) and disjoint train / valid / test sets."""
    scores = np.round(rng.normal(size=(n_users, n_items)), 1)
    split = rng.choice(4, size=(n_users, n_items), p=[0.7, 0.15, 0.05, 0.1])
    mats = [sp.csr_matrix((split == s).astype(np.float32)) for s in (1, 2, 3)]
    return scores, mats[0], mats[1], mats[2]


# ----------------------------------------------------------------------------- topk_items
def test_topk_hand_cases():
    # Ties across the top-k boundary: items 1, 2, 3 tie at 3; lower ids first → [1, 2].
    s = torch.tensor([[1.0, 3, 3, 3, 0]])
    assert topk_items(s, None, 2).tolist() == [[1, 2]]
    # Tie inside the top-k only (3rd = 3.0 > 4th = 1.0): order (score desc, id asc).
    s = torch.tensor([[3.0, 5, 5, 1]])
    assert topk_items(s, None, 3).tolist() == [[1, 2, 0]]
    # All equal: ranking is the id order, excluded items skipped.
    s = torch.zeros(1, 6)
    assert topk_items(s, csr([[0, 2]], 6), 3).tolist() == [[1, 3, 4]]


def test_topk_exclusion_and_padding():
    # Kept items with a genuine -inf still rank above the excluded one; the tail is padded -1.
    s = torch.tensor([[-INF, 1.0, -INF, 2.0]])
    assert topk_items(s, csr([[1]], 4), 4).tolist() == [[3, 0, 2, -1]]
    assert topk_items(s, (np.array([0]), np.array([1])), 6).tolist() == [[3, 0, 2, -1, -1, -1]]
    mask = torch.tensor([[False, True, False, False]])
    assert topk_items(s, mask, 2).tolist() == [[3, 0]]
    # Every item excluded: nothing to rank.
    assert topk_items(torch.rand(2, 5), csr([[0, 1, 2, 3, 4]] * 2, 5), 3).tolist() == [[-1] * 3] * 2
    # The caller's scores are untouched.
    s2 = s.clone()
    topk_items(s, csr([[3]], 4), 2)
    assert torch.equal(s, s2)


def test_topk_nan_raises():
    with pytest.raises(ValueError, match="NaN"):
        topk_items(torch.tensor([[0.1, float("nan"), 0.3, 0.2]]), None, 2)
    with pytest.raises(ValueError, match="NaN"):
        topk_items(torch.tensor([[0.1, float("nan")]]), None, 5)  # k >= n_items path
    # A NaN in an excluded item is irrelevant.
    assert topk_items(torch.tensor([[0.1, float("nan"), 0.3]]), csr([[1]], 3), 1).tolist() == [[2]]


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_topk_matches_stable_sort(k):
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=(40, 50)), 1).astype(np.float32)  # many ties
    s[:5] = 0.0  # whole rows tied
    excl = sp.random(40, 50, density=0.3, format="csr", random_state=2)
    excl.data[:] = 1
    mask = excl.toarray() > 0
    top = topk_items(torch.from_numpy(s), excl, k).numpy()
    for u in range(40):
        kept = [i for i in range(50) if not mask[u, i]]
        want = sorted(kept, key=lambda i: (-s[u, i], i))[:k]
        assert top[u].tolist() == want + [-1] * (k - len(want))
        assert not mask[u, top[u][top[u] >= 0]].any()  # excluded items never appear


# ----------------------------------------------------------------------------- ranking_metrics
def test_ranking_hand_case():
    # User 0: test items {2, 5}; scores rank 5, 1, 2, … → hits at ranks 0 and 2.
    #   K=2: recall 1/2; DCG = 1/log2(2) = 1; IDCG = 1 + 1/log2(3); NDCG = 1 / (1 + 1/log2 3).
    #   K=3: recall 2/2; DCG = 1 + 1/log2(4) = 1.5; NDCG = 1.5 / (1 + 1/log2 3).
    # User 1: no test item → skipped.
    # User 2: test {3}; training item 0 has the top score and is masked, so item 3 ranks first
    #   → recall 1, NDCG 1 (IDCG over min(|T|, K) = 1 position) at K = 2 and 3.
    scores = np.array([[0.0, 0.8, 0.7, 0.1, 0.2, 0.9],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [9.0, 0.1, 0.2, 0.5, 0.3, 0.4]])
    target = csr([[2, 5], [], [3]], 6)
    train = csr([[], [1], [0]], 6)
    m = ranking_metrics(table_fn(scores), None, target, [train], ks=(2, 3))
    idcg2 = 1 + 1 / math.log2(3)
    assert m["n_users"] == 2
    assert m["recall@2"] == pytest.approx((0.5 + 1) / 2)
    assert m["ndcg@2"] == pytest.approx((1 / idcg2 + 1) / 2)
    assert m["recall@3"] == pytest.approx((1 + 1) / 2)
    assert m["ndcg@3"] == pytest.approx((1.5 / idcg2 + 1) / 2)


def test_ranking_idcg_uses_min_targets_k():
    # Test items {0, 1, 2} and a perfect ranking: at K=2 NDCG = 1 (IDCG over 2 positions, not 3);
    # recall@2 = 2/3 (denominator |T|, not min(|T|, K)).
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    m = ranking_metrics(table_fn(scores), None, csr([[0, 1, 2]], 4), [], ks=(2,))
    assert m["ndcg@2"] == pytest.approx(1.0)
    assert m["recall@2"] == pytest.approx(2 / 3)


def test_ranking_users_subset_and_no_users():
    scores = np.array([[0.9, 0.1], [0.1, 0.9]])
    target = csr([[0], [0]], 2)
    assert ranking_metrics(table_fn(scores), [1, 1], target, [], ks=(1,)) == {
        "recall@1": 0.0, "ndcg@1": 0.0, "n_users": 1}
    m = ranking_metrics(table_fn(scores), None, csr([[], []], 2), [], ks=(1,))
    assert m["n_users"] == 0 and math.isnan(m["recall@1"])


def test_ranking_bad_score_shape():
    with pytest.raises(ValueError, match="shape"):
        ranking_metrics(lambda u: torch.zeros(len(u), 3), None, csr([[0]], 4), [], ks=(1,))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores, train, valid, test = random_split(rng)
    ks = (5, 10, 40)
    want, n = brute_ranking(scores, test, [train, valid], ks)
    got = ranking_metrics(table_fn(scores), None, test, [train, valid], ks=ks, batch_size=16)
    assert got["n_users"] == n
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key


def test_ranking_monotone_and_batch_invariant():
    rng = np.random.default_rng(3)
    scores, train, _valid, test = random_split(rng, n_users=200, n_items=80)
    runs = [ranking_metrics(table_fn(scores), None, test, [train], batch_size=b)
            for b in (1, 7, 64, 1024)]
    for m in runs[1:]:
        assert m.keys() == runs[0].keys()
        for key in m:
            assert m[key] == pytest.approx(runs[0][key], abs=1e-12)
    m = runs[0]
    assert m["recall@10"] <= m["recall@20"] <= m["recall@40"]
    # Excluded items never reach the ranking, so they cannot be hits: scoring the training
    # items highest changes nothing.
    boosted = scores + 100 * train.toarray()
    assert ranking_metrics(table_fn(boosted), None, test, [train]) == pytest.approx(m)


# ----------------------------------------------------------------------------- medication
def test_medication_hand_case():
    # Visit 0: Y = {0, 1, 2}, Ŷ = {1, 2, 3}: ∩ = 2, ∪ = 4 → Jaccard 1/2; p = r = 2/3 → F1 2/3.
    # Visit 1: Y = {0}, Ŷ = {} → Jaccard 0, p = 0 (empty), r = 0, F1 0.
    # Means: Jaccard 1/4, F1 1/3, precision 1/3, recall 1/3; avg #meds (3 + 0) / 2 = 1.5.
    # DDI pairs (1, 3): visit 0's pairs {1,2}, {1,3}, {2,3} → 1 of 3 interact; visit 1 none.
    m = medication_metrics([[1, 2, 3], []], [[0, 1, 2], [0]], np.array([[1, 3]]), n_meds=5)
    assert m["jaccard"] == pytest.approx(0.25)
    assert m["f1"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert m["avg_meds"] == pytest.approx(1.5)
    assert m["ddi_rate"] == pytest.approx(1 / 3)
    assert m["n_visits"] == 2 and math.isnan(m["prauc"])


def test_medication_input_forms_agree():
    pred, true = [[1, 2, 3], [], [0, 4]], [[0, 1, 2], [0], [4]]
    scores = np.random.default_rng(0).random((3, 5))
    ref = medication_metrics(pred, true, np.array([[0, 4]]), scores)
    assert ref["prauc"] == pytest.approx(average_precision(csr(true, 5).toarray() > 0,
                                                          scores).mean())
    for p, t in ((csr(pred, 5), csr(true, 5)), (csr(pred, 5).toarray(), csr(true, 5).toarray())):
        assert medication_metrics(p, t, np.array([[0, 4]]), scores) == pytest.approx(ref)


def test_medication_empty_union_and_no_visits():
    # Both sets empty: Jaccard and F1 are 0, not a division by zero.
    m = medication_metrics([[]], [[]], np.zeros((0, 2)), n_meds=3)
    assert m["jaccard"] == 0.0 and m["f1"] == 0.0 and m["ddi_rate"] == 0.0
    m = medication_metrics([], [], np.zeros((0, 2)), n_meds=3)
    assert m["n_visits"] == 0 and math.isnan(m["jaccard"])


def test_average_precision_hand_cases():
    # Ranks 1..4 hold labels 1, 0, 1, 0: precision at the positives 1/1 and 2/3 → AP 0.8333.
    ap = average_precision(np.array([[1, 0, 1, 0]]), np.array([[0.9, 0.8, 0.7, 0.6]]))
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    # Ties form one threshold (sklearn): scores 0.9 | 0.5 0.5 | 0.1, labels 0 | 1 0 | 1.
    #   threshold 0.5: TP 1 of 3 predicted, recall +1/2; threshold 0.1: TP 2 of 4, recall +1/2
    #   → AP = 1/2 · 1/3 + 1/2 · 1/2 = 5/12 (not the 1/2 · 1/2 + 1/2 · 1/2 of ignoring ties).
    ap = average_precision(np.array([[0, 1, 0, 1]]), np.array([[0.9, 0.5, 0.5, 0.1]]))
    assert ap[0] == pytest.approx(5 / 12)
    # No positive label: 0 (sklearn ≥ 1.1 sets recall to 1 everywhere, so AP is 0).
    assert average_precision(np.zeros((1, 3)), np.array([[0.3, 0.2, 0.1]]))[0] == 0.0


def test_average_precision_brute_force():
    rng = np.random.default_rng(4)
    y = rng.random((50, 12)) < 0.3
    s = np.round(rng.random((50, 12)), 1)  # ties
    got = average_precision(y, s)
    for v in range(50):
        n_pos, ap, prev_r = y[v].sum(), 0.0, 0.0
        for t in sorted(set(s[v]), reverse=True):  # Σ (R_n - R_{n-1}) P_n over thresholds
            sel = s[v] >= t
            r = (y[v] & sel).sum() / max(n_pos, 1)
            ap += (r - prev_r) * (y[v] & sel).sum() / sel.sum()
            prev_r = r
        assert got[v] == pytest.approx(ap if n_pos else 0.0)


def test_ddi_rate_pooled_hand_case():
    # Pairs (0, 1) and (3, 2) (order irrelevant); the self-pair (4, 4) is ignored.
    # {0, 1, 2}: 3 pairs, 1 interacts; {2, 3}: 1 pair, 1 interacts; {4}: no pair.
    # Pooled 2 / 4 = 0.5 (a per-visit mean would give (1/3 + 1) / 2).
    pairs = np.array([[0, 1], [3, 2], [4, 4]])
    assert ddi_rate([[0, 1, 2], [2, 3], [4]], pairs) == pytest.approx(0.5)
    assert ddi_rate([[4], []], pairs) == 0.0  # no pair at all
    with pytest.raises(ValueError):
        ddi_rate(np.ones((1, 3), bool), np.array([[0, 7]]))


def test_ddi_rate_brute_force():
    rng = np.random.default_rng(5)
    sets = [sorted(set(rng.integers(0, 30, rng.integers(0, 9)).tolist())) for _ in range(200)]
    pairs = rng.integers(0, 30, (60, 2))
    inter = {frozenset(p) for p in pairs.tolist() if p[0] != p[1]}
    bad = sum(frozenset((a, b)) in inter for s in sets for i, a in enumerate(s) for b in s[i + 1:])
    total = sum(len(s) * (len(s) - 1) // 2 for s in sets)
    assert ddi_rate(sets, pairs, n_meds=30) == pytest.approx(bad / total)


def test_decision_rules():
    s = np.array([[0.5, 0.49, 0.9], [0.1, 0.2, 0.3]])
    assert predict_threshold(s).tolist() == [[True, False, True], [False, False, False]]
    # Top-k ties: 0.5 and 0.5 at ids 1 and 2; lower id first.
    t = np.array([[0.2, 0.5, 0.5, 0.1]])
    assert np.flatnonzero(predict_topk(t, 1)[0]).tolist() == [1]
    assert np.flatnonzero(predict_topk(t, 2)[0]).tolist() == [1, 2]
    assert predict_topk(t, 9).all()
    assert decide(s, probabilities=True).tolist() == predict_threshold(s).tolist()
    assert decide(t, probabilities=False, k=1).tolist() == predict_topk(t, 1).tolist()
    with pytest.raises(ValueError):
        decide(t, probabilities=False)


def test_default_k():
    assert default_k([2, 3]) == 3  # mean 2.5, half rounds up
    assert default_k([1, 2, 2]) == 2  # 1.67
    assert default_k([0, 0]) == 1  # at least one medication
    with pytest.raises(ValueError):
        default_k([])


def test_visit_med_matrix():
    v = VisitFeatures(
        patient=np.array([0, 0, 1]), split=np.array([0, 2, 2]),
        diag_ptr=np.zeros(4, np.int64), diag=np.zeros(0, np.int64),
        proc_ptr=np.zeros(4, np.int64), proc=np.zeros(0, np.int64),
        med_ptr=np.array([0, 2, 2, 5]), med=np.array([1, 3, 0, 4, 2]),
    )
    assert visit_med_matrix(v, 5, split=2).toarray().astype(int).tolist() == [
        [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]]
    assert visit_med_matrix(v, 5, split=None).shape == (3, 5)
