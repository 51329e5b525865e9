"""``diffkg-fast recommend``: the ranked medications of one patient, from a trained run.

A patient is given by diagnosis and procedure codes (what a clinician has at hand), by its row
in the dataset (``--patient ID``), or both:

- DiffKG with patient codes scores the mean RGAT embedding of the codes
  (``score_patients`` with codes, the representation the code BPR term trains); with a patient, its
  training codes are united with the given ones and its propagated ID embedding is added (masked
  for a patient without training interactions), so ``--patient P`` alone ranks exactly as the
  trained model scores user ``P``;
- a model without codes (LightGCN, MostPop, DiffKG with ``patient_codes=false`` or trained on a
  dataset without visits) knows patients only by ID: ``--patient`` works, codes are refused.

The patient's training medications are NOT excluded (re-prescription is legitimate in medication
recommendation) but are flagged ``known``.

What is recommended is a SET (:mod:`diffkg_fast.eval.sets`), because a set is what a clinician
receives and what is judged, by its accuracy and by its DDI rate:

- its size: ``--top N`` (the ``N`` best), else the rule the run chose on its validation visits
  (``sets.json``), else the 10 best (a run without a visit split has no visits to choose on);
- its DDI mode, ``--ddi off|avoid|penalty=W``: by default the DDI-aware mode the run chose on
  validation, else ``avoid`` on data with a ``ddi`` relation (no validation visits to choose a
  ``W`` on: ``avoid`` has no parameter, and is the end of the penalty family that admits no
  interacting pair), else ``off``.

Each row lists the other medications of the set it interacts with; a DDI-aware set also lists
what it changed: each medication of the plain set it left out, and the chosen medications it
interacts with (why it was displaced).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.eval.sets import SetRule, displaced, parse_ddi, select_sets
from diffkg_fast.model.base import Patients
from diffkg_fast.model.ddi_loss import has_ddi
from diffkg_fast.model.patients import codes_to_entities, patient_code_matrix, row_mean_csr
from diffkg_fast.ops.graph import torch_csr
from diffkg_fast.train.evaluation import ddi_adjacency, has_visit_split
from diffkg_fast.train.output import FORMATS
from diffkg_fast.train.run_folder import LoadedRun, load_run

__all__ = ["RecommendedSet", "cmd_recommend", "ddi_pairs", "format_example",
           "format_recommendations", "recommend", "recommend_set", "split_codes"]

DEFAULT_TOP = 10
NAME_WIDTH = 48  # the table's name column is cut here: names of ATC classes run to 90 chars
EXAMPLE_CODES = 5  # codes shown in train's example line before "+N"


# ------------------------------------------------------------------ helpers
def split_codes(text: str | None) -> list[str]:
    """``"4019, 25000,"`` → ``["4019", "25000"]`` (the comma-separated CLI form)."""
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def _code_of(ds: KGDataset, entity: int) -> tuple[str, str]:
    """``(level, code)`` of an entity: ``"ATC3:N02B"`` → ``("ATC3", "N02B")``; ``("", "")``
    when the dataset has no codes (KGAT-style data)."""
    full = ds.entity_codes[entity] if ds.entity_codes else ""
    level, sep, code = full.partition(":")
    return (level, code) if sep else ("", full)


def _label(ds: KGDataset, item: int) -> str:
    """How a medication is named in ``ddi_with``: its code, or ``#id`` without one."""
    return _code_of(ds, item)[1] or f"#{item}"


def _has_ddi(ds: KGDataset) -> bool:
    return has_ddi(ds)


def _model_desc(run: LoadedRun) -> str:
    """Why a model cannot score codes, in the config's own words."""
    name, codes = run.config["model"], run.config.get("patient_codes")
    if codes is None:
        return name
    if not codes:
        return f"{name} with patient_codes=false"
    return f"{name} trained on a dataset without visits"


