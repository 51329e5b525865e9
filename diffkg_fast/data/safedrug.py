"""SafeDrug's preprocessed MIMIC-III pickles: load into :class:`MedicalRecords`, write back.

A SafeDrug directory holds ``records_final.pkl`` (patients -> visits -> ``[diag, proc, med]``
index lists), ``voc_final.pkl`` (the three vocabularies, a dill pickle) and optionally
``ddi_A_final.pkl`` (medication × medication DDI adjacency), ``ehr_adj_final.pkl``
(co-prescription adjacency) and ``ddi_mask_H.pkl`` (medication × molecular substructure mask);
SafeDrug writes the three matrices with ``dill``, whose numpy form the unpickler reads. The
last two are checked and not used. Everything is read through the restricted unpicklers of
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

from diffkg_fast.data.errors import DataError, excerpt
from diffkg_fast.data.records import KINDS, MedicalRecords
from diffkg_fast.data.unpickle import NUMPY_GLOBALS, load_plain_pickle, load_safedrug_voc
from diffkg_fast.utils.io import atomic_directory, atomic_write

log = logging.getLogger(__name__)

RECORDS_FILE = "records_final.pkl"
VOC_FILE = "voc_final.pkl"
DDI_FILE = "ddi_A_final.pkl"
EHR_FILE = "ehr_adj_final.pkl"
MASK_FILE = "ddi_mask_H.pkl"
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


def _unshared(obj: object, where: str, seen: dict[int, str], path: Path) -> None:
    """Refuse a list or tuple met before: a pickle back-reference, expanded without bound.

    SafeDrug writes every list once, so a 12 KB stream that references one visit 3,000 × 3,000
    times is no SafeDrug file; walking it would cost 9 million visits. ``seen`` maps the id of
    every container met so far (all alive, held by ``records``) to where it was.
    """
    first = seen.setdefault(id(obj), where)
    if first != where:
        raise DataError(f"{where} is the same list object as {first} (a back-reference in the "
                        "pickle; SafeDrug writes every list once, and shared lists could expand "
                        "a small file without bound)", path=path, field=where)


def _check_codes(codes: object, name: str, n: int, at: tuple[Path, int, int, int]) -> list[int]:
    """One visit's code list: ints in ``0 … n-1``, at least one; distinct, in order."""
    path, p, v, k = at
    where = f"records[{p}][{v}][{k}]"
    if not isinstance(codes, list | tuple) or not all(map(_is_int, codes)):
        bad = codes if not isinstance(codes, list | tuple) else next(
            c for c in codes if not _is_int(c))
        raise DataError(f"patient {p} visit {v}: expected a list of {name} indices (ints), "
                        f"found {type(bad).__name__} {excerpt(bad, 40)}", path=path, field=where)
    if not codes:
        # SafeDrug drops visits without all three kinds; MedicalRecords needs them.
        raise DataError(f"patient {p} visit {v}: empty {name} list (every visit needs at least "
                        "one code of each kind)", path=path, field=where)
    bad_idx = next((int(c) for c in codes if not 0 <= c < n), None)
    if bad_idx is not None:
        raise DataError(f"patient {p} visit {v}: {name} index {excerpt(bad_idx, 40)} outside the "
                        f"vocabulary ({_VOC_KEY[KINDS[k]]} has {n} codes, expected 0 … {n - 1})",
                        path=path, field=where)
    return list(dict.fromkeys(int(c) for c in codes))  # keeps first occurrences


def _check_visit(visit: object, at: tuple[Path, int, int], sizes: dict[str, int],
                 stats: dict[str, int], seen: dict[int, str]) -> list[list[int]]:
    path, p, v = at
    where = f"records[{p}][{v}]"
    if not isinstance(visit, list | tuple) or len(visit) != 3:
        got = f"a {len(visit)}-element list" if isinstance(visit, list | tuple) else (
            type(visit).__name__)
        raise DataError(f"patient {p} visit {v}: expected [diag_ids, proc_ids, med_ids], got "
                        f"{got}", path=path, field=where)
    _unshared(visit, where, seen, path)
    lists = []
    for k, kind in enumerate(KINDS):
        if isinstance(visit[k], list | tuple):
            _unshared(visit[k], f"{where}[{k}]", seen, path)
        uniq = _check_codes(visit[k], _KIND_NAMES[kind], sizes[kind], (path, p, v, k))
        stats[f"duplicate_{kind}_codes"] += len(visit[k]) - len(uniq)
        lists.append(uniq)
    return lists


