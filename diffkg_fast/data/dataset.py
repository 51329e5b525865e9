"""The built dataset: interactions, patient features and the knowledge graph, with its invariants.

Id spaces (the DiffKG / KGAT convention):

- users ``0 … n_users-1`` (patients for the medication graph);
- entities ``0 … n_entities-1``, whose first ``n_items`` ids are the items (medications);
- relations ``0 … n_relations-1`` as stored; the model adds the inverse relations itself.

One file per dataset (``.npz``, no pickled objects, written atomically). The zip container's CRCs
and a SHA-256 over every array catch a corrupt or truncated file: loading either returns a dataset
that passed :meth:`KGDataset.validate` or raises :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.errors import DataError, cut, excerpt
from diffkg_fast.utils.io import atomic_write

FORMAT = "diffkg-fast-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
SPLIT_KINDS = ("interaction", "visit", "given")  # KGDataset.split
_INT32_MAX = 2**31 - 1  # CSR indices are int32
# Visit split codes stored in ``VisitFeatures.split``.
VISIT_SPLIT = {"train": 0, "valid": 1, "test": 2}


def unique_int(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array.

    ``np.unique`` takes 4.5-5.4 s on 3M random int64 keys with numpy 2.4 on the 2-core CI
    machine; a sort plus a neighbour comparison takes 0.08 s.
    """
    s = np.sort(np.asarray(keys), kind="stable")
    if len(s) < 2:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def unique_triplets(kg: np.ndarray) -> np.ndarray:
    """Distinct (h, r, t) rows of an (n, 3) int array, sorted by (h, r, t): the stored KG form."""
    kg = np.asarray(kg, dtype=np.int64).reshape(-1, 3)
    if len(kg) < 2:
        return np.ascontiguousarray(kg)
    kg = kg[np.lexsort((kg[:, 2], kg[:, 1], kg[:, 0]))]
    return np.ascontiguousarray(kg[np.concatenate(([True], np.any(kg[1:] != kg[:-1], axis=1)))])