def _scores(run: LoadedRun, diagnoses: Sequence[str], procedures: Sequence[str],
            patient: int | None) -> np.ndarray:
    """Scores of every item for the patient of :func:`recommend` (arguments checked there)."""
    ds, model = run.ds, run.model
    users = None if patient is None else torch.tensor([patient], dtype=torch.long)
    if "codes" not in model.patient_inputs:
        assert users is not None  # codes without a code model were refused by the caller
        return model.score(users)[0].float().cpu().numpy()
    assert ds.visits is not None
    ents = codes_to_entities(ds.entity_codes, diagnoses, procedures)
    if patient is not None:
        known = patient_code_matrix(ds.visits, ds.n_users, ds.n_entities, (0,))[patient]
        ents = np.union1d(ents, known.indices.astype(np.int64))
        if not len(ents) and ds.train[patient].count_nonzero() == 0:
            # Neither codes nor a trained ID embedding: every score would be 0.
            raise DataError(f"patient {patient} has no training visits; give its codes with "
                            "--diagnoses / --procedures", field="--patient")
    row = row_mean_csr(np.zeros(len(ents), np.int64), ents, (1, ds.n_entities))
    return model.score_patients(Patients(users, torch_csr(row)))[0].float().cpu().numpy()


# ------------------------------------------------------------------ recommend
@dataclass
class RecommendedSet:
    """What :func:`recommend_set` returns: ``rows`` (the set, best score first; keys in
    :func:`recommend`), ``displaced`` (each medication of the plain set the DDI mode left out:
    ``item``, ``code``, ``rank``, ``interacts_with``: labels of the set's medications it
    interacts with), ``rule`` (the rule, as ``SetRule.describe``), ``mode`` (its DDI mode) and
    ``source`` (where the rule came from)."""

    rows: list[dict[str, Any]]
    displaced: list[dict[str, Any]]
    rule: str
    mode: str
    source: str


def _rule(run: LoadedRun, top: int | None, ddi: str | None) -> tuple[SetRule, str]:
    """The set rule of a recommendation (module docstring) and where it came from."""
    chosen = run.sets
    base = (SetRule("topk", top) if top is not None
            else chosen.plain if chosen is not None
            else SetRule("topk", min(DEFAULT_TOP, run.ds.n_items)))
    if ddi is not None:
        mode, weight = parse_ddi(ddi)
        if mode != "off" and not _has_ddi(run.ds):
            raise DataError(f"needs the KG's 'ddi' relation, and dataset {run.ds.name!r} has "
                            "none (or an empty one): only --ddi off applies", field="--ddi")
        how = "given"
    elif not _has_ddi(run.ds):
        mode, weight, how = "off", 0.0, "the data has no ddi relation"
    elif chosen is not None:
        mode, weight, how = chosen.safe.mode, chosen.safe.weight, chosen.criterion
    else:
        mode, weight, how = "avoid", 0.0, "no validation visits to choose a penalty on"
    size = ("given" if top is not None else "chosen on validation" if chosen is not None
            else "default")
    return base.with_ddi(mode, weight), f"size: {size}; DDI: {how}"


def _n_codes(run: LoadedRun, n_given: int, patient: int | None) -> np.ndarray:
    """The visit's number of codes for the ``visit_size`` rule: the codes given, else the
    patient's mean over its training visits."""
    v = run.ds.visits
    if n_given or patient is None or v is None:
        return np.array([n_given])
    mine = (np.asarray(v.patient) == patient) & (np.asarray(v.split) == 0)
    counts = (np.diff(np.asarray(v.diag_ptr)) + np.diff(np.asarray(v.proc_ptr)))[mine]
    return np.array([float(counts.mean()) if len(counts) else 0.0])


