"""DDI-aware medication sets end to end: the rules a visit-split run chose on validation (its
checkpoint, sets.json, evaluate), ``recommend --ddi off|avoid|penalty=W`` and its
explanations, and the refusals on data without DDI pairs."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from diffkg_fast.cli import main
from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.eval.set_choice import SetChoice
from diffkg_fast.train import make_config, train
from diffkg_fast.train.checkpoint import load_checkpoint
from diffkg_fast.train.commands import evaluate_run
from diffkg_fast.train.recommend import ddi_pairs, recommend, recommend_set
from diffkg_fast.train.run_folder import CHECKPOINT, SETS, load_run

TINY = {"epoch": 2, "latdim": 8, "dims": [16], "seed": 1}


@pytest.fixture(scope="module")
def visit_run(tmp_path_factory):
    """A visit split whose sets interact often enough that the DDI rule matters."""
    root = tmp_path_factory.mktemp("ddi")
    ds = build_dataset("synthetic", n_patients=300, n_diag=100, n_proc=50, split="visit")
    data = root / "visit.npz"
    ds.save(data)
    res = train(ds, make_config(**TINY, target_ddi=0.03), log=lambda _: None,
                out_dir=root / "run")
    return res, root / "run", str(data)


@pytest.fixture(scope="module")
def noddi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("noddi")
    ds = build_dataset("synthetic", n_patients=150, n_diag=100, n_proc=50, n_med=30,
                       split="visit", ddi=False)
    data = root / "noddi.npz"
    ds.save(data)
    res = train(ds, make_config(**TINY), log=lambda _: None, out_dir=root / "run")
    return res, root / "run", str(data)


# ------------------------------------------------------------------ the run records its rules
def test_the_run_records_and_reuses_its_rules(visit_run) -> None:
    res, out, data = visit_run
    assert res.sets is not None and res.sets.target_ddi == 0.03
    on_disk = json.loads((out / SETS).read_text())
    assert on_disk == load_checkpoint(out / CHECKPOINT)["sets"] == res.sets.to_dict()
    assert load_run(out, data).sets == SetChoice.from_dict(on_disk)
    # evaluate reproduces both splits, the chosen rules' med_* and safe_* included.
    assert evaluate_run(out, "test", data) == res.test
    assert evaluate_run(out, "valid", data) == res.val
    rows = {r["rule"]: r for r in res.sets.table}
    assert res.val["med_jaccard"] == pytest.approx(rows[res.sets.plain.describe()]["jaccard"])
    safe = rows[res.sets.safe.describe()]
    assert res.val["safe_ddi_rate"] == pytest.approx(safe["ddi_rate"])
    # The plain rule is the best validation Jaccard of all the base rules tried.
    assert res.val["med_jaccard"] == pytest.approx(
        max(r["jaccard"] for r in res.sets.table if "," not in r["rule"]))


def test_evaluate_prints_the_safe_columns(visit_run, capsys) -> None:
    _, out, data = visit_run
    assert main(["evaluate", str(out), "--data", data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].split() == ["split", "safe_jaccard", "safe_f1", "safe_ddi_rate",
                                "safe_avg_meds"]


# ------------------------------------------------------------------ recommend --ddi
def _codes(run, vid: int) -> tuple[list[str], list[str]]:
    v, codes = run.ds.visits, run.ds.entity_codes
    return ([codes[e] for e in v.diag[v.diag_ptr[vid]:v.diag_ptr[vid + 1]]],
            [codes[e] for e in v.proc[v.proc_ptr[vid]:v.proc_ptr[vid + 1]]])


def _greedy_avoid(ranking: list[int], pairs: set[frozenset[int]], k: int) -> list[int]:
    """The avoid rule as stated: down the ranking, skip a drug interacting with a chosen one."""
    chosen: list[int] = []
    for i in ranking:
        if len(chosen) == k:
            break
        if not any(frozenset((i, j)) in pairs for j in chosen):
            chosen.append(i)
    return chosen


def test_avoid_is_the_stated_greedy_and_explains_each_displacement(visit_run) -> None:
    _, out, data = visit_run
    run = load_run(out, data)
    pairs = {frozenset(p) for p in run.ds.triplets_of("ddi").tolist()}
    code = {i: run.ds.entity_codes[i].partition(":")[2] for i in range(run.ds.n_items)}
    found_a_displacement = False
    for vid in range(0, 40, 4):
        diag, proc = _codes(run, vid)
        ranking = [r["item"] for r in recommend(run, diag, proc, top=run.ds.n_items, ddi="off")]
        rec = recommend_set(run, diag, proc, top=12, ddi="avoid")
        items = [r["item"] for r in rec.rows]
        assert sorted(items) == sorted(_greedy_avoid(ranking, pairs, 12))
        assert ddi_pairs(rec.rows) == [] and rec.rule == "topk:12, avoid"
        assert [r["rank"] for r in rec.rows] == [ranking.index(i) + 1 for i in items]
        plain = set(ranking[:12])
        assert {d["item"] for d in rec.displaced} == plain - set(items)
        for d in rec.displaced:
            # Why: each named partner is in the set and interacts with the displaced drug.
            partners = [i for i in items if frozenset((i, d["item"])) in pairs]
            assert d["interacts_with"] and d["interacts_with"] == [code[i] for i in partners]
            found_a_displacement = True
    assert found_a_displacement


def test_penalty_sits_between_off_and_avoid(visit_run) -> None:
    _, out, data = visit_run
    run = load_run(out, data)
    n_pairs = {}
    for mode in ("off", "penalty=0.3", "avoid"):
        total = 0
        for vid in range(0, 60, 3):
            diag, proc = _codes(run, vid)
            total += len(ddi_pairs(recommend(run, diag, proc, top=15, ddi=mode)))
        n_pairs[mode] = total
    assert n_pairs["off"] > n_pairs["penalty=0.3"] >= n_pairs["avoid"] == 0


def test_the_default_is_the_runs_ddi_aware_rule(visit_run, capsys) -> None:
    res, out, data = visit_run
    run = load_run(out, data)
    diag, proc = _codes(run, 0)
    rec = recommend_set(run, diag, proc)
    assert rec.rule == res.sets.safe.describe()
    assert rec.source == f"size: chosen on validation; DDI: {res.sets.criterion}"
    assert main(["recommend", str(out), "--data", data, "--diagnoses", ",".join(diag),
                 "--ddi", "penalty=0.3", "--top", "8"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "set: topk:8, penalty=0.3 (size: given; DDI: given)"
    assert text[-2].startswith("displaced: ") and text[-1].startswith("DDI pairs in this set:")
    assert main(["recommend", str(out), "--data", data, "--diagnoses", ",".join(diag),
                 "--ddi", "avoid", "--format", "json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["set_rule"].endswith(", avoid") and obj["ddi_pairs"] == []
    assert all({"item", "code", "rank", "interacts_with"} <= set(d) for d in obj["displaced"])


@pytest.mark.parametrize(("value", "needle"), [
    ("penalty=-1", "error: field '--ddi': expected off, avoid or penalty=W"),
    ("sometimes", "error: field '--ddi': expected off, avoid or penalty=W"),
])
def test_bad_ddi_values_are_one_error_line(visit_run, value, needle, capsys) -> None:
    _, out, data = visit_run
    assert main(["recommend", str(out), "--data", data, "--patient", "0", "--ddi", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(needle)


# ------------------------------------------------------------------ data without DDI pairs
def test_data_without_ddi_pairs(noddi_run, capsys) -> None:
    res, out, data = noddi_run
    assert res.sets.safe == res.sets.plain and "no ddi relation" in res.sets.criterion
    assert not any(k.startswith("safe_") for k in res.test)
    run = load_run(out, data)
    diag, proc = _codes(run, 0)
    with pytest.raises(DataError, match="field '--ddi': needs the KG's 'ddi' relation"):
        recommend(run, diag, proc, ddi="avoid")
    # No DDI option asked: the plain set, without a footer claiming safety.
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert main(["recommend", str(out), "--data", data, "--diagnoses", ",".join(diag)]) == 0
    text = buf.getvalue()
    assert "DDI pairs" not in text and "displaced" not in text and "ddi_with" not in text
    assert main(["recommend", str(out), "--data", data, "--diagnoses", ",".join(diag),
                 "--ddi", "penalty=1"]) == 2
    assert "needs the KG's 'ddi' relation" in capsys.readouterr().err


def test_set_sizes_follow_the_chosen_rule(visit_run) -> None:
    """Without --top the size is the validated rule's, from the rule's definition: K, the
    count of standardised scores >= T, or round(C (a + b n_codes))."""
    res, out, data = visit_run
    run = load_run(out, data)
    rule = res.sets.plain
    for vid in range(0, 60, 3):
        diag, proc = _codes(run, vid)
        full = recommend(run, diag, proc, top=run.ds.n_items, ddi="off")
        s = np.array([r["score"] for r in full])
        if rule.kind == "topk":
            want = int(rule.param)
        elif rule.kind == "threshold":
            want = int(((s - s.mean()) / s.std() >= rule.param).sum())
        else:
            a, b = rule.fit
            n = len(set(diag) | set(proc))
            want = min(max(int(np.floor(rule.param * (a + b * n) + 0.5)), 1), run.ds.n_items)
        assert len(recommend(run, diag, proc, ddi="off")) == want, (rule, vid)
