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
recommendation) but are flagged ``known``. Each row lists the other medications of the list it
interacts with (the dataset's ``ddi`` relation), because a recommended set is judged by its DDI
rate as much as by its accuracy.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.model.base import Patients
from diffkg_fast.model.patients import codes_to_entities, patient_code_matrix, row_mean_csr
from diffkg_fast.ops.graph import torch_csr
from diffkg_fast.train.evaluation import has_visit_split
from diffkg_fast.train.output import FORMATS
from diffkg_fast.train.run_folder import LoadedRun, load_run

__all__ = ["cmd_recommend", "ddi_pairs", "format_example", "format_recommendations",
           "recommend", "split_codes"]

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
    return "ddi" in ds.relation_names


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
def recommend(run: LoadedRun, diagnoses: Sequence[str] = (), procedures: Sequence[str] = (),
              patient: int | None = None, top: int = DEFAULT_TOP) -> list[dict[str, Any]]:
    """The ``top`` highest-scoring medications, best first, one dict per row.

    Keys: ``rank`` (1-based), ``item`` (id), ``level`` (code prefix, e.g. ``ATC3``), ``code``
    (without prefix), ``name``, ``score``, ``known`` (a training medication of ``patient``),
    ``ddi_with`` (labels of the OTHER listed medications it interacts with). Codes are plain
    ICD-9 strings or full entity codes; bad input raises :class:`DataError` naming the option.
    Ties keep item order (a stable sort), so MostPop's equal counts rank reproducibly.
    """
    ds = run.ds
    if not 1 <= top <= ds.n_items:
        raise DataError(f"must be between 1 and {ds.n_items} (the number of items), got {top}",
                        field="--top")
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
    scores = _scores(run, diagnoses, procedures, patient)
    items = [int(i) for i in np.argsort(-scores, kind="stable")[:top]]
    known = set() if patient is None else set(ds.train[patient].indices.tolist())
    listed = set(items)
    interacts: dict[int, set[int]] = {i: set() for i in items}
    if _has_ddi(ds):
        for a, b in ds.triplets_of("ddi").tolist():
            if a in listed and b in listed and a != b:
                interacts[a].add(b)
                interacts[b].add(a)
    rows = []
    for rank, i in enumerate(items, 1):
        level, code = _code_of(ds, i)
        rows.append({"rank": rank, "item": i, "level": level, "code": code,
                     "name": ds.entity_names[i] if ds.entity_names else "",
                     "score": float(scores[i]), "known": i in known,
                     "ddi_with": [_label(ds, j) for j in items if j in interacts[i]]})
    return rows


def ddi_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The interacting pairs of a :func:`recommend` list, each once, in rank order."""
    labels = [r["code"] or f"#{r['item']}" for r in rows]
    return [(labels[i], labels[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))
            if labels[j] in rows[i]["ddi_with"]]


# ------------------------------------------------------------------ output
def format_recommendations(rows: Sequence[dict[str, Any]], fmt: str = "table", *,
                           diagnoses: Sequence[str] = (), procedures: Sequence[str] = (),
                           patient: int | None = None, ddi: bool = True) -> str:
    """A :func:`recommend` list as an aligned table (with a DDI footer), JSON or CSV.

    JSON is one object: the inputs echoed (``diagnoses``, ``procedures``, ``patient``), the
    ``ddi_pairs`` and the ``recommendations``; CSV one row per medication (``ddi_with``
    joined by ``;``, ``known`` as ``true``/``false`` as in JSON). The table shows the
    ``known`` column only with a patient, and ``ddi=False`` (a dataset without a ``ddi``
    relation) drops the footer, which would claim a safety it never checked.
    """
    pairs = ddi_pairs(rows)
    if fmt == "json":
        return json.dumps({"diagnoses": list(diagnoses), "procedures": list(procedures),
                           "patient": patient, "ddi_pairs": [list(p) for p in pairs],
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

    out = [line([h for h, _, _ in cols])]
    out += [line([cells[k] for _, cells, _ in cols]) for k in range(len(rows))]
    if ddi:
        listed = ", ".join(f"{a}-{b}" for a, b in pairs)
        out.append(f"DDI pairs in this list: {len(pairs)}" + (f" ({listed})" if pairs else ""))
    return "\n".join(out)


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
    ≤ 14 lines; a visit's long code lists are cut): the top ``top`` for one visit's codes (or, for a
    model without codes, that visit's patient), or the top items of user 0 on data without
    visits. It shows what the run produces and how ``recommend`` would ask for it."""
    ds = run.ds
    top = min(top, ds.n_items)
    vid = _example_visit(ds)
    if vid is None:
        rows = recommend(run, patient=0, top=top)
        return (f"\nexample: top {top} items of user 0\n"
                + format_recommendations(rows, patient=0, ddi=_has_ddi(ds)))
    assert ds.visits is not None
    v = ds.visits
    diag = [ds.entity_codes[e] for e in v.diag[v.diag_ptr[vid]:v.diag_ptr[vid + 1]]]
    proc = [ds.entity_codes[e] for e in v.proc[v.proc_ptr[vid]:v.proc_ptr[vid + 1]]]
    head = (f"\nexample: recommend for diagnoses {_short([c.partition(':')[2] for c in diag])} "
            f"procedures {_short([c.partition(':')[2] for c in proc])}")
    if "codes" in run.model.patient_inputs:
        rows = recommend(run, diag, proc, None, top)
        return head + "\n" + format_recommendations(rows, ddi=_has_ddi(ds))
    p = int(v.patient[vid])
    rows = recommend(run, patient=p, top=top)
    return (head + f"\nranked as --patient {p}: this run's model ({_model_desc(run)}) "
            "cannot use codes\n"
            + format_recommendations(rows, patient=p, ddi=_has_ddi(ds)))


# ------------------------------------------------------------------ command
def cmd_recommend(args: argparse.Namespace) -> int:
    """``diffkg-fast recommend DIR``: the top medications for codes and/or a patient."""
    run = load_run(args.run_dir, args.data, args.device)
    diagnoses, procedures = split_codes(args.diagnoses), split_codes(args.procedures)
    top = min(DEFAULT_TOP, run.ds.n_items) if args.top is None else args.top
    rows = recommend(run, diagnoses, procedures, args.patient, top)
    print(format_recommendations(rows, args.format, diagnoses=diagnoses, procedures=procedures,
                                 patient=args.patient, ddi=_has_ddi(run.ds)))
    return 0