def recommend_set(run: LoadedRun, diagnoses: Sequence[str] = (), procedures: Sequence[str] = (),
                  patient: int | None = None, top: int | None = None,
                  ddi: str | None = None) -> RecommendedSet:
    """The recommended medication set of a patient given by codes and/or ``patient``: its
    size from ``top`` or the run's rule, its DDI mode from ``ddi`` (``off``, ``avoid``,
    ``penalty=W``) or the run's (module docstring). Bad input raises :class:`DataError` naming
    the option."""
    ds = run.ds
    if top is not None and not 1 <= top <= ds.n_items:
        raise DataError(f"must be between 1 and {ds.n_items} (the number of items), got {top}",
                        field="--top")
    diagnoses, procedures = _checked(run, diagnoses, procedures, patient)
    rule, source = _rule(run, top, ddi)
    scores = _scores(run, diagnoses, procedures, patient)
    n_given = len(codes_to_entities(ds.entity_codes, diagnoses, procedures)) if (
        diagnoses or procedures) else 0
    n_codes = _n_codes(run, n_given, patient)
    adj = ddi_adjacency(ds)
    plain = select_sets(scores[None], rule.with_ddi("off"), None, n_codes)[0]
    chosen = plain if rule.mode == "off" else select_sets(scores[None], rule, adj, n_codes)[0]
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    items = [int(i) for i in order if chosen[i]]
    rows = _rows(run, items, rank, scores, patient)
    moved = [] if adj is None else [
        {"item": i, "code": _label(ds, i), "rank": int(rank[i]),
         "interacts_with": [_label(ds, j) for j in sorted(why, key=lambda j: rank[j])]}
        for i, why in displaced(plain, chosen, adj)]
    return RecommendedSet(rows, sorted(moved, key=lambda d: d["rank"]), rule.describe(),
                          rule.mode, source)


def _checked(run: LoadedRun, diagnoses: Sequence[str], procedures: Sequence[str],
             patient: int | None) -> tuple[list[str], list[str]]:
    """The codes, stripped, after the checks every recommendation makes."""
    ds = run.ds
    if patient is not None and not 0 <= patient < ds.n_users:
        raise DataError(f"patient {patient} is out of range; valid ids are 0 … {ds.n_users - 1}",
                        field="--patient")
    diagnoses = [c.strip() for c in diagnoses if c.strip()]
    procedures = [c.strip() for c in procedures if c.strip()]
    if not diagnoses and not procedures and patient is None:
        raise DataError("give at least one code (--diagnoses / --procedures) or --patient ID",
                        field="--diagnoses")
    if (diagnoses or procedures) and "codes" not in run.model.patient_inputs:
        raise DataError(f"this run's model ({_model_desc(run)}) cannot use diagnosis or "
                        "procedure codes: only a model that scores codes (DiffKG with "
                        "patient_codes=true, trained on a dataset with visits) does; pass "
                        "--patient ID instead", field="--diagnoses")
    return diagnoses, procedures


def _rows(run: LoadedRun, items: list[int], rank: np.ndarray, scores: np.ndarray,
          patient: int | None) -> list[dict[str, Any]]:
    ds = run.ds
    known = set() if patient is None else set(ds.train[patient].indices.tolist())
    listed = set(items)
    interacts: dict[int, set[int]] = {i: set() for i in items}
    if _has_ddi(ds):
        for a, b in ds.triplets_of("ddi").tolist():
            if a in listed and b in listed and a != b:
                interacts[a].add(b)
                interacts[b].add(a)
    rows = []
    for i in items:
        level, code = _code_of(ds, i)
        rows.append({"rank": int(rank[i]), "item": i, "level": level, "code": code,
                     "name": ds.entity_names[i] if ds.entity_names else "",
                     "score": float(scores[i]), "known": i in known,
                     "ddi_with": [_label(ds, j) for j in items if j in interacts[i]]})
    return rows


