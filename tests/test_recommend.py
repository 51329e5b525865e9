"""``diffkg-fast recommend`` and the medication columns of the results table, on two tiny
one-epoch runs: DiffKG with patient codes on a visit split, LightGCN on an interaction split.
Tests of the ranking itself ask for the plain set (``ddi="off"``); the DDI-aware sets are
tested in tests/test_recommend_ddi.py."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from diffkg_fast.cli import main
from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.model import MostPop, Patients
from diffkg_fast.model.patients import codes_to_entities, patient_code_matrix, row_mean_csr
from diffkg_fast.ops.graph import torch_csr
from diffkg_fast.train.recommend import format_example, recommend
from diffkg_fast.train.run_folder import LoadedRun, load_run

TINY = ["--set", "epoch=1", "--set", "latdim=8", "--set", "seed=1", "--no-progress",
        "--no-plot"]


def _train(tmp_path_factory: pytest.TempPathFactory, name: str, split: str,
           *extra: str) -> tuple[str, str]:
    """One tiny run: ``(run dir, train's stdout)``."""
    root = tmp_path_factory.mktemp(name)
    data = root / "tiny.npz"
    build_dataset("synthetic", n_patients=150, n_diag=100, n_proc=50, n_med=30,
                  split=split).save(data)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--data", str(data), *TINY, *extra, "--out", str(root / "run")]) == 0
    return str(root / "run"), buf.getvalue()


@pytest.fixture(scope="module")
def diffkg_run(tmp_path_factory) -> tuple[str, str]:
    return _train(tmp_path_factory, "visit", "visit", "--set", "dims=[16]")


@pytest.fixture(scope="module")
def lightgcn_run(tmp_path_factory) -> tuple[str, str]:
    return _train(tmp_path_factory, "interaction", "interaction", "--set", "model=lightgcn")


@pytest.fixture(scope="module")
def run(diffkg_run) -> LoadedRun:
    return load_run(diffkg_run[0])


def _visit_codes(run: LoadedRun, vid: int) -> tuple[list[str], list[str]]:
    """Full entity codes of one visit's diagnoses and procedures."""
    v, codes = run.ds.visits, run.ds.entity_codes
    return ([codes[e] for e in v.diag[v.diag_ptr[vid]:v.diag_ptr[vid + 1]]],
            [codes[e] for e in v.proc[v.proc_ptr[vid]:v.proc_ptr[vid + 1]]])


def _plain(codes: list[str]) -> list[str]:
    return [c.partition(":")[2] for c in codes]


def _ranking(scores: torch.Tensor) -> list[int]:
    return np.argsort(-scores.float().cpu().numpy().ravel(), kind="stable").tolist()


def _direct(run: LoadedRun, ents: np.ndarray, patient: int | None = None) -> torch.Tensor:
    row = row_mean_csr(np.zeros(len(ents), np.int64), ents, (1, run.ds.n_entities))
    users = None if patient is None else torch.tensor([patient])
    return run.model.score_patients(Patients(users, torch_csr(row)))[0]


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ------------------------------------------------------------------ codes
def test_unknown_codes_are_all_named_and_exit_2(diffkg_run, capsys) -> None:
    assert main(["recommend", diffkg_run[0], "--diagnoses", "0062,4019x,ICD9DX:bogus",
                 "--procedures", "zz9"]) == 2
    err = _err(capsys)
    assert "'4019x'" in err and "'ICD9DX:bogus'" in err and "procedure 'zz9'" in err
    assert "'0062'" not in err


def test_plain_and_prefixed_codes_rank_alike_and_as_score_patients(run) -> None:
    diag, proc = _visit_codes(run, 0)
    full = recommend(run, diag, proc, top=run.ds.n_items, ddi="off")
    assert recommend(run, _plain(diag), _plain(proc), top=run.ds.n_items, ddi="off") == full
    ents = codes_to_entities(run.ds.entity_codes, diag, proc)
    direct = _direct(run, ents)
    assert [r["item"] for r in full] == _ranking(direct)
    assert [r["score"] for r in full] == pytest.approx(direct[[r["item"] for r in full]].tolist())
    assert [r["rank"] for r in full] == list(range(1, run.ds.n_items + 1))
    assert not any(r["known"] for r in full)  # no patient, nothing known
    r0 = full[0]
    assert run.ds.entity_codes[r0["item"]] == f"{r0['level']}:{r0['code']}"
    assert r0["name"] == run.ds.entity_names[r0["item"]]


def test_ddi_flags_match_brute_force(diffkg_run, run, capsys) -> None:
    """The whole catalogue, so that every DDI pair of the dataset is in the list."""
    diag, proc = _visit_codes(run, 0)
    n = run.ds.n_items
    rows = recommend(run, diag, proc, top=n, ddi="off")
    pairs = {frozenset(p) for p in run.ds.triplets_of("ddi").tolist()}
    assert pairs and all(max(p) < n for p in pairs)
    code = {r["item"]: r["code"] for r in rows}
    for r in rows:
        want = [code[o["item"]] for o in rows
                if o["item"] != r["item"] and frozenset((r["item"], o["item"])) in pairs]
        assert r["ddi_with"] == want
    assert main(["recommend", diffkg_run[0], "--diagnoses", ",".join(_plain(diag)),
                 "--procedures", ",".join(_plain(proc)), "--top", str(n), "--ddi", "off"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"set: topk:{n} (size: given; DDI: given)"
    assert len(lines) == n + 3 and lines[1].split()[:5] == ["rank", "item", "level", "code",
                                                           "score"]
    assert lines[-1].startswith(f"DDI pairs in this set: {len(pairs)} (")
    # A short list holds only the pairs among its own medications.
    top5 = recommend(run, diag, proc, top=5, ddi="off")
    listed = {r["code"] for r in top5}
    assert all(set(r["ddi_with"]) <= listed - {r["code"]} for r in top5)


# ------------------------------------------------------------------ patients
def test_patient_adds_its_codes_and_id_embedding(run) -> None:
    ds, model = run.ds, run.model
    diag, proc = _visit_codes(run, 0)
    ents = codes_to_entities(ds.entity_codes, diag, proc)
    codes_only = recommend(run, diag, proc, top=ds.n_items, ddi="off")
    train_codes = patient_code_matrix(ds.visits, ds.n_users, ds.n_entities, (0,))
    has_train = model.encoder.has_train.ravel().bool()
    p = int(torch.nonzero(has_train)[0])  # a training patient
    with_p = recommend(run, diag, proc, patient=p, top=ds.n_items, ddi="off")
    assert [r["score"] for r in with_p] != pytest.approx([r["score"] for r in codes_only])
    both = np.union1d(ents, train_codes[p].indices)
    assert [r["item"] for r in with_p] == _ranking(_direct(run, both, p))
    assert {r["item"] for r in with_p if r["known"]} == set(ds.train[p].indices.tolist())
    # The patient alone is the trained model's own user vector.
    alone = recommend(run, patient=p, top=ds.n_items, ddi="off")
    assert [r["item"] for r in alone] == _ranking(model.score(torch.tensor([p])))
    # A held-out patient: no training codes, its ID embedding is masked: codes only.
    q = int(torch.nonzero(~has_train)[0])
    assert train_codes[q].nnz == 0
    assert recommend(run, diag, proc, patient=q, top=ds.n_items, ddi="off") == codes_only
    with pytest.raises(DataError, match="no training visits"):
        recommend(run, patient=q)


def test_json_and_csv_carry_the_same_ranking(diffkg_run, run, capsys) -> None:
    diag, proc = _visit_codes(run, 1)
    args = ["recommend", diffkg_run[0], "--diagnoses", ",".join(_plain(diag)),
            "--procedures", ",".join(proc), "--patient", "2", "--top", "7"]
    assert main([*args, "--format", "json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["diagnoses"] == _plain(diag) and obj["procedures"] == proc
    assert obj["patient"] == 2
    assert main([*args, "--format", "csv"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    expect = recommend(run, diag, proc, patient=2, top=7)
    assert obj["recommendations"] == expect
    assert [int(r["item"]) for r in rows] == [r["item"] for r in expect]
    assert [float(r["score"]) for r in rows] == [r["score"] for r in expect]
    assert [r["known"] == "true" for r in rows] == [r["known"] for r in expect]
    assert [r["ddi_with"] for r in rows] == [";".join(r["ddi_with"]) for r in expect]
    pairs = [[a["code"], b] for a in expect for b in a["ddi_with"]
             if [o["code"] for o in expect].index(b) > a["rank"] - 1]
    assert obj["ddi_pairs"] == pairs


@pytest.mark.parametrize(("args", "needle"), [
    (["--patient", "1", "--top", "0"], "field '--top': must be between 1 and 30"),
    (["--patient", "1", "--top", "31"], "field '--top': must be between 1 and 30"),
    (["--patient", "150"], "field '--patient': patient 150 is out of range; valid ids are 0 … 149"),
    (["--patient", "-1"], "valid ids are 0 … 149"),
    ([], "at least one code"),
])
def test_bad_options_are_one_error_line(diffkg_run, args, needle, capsys) -> None:
    assert main(["recommend", diffkg_run[0], *args]) == 2
    assert needle in _err(capsys)


# ------------------------------------------------------------------ models without codes
def test_lightgcn_ranks_patients_and_refuses_codes(lightgcn_run, capsys) -> None:
    run = load_run(lightgcn_run[0])
    rows = recommend(run, patient=4, top=run.ds.n_items, ddi="off")
    assert [r["item"] for r in rows] == _ranking(run.model.score(torch.tensor([4])))
    assert {r["item"] for r in rows if r["known"]} == set(run.ds.train[4].indices.tolist())
    assert main(["recommend", lightgcn_run[0], "--patient", "4", "--diagnoses", "0062"]) == 2
    err = _err(capsys)
    assert "lightgcn" in err and "patient_codes" in err and "--patient" in err


def test_kgat_style_example_lists_user_0(run) -> None:
    """A dataset without visits: the example is user 0's 10 items with entity codes, the
    DDI-aware set (avoid: no validation visits to choose a penalty on)."""
    ds = dataclasses.replace(run.ds, visits=None)
    text = format_example(LoadedRun(run.config, ds, MostPop(ds.n_users, ds.n_items, ds.train)))
    lines = text.strip().splitlines()
    assert lines[0] == "example: 10 items for user 0" and len(lines) == 15
    assert lines[1] == ("set: topk:10, avoid (size: given; DDI: no validation visits to "
                        "choose a penalty on)")
    assert lines[-2].startswith("displaced: ") and lines[-1] == "DDI pairs in this set: 0"
    pop = np.asarray(ds.train.sum(axis=0)).ravel()
    assert int(lines[3].split()[1]) == int(np.argsort(-pop, kind="stable")[0])


# ------------------------------------------------------------------ train / evaluate output
def test_train_prints_metrics_and_an_example(diffkg_run, lightgcn_run) -> None:
    text = diffkg_run[1]
    ex = text[text.index("example: recommend for diagnoses ["):].splitlines()
    ex = ex[:ex.index(next(ln for ln in ex if ln.startswith("run saved in")))]
    assert len(ex) <= 16 and ex[-1].startswith("DDI pairs in this set: ")
    assert ex[1].startswith("set: topk:10") and "size: given" in ex[1]
    assert len([ln for ln in ex if ln[:4].strip().isdigit()]) <= 10
    assert "med_jaccard" in text and "safe_jaccard" in text
    assert "set rule chosen on validation: " in text
    text = lightgcn_run[1]
    ex = text[text.index("example: recommend for diagnoses ["):].splitlines()
    assert ex[1].startswith("ranked as --patient ") and "(lightgcn) cannot use codes" in ex[1]
    # Interaction split: the DDI-aware default is avoid, and the example says what it moved.
    assert ex[2].startswith("set: topk:10, avoid")
    assert ex[16].startswith("run saved in") and ex[15] == "DDI pairs in this set: 0"
    assert ex[14].startswith("displaced: ")
    assert "med_jaccard" not in text


def test_format_metrics_med_columns_on_visit_split_only(diffkg_run, lightgcn_run,
                                                       capsys) -> None:
    med = ["med_jaccard", "med_f1", "med_prauc", "med_ddi_rate", "med_avg_meds"]
    assert main(["evaluate", diffkg_run[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["split", "recall@10", "ndcg@10", "recall@20", "ndcg@20",
                                "recall@40", "ndcg@40"]
    assert lines[2].split() == ["split", *med] and lines[3].split()[0] == "test"
    assert max(len(ln) for ln in lines) <= 80
    assert main(["evaluate", diffkg_run[0], "--format", "csv"]) == 0
    row = next(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert all(0.0 <= float(row[c]) <= 1.0 for c in med[:4]) and float(row["med_avg_meds"]) > 0
    assert main(["evaluate", diffkg_run[0], "--format", "json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert set(med) <= set(obj) and float(row["med_f1"]) == obj["med_f1"]
    for fmt in ("table", "csv", "json"):
        assert main(["evaluate", lightgcn_run[0], "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert "med_" not in out and "recall@40" in out
