"""Patients described by their codes: the bridge from diagnoses and procedures to the KG.

DiffKG only knows a user by an ID embedding, so a patient without training interactions (every
patient of the ``visit`` split's validation and test parts, or a new patient) is a random
vector. This module gives each patient, and each visit, a *code row*: the mean of one-hot rows
of its diagnosis and procedure entities. With the RGAT entity table ``ent`` (entities × d), the
code representation is ``C @ ent`` — the average learned embedding of the patient's codes,
the same entities the KG links to medications (``med_diagnosis``, ``med_procedure``).

Which visits a row sees (no target ever leaks: codes are inputs, medications are targets):

- :func:`patient_code_matrix` with ``splits=(0,)``: each patient's training visits (the
  training representation; a held-out patient of the ``visit`` split has an empty row);
  with ``splits=(0, s)``: what evaluating split ``s`` may use, its own visits' codes included;
- :func:`visit_code_matrix`: one row per visit of split ``s``, the codes of that visit and of
  the patient's earlier visits (history), so a held-out visit is predicted from what is known
  when it happens;
- :func:`codes_to_entities`: a new patient given by code strings, and :func:`code_rows` the
  rows of :class:`~diffkg_fast.model.base.Patients` that a model's ``score_patients`` takes;
- :func:`visit_history_meds`: the medications of each visit's earlier visits, for the models
  that read a patient's known medications.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.dataset import VisitFeatures
from diffkg_fast.data.errors import DataError

__all__ = ["code_rows", "codes_to_entities", "patient_code_matrix", "row_mean_csr",
           "visit_code_matrix", "visit_history_meds"]


def row_mean_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Float32 CSR ``M`` with ``M[r, c] = 1/|{c' : (r, c')}|`` over the UNIQUE pairs.

    ``M @ X`` is then the mean of the rows of ``X`` a row names (an empty row gives zeros).
    """
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0  # a code seen in several visits counts once
    deg = np.diff(m.indptr)
    m.data /= np.repeat(np.maximum(deg, 1), deg).astype(np.float32)
    m.sort_indices()
    return m


def _visit_codes(visits: VisitFeatures) -> tuple[np.ndarray, np.ndarray]:
    """``(visit, entity)`` pairs of every diagnosis and procedure, sorted by visit."""
    vis, ent = [], []
    for ptr, codes in ((visits.diag_ptr, visits.diag), (visits.proc_ptr, visits.proc)):
        ptr = np.asarray(ptr, dtype=np.int64)
        vis.append(np.repeat(np.arange(visits.n_visits, dtype=np.int64), np.diff(ptr)))
        ent.append(np.asarray(codes, dtype=np.int64))
    v, e = np.concatenate(vis), np.concatenate(ent)
    order = np.argsort(v, kind="stable")  # grouped by visit: visit_code_matrix slices by visit
    return v[order], e[order]


def patient_code_matrix(visits: VisitFeatures, n_users: int, n_entities: int,
                        splits: Sequence[int] = (0,)) -> sp.csr_matrix:
    """``n_users × n_entities`` row-mean CSR of each patient's codes in visits of ``splits``."""
    v, e = _visit_codes(visits)
    keep = np.isin(np.asarray(visits.split)[v], np.asarray(splits))
    patient = np.asarray(visits.patient, dtype=np.int64)[v[keep]]
    return row_mean_csr(patient, e[keep], (n_users, n_entities))