def recommend(run: LoadedRun, diagnoses: Sequence[str] = (), procedures: Sequence[str] = (),
              patient: int | None = None, top: int | None = None,
              ddi: str | None = None) -> list[dict[str, Any]]:
    """The rows of :func:`recommend_set`: the set's medications, best first, one dict each.

    Keys: ``rank`` (1-based, in the patient's full ranking: a DDI-aware set may skip ranks),
    ``item`` (id), ``level`` (code prefix, e.g. ``ATC3``), ``code`` (without prefix), ``name``,
    ``score``, ``known`` (a training medication of ``patient``), ``ddi_with`` (labels of the
    OTHER medications of the set it interacts with). ``ddi="off"`` with ``top=N`` is the plain
    top ``N`` of the ranking. Codes are plain ICD-9 strings or full entity codes. Ties keep item
    order (a stable sort), so MostPop's equal counts rank reproducibly.
    """
    return recommend_set(run, diagnoses, procedures, patient, top, ddi).rows


def ddi_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The interacting pairs of a :func:`recommend` set, each once, in rank order."""
    labels = [r["code"] or f"#{r['item']}" for r in rows]
    return [(labels[i], labels[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))
            if labels[j] in rows[i]["ddi_with"]]


# ------------------------------------------------------------------ output
def format_recommendations(rec: RecommendedSet, fmt: str = "table", *,
                           diagnoses: Sequence[str] = (), procedures: Sequence[str] = (),
                           patient: int | None = None, ddi: bool = True) -> str:
    """A :func:`recommend_set` result as an aligned table, JSON or CSV.

    The table: a ``set:`` line (the rule and where it came from), one row per medication, then,
    with ``ddi``, the ``displaced:`` line (what the DDI mode left out, and the interactions
    why; only for a DDI-aware rule) and the DDI pairs left in the set. ``ddi=False`` (a dataset
    without a ``ddi`` relation) drops both, which would claim a safety never checked, and the
    ``ddi_with`` column. The ``known`` column shows only with a patient. JSON is one object:
    the inputs echoed (``diagnoses``, ``procedures``, ``patient``), ``set_rule``,
    ``rule_source``, ``displaced``, ``ddi_pairs`` and the ``recommendations``; CSV one row per
    medication (``ddi_with`` joined by ``;``, ``known`` as ``true``/``false`` as in JSON).
    """
    rows = rec.rows
    pairs = ddi_pairs(rows)
    if fmt == "json":
        return json.dumps({"diagnoses": list(diagnoses), "procedures": list(procedures),
                           "patient": patient, "set_rule": rec.rule,
                           "rule_source": rec.source, "displaced": rec.displaced,
                           "ddi_pairs": [list(p) for p in pairs],
                           "recommendations": list(rows)}, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        keys = ["rank", "item", "level", "code", "name", "score", "known", "ddi_with"]
        w.writerow(keys)
        for r in rows:
            w.writerow([";".join(r["ddi_with"]) if k == "ddi_with"
                        else str(r["known"]).lower() if k == "known" else r[k] for k in keys])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise DataError(f"unknown format; expected one of {FORMATS}", field="--format")
    out = [f"set: {rec.rule} ({rec.source})", *_table(rows, patient, ddi)]
    if ddi and rec.mode != "off":
        out.append("displaced: " + (", ".join(
            f"{d['code']} (rank {d['rank']}; interacts with {', '.join(d['interacts_with'])})"
            for d in rec.displaced) or "none"))
    if ddi:
        listed = ", ".join(f"{a}-{b}" for a, b in pairs)
        out.append(f"DDI pairs in this set: {len(pairs)}" + (f" ({listed})" if pairs else ""))
    return "\n".join(out)


def _table(rows: Sequence[dict[str, Any]], patient: int | None, ddi: bool) -> list[str]:
    """The aligned header and rows of a set."""
    cols: list[tuple[str, list[str], bool]] = [  # (header, cells, right-aligned)
        ("rank", [str(r["rank"]) for r in rows], True),
        ("item", [str(r["item"]) for r in rows], True),
        ("level", [r["level"] for r in rows], False),
        ("code", [r["code"] for r in rows], False),
        ("score", [f"{r['score']:.4f}" for r in rows], True)]
    if patient is not None:
        cols.append(("known", ["yes" if r["known"] else "" for r in rows], False))
    if ddi:
        cols.append(("ddi_with", [",".join(r["ddi_with"]) for r in rows], False))
    cols.append(("name", [_cut(r["name"]) for r in rows], False))
    widths = [max(len(h), *(len(c) for c in cells)) for h, cells, _ in cols]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if right else c.ljust(w)
                         for c, w, (_, _, right) in zip(cells, widths, cols, strict=True)
                         ).rstrip()

    return [line([h for h, _, _ in cols])] + [line([cells[k] for _, cells, _ in cols])
                                              for k in range(len(rows))]


def _cut(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"


def _short(codes: Sequence[str]) -> str:
    """``[4019, 25000 … +3]``: a visit's codes, cut so that the example stays one line."""
    more = f" … +{len(codes) - EXAMPLE_CODES}" if len(codes) > EXAMPLE_CODES else ""
    return "[" + ", ".join(codes[:EXAMPLE_CODES]) + more + "]"


