"""Medical records -> the patient × medication dataset and its medication knowledge graph.

Entity id layout (items first, as DiffKG and KGAT expect)::

    [ medications | diagnoses | procedures | ATC classes ]
      0 … M-1       M … M+D-1  …            …

Relations (one direction stored; the model adds the inverses):

- ``med_diagnosis`` (medication -> diagnosis) and ``med_procedure`` (medication -> procedure):
  co-occurrence in **training** data only. A (visit, medication) entry counts only when it is
  training data: under the ``visit`` split, visits of training patients; under the
  ``interaction`` split, entries whose (patient, medication) pair is in the training matrix. An
  edge needs ``count >= cooc_min_count`` and ``lift = P(m, c) / (P(m) P(c)) >= cooc_min_lift``
  over the counted visits; an edge is kept when it is among the medication's ``cooc_top_k``
  highest-lift codes or the code's ``cooc_top_k_code`` highest-lift medications (so frequent
  codes are not left isolated). Raw co-occurrence alone would link the most common drug (in ~89%
  of visits) to nearly every code.
- ``ddi`` (medication -> medication, lower id first): TWOSIDES pairs mapped to ATC-3 by SafeDrug's
  rule (:func:`diffkg_fast.data.codes.ddi_pairs`), or the source's own DDI matrix.
- ``atc_parent``: medication -> its ATC parent class -> … -> ATC level-1 group (class entities).

Splits (seeded, stored in the dataset):

- ``interaction``: per patient, a random 80 / 10 / 10 of its distinct medication pairs
  (held-out counts ``floor(0.1 n + 0.5)`` each, at least one training pair kept);
- ``visit`` (SafeDrug): patients in file order (or seeded shuffle), the first ``int(2n/3)``
  train, then SafeDrug's ``eval_len = int((n - split)/2)`` patients **test**, the rest
  validation (SafeDrug's order: test before validation). All visits of a held-out patient are
  held out; their diagnoses and procedures stay known inputs.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data import codes as codes_mod
from diffkg_fast.data.dataset import (
    KGDataset,
    VisitFeatures,
    to_csr,
    unique_int,
    unique_triplets,
)
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.records import MedicalRecords

RELATIONS = ("med_diagnosis", "med_procedure", "ddi", "atc_parent")
ENTITY_TYPES = ("medication", "diagnosis", "procedure", "atc_class")
SPLIT_NAMES = ("interaction", "visit")


def split_interactions(
    patient: np.ndarray, med: np.ndarray, n_patients: int, rng: np.random.Generator,
    ratios: tuple[float, float] = (0.1, 0.1),
) -> np.ndarray:
    """Per-patient random split of distinct (patient, med) pairs; returns 0/1/2 per pair.

    Pairs must be distinct. Vectorized: a random key per pair, lexsort by (patient, key), the
    rank of each pair inside its patient decides its part.
    """
    n = len(patient)
    order = np.lexsort((rng.random(n), patient))
    counts = np.bincount(patient, minlength=n_patients)
    start = np.zeros(n_patients + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - start[patient[order]]
    n_valid = np.floor(ratios[0] * counts + 0.5).astype(np.int64)
    n_test = np.floor(ratios[1] * counts + 0.5).astype(np.int64)
    # Keep at least one training pair: shrink validation first, then test.
    over = np.maximum(n_valid + n_test - (counts - 1), 0) * (counts > 0)
    cut = np.minimum(over, n_valid)
    n_valid -= cut
    n_test -= over - cut
    part = np.zeros(n, dtype=np.int8)
    part[rank < (n_valid + n_test)[patient]] = 1
    part[rank < n_test[patient]] = 2
    return part


def split_patients_safedrug(n_patients: int, rng: np.random.Generator | None) -> np.ndarray:
    """SafeDrug's patient split: 0 train / 1 valid / 2 test per patient (file order unless rng)."""
    split_point = int(n_patients * 2 / 3)
    eval_len = int((n_patients - split_point) / 2)
    by_position = np.zeros(n_patients, dtype=np.int8)
    by_position[split_point : split_point + eval_len] = 2
    by_position[split_point + eval_len :] = 1
    if rng is None:
        return by_position
    out = np.empty_like(by_position)
    out[rng.permutation(n_patients)] = by_position
    return out


def _top_k_mask(group: np.ndarray, other: np.ndarray, lift: np.ndarray, count: np.ndarray,
                k: int) -> np.ndarray:
    """True for the ``k`` highest-lift entries of each ``group`` (ties: count, then id)."""
    order = np.lexsort((other, -count, -lift, group))
    g = group[order]
    rank = np.arange(len(g)) - np.searchsorted(g, g, side="left")
    mask = np.zeros(len(g), dtype=bool)
    mask[order] = rank < k
    return mask