def _history(visits: VisitFeatures, split: int, include_self: bool,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(target visits of split, row j, visit w)`` pairs: ``w`` runs over the earlier visits of
    target ``j``'s patient (and the visit itself with ``include_self``), without a loop.

    Visits of a patient are contiguous and in time order (``VisitFeatures``).
    """
    patient = np.asarray(visits.patient, dtype=np.int64)
    target = np.flatnonzero(np.asarray(visits.split) == split)
    # First visit of each visit's patient: the start of its run of equal patient ids.
    starts = np.flatnonzero(np.r_[True, patient[1:] != patient[:-1]])
    first = starts[np.searchsorted(starts, np.arange(len(patient)), side="right") - 1]
    n_hist = target - first[target] + int(include_self)
    row = np.repeat(np.arange(len(target), dtype=np.int64), n_hist)
    offs = np.arange(int(n_hist.sum())) - np.repeat(np.cumsum(n_hist) - n_hist, n_hist)
    return target, row, np.repeat(first[target], n_hist) + offs


def _gather(ptr: np.ndarray, values: np.ndarray, row: np.ndarray, w: np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray]:
    """``(row, value)`` for every value of visit ``w`` (``ptr`` indexes values by visit)."""
    counts = ptr[w + 1] - ptr[w]
    idx = np.repeat(ptr[w], counts) + (
        np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
    return np.repeat(row, counts), values[idx]


def visit_code_matrix(visits: VisitFeatures, n_entities: int, split: int,
                      ) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows of the visits of ``split`` (in visit order) and their visit ids.

    Row ``j`` (visit ``v``) holds the codes of ``v`` and of the earlier visits of ``v``'s
    patient: what is known when the visit happens.
    """
    target, row, w = _history(visits, split, include_self=True)
    v, e = _visit_codes(visits)
    code_ptr = np.searchsorted(v, np.arange(visits.n_visits + 1))  # v is sorted by visit
    rows, cols = _gather(code_ptr, e, row, w)
    return row_mean_csr(rows, cols, (len(target), n_entities)), target


def visit_history_meds(visits: VisitFeatures, n_items: int, split: int,
                       ) -> tuple[sp.csr_matrix, np.ndarray]:
    """0/1 rows of the medications of the patient's EARLIER visits, one per visit of ``split``
    (in visit order), and their visit ids: the medication history known when the visit happens
    (a visit's own medications are its targets, never an input)."""
    target, row, w = _history(visits, split, include_self=False)
    rows, cols = _gather(np.asarray(visits.med_ptr, dtype=np.int64),
                         np.asarray(visits.med, dtype=np.int64), row, w)
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(target), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m, target


def codes_to_entities(entity_codes: Sequence[str], diagnoses: Sequence[str] = (),
                      procedures: Sequence[str] = ()) -> np.ndarray:
    """Entity ids of diagnosis and procedure codes given as plain strings (``"4019"``).

    A code matches the entity code ``ICD9DX:4019`` / ``DX:4019`` (diagnoses) or ``ICD9PX:…`` /
    ``PX:…`` (procedures), or the full prefixed form. Unknown codes raise one
    :class:`DataError` that names every one of them.
    """
    index = {c: i for i, c in enumerate(entity_codes)}
    ids, unknown = [], []
    for what, kind, given in (("diagnosis", "DX", diagnoses), ("procedure", "PX", procedures)):
        for code in given:
            code = code.strip()
            cands = (code, f"ICD9{kind}:{code}", f"{kind}:{code}")
            hit = next((index[c] for c in cands if c in index), None)
            if hit is None:
                unknown.append(f"{what} {code!r}")
            else:
                ids.append(hit)
    if unknown:
        raise DataError(f"unknown code(s) not in the dataset's vocabulary: {', '.join(unknown)}",
                        field="codes")
    return np.unique(np.asarray(ids, dtype=np.int64))


def code_rows(patients: Sequence[Sequence[int]], n_entities: int):  # -> torch sparse CSR
    """``len(patients) × n_entities`` torch CSR, row ``i`` the mean one-hot of the entity ids
    ``patients[i]`` (from :func:`codes_to_entities`): the ``codes`` of
    :class:`~diffkg_fast.model.base.Patients`."""
    from diffkg_fast.ops.graph import torch_csr  # torch: imported on use, as the data layer

    rows = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(patients)]
                          + [np.zeros(0, np.int64)])
    cols = np.concatenate([np.asarray(p, np.int64) for p in patients] + [np.zeros(0, np.int64)])
    return torch_csr(row_mean_csr(rows, cols, (len(patients), n_entities)))
