"""Medication set rules (eval/sets.py) and their choice on validation (eval/set_choice.py):
hand cases, a per-visit loop reference of the vectorised greedy, brute force for the exact
programme."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from diffkg_fast.data.dataset import VisitFeatures
from diffkg_fast.data.errors import DataError
from diffkg_fast.eval.medication import ddi_matrix, medication_metrics, predict_topk
from diffkg_fast.eval.set_choice import SetChoice, choose_rules, jaccard_of_sizes
from diffkg_fast.eval.sets import (
    SetRule,
    displaced,
    exact_penalty_set,
    fit_visit_size,
    parse_ddi,
    select_sets,
    standardise,
)

# Five medications, best first by id; 0-1 and 1-3 interact.
TOY = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
TOY_ADJ = ddi_matrix(np.array([[0, 1], [1, 3]]), 5)


def _ids(sets: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(r).tolist() for r in sets]


# ------------------------------------------------------------------ hand cases
def test_toy_sets_by_hand() -> None:
    top3 = SetRule("topk", 3)
    assert _ids(select_sets(TOY, top3)) == [[0, 1, 2]]
    # avoid: 1 interacts with 0 (chosen first), so 2 and 3 come in; 3 no longer interacts
    # with anything chosen (1 was skipped).
    assert _ids(select_sets(TOY, top3.with_ddi("avoid"), TOY_ADJ)) == [[0, 2, 3]]
    # z of 5..1 is (2, 1, 0, -1, -2) / sqrt(2). After 0, med 1 is worth 0.707 - W against
    # med 2's 0. W = 0.5: 1 (0.207) then 2. W = 1: 2 first, then 1 (-0.293) beats 3 (-0.707).
    assert _ids(select_sets(TOY, top3.with_ddi("penalty", 0.5), TOY_ADJ)) == [[0, 1, 2]]
    assert _ids(select_sets(TOY, top3.with_ddi("penalty", 1.0), TOY_ADJ)) == [[0, 1, 2]]
    # W = 2: after 0 and 2, 1 is 0.707 - 2 = -1.29 < 3's -0.707: 3 comes in instead.
    assert _ids(select_sets(TOY, top3.with_ddi("penalty", 2.0), TOY_ADJ)) == [[0, 2, 3]]
    plain = select_sets(TOY, top3)[0]
    safe = select_sets(TOY, top3.with_ddi("avoid"), TOY_ADJ)[0]
    assert displaced(plain, safe, TOY_ADJ) == [(1, [0, 3])]


def test_penalised_ties_go_to_the_better_ranked_medication() -> None:
    """z = s exactly here (mean 0, std 1). After med 1, med 3 (score 1, interacting: 1 - 2 =
    -1) ties with meds 0 and 2 (-1): the greedy goes down the ranking, so 3, not the lower
    id 0."""
    scores = np.array([[-1.0, 1.0, -1.0, 1.0]])
    adj = ddi_matrix(np.array([[1, 3]]), 4)
    assert _ids(select_sets(scores, SetRule("topk", 2, "penalty", 2.0), adj)) == [[1, 3]]


def test_threshold_rule_by_hand() -> None:
    z = standardise(TOY)[0]
    assert z == pytest.approx(np.array([2, 1, 0, -1, -2]) / math.sqrt(2))
    t = SetRule("threshold", 0.0)
    assert _ids(select_sets(TOY, t)) == [[0, 1, 2]]
    # avoid with a threshold: 1 is skipped, 3 is below T: the set shrinks to {0, 2}.
    assert _ids(select_sets(TOY, t.with_ddi("avoid"), TOY_ADJ)) == [[0, 2]]
    # penalty 0.5: 1 stays (0.707 - 0.5 >= 0); penalty 1: 1 drops below T (-0.29).
    assert _ids(select_sets(TOY, t.with_ddi("penalty", 0.5), TOY_ADJ)) == [[0, 1, 2]]
    assert _ids(select_sets(TOY, t.with_ddi("penalty", 1.0), TOY_ADJ)) == [[0, 2]]


def test_visit_size_rule_by_hand() -> None:
    # a + b n = 1 + 0.5 n: n = 2 -> 2 drugs, n = 5 -> 3.5 -> round half up 4, C = 0.5 -> 1.75 -> 2.
    r = SetRule("visit_size", 1.0, fit=(1.0, 0.5))
    scores = np.tile(TOY, (2, 1))
    assert _ids(select_sets(scores, r, n_codes=np.array([2, 5]))) == [[0, 1], [0, 1, 2, 3]]
    half = SetRule("visit_size", 0.5, fit=(1.0, 0.5))
    assert _ids(select_sets(scores, half, n_codes=np.array([0, 5]))) == [[0], [0, 1]]


def test_fit_visit_size_is_least_squares_on_training_visits() -> None:
    # Visits: (codes, meds, split) = (1, 2, 0), (2, 3, 0), (4, 7, 0), (9, 1, 1): the held-out
    # one must not move the line. Least squares over the first three: b = 12/7... by hand:
    # n = 1, 2, 4 (mean 7/3), m = 2, 3, 7 (mean 4); b = Σ(n-n̄)(m-m̄) / Σ(n-n̄)^2 = 8 / (14/3).
    n_codes, meds, split = [1, 2, 4, 9], [2, 3, 7, 1], [0, 0, 0, 1]
    ptr = np.concatenate([[0], np.cumsum(n_codes)])
    mptr = np.concatenate([[0], np.cumsum(meds)])
    v = VisitFeatures(patient=np.arange(4), split=np.array(split, np.int8), diag_ptr=ptr,
                      diag=np.zeros(ptr[-1], np.int64), proc_ptr=np.zeros(5, np.int64),
                      proc=np.zeros(0, np.int64), med_ptr=mptr, med=np.zeros(mptr[-1], np.int64))
    a, b = fit_visit_size(v)
    assert b == pytest.approx(8 / (14 / 3)) and a == pytest.approx(4 - b * 7 / 3)


# ------------------------------------------------------------------ reference greedy
def _greedy_loop(scores: np.ndarray, rule: SetRule, adj: np.ndarray,
                 n_codes: np.ndarray) -> np.ndarray:
    """One visit at a time, one candidate at a time: the rule as the docstring states it."""
    out = np.zeros(scores.shape, dtype=bool)
    for v, s in enumerate(scores):
        sd = s.std()
        z = (s - s.mean()) / (sd if sd > 0 else 1.0)
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        if rule.kind == "topk":
            size = min(int(rule.param), len(s))
        elif rule.kind == "visit_size":
            a, b = rule.fit
            size = int(min(max(math.floor(rule.param * (a + b * n_codes[v]) + 0.5), 1), len(s)))
        else:
            size = None
        chosen: list[int] = []
        while size is None or len(chosen) < size:
            best, best_val = None, -math.inf
            for i in order:  # score order: the first of equal values wins
                if i in chosen:
                    continue
                c = sum(adj[i, j] > 0 for j in chosen)
                if rule.mode == "avoid":
                    val = -math.inf if c else z[i]
                else:
                    val = z[i] - (rule.weight if rule.mode == "penalty" else 0.0) * c
                if val > best_val:
                    best, best_val = i, val
            if best is None or (size is None and best_val < rule.param):
                break
            chosen.append(best)
        out[v, chosen] = True
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_greedy_matches_the_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    v, m = 25, 12
    # Scores rounded to one decimal: many ties, which must go to the lower id.
    scores = np.round(rng.normal(size=(v, m)), 1)
    scores[0] = 0.3  # a constant visit: z = 0 everywhere
    pairs = np.array([(i, j) for i in range(m) for j in range(i + 1, m) if rng.random() < 0.3])
    adj = ddi_matrix(pairs, m)
    n_codes = rng.integers(0, 15, v)
    bases = [SetRule("topk", 4), SetRule("topk", m), SetRule("threshold", 0.3),
             SetRule("threshold", -0.5), SetRule("visit_size", 0.8, fit=(1.0, 0.4))]
    for base in bases:
        for mode, w in (("off", 0.0), ("penalty", 0.0), ("penalty", 0.3), ("penalty", 2.0),
                        ("avoid", 0.0)):
            rule = base.with_ddi(mode, w)
            got = select_sets(scores, rule, adj, n_codes)
            want = _greedy_loop(scores, rule, adj, n_codes)
            assert (got == want).all(), rule.describe()


def test_zero_penalty_is_the_plain_set_and_topk_is_predict_topk() -> None:
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=(40, 30)), 1)
    adj = ddi_matrix(np.array([[0, 1], [2, 3], [1, 4]]), 30)
    rule = SetRule("topk", 7)
    assert (select_sets(scores, rule) == predict_topk(scores, 7)).all()
    assert (select_sets(scores, rule.with_ddi("penalty", 0.0), adj)
            == select_sets(scores, rule)).all()
    with pytest.raises(ValueError, match="interaction matrix"):
        select_sets(scores, rule.with_ddi("avoid"))


# ------------------------------------------------------------------ exact programme
def test_exact_penalty_set_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    m, k = 8, 3
    for trial in range(5):
        z = rng.normal(size=m)
        pairs = np.array([(i, j) for i in range(m) for j in range(i + 1, m) if rng.random() < .4])
        adj = ddi_matrix(pairs, m)
        for w in (0.0, 0.4, 3.0):
            def value(s: tuple[int, ...], z=z, adj=adj, w=w) -> float:
                return sum(z[i] for i in s) - w * sum(adj[i, j] for i, j in
                                                       itertools.combinations(s, 2))
            best = max(value(s) for s in itertools.combinations(range(m), k))
            got = exact_penalty_set(z, adj, k, w)
            assert got.sum() == k
            assert value(tuple(np.flatnonzero(got))) == pytest.approx(best, abs=1e-9), (trial, w)
            # Any size (the threshold rule's programme, z - T for z): the empty set included.
            free = max(value(s) for n in range(m + 1) for s in itertools.combinations(range(m), n))
            got = exact_penalty_set(z, adj, None, w)
            assert value(tuple(np.flatnonzero(got))) == pytest.approx(free, abs=1e-9), (trial, w)


# ------------------------------------------------------------------ parsing, records
@pytest.mark.parametrize(("text", "want"), [("off", ("off", 0.0)), ("AVOID", ("avoid", 0.0)),
                                            ("penalty=2", ("penalty", 2.0)),
                                            (" penalty=0.5 ", ("penalty", 0.5))])
def test_parse_ddi(text: str, want: tuple[str, float]) -> None:
    assert parse_ddi(text) == want


@pytest.mark.parametrize("text", ["penalty=-1", "penalty=x", "penalty=", "penalty=inf", "on",
                                  "penalty"])
def test_parse_ddi_refuses_bad_values(text: str) -> None:
    with pytest.raises(DataError, match="field '--ddi': expected off, avoid or penalty=W"):
        parse_ddi(text)


def test_rule_and_choice_round_trip() -> None:
    r = SetRule("visit_size", 0.9, "penalty", 0.3, (2.5, 0.75))
    assert SetRule.from_dict(r.to_dict()) == r
    assert r.describe() == "visit_size:0.9, penalty=0.3"
    c = SetChoice(r.with_ddi("off"), r, 0.06, "why", [{"rule": "x", "jaccard": 0.5}])
    assert SetChoice.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="penalty weight"):
        SetRule("topk", 3, "penalty", -1.0)


# ------------------------------------------------------------------ choice on validation
def test_jaccard_of_sizes_is_medication_metrics_jaccard() -> None:
    rng = np.random.default_rng(7)
    scores = np.round(rng.normal(size=(30, 20)), 1)
    truth = rng.random((30, 20)) < 0.3
    order = np.argsort(-scores, axis=1, kind="stable")
    csum = np.concatenate([np.zeros((30, 1)), np.cumsum(np.take_along_axis(truth, order, 1), 1)],
                          axis=1)
    sizes = rng.integers(0, 21, 30)
    pred = select_sets(scores, SetRule("visit_size", 1.0, fit=(0.0, 1.0)), n_codes=sizes)
    sizes = pred.sum(axis=1)
    want = medication_metrics(pred, truth, np.zeros((0, 2), np.int64))["jaccard"]
    assert jaccard_of_sizes(csum, truth.sum(axis=1), sizes) == pytest.approx(want)


def _toy_validation() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thirty medications; visit v's truth is its n_v best, n_v = its code count: of all the
    candidates only the visit-size rule with (a, b) = (0, 1), C = 1 is exact (C = 0.95 and
    1.05 miss n = 25). Meds 0 and 1 (the two best of every visit) interact, and 0-1 is in
    every true set."""
    n_codes = np.array([2, 3, 5, 8, 25, 4])
    scores = np.tile(np.arange(30, 0, -1, dtype=float), (6, 1))
    truth = np.arange(30)[None, :] < n_codes[:, None]
    adj = ddi_matrix(np.array([[0, 1]]), 30)
    return scores, truth, n_codes, adj