def csr_from_keys(keys: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary canonical CSR from sorted, distinct ``row * n_cols + col`` keys."""
    n_rows, n_cols = shape
    r, c = np.divmod(np.asarray(keys, dtype=np.int64), max(n_cols, 1))
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
    m = sp.csr_matrix((np.ones(len(c), dtype=np.float32), c.astype(np.int32), indptr),
                      shape=shape)
    m.has_sorted_indices = True
    return m


def to_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary CSR with sorted column indices, duplicates merged (the canonical interaction form)."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    return csr_from_keys(unique_int(rows * max(shape[1], 1) + cols), shape)


@dataclass
class VisitFeatures:
    """Each visit's patient, split and codes, as entity ids (diagnoses, procedures) and item ids.

    ``split[v]`` is 0 / 1 / 2 (train / valid / test) for the ``visit`` split: a held-out visit's
    diagnoses and procedures are known inputs, its medications are the targets. Under the
    ``interaction`` split every visit is 0 and the held-out part is pair-wise (the CSR matrices).
    Visits of one patient are contiguous and in time order.
    """

    patient: np.ndarray
    split: np.ndarray
    diag_ptr: np.ndarray
    diag: np.ndarray
    proc_ptr: np.ndarray
    proc: np.ndarray
    med_ptr: np.ndarray
    med: np.ndarray

    ARRAYS = ("patient", "split", "diag_ptr", "diag", "proc_ptr", "proc", "med_ptr", "med")

    @property
    def n_visits(self) -> int:
        return len(self.patient)


@dataclass
class KGDataset:
    """Users × items interactions (train / valid / test CSR), the KG triplets and their names."""

    name: str
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    kg: np.ndarray  # (n_triplets, 3) int64 rows (h, r, t), sorted, unique
    n_entities: int
    relation_names: list[str]
    entity_type: np.ndarray  # int8 per entity, index into entity_type_names
    entity_type_names: list[str]
    entity_codes: list[str] = field(default_factory=list)  # e.g. "ATC3:N02B", "" when unknown
    entity_names: list[str] = field(default_factory=list)  # human readable, "" when unknown
    visits: VisitFeatures | None = None
    split: str = "given"  # "interaction", "visit" or "given" (the source fixed it)
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # source, build options, thresholds

    # ------------------------------------------------------------------ sizes
    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @property
    def n_relations(self) -> int:
        return len(self.relation_names)

    @property
    def n_triplets(self) -> int:
        return len(self.kg)

    def relation_id(self, name: str) -> int:
        try:
            return self.relation_names.index(name)
        except ValueError:
            raise DataError(f"no relation named {name!r}; have {self.relation_names}") from None

    def triplets_of(self, name: str) -> np.ndarray:
        """The (h, t) pairs of one relation."""
        return self.kg[self.kg[:, 1] == self.relation_id(name)][:, [0, 2]]

    # ------------------------------------------------------------------ invariants
    def validate(self) -> None:
        """Check every invariant; raise :class:`DataError` naming the broken field."""
        shape = self.train.shape
        for s in SPLITS:
            m = getattr(self, s)
            if not sp.issparse(m) or m.format != "csr":
                raise DataError("must be a scipy CSR matrix", field=s)
            if m.shape != shape:
                raise DataError(f"shape {m.shape} differs from train's {shape}", field=s)
            if not m.has_canonical_format:
                raise DataError("CSR must have sorted, unique column indices", field=s)
            if m.nnz and (m.data != 1).any():
                raise DataError("interactions must be binary (all stored values 1)", field=s)
        if shape[1] > self.n_entities:
            raise DataError(
                f"{shape[1]} items but only {self.n_entities} entities (items are entities "
                "0 … n_items-1)",
                field="n_entities",
            )
        for a, b in (("train", "test"), ("train", "valid"), ("valid", "test")):
            overlap = getattr(self, a).multiply(getattr(self, b)).nnz
            if overlap:
                raise DataError(f"{overlap} interactions are in both {a} and {b}", field=b)
        kg = self.kg
        if kg.ndim != 2 or kg.shape[1] != 3 or kg.dtype != np.int64:
            raise DataError("must be an int64 (n, 3) array of (h, r, t)", field="kg")
        if len(kg):
            ent = kg[:, [0, 2]]
            if ent.min() < 0 or ent.max() >= self.n_entities:
                raise DataError(f"entity id outside [0, {self.n_entities})", field="kg")
            if kg[:, 1].min() < 0 or kg[:, 1].max() >= self.n_relations:
                raise DataError(f"relation id outside [0, {self.n_relations})", field="kg")
            order = np.lexsort((kg[:, 2], kg[:, 1], kg[:, 0]))
            if np.any(order != np.arange(len(kg))):
                raise DataError("triplets must be sorted by (h, r, t)", field="kg")
            if np.any(np.all(kg[1:] == kg[:-1], axis=1)):
                raise DataError("duplicate triplet", field="kg")
        if len(self.entity_type) != self.n_entities:
            raise DataError(f"needs one entry per entity ({self.n_entities})", field="entity_type")
        if len(self.entity_type) and (
            self.entity_type.min() < 0 or self.entity_type.max() >= len(self.entity_type_names)
        ):
            raise DataError("type index outside entity_type_names", field="entity_type")
        for f in ("entity_codes", "entity_names"):
            if getattr(self, f) and len(getattr(self, f)) != self.n_entities:
                raise DataError(f"needs one entry per entity ({self.n_entities})", field=f)
        if self.visits is not None:
            self._validate_visits()

    def _validate_visits(self) -> None:
        v = self.visits
        assert v is not None
        n = v.n_visits
        if len(v.split) != n:
            raise DataError("needs one entry per visit", field="visits.split")
        if n and (v.patient.min() < 0 or v.patient.max() >= self.n_users):
            raise DataError(f"patient id outside [0, {self.n_users})", field="visits.patient")
        if n and np.any(np.diff(v.patient) < 0):
            raise DataError("visits of one patient must be contiguous, patients in order",
                            field="visits.patient")
        if n and not np.isin(v.split, (0, 1, 2)).all():
            raise DataError("split codes must be 0, 1 or 2", field="visits.split")
        bounds = {"diag": self.n_entities, "proc": self.n_entities, "med": self.n_items}
        for kind, hi in bounds.items():
            ptr, idx = getattr(v, f"{kind}_ptr"), getattr(v, kind)
            if len(ptr) != n + 1 or ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != len(idx):
                raise DataError("offsets must be n_visits + 1 non-decreasing values from 0 to "
                                "the number of codes", field=f"visits.{kind}_ptr")
            if len(idx) and (idx.min() < 0 or idx.max() >= hi):
                raise DataError(f"id outside [0, {hi})", field=f"visits.{kind}")

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one compressed ``.npz`` atomically (temp file, then rename)."""
        self.validate()
        arrays: dict[str, np.ndarray] = {}
        for s in SPLITS:
            m = getattr(self, s)
            arrays[f"{s}_indptr"] = m.indptr.astype(np.int64)
            arrays[f"{s}_indices"] = m.indices.astype(np.int64)
        arrays["kg"] = self.kg
        arrays["entity_type"] = self.entity_type.astype(np.int8)
        if self.visits is not None:
            for a in VisitFeatures.ARRAYS:
                arrays[f"visits_{a}"] = np.asarray(getattr(self.visits, a),
                                                   dtype=ARRAYS[f"visits_{a}"][0])
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_entities": self.n_entities,
            "relation_names": self.relation_names,
            "entity_type_names": self.entity_type_names,
            "entity_codes": self.entity_codes,
            "entity_names": self.entity_names,
            "split": self.split,
            "seed": self.seed,
            "meta": self.meta,
            "has_visits": self.visits is not None,
            "sha256": _digest(arrays),
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with atomic_write(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, max_bytes: int | None = None) -> KGDataset:
        """Load and validate; a corrupt, truncated or foreign file raises :class:`DataError`.

        Nothing is decompressed before the sizes the zip declares are checked: the arrays may
        take at most ``max_bytes`` decompressed (default: :data:`LOAD_RATIO` times the file's
        size, at least :data:`LOAD_FLOOR`), so that a small file cannot cost gigabytes. Every
        array's dtype and shape are checked before it is read, the header's fields after.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError("no such dataset file", path=path)
        try:
            with zipfile.ZipFile(path) as z:
                arrays = _read_members(z, path, _load_limit(path, max_bytes))
        except DataError:
            raise
        # zipfile, zlib and numpy's header parser raise many types on damaged bytes (BadZipFile,
        # zlib.error, ValueError, EOFError, struct.error …): every one means the same to a user.
        except Exception as exc:
            raise DataError(f"not a readable dataset file (corrupt or truncated?): "
                            f"{cut(str(exc))}", path=path) from exc
        header = _check_header(arrays.pop("header"), path)
        need = {k for k in ARRAYS if k != "header" and (header["has_visits"]
                                                         or not k.startswith("visits_"))}
        if need != arrays.keys():
            odd = sorted(need ^ arrays.keys())[0]
            raise DataError(f"{'missing' if odd in need else 'unexpected'} array", path=path,
                            field=odd)
        if _digest(arrays) != header["sha256"]:
            raise DataError("checksum mismatch: the file is corrupt", path=path, field="sha256")
        try:
            ds = cls._from_arrays(arrays, header, path)
            ds.validate()
        except DataError as exc:
            raise DataError(exc.message, path=path, field=exc.field) from exc
        return ds

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], header: dict, path: Path) -> KGDataset:
        shape = (header["n_users"], header["n_items"])
        mats = {}
        for s in SPLITS:
            indptr, indices = arrays[f"{s}_indptr"], arrays[f"{s}_indices"]
            if len(indptr) != shape[0] + 1 or (len(indices) and (
                    indices.min() < 0 or indices.max() >= shape[1])):
                raise DataError(f"needs n_users + 1 = {shape[0] + 1} offsets and item ids in "
                                f"[0, {shape[1]})", field=f"{s}_indptr/{s}_indices")
            mats[s] = sp.csr_matrix(
                (np.ones(len(indices), np.float32), indices.astype(np.int32), indptr),
                shape=shape,
            )
        visits = None
        if header["has_visits"]:
            visits = VisitFeatures(**{a: arrays[f"visits_{a}"] for a in VisitFeatures.ARRAYS})
        return cls(
            name=header["name"], kg=arrays["kg"], n_entities=header["n_entities"],
            relation_names=header["relation_names"], entity_type=arrays["entity_type"],
            entity_type_names=header["entity_type_names"], entity_codes=header["entity_codes"],
            entity_names=header["entity_names"], visits=visits, split=header["split"],
            seed=header["seed"], meta=header["meta"], **mats,
        )


# Decompressed arrays may take at most LOAD_RATIO × the file's size, at least LOAD_FLOOR, unless
# the caller passes max_bytes: this project's files compress 3.8-7.4 × (a Last-FM-size KGAT
# dataset, the synthetic cohort), a zip bomb about 1,000 ×.
LOAD_RATIO = 64
LOAD_FLOOR = 64 << 20
_I64, _I8 = np.dtype(np.int64), np.dtype(np.int8)
# Every array a dataset file holds: its dtype and number of dimensions.
ARRAYS: dict[str, tuple[np.dtype, int]] = {
    **{f"{s}_{a}": (_I64, 1) for s in SPLITS for a in ("indptr", "indices")},
    "kg": (_I64, 2), "entity_type": (_I8, 1), "header": (np.dtype(np.uint8), 1),
    **{f"visits_{a}": (_I8 if a == "split" else _I64, 1) for a in VisitFeatures.ARRAYS},
}
_HEADER: dict[str, tuple[type | tuple[type, ...], str]] = {
    "name": (str, "a string"), "split": (str, "a string"), "sha256": (str, "a string"),
    "n_users": (int, "a non-negative integer"), "n_items": (int, "a non-negative integer"),
    "n_entities": (int, "a non-negative integer"), "has_visits": (bool, "true or false"),
    "seed": ((int, type(None)), "an integer or null"), "meta": (dict, "an object"),
    **{k: (list, "a list of strings") for k in ("relation_names", "entity_type_names",
                                               "entity_codes", "entity_names")},
}


def _load_limit(path: Path, max_bytes: int | None) -> int:
    if max_bytes is not None:
        return int(max_bytes)
    return max(LOAD_RATIO * path.stat().st_size, LOAD_FLOOR)


def _read_members(z: zipfile.ZipFile, path: Path, limit: int) -> dict[str, np.ndarray]:
    """Every member as an array, after checking the declared sizes against ``limit``."""
    infos = z.infolist()
    keys = [i.filename.removesuffix(".npy") for i in infos]
    if "header" not in keys:
        raise DataError(f"no header: not a {FORMAT} file", path=path, field="header")
    unknown = sorted(set(keys) - ARRAYS.keys())
    if unknown or len(set(keys)) != len(keys):
        what = f"unexpected array {excerpt(unknown[0])}" if unknown else "an array stored twice"
        raise DataError(f"not a {FORMAT} file: {what}", path=path)
    total = sum(i.file_size for i in infos)
    if total > limit:
        raise DataError(
            f"the arrays would take {total:,} bytes decompressed, more than the limit of "
            f"{limit:,} ({LOAD_RATIO} × the file's size, at least {LOAD_FLOOR:,}): a damaged "
            "file or a zip bomb; if the file is right, raise the limit (max_bytes, "
            "--max-bytes)", path=path)
    return {k: _read_npy(z, i, k, path) for k, i in zip(keys, infos, strict=True)}


def _read_npy(z: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: Path) -> np.ndarray:
    want, ndim = ARRAYS[key]
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        # Checked before anything is allocated: the shape in a member's header is unchecked.
        if (dtype.kind, dtype.itemsize) != (want.kind, want.itemsize) or len(shape) != ndim \
                or fortran or (key == "kg" and shape[1] != 3):
            raise DataError(f"{'Fortran-order ' if fortran else ''}{dtype} array of shape "
                            f"{shape}, expected a {ndim}-D {want} array"
                            f"{' of shape (n, 3)' if key == 'kg' else ''}", path=path, field=key)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != info.file_size - f.tell():
            raise DataError(f"array of shape {shape} does not fill its {info.file_size} bytes",
                            path=path, field=key)
        a = np.empty(shape, dtype=dtype)
        view = memoryview(a.reshape(-1).view(np.uint8))
        got = 0
        while got < nbytes and (n := f.readinto(view[got:])):
            got += n
        if got != nbytes or f.read(1):  # the last read makes zipfile check the CRC
            raise DataError("truncated array", path=path, field=key)
    return a.astype(want, copy=False)  # native byte order


def _check_header(raw: np.ndarray, path: Path) -> dict:
    try:
        header = json.loads(raw.tobytes().decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError("unreadable header", path=path, field="header") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"not a {FORMAT} file", path=path, field="format")
    if header.get("version") != FORMAT_VERSION:
        raise DataError(f"format version {excerpt(header.get('version'))}, this code reads "
                        f"{FORMAT_VERSION}", path=path, field="version")
    for key, (kind, what) in _HEADER.items():
        value = header.get(key)
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if ok and kind is int:
            ok = 0 <= value <= _INT32_MAX
        if ok and kind is list:
            ok = all(isinstance(x, str) for x in value)
        if not ok:
            raise DataError(f"expected {what}, got {excerpt(value)}", path=path, field=key)
    if header["split"] not in SPLIT_KINDS:
        raise DataError(f"expected one of {SPLIT_KINDS}, got {excerpt(header['split'])}",
                        path=path, field="split")
    return header


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()
