"""SafeDrug's preprocessed MIMIC-III pickles: load into :class:`MedicalRecords`, write back.

A SafeDrug directory holds ``records_final.pkl`` (patients -> visits -> ``[diag, proc, med]``
index lists), ``voc_final.pkl`` (the three vocabularies, a dill pickle) and optionally
``ddi_A_final.pkl`` (medication × medication DDI adjacency) and ``ehr_adj_final.pkl``
(co-prescription adjacency). Everything is read through the restricted unpicklers of
:mod:`diffkg_fast.data.unpickle`: loading never runs code from the files.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.errors import DataError
from diffkg_fast.data.records import KINDS, MedicalRecords
from diffkg_fast.data.unpickle import NUMPY_GLOBALS, load_plain_pickle, load_safedrug_voc
from diffkg_fast.utils.io import atomic_write

log = logging.getLogger(__name__)

RECORDS_FILE = "records_final.pkl"
VOC_FILE = "voc_final.pkl"
DDI_FILE = "ddi_A_final.pkl"
EHR_FILE = "ehr_adj_final.pkl"
_KIND_NAMES = {"diag": "diagnosis", "proc": "procedure", "med": "medication"}
_VOC_KEY = {"diag": "diag_voc", "proc": "pro_voc", "med": "med_voc"}


class Voc:
    """SafeDrug's vocabulary (``idx2word`` / ``word2idx``), as :func:`write_safedrug` writes it.

    Module level so that it pickles by reference (``diffkg_fast.data.safedrug.Voc``), which the
    restricted loader maps to its inert stand-in like SafeDrug's own ``__main__.Voc``.
    """

    def __init__(self, words: list[str] | None = None) -> None:
        self.idx2word: dict[int, str] = {}
        self.word2idx: dict[str, int] = {}
        for w in words or []:
            self.add_sentence([w])

    def add_sentence(self, sentence: list[str]) -> None:
        """Append unseen words (SafeDrug's method of the same name)."""
        for word in sentence:
            if word not in self.word2idx:
                self.idx2word[len(self.word2idx)] = word
                self.word2idx[word] = len(self.word2idx)


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def check_records(
    records: Any, path: Path, sizes: dict[str, int]
) -> tuple[list[list[list[list[int]]]], dict[str, int]]:
    """Check SafeDrug's nested records against vocabulary ``sizes`` (keys ``diag/proc/med``).

    Returns the records with duplicate codes inside a visit removed (first occurrence kept)
    and the number removed per kind (``duplicate_diag_codes`` / ``_proc_`` / ``_med_``).
    Raises :class:`DataError` naming ``path`` and ``records[patient][visit][kind]``.
    """
    stats = {f"duplicate_{kind}_codes": 0 for kind in KINDS}
    if not isinstance(records, list | tuple):
        raise DataError(f"expected a list of patients, got {type(records).__name__}", path=path)
    if not records:
        raise DataError("no patients (expected a non-empty list)", path=path)
    out: list[list[list[list[int]]]] = []
    for p, patient in enumerate(records):
        if not isinstance(patient, list | tuple):
            raise DataError(f"expected a list of visits, got {type(patient).__name__}",
                            path=path, field=f"records[{p}]")
        if not patient:
            raise DataError(f"patient {p} has no visit (every patient needs at least one)",
                            path=path, field=f"records[{p}]")
        visits = []
        for v, visit in enumerate(patient):
            where = f"records[{p}][{v}]"
            if not isinstance(visit, list | tuple) or len(visit) != 3:
                got = f"a {len(visit)}-element list" if isinstance(visit, list | tuple) else (
                    type(visit).__name__)
                raise DataError(
                    f"patient {p} visit {v}: expected [diag_ids, proc_ids, med_ids], got {got}",
                    path=path, field=where)
            lists = []
            for k, kind in enumerate(KINDS):
                codes = visit[k]
                name = _KIND_NAMES[kind]
                if not isinstance(codes, list | tuple) or not all(map(_is_int, codes)):
                    bad = codes if not isinstance(codes, list | tuple) else next(
                        c for c in codes if not _is_int(c))
                    raise DataError(
                        f"patient {p} visit {v}: expected a list of {name} indices (ints), "
                        f"found {type(bad).__name__} {bad!r:.40}", path=path, field=f"{where}[{k}]")
                if not codes:
                    # SafeDrug drops visits without all three kinds; MedicalRecords needs them.
                    raise DataError(f"patient {p} visit {v}: empty {name} list (every visit needs "
                                    "at least one code of each kind)", path=path,
                                    field=f"{where}[{k}]")
                n = sizes[kind]
                bad_idx = next((int(c) for c in codes if not 0 <= c < n), None)
                if bad_idx is not None:
                    raise DataError(
                        f"patient {p} visit {v}: {name} index {bad_idx} outside the vocabulary "
                        f"({_VOC_KEY[kind]} has {n} codes, expected 0 … {n - 1})",
                        path=path, field=f"{where}[{k}]")
                uniq = list(dict.fromkeys(int(c) for c in codes))  # keeps first occurrences
                stats[f"duplicate_{kind}_codes"] += len(codes) - len(uniq)
                lists.append(uniq)
            visits.append(lists)
        out.append(visits)
    return out, stats


def _square_matrix(path: Path, n_med: int) -> np.ndarray:
    a = load_plain_pickle(path, allowed=NUMPY_GLOBALS)
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.kind not in "biuf":
        desc = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else (
            type(a).__name__)
        raise DataError(f"expected a numeric 2-D numpy array, got {desc}", path=path)
    if a.shape != (n_med, n_med):
        raise DataError(f"shape {a.shape}, expected ({n_med}, {n_med}): one row and column per "
                        f"medication of med_voc in {VOC_FILE}", path=path)
    return a


def _load_ddi(path: Path, n_med: int) -> np.ndarray:
    a = _square_matrix(path, n_med)
    if not np.isin(a, (0, 1)).all():
        i, j = np.argwhere(~np.isin(a, (0, 1)))[0]
        raise DataError(f"entry ({i}, {j}) = {a[i, j].item()!r}: expected a binary 0/1 matrix",
                        path=path)
    if not np.array_equal(a, a.T):
        i, j = np.argwhere(a != a.T)[0]
        raise DataError(f"not symmetric: entry ({i}, {j}) = {a[i, j].item()} but ({j}, {i}) = "
                        f"{a[j, i].item()}", path=path)
    if np.any(np.diagonal(a)):
        i = int(np.flatnonzero(np.diagonal(a))[0])
        raise DataError(f"nonzero diagonal entry ({i}, {i}): a drug cannot interact with itself",
                        path=path)
    return np.argwhere(np.triu(a, 1) != 0).astype(np.int64)


def load_safedrug(path: str | os.PathLike[str]) -> MedicalRecords:
    """Load a SafeDrug preprocessing output directory as :class:`MedicalRecords`.

    Duplicate codes inside one visit are removed (first occurrence kept) and their count logged
    (:class:`MedicalRecords` has no field to keep it; :func:`check_records` returns it).
    Every malformed input raises :class:`DataError` naming the file and the patient / visit.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a directory (expected SafeDrug's output folder)", path=root)
    for name in (RECORDS_FILE, VOC_FILE):
        if not (root / name).is_file():
            raise DataError(f"missing {name} (SafeDrug's preprocessing writes it)",
                            path=root / name)
    voc = load_safedrug_voc(root / VOC_FILE)
    sizes = {kind: len(voc[_VOC_KEY[kind]]) for kind in KINDS}
    for kind, n in sizes.items():
        if n == 0:
            raise DataError("empty vocabulary", path=root / VOC_FILE, field=_VOC_KEY[kind])
    rec_path = root / RECORDS_FILE
    # numpy scalars are harmless and some re-implementations store indices as np.int64.
    nested, counts = check_records(load_plain_pickle(rec_path, allowed=NUMPY_GLOBALS),
                                   rec_path, sizes)
    if any(counts.values()):
        log.warning("%s: removed duplicate codes inside visits: %s", rec_path, counts)
    ddi_pairs = None
    if (root / DDI_FILE).is_file():
        ddi_pairs = _load_ddi(root / DDI_FILE, sizes["med"])
    if (root / EHR_FILE).is_file():
        _square_matrix(root / EHR_FILE, sizes["med"])  # checked for consistency, not used
    try:
        return MedicalRecords.from_nested(
            nested, voc["diag_voc"], voc["pro_voc"], voc["med_voc"], ddi_pairs=ddi_pairs,
            source="safedrug",
        )
    except DataError as exc:  # e.g. a vocabulary listing one code twice
        raise DataError(str(exc), path=root) from exc


def write_safedrug(records: MedicalRecords, path: str | os.PathLike[str]) -> None:
    """Write ``records`` as a SafeDrug directory that :func:`load_safedrug` (and SafeDrug) reads.

    Writes ``records_final.pkl``, ``voc_final.pkl``, ``ehr_adj_final.pkl`` (co-prescriptions in
    one visit) and, when ``records.ddi_pairs`` is set, ``ddi_A_final.pkl`` (float64, like
    SafeDrug's); otherwise an old ``ddi_A_final.pkl`` there is removed so that the directory
    stays consistent. Each file is written atomically.
    """
    records.validate()
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_write(root / RECORDS_FILE, "wb") as f:
        pickle.dump(records.to_nested(), f, protocol=4)
    vocs = {key: Voc(records.voc(kind)) for kind, key in _VOC_KEY.items()}
    with atomic_write(root / VOC_FILE, "wb") as f:
        pickle.dump({k: vocs[k] for k in ("diag_voc", "med_voc", "pro_voc")}, f, protocol=4)
    n_med = len(records.med_voc)
    # visit × medication incidence; M^T M counts co-prescriptions (SafeDrug's ehr_adj).
    inc = sp.csr_matrix(
        (np.ones(len(records.med)), (records.entry_visit("med"), records.med)),
        shape=(records.n_visits, n_med),
    )
    ehr = ((inc.T @ inc).toarray() > 0).astype(np.float64)
    np.fill_diagonal(ehr, 0)
    with atomic_write(root / EHR_FILE, "wb") as f:
        pickle.dump(ehr, f, protocol=4)
    if records.ddi_pairs is None:
        (root / DDI_FILE).unlink(missing_ok=True)
        return
    pairs = np.asarray(records.ddi_pairs, dtype=np.int64).reshape(-1, 2)
    ddi = np.zeros((n_med, n_med))
    ddi[pairs[:, 0], pairs[:, 1]] = 1
    ddi[pairs[:, 1], pairs[:, 0]] = 1
    with atomic_write(root / DDI_FILE, "wb") as f:
        pickle.dump(ddi, f, protocol=4)