def _cooccurrence_edges(
    visit_med: sp.csr_matrix, visit_code: sp.csr_matrix, min_count: int, min_lift: float,
    top_k: int, top_k_code: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(med, code) edges by count and lift, kept when in the medication's top-k or the code's."""
    n_visits = visit_med.shape[0]
    counts = (visit_med.T @ visit_code).tocoo()
    med_freq = np.asarray(visit_med.sum(axis=0)).ravel()
    code_freq = np.asarray(visit_code.sum(axis=0)).ravel()
    m, c, k = counts.row.astype(np.int64), counts.col.astype(np.int64), counts.data
    lift = k * n_visits / (med_freq[m] * code_freq[c])
    keep = (k >= min_count) & (lift >= min_lift)
    m, c, k, lift = m[keep], c[keep], k[keep], lift[keep]
    keep = _top_k_mask(m, c, lift, k, top_k) | _top_k_mask(c, m, lift, k, top_k_code)
    order = np.lexsort((c[keep], m[keep]))
    return m[keep][order], c[keep][order]


def _icd_code(code: str, kind: str) -> str:
    """``ICD9DX:4019`` for a real ICD-9 code; ``DX:DX_000123`` for a synthetic one."""
    real = code in codes_mod.icd9_titles(kind)
    return f"{'ICD9' if real else ''}{'DX' if kind == 'diag' else 'PX'}:{code}"


def _entity_name(code: str, kind: str) -> str:
    if kind == "med" or kind == "atc":
        return codes_mod.atc_names().get(code, "")
    return codes_mod.icd9_titles(kind).get(code, "")


def build_medication_dataset(
    records: MedicalRecords,
    *,
    split: str = "interaction",
    seed: int = 0,
    cooc_min_count: int = 5,
    cooc_min_lift: float = 1.5,
    cooc_top_k: int = 50,
    cooc_top_k_code: int = 5,
    ddi: bool = True,
    atc_hierarchy: bool = True,
    shuffle_patients: bool = False,
    name: str | None = None,
) -> KGDataset:
    """Split ``records`` and build the medication KG from training data only (module docstring)."""
    records.validate()
    if split not in SPLIT_NAMES:
        raise DataError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}", field="split")
    minimum = {"cooc_min_count": 1, "cooc_top_k": 0, "cooc_top_k_code": 0}
    given = {"cooc_min_count": cooc_min_count, "cooc_top_k": cooc_top_k,
             "cooc_top_k_code": cooc_top_k_code}
    for key, low in minimum.items():
        if int(given[key]) < low:
            raise DataError(f"must be >= {low}, got {given[key]}", field=key)
    rng = np.random.default_rng(seed)
    n_pat, n_vis = records.n_patients, records.n_visits
    n_med, n_diag, n_proc = (len(records.voc(k)) for k in ("med", "diag", "proc"))
    visit_patient = records.visit_patient()
    med_visit = records.entry_visit("med")
    med_patient = visit_patient[med_visit]

    # --- split ---------------------------------------------------------------------------
    if split == "interaction":
        key = unique_int(med_patient * n_med + records.med)
        pair_patient, pair_med = np.divmod(key, n_med)
        part = split_interactions(pair_patient, pair_med, n_pat, rng)
        visit_split = np.zeros(n_vis, dtype=np.int8)
        # An entry is training data when its (patient, med) pair is a training pair.
        train_keys = key[part == 0]
        entry_is_train = np.isin(med_patient * n_med + records.med, train_keys)
        counted_visits = np.ones(n_vis, dtype=bool)
    else:
        patient_split = split_patients_safedrug(n_pat, rng if shuffle_patients else None)
        visit_split = patient_split[visit_patient]
        pair_patient, pair_med = med_patient, records.med
        part = visit_split[med_visit]
        entry_is_train = part == 0
        counted_visits = visit_split == 0
    mats = {
        s: to_csr(pair_patient[part == p], pair_med[part == p], (n_pat, n_med))
        for p, s in enumerate(("train", "valid", "test"))
    }

    # --- entities ------------------------------------------------------------------------
    diag_off, proc_off = n_med, n_med + n_diag
    class_codes: list[str] = []
    parent_edges: list[tuple[int, int]] = []
    if atc_hierarchy:
        class_id: dict[str, int] = {}
        base = n_med + n_diag + n_proc
        for i, code in enumerate(records.med_voc):
            child = i
            try:
                ancestors = codes_mod.atc_ancestors(code)
            except DataError:
                continue  # a non-ATC code (synthetic large cohorts) has no hierarchy
            for anc in ancestors:
                if anc not in class_id:
                    class_id[anc] = base + len(class_codes)
                    class_codes.append(anc)
                parent_edges.append((child, class_id[anc]))
                child = class_id[anc]
    n_entities = n_med + n_diag + n_proc + len(class_codes)
    entity_type = np.repeat(
        np.arange(4, dtype=np.int8), [n_med, n_diag, n_proc, len(class_codes)]
    )
    med_prefix = {1: "ATC1", 3: "ATC2", 4: "ATC3", 5: "ATC4", 7: "ATC5"}
    entity_codes = (
        [f"{med_prefix.get(len(c), 'MED')}:{c}" for c in records.med_voc]
        + [_icd_code(c, "diag") for c in records.diag_voc]
        + [_icd_code(c, "proc") for c in records.proc_voc]
        + [f"{med_prefix[len(c)]}:{c}" for c in class_codes]
    )
    entity_names = (
        [_entity_name(c, "med") for c in records.med_voc]
        + [_entity_name(c, "diag") for c in records.diag_voc]
        + [_entity_name(c, "proc") for c in records.proc_voc]
        + [_entity_name(c, "atc") for c in class_codes]
    )

    # --- relations -----------------------------------------------------------------------
    counted_rows = np.flatnonzero(counted_visits)
    visit_med = sp.csr_matrix(
        (np.ones(int(entry_is_train.sum()), np.float64),
         (med_visit[entry_is_train], records.med[entry_is_train])),
        shape=(n_vis, n_med),
    )[counted_rows]
    triplets = []
    for rel, kind, offset in ((0, "diag", diag_off), (1, "proc", proc_off)):
        ptr = getattr(records, f"{kind}_ptr")
        visit_code = sp.csr_matrix(
            (np.ones(len(getattr(records, kind)), np.float64), getattr(records, kind), ptr),
            shape=(n_vis, len(records.voc(kind))),
        )[counted_rows]
        m, c = _cooccurrence_edges(visit_med, visit_code, cooc_min_count, cooc_min_lift,
                                   cooc_top_k, cooc_top_k_code)
        triplets.append(np.stack([m, np.full_like(m, rel), c + offset], axis=1))
    ddi_pairs = np.zeros((0, 2), np.int64)
    if ddi:
        ddi_pairs = (records.ddi_pairs if records.ddi_pairs is not None
                     else codes_mod.ddi_pairs(records.med_voc))
        ddi_pairs = np.asarray(ddi_pairs, dtype=np.int64).reshape(-1, 2)
        triplets.append(np.stack([ddi_pairs[:, 0], np.full(len(ddi_pairs), 2), ddi_pairs[:, 1]],
                                 axis=1))
    if parent_edges:
        pe = np.asarray(parent_edges, dtype=np.int64)
        triplets.append(np.stack([pe[:, 0], np.full(len(pe), 3), pe[:, 1]], axis=1))
    kg = unique_triplets(np.concatenate(triplets))

    visits = VisitFeatures(
        patient=visit_patient,
        split=visit_split.astype(np.int8),
        diag_ptr=records.diag_ptr.astype(np.int64),
        diag=records.diag.astype(np.int64) + diag_off,
        proc_ptr=records.proc_ptr.astype(np.int64),
        proc=records.proc.astype(np.int64) + proc_off,
        med_ptr=records.med_ptr.astype(np.int64),
        med=records.med.astype(np.int64),
    )
    meta = {
        "source": records.source,
        "kind": "medication",
        "patient_ids": list(records.patient_ids),
        "vocab_sizes": {"diag": n_diag, "proc": n_proc, "med": n_med},
        "ddi_pairs": len(ddi_pairs),
        "options": {
            "split": split, "seed": seed, "cooc_min_count": cooc_min_count,
            "cooc_min_lift": cooc_min_lift, "cooc_top_k": cooc_top_k,
            "cooc_top_k_code": cooc_top_k_code, "ddi": ddi,
            "atc_hierarchy": atc_hierarchy, "shuffle_patients": shuffle_patients,
        },
    }
    ds = KGDataset(
        name=name or records.source or "medication",
        kg=kg,
        n_entities=n_entities,
        relation_names=list(RELATIONS),
        entity_type=entity_type,
        entity_type_names=list(ENTITY_TYPES),
        entity_codes=entity_codes,
        entity_names=entity_names,
        visits=visits,
        split=split,
        seed=seed,
        meta=meta,
        **mats,
    )
    ds.validate()
    return ds


def ddi_pairs_of(ds: KGDataset) -> np.ndarray:
    """Interacting medication pairs (i < j) of a medication dataset (from its ``ddi`` relation)."""
    return ds.triplets_of("ddi")