def _example_visit(ds: KGDataset) -> int | None:
    """The visit ``train`` shows: the first test visit (visit split) or the first training
    visit (interaction split) with at least one code; ``None`` without visits or codes."""
    v = ds.visits
    if v is None or not ds.entity_codes:
        return None
    split = np.asarray(v.split)
    n_codes = np.diff(np.asarray(v.diag_ptr)) + np.diff(np.asarray(v.proc_ptr))
    cand = np.flatnonzero((split == (2 if has_visit_split(ds) else 0)) & (n_codes > 0))
    return int(cand[0]) if len(cand) else None


def format_example(run: LoadedRun, top: int = DEFAULT_TOP) -> str:
    """The example recommendation ``train`` prints after its results table (a blank line, then
    ≤ 16 lines; a visit's long code lists are cut): the set of the ``top`` best for one visit's
    codes (or, for a model without codes, that visit's patient), or for user 0 on data without
    visits, under the run's DDI mode (module docstring: DDI-aware by default). It shows what the
    run produces and how ``recommend`` would ask for it."""
    ds = run.ds
    top = min(top, ds.n_items)
    vid = _example_visit(ds)
    if vid is None:
        rec = recommend_set(run, patient=0, top=top)
        return (f"\nexample: {top} items for user 0\n"
                + format_recommendations(rec, patient=0, ddi=_has_ddi(ds)))
    assert ds.visits is not None
    v = ds.visits
    diag = [ds.entity_codes[e] for e in v.diag[v.diag_ptr[vid]:v.diag_ptr[vid + 1]]]
    proc = [ds.entity_codes[e] for e in v.proc[v.proc_ptr[vid]:v.proc_ptr[vid + 1]]]
    head = (f"\nexample: recommend for diagnoses {_short([c.partition(':')[2] for c in diag])} "
            f"procedures {_short([c.partition(':')[2] for c in proc])}")
    if "codes" in run.model.patient_inputs:
        rec = recommend_set(run, diag, proc, None, top)
        return head + "\n" + format_recommendations(rec, ddi=_has_ddi(ds))
    p = int(v.patient[vid])
    rec = recommend_set(run, patient=p, top=top)
    return (head + f"\nranked as --patient {p}: this run's model ({_model_desc(run)}) "
            "cannot use codes\n"
            + format_recommendations(rec, patient=p, ddi=_has_ddi(ds)))


# ------------------------------------------------------------------ command
def cmd_recommend(args: argparse.Namespace) -> int:
    """``diffkg-fast recommend DIR``: the medication set for codes and/or a patient."""
    run = load_run(args.run_dir, args.data, args.device)
    diagnoses, procedures = split_codes(args.diagnoses), split_codes(args.procedures)
    rec = recommend_set(run, diagnoses, procedures, args.patient, args.top, args.ddi)
    print(format_recommendations(rec, args.format, diagnoses=diagnoses, procedures=procedures,
                                 patient=args.patient, ddi=_has_ddi(run.ds)))
    return 0
