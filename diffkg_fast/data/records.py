"""SafeDrug-style medical records in flat (CSR) arrays.

Every medication source (MIMIC-III CSV tables, SafeDrug pickles, the synthetic cohort) produces a
:class:`MedicalRecords`; :func:`diffkg_fast.data.medkg.build_medication_dataset` turns one into a
:class:`~diffkg_fast.data.dataset.KGDataset`. The nested form of SafeDrug's ``records_final.pkl``
(patients -> visits in time order -> ``[diag_ids, proc_ids, med_ids]``) is kept as flat arrays so
that building the graph is vectorized numpy, not Python loops over visits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from diffkg_fast.data.errors import DataError

KINDS = ("diag", "proc", "med")


def _csr_from_lists(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    ptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    flat = np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(ptr[-1]))
    return ptr, flat


@dataclass
class MedicalRecords:
    """Patients, their visits in time order, each visit's diagnosis / procedure / medication codes.

    Visit ``v`` of patient ``p`` is ``visit_ptr[p] <= v < visit_ptr[p + 1]``. Its diagnoses are
    ``diag_voc[diag[diag_ptr[v]:diag_ptr[v + 1]]]`` and likewise for ``proc`` and ``med``. Codes in
    one visit are distinct. Vocabularies hold the raw codes: undotted ICD-9 for diagnoses and
    procedures, ATC codes (level 3 by default, e.g. ``N02B``) for medications.
    """

    visit_ptr: np.ndarray
    diag_ptr: np.ndarray
    diag: np.ndarray
    proc_ptr: np.ndarray
    proc: np.ndarray
    med_ptr: np.ndarray
    med: np.ndarray
    diag_voc: list[str]
    proc_voc: list[str]
    med_voc: list[str]
    patient_ids: list[str] = field(default_factory=list)
    # Interacting medication pairs (i < j); None: derive them from the shipped DDI files.
    ddi_pairs: np.ndarray | None = None
    source: str = ""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_nested(
        cls,
        records: Sequence[Sequence[Sequence[Sequence[int]]]],
        diag_voc: Sequence[str],
        proc_voc: Sequence[str],
        med_voc: Sequence[str],
        **kwargs: object,
    ) -> MedicalRecords:
        """Build from SafeDrug's nested ``records_final`` layout (validates the result)."""
        visits = [visit for patient in records for visit in patient]
        visit_ptr = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in records], out=visit_ptr[1:])
        arrays = {}
        for k, kind in enumerate(KINDS):
            try:
                arrays[f"{kind}_ptr"], arrays[kind] = _csr_from_lists([v[k] for v in visits])
            except (IndexError, TypeError, ValueError) as exc:
                raise DataError(
                    f"every visit must be [diag_ids, proc_ids, med_ids] lists of ints ({exc})",
                    field="records",
                ) from exc
        rec = cls(
            visit_ptr=visit_ptr,
            diag_voc=list(diag_voc),
            proc_voc=list(proc_voc),
            med_voc=list(med_voc),
            **arrays,
            **kwargs,  # type: ignore[arg-type]
        )
        rec.validate()
        return rec

    def to_nested(self) -> list[list[list[list[int]]]]:
        """SafeDrug's nested layout (for export and tests)."""
        out = []
        for p in range(self.n_patients):
            visits = []
            for v in range(self.visit_ptr[p], self.visit_ptr[p + 1]):
                visits.append([self.codes(kind, v).tolist() for kind in KINDS])
            out.append(visits)
        return out

    # ------------------------------------------------------------------ accessors
    @property
    def n_patients(self) -> int:
        return len(self.visit_ptr) - 1

    @property
    def n_visits(self) -> int:
        return int(self.visit_ptr[-1])

    def voc(self, kind: str) -> list[str]:
        return getattr(self, f"{kind}_voc")

    def codes(self, kind: str, visit: int) -> np.ndarray:
        ptr = getattr(self, f"{kind}_ptr")
        return getattr(self, kind)[ptr[visit] : ptr[visit + 1]]

    def visit_patient(self) -> np.ndarray:
        """Patient index of every visit (int64, length ``n_visits``)."""
        return np.repeat(np.arange(self.n_patients, dtype=np.int64), np.diff(self.visit_ptr))

    def entry_visit(self, kind: str) -> np.ndarray:
        """Visit index of every entry of ``kind`` (the COO row of the visit × code matrix)."""
        ptr = getattr(self, f"{kind}_ptr")
        return np.repeat(np.arange(self.n_visits, dtype=np.int64), np.diff(ptr))

    # ------------------------------------------------------------------ invariants
    def validate(self) -> None:
        """Raise :class:`DataError` naming the field whose invariant is broken."""
        vp = np.asarray(self.visit_ptr)
        if vp.ndim != 1 or len(vp) < 1 or vp[0] != 0 or np.any(np.diff(vp) < 0):
            raise DataError("must start at 0 and be non-decreasing", field="visit_ptr")
        if np.any(np.diff(vp) == 0):
            p = int(np.flatnonzero(np.diff(vp) == 0)[0])
            raise DataError(f"patient {p} has no visit", field="visit_ptr")
        if self.patient_ids and len(self.patient_ids) != self.n_patients:
            raise DataError(
                f"{len(self.patient_ids)} ids for {self.n_patients} patients", field="patient_ids"
            )
        for kind in KINDS:
            ptr = np.asarray(getattr(self, f"{kind}_ptr"))
            idx = np.asarray(getattr(self, kind))
            voc = self.voc(kind)
            if len(ptr) != self.n_visits + 1 or ptr[0] != 0 or np.any(np.diff(ptr) < 0):
                raise DataError(
                    f"must have n_visits + 1 = {self.n_visits + 1} non-decreasing offsets from 0",
                    field=f"{kind}_ptr",
                )
            if ptr[-1] != len(idx):
                raise DataError(f"last offset {ptr[-1]} != {len(idx)} codes", field=f"{kind}_ptr")
            if len(idx) and (idx.min() < 0 or idx.max() >= len(voc)):
                raise DataError(
                    f"code index out of range [0, {len(voc)}) of the {kind} vocabulary", field=kind
                )
            empty = np.flatnonzero(np.diff(ptr) == 0)
            if len(empty):
                raise DataError(
                    f"visit {int(empty[0])} has no {kind} code (every visit needs all three)",
                    field=kind,
                )
            if len(set(voc)) != len(voc):
                raise DataError("duplicate code in vocabulary", field=f"{kind}_voc")
            # Distinct codes within a visit: sort (visit, code) keys and look for equal neighbours.
            key = self.entry_visit(kind) * max(len(voc), 1) + idx
            if len(key) > 1 and np.any(np.diff(np.sort(key)) == 0):
                raise DataError("a code repeats inside one visit", field=kind)
        if self.ddi_pairs is not None:
            pairs = np.asarray(self.ddi_pairs)
            n_med = len(self.med_voc)
            if pairs.ndim != 2 or pairs.shape[1] != 2:
                raise DataError("must be an (n, 2) array of medication indices", field="ddi_pairs")
            bad = len(pairs) and (pairs.min() < 0 or pairs.max() >= n_med
                                   or np.any(pairs[:, 0] >= pairs[:, 1]))
            if bad:
                raise DataError(
                    f"pairs must satisfy 0 <= i < j < {n_med} (one row per unordered pair)",
                    field="ddi_pairs",
                )