def test_choice_prefers_the_exact_rule_and_respects_the_ddi_target() -> None:
    scores, truth, n_codes, adj = _toy_validation()
    c = choose_rules(scores, truth, adj, n_codes, (0.0, 1.0), k0=4, target_ddi=1.0)
    assert c.plain == SetRule("visit_size", 1.0, fit=(0.0, 1.0))
    # Target 1: the plain rule (Jaccard 1) already qualifies and nothing beats it.
    assert c.safe == c.plain and "<= 1" in c.criterion
    rows = {r["rule"]: r for r in c.table}
    assert rows["visit_size:1"]["jaccard"] == 1.0
    # A target of 0: only sets without 0-1 qualify; avoid drops med 1, and a penalty as large
    # as 4 standard deviations does the same or more: the best Jaccard among them wins.
    c0 = choose_rules(scores, truth, adj, n_codes, (0.0, 1.0), k0=4, target_ddi=0.0)
    assert c0.safe.mode in ("avoid", "penalty") and c0.safe.kind == "visit_size"
    chosen = rows_of(c0)[c0.safe.describe()]
    assert chosen["ddi_rate"] == 0.0
    assert chosen["jaccard"] == max(r["jaccard"] for r in c0.table
                                    if r["ddi_rate"] == 0.0 and "visit_size:1," in r["rule"])


def rows_of(c: SetChoice) -> dict[str, dict]:
    return {r["rule"]: r for r in c.table}


def test_choice_without_a_feasible_candidate_takes_the_lowest_rate() -> None:
    scores, truth, n_codes, adj = _toy_validation()
    # Negative target: nothing qualifies; the criterion says so.
    c = choose_rules(scores, truth, adj, n_codes, (0.0, 1.0), k0=4, target_ddi=-1.0)
    assert "no candidate reached" in c.criterion
    assert rows_of(c)[c.safe.describe()]["ddi_rate"] == 0.0
    # Without a ddi relation the DDI-aware rule is the plain one.
    c = choose_rules(scores, truth, None, n_codes, (0.0, 1.0), k0=4, target_ddi=0.06)
    assert c.safe == c.plain and "no ddi relation" in c.criterion
    with pytest.raises(ValueError, match="no validation visits"):
        choose_rules(scores[:0], truth[:0], adj, n_codes[:0], (0.0, 1.0), k0=4, target_ddi=0.06)