def check_records(
    records: Any, path: Path, sizes: dict[str, int]
) -> tuple[list[list[list[list[int]]]], dict[str, int]]:
    """Check SafeDrug's nested records against vocabulary ``sizes`` (keys ``diag/proc/med``).

    Returns the records with duplicate codes inside a visit removed (first occurrence kept)
    and the number removed per kind (``duplicate_diag_codes`` / ``_proc_`` / ``_med_``).
    Raises :class:`DataError` naming ``path`` and ``records[patient][visit][kind]``, also for a
    list that occurs twice (shared references would expand without bound).
    """
    stats = {f"duplicate_{kind}_codes": 0 for kind in KINDS}
    if not isinstance(records, list | tuple):
        raise DataError(f"expected a list of patients, got {type(records).__name__}", path=path)
    if not records:
        raise DataError("no patients (expected a non-empty list)", path=path)
    seen: dict[int, str] = {id(records): "records"}
    out: list[list[list[list[int]]]] = []
    for p, patient in enumerate(records):
        if not isinstance(patient, list | tuple):
            raise DataError(f"expected a list of visits, got {type(patient).__name__}",
                            path=path, field=f"records[{p}]")
        if not patient:
            raise DataError(f"patient {p} has no visit (every patient needs at least one)",
                            path=path, field=f"records[{p}]")
        _unshared(patient, f"records[{p}]", seen, path)
        out.append([_check_visit(visit, (path, p, v), sizes, stats, seen)
                    for v, visit in enumerate(patient)])
    return out, stats


def _matrix(path: Path, n_med: int, square: bool) -> np.ndarray:
    """A numeric 2-D array with one row per medication (and one column too when ``square``)."""
    a = load_plain_pickle(path, allowed=NUMPY_GLOBALS)
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.kind not in "biuf":
        desc = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else (
            type(a).__name__)
        raise DataError(f"expected a numeric 2-D numpy array, got {desc}", path=path)
    if square and a.shape != (n_med, n_med):
        raise DataError(f"shape {a.shape}, expected ({n_med}, {n_med}): one row and column per "
                        f"medication of med_voc in {VOC_FILE}", path=path)
    if not square and (a.shape[0] != n_med or a.shape[1] == 0):
        raise DataError(f"shape {a.shape}, expected ({n_med}, k >= 1): one row per medication "
                        f"of med_voc in {VOC_FILE}, one column per molecular substructure",
                        path=path)
    return a


def _check_binary(a: np.ndarray, path: Path) -> None:
    if not np.isin(a, (0, 1)).all():
        i, j = np.argwhere(~np.isin(a, (0, 1)))[0]
        raise DataError(f"entry ({i}, {j}) = {a[i, j].item()!r}: expected a binary 0/1 matrix",
                        path=path)


def _load_ddi(path: Path, n_med: int) -> np.ndarray:
    a = _matrix(path, n_med, square=True)
    _check_binary(a, path)
    if not np.array_equal(a, a.T):
        i, j = np.argwhere(a != a.T)[0]
        raise DataError(f"not symmetric: entry ({i}, {j}) = {a[i, j].item()} but ({j}, {i}) = "
                        f"{a[j, i].item()}", path=path)
    if np.any(np.diagonal(a)):
        i = int(np.flatnonzero(np.diagonal(a))[0])
        raise DataError(f"nonzero diagonal entry ({i}, {i}): a drug cannot interact with itself",
                        path=path)
    return np.argwhere(np.triu(a, 1) != 0).astype(np.int64)


def _check_unused(root: Path, n_med: int) -> list[str]:
    """Check the files this tool reads but does not use; return the names of those present.

    ``ehr_adj_final.pkl`` (co-prescriptions) is derived here from training visits only, and
    ``ddi_mask_H.pkl`` (SafeDrug's medication × substructure mask) serves SafeDrug's molecule
    encoder, which DiffKG has not: both are checked against the vocabulary, so that a folder
    mixing two preprocessing runs is caught, then ignored.
    """
    present = []
    if (root / EHR_FILE).is_file():
        _matrix(root / EHR_FILE, n_med, square=True)
        present.append(EHR_FILE)
    if (root / MASK_FILE).is_file():
        _check_binary(_matrix(root / MASK_FILE, n_med, square=False), root / MASK_FILE)
        present.append(MASK_FILE)
    return present


def _load_vocabularies(root: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    voc = load_safedrug_voc(root / VOC_FILE)
    sizes = {kind: len(voc[_VOC_KEY[kind]]) for kind in KINDS}
    for kind, n in sizes.items():
        if n == 0:
            raise DataError("empty vocabulary", path=root / VOC_FILE, field=_VOC_KEY[kind])
    return voc, sizes


def load_safedrug(path: str | os.PathLike[str], *, stats: dict | None = None) -> MedicalRecords:
    """Load a SafeDrug preprocessing output directory as :class:`MedicalRecords`.

    Reads ``records_final.pkl``, ``voc_final.pkl`` and, if present, ``ddi_A_final.pkl`` (the
    DDI relation; without it the bundled TWOSIDES pairs are mapped); ``ehr_adj_final.pkl`` and
    ``ddi_mask_H.pkl`` are checked against the vocabulary and not used (:func:`_check_unused`).
    Duplicate codes inside one visit are removed (first occurrence kept) and counted. If
    ``stats`` is given it is filled with the files used and the counts. Every malformed input
    raises :class:`DataError` naming the file and the patient / visit.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a directory (expected SafeDrug's output folder)", path=root)
    for name in (RECORDS_FILE, VOC_FILE):
        if not (root / name).is_file():
            raise DataError(f"missing {name} (SafeDrug's preprocessing writes it)",
                            path=root / name)
    voc, sizes = _load_vocabularies(root)
    rec_path = root / RECORDS_FILE
    # numpy scalars are harmless and some re-implementations store indices as np.int64.
    nested, counts = check_records(load_plain_pickle(rec_path, allowed=NUMPY_GLOBALS),
                                   rec_path, sizes)
    if any(counts.values()):
        log.warning("%s: removed duplicate codes inside visits: %s", rec_path, counts)
    ddi_pairs = None
    if (root / DDI_FILE).is_file():
        ddi_pairs = _load_ddi(root / DDI_FILE, sizes["med"])
    unused = _check_unused(root, sizes["med"])
    if stats is not None:
        used = [RECORDS_FILE, VOC_FILE] + ([DDI_FILE] if ddi_pairs is not None else [])
        stats.update(files_used=", ".join(used),
                     files_checked_not_used=", ".join(unused) or "none", **counts)
    try:
        return MedicalRecords.from_nested(
            nested, voc["diag_voc"], voc["pro_voc"], voc["med_voc"], ddi_pairs=ddi_pairs,
            source="safedrug",
        )
    except DataError as exc:  # e.g. a vocabulary listing one code twice
        raise DataError(str(exc), path=root) from exc


def _safedrug_files(records: MedicalRecords) -> dict[str, object]:
    """What :func:`write_safedrug` pickles, by file name."""
    vocs = {key: Voc(records.voc(kind)) for kind, key in _VOC_KEY.items()}
    n_med = len(records.med_voc)
    # visit × medication incidence; M^T M counts co-prescriptions (SafeDrug's ehr_adj).
    inc = sp.csr_matrix(
        (np.ones(len(records.med)), (records.entry_visit("med"), records.med)),
        shape=(records.n_visits, n_med),
    )
    ehr = ((inc.T @ inc).toarray() > 0).astype(np.float64)
    np.fill_diagonal(ehr, 0)
    files = {RECORDS_FILE: records.to_nested(),
             VOC_FILE: {k: vocs[k] for k in ("diag_voc", "med_voc", "pro_voc")},
             EHR_FILE: ehr}
    if records.ddi_pairs is not None:
        pairs = np.asarray(records.ddi_pairs, dtype=np.int64).reshape(-1, 2)
        ddi = np.zeros((n_med, n_med))
        ddi[pairs[:, 0], pairs[:, 1]] = 1
        ddi[pairs[:, 1], pairs[:, 0]] = 1
        files[DDI_FILE] = ddi
    return files


def write_safedrug(records: MedicalRecords, path: str | os.PathLike[str]) -> None:
    """Write ``records`` as a SafeDrug directory that :func:`load_safedrug` (and SafeDrug) reads.

    Writes ``records_final.pkl``, ``voc_final.pkl``, ``ehr_adj_final.pkl`` (co-prescriptions in
    one visit) and, when ``records.ddi_pairs`` is set, ``ddi_A_final.pkl`` (float64, like
    SafeDrug's); otherwise an old ``ddi_A_final.pkl`` there is removed afterwards so that the
    directory stays consistent. All files or none are written (they are moved into place from
    a temporary folder beside ``path`` once complete).
    """
    records.validate()
    root = Path(path)
    with atomic_directory(root) as tmp:
        for name, obj in _safedrug_files(records).items():
            with atomic_write(tmp / name, "wb") as f:
                pickle.dump(obj, f, protocol=4)
    if records.ddi_pairs is None:
        (root / DDI_FILE).unlink(missing_ok=True)
