"""Load the public KG-recommendation benchmarks: DiffKG's pickles and KGAT's text files.

- DiffKG: ``trnMat.pkl`` / ``tstMat.pkl`` (and our exporter's ``valMat.pkl``), pickled scipy
  user × item matrices that DiffKG binarises, plus ``kg.txt`` (``h r t`` lines).
- KGAT / SSLRec: ``train.txt`` / ``test.txt`` (and optional ``valid.txt``), each line a user id
  followed by its item ids, plus ``kg_final.txt`` (``h r t`` lines).

Items are entities ``0 … n_items-1``, the KGAT convention. Text files are read by the numba
scanner of :mod:`diffkg_fast.data.textscan`.

**Validation split.** DiffKG's published folders hold ``trnMat.pkl`` and ``tstMat.pkl`` only,
and many KGAT folders have no ``valid.txt``. Without a validation file, ``valid_fraction`` of
each user's distinct training interactions (``floor(f n + 1/2)``, the user keeping at least one)
become the validation split, drawn with ``seed``, so that model selection and early stopping
work on the published data; ``valid_fraction=0`` keeps it empty. An *empty* validation file is
an empty validation split (the exporters write one for a dataset without validation data, and
the round trip keeps it). ``meta['validation']`` records which it was; ``data stats`` shows it.

**Id spaces.** Users, items, entities and relations number ``largest id + 1``, and per-id arrays
(CSR row pointers, entity types) are allocated at that size, so a stray id of 99,999,999 in a
small file would allocate gigabytes. Each space may therefore hold at most
``max(ids that occur, ID_SLACK)`` ids that never occur, unless ``sparse_ids=True``; and every id
is at most ``max_id`` (a ceiling, int32 at most for CSR indices).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.dataset import KGDataset, csr_from_keys, unique_int, unique_triplets
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.kgrec_synthetic import write_kgat_synthetic as write_kgat_synthetic
from diffkg_fast.data.medkg import split_interactions
from diffkg_fast.data.textscan import read_interactions, read_triplet_lines
from diffkg_fast.data.unpickle import SPARSE_GLOBALS, load_plain_pickle

# The largest public benchmarks have ~10**5 ids; callers with bigger id spaces pass ``max_id``.
DEFAULT_MAX_ID = 100_000_000
_INT32_MAX = 2**31 - 1
# Unused ids an id space may hold regardless of how many occur (module docstring): 8 MiB of
# int64 row pointers.
ID_SLACK = 1 << 20
DEFAULT_VALID_FRACTION = 0.1

# (file, ids in file order, their 0-based lines or None for pickled matrices)
Source = tuple[Path, np.ndarray, np.ndarray | None]


def _check_dense(what: str, span: int, sources: list[Source], sparse_ids: bool) -> None:
    """Refuse an id space of ``span`` ids far larger than the ids that occur in ``sources``."""
    ids = np.concatenate([s[1] for s in sources]) if sources else np.zeros(0, np.int64)
    present = len(unique_int(ids))
    if sparse_ids or span - present <= max(present, ID_SLACK):
        return
    top = int(ids.max()) if len(ids) else -1
    path, line = sources[0][0], None
    if top == span - 1:  # the largest id occurs: name its first file and line
        path, x, lines = next(s for s in sources if len(s[1]) and s[1].max() == top)
        line = None if lines is None else int(lines[np.argmax(x == top)]) + 1
        how = f"{what} id {top:,} makes {span:,} {what}s"
    else:
        how = f"the matrix shape declares {span:,} {what}s"
    raise DataError(
        f"{how}, but only {present:,} distinct {what}s occur: {span - present:,} unused ids "
        f"would be allocated (at most max(ids used, {ID_SLACK:,}) are; public benchmarks number "
        "their ids 0 … n-1). Pass sparse_ids=true (--set sparse_ids=true) to allow it, up to "
        "max_id", path=path, line=line)


def _carve_validation(train: np.ndarray, n_items: int, fraction: float, seed: int,
                      n_users: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split sorted distinct ``user * n_items + item`` training keys into (train, valid, meta)."""
    users, items = np.divmod(train, max(n_items, 1))
    part = split_interactions(users, items, n_users, np.random.default_rng(seed),
                              ratios=(fraction, 0.0))
    valid = train[part == 1]
    meta = {"from": "train", "fraction": fraction, "seed": seed,
            "interactions": len(valid),
            "users": len(unique_int(users[part == 1]))}
    return train[part == 0], valid, meta


def _build(name: str, splits: dict[str, tuple[Path, np.ndarray, np.ndarray | None]],
           shape: tuple[int, int], triplets: np.ndarray, meta: dict,
           carve: tuple[float, int]) -> KGDataset:
    """Assemble and check a dataset from per-split ``(file, keys, lines)`` and the raw triplets.

    ``keys`` are ``user * n_items + item`` in file order; ``lines`` their 0-based lines (None
    for pickled matrices). An interaction of valid / test already in an earlier split raises
    :class:`DataError` naming the later file and its first offending line (or user). Without a
    ``valid`` entry, ``carve = (fraction, seed)`` takes the validation split from train.
    """
    n_users, n_items = shape
    uniq: dict[str, np.ndarray] = {}
    meta["duplicate_interactions"] = {}
    for split in ("train", "valid", "test"):
        if split in splits:
            keys = splits[split][1]
            distinct = unique_int(keys)
            meta["duplicate_interactions"][split] = len(keys) - len(distinct)
            _check_overlap(split, distinct, splits, uniq, n_items)
            uniq[split] = distinct
    if "valid" in splits:
        meta["validation"] = {"from": splits["valid"][0].name}
    elif carve[0] > 0:
        uniq["train"], uniq["valid"], meta["validation"] = _carve_validation(
            uniq["train"], n_items, carve[0], carve[1], n_users)
    else:
        meta["validation"] = {"from": "none"}
    mats = {s: csr_from_keys(uniq.get(s, np.zeros(0, np.int64)), shape)
            for s in ("train", "valid", "test")}
    kg = unique_triplets(triplets)
    meta["duplicate_triplets"] = len(triplets) - len(kg)
    n_rel = int(kg[:, 1].max()) + 1 if len(kg) else 0
    n_ent = max(n_items, int(kg[:, [0, 2]].max()) + 1 if len(kg) else 0)
    entity_type = np.ones(n_ent, dtype=np.int8)
    entity_type[:n_items] = 0
    ds = KGDataset(
        name=name, kg=kg, n_entities=n_ent,
        relation_names=[f"r{i}" for i in range(n_rel)], entity_type=entity_type,
        entity_type_names=["item", "entity"], split="given", meta=meta,
        seed=carve[1] if meta["validation"]["from"] == "train" else None, **mats,
    )
    ds.validate()
    return ds


def _check_overlap(split: str, distinct: np.ndarray,
                   splits: dict[str, tuple[Path, np.ndarray, np.ndarray | None]],
                   earlier: dict[str, np.ndarray], n_items: int) -> None:
    """Refuse an interaction of ``split`` that an ``earlier`` split holds (first in file order)."""
    path, keys, lines = splits[split]
    for other, other_keys in earlier.items():
        if not len(other_keys) or not len(keys):
            continue
        pos = np.searchsorted(other_keys, keys)
        pos[pos == len(other_keys)] = 0
        hit = np.flatnonzero(other_keys[pos] == keys)  # in file order: first is reported
        if len(hit):
            u, i = divmod(int(keys[hit[0]]), max(n_items, 1))
            n_hit = len(np.intersect1d(distinct, other_keys, assume_unique=True))
            raise DataError(
                f"user {u} item {i} is also in {splits[other][0].name} ({n_hit} "
                f"interactions are in both {other} and {split}; the splits must not overlap)",
                path=path, line=None if lines is None else int(lines[hit[0]]) + 1,
                field=None if lines is not None else f"user {u}",
            )


def _dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a directory (expected a dataset folder)", path=root)
    return root


def _check_options(max_id: int, valid_fraction: float) -> int:
    if not 0 <= max_id <= _INT32_MAX - 1:
        raise DataError(f"must be in [0, {_INT32_MAX - 1}] (int32 CSR indices)", field="max_id")
    if not 0 <= valid_fraction < 1:
        raise DataError(f"must be in [0, 1), got {valid_fraction}", field="valid_fraction")
    return int(max_id)


def _triplet_sources(path: Path, kg: np.ndarray, lines: np.ndarray) -> dict[str, list[Source]]:
    return {"entity": [(path, kg[:, 0], lines), (path, kg[:, 2], lines)],
            "relation": [(path, kg[:, 1], lines)]}


def load_kgat(path: str | os.PathLike[str], *, max_id: int = DEFAULT_MAX_ID,
              valid_fraction: float = DEFAULT_VALID_FRACTION, seed: int = 0,
              sparse_ids: bool = False) -> KGDataset:
    """Load a KGAT / SSLRec folder: ``train.txt``, ``test.txt``, ``valid.txt``?, ``kg_final.txt``.

    Users number ``max user id + 1`` and items ``max item id + 1`` over all interaction files;
    entities ``max(n_items, max KG entity + 1)``; relations ``max relation id + 1`` (named
    ``r0``, ``r1``, …). Duplicates are dropped and counted in ``meta``. ``valid.txt`` may be
    empty (an empty validation split); without it one is carved out of train (module
    docstring). Raises :class:`DataError` (file, line, token) on any malformed input,
    overlapping splits, or an id space far larger than its ids (``sparse_ids``).
    """
    max_id = _check_options(max_id, valid_fraction)
    root = _dir(path)
    parsed = {}
    for split, fname in (("train", "train.txt"), ("test", "test.txt"), ("valid", "valid.txt")):
        p = root / fname
        if split == "valid" and not p.exists():
            continue
        users, inter = read_interactions(p, max_id, allow_empty=split == "valid")
        if split == "train" and inter.shape[1] == 0:
            raise DataError("no interaction: every line holds only a user id", path=p)
        parsed[split] = (p, users, inter)
    kg_path = root / "kg_final.txt"
    triplets, kg_lines = read_triplet_lines(kg_path, max_id)
    n_users = max(int(u[0].max(initial=-1)) for _, u, _ in parsed.values()) + 1
    n_items = max(int(x[1].max(initial=-1)) + 1 for _, _, x in parsed.values())
    kg_src = _triplet_sources(kg_path, triplets, kg_lines)
    _check_dense("user", n_users, [(p, u[0], u[1]) for p, u, _ in parsed.values()], sparse_ids)
    items = [(p, x[1], x[2]) for p, _, x in parsed.values()]
    _check_dense("item", n_items, items, sparse_ids)
    ent_span = max(n_items, int(triplets[:, [0, 2]].max()) + 1)
    _check_dense("entity", ent_span, items + kg_src["entity"], sparse_ids)
    _check_dense("relation", int(triplets[:, 1].max()) + 1, kg_src["relation"], sparse_ids)
    splits = {s: (p, x[0] * n_items + x[1], x[2]) for s, (p, _, x) in parsed.items()}
    files = [*sorted(p.name for p, _, _ in parsed.values()), "kg_final.txt"]
    meta = {"source": "kgat", "files": files}
    return _build(root.name, splits, (n_users, n_items), triplets, meta,
                  (valid_fraction, seed))


def _matrix_coo(path: Path, max_id: int) -> tuple[sp.coo_matrix, int]:
    m = load_plain_pickle(path, allowed=SPARSE_GLOBALS)
    if isinstance(m, np.ndarray) and m.ndim == 2 and m.dtype.kind in "biuf":
        m = sp.coo_matrix(m)
    if not sp.issparse(m):
        raise DataError(f"expected a scipy sparse user × item matrix, got {type(m).__name__}",
                        path=path)
    if max(m.shape) > max_id + 1:
        raise DataError(f"shape {m.shape} exceeds max_id={max_id} (pass a larger max_id)",
                        path=path)
    m = m.tocoo()
    data = np.asarray(m.data)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError("non-finite value in the matrix", path=path)
    nz = data != 0  # DiffKG keeps (mat != 0): explicit zeros are no interaction
    non_binary = int(np.count_nonzero(nz & (data != 1)))
    return sp.coo_matrix((np.ones(int(nz.sum())), (m.row[nz], m.col[nz])), shape=m.shape), (
        non_binary)


def _load_matrices(root: Path, max_id: int) -> tuple[dict[str, tuple[Path, sp.coo_matrix]],
                                                      dict[str, int]]:
    mats: dict[str, tuple[Path, sp.coo_matrix]] = {}
    non_binary = {}
    for split, fname in (("train", "trnMat.pkl"), ("test", "tstMat.pkl"), ("valid", "valMat.pkl")):
        p = root / fname
        if split == "valid" and not p.exists():
            continue
        if not p.is_file():
            raise DataError("missing file", path=p)
        m, non_binary[split] = _matrix_coo(p, max_id)
        train_path, train_m = mats.get("train", (p, m))
        if m.shape != train_m.shape:
            raise DataError(f"shape {m.shape} differs from the shape {train_m.shape} of "
                            f"{train_path} (both must be users × items)", path=p)
        mats[split] = (p, m)
    train_path, train_m = mats["train"]
    if train_m.nnz == 0:
        raise DataError("no interaction in the training matrix", path=train_path)
    return mats, non_binary


def load_diffkg(path: str | os.PathLike[str], *, max_id: int = DEFAULT_MAX_ID,
                valid_fraction: float = DEFAULT_VALID_FRACTION, seed: int = 0,
                sparse_ids: bool = False) -> KGDataset:
    """Load a DiffKG directory (``trnMat.pkl``, ``tstMat.pkl``, ``valMat.pkl``?, ``kg.txt``).

    The pickles are read by the restricted unpickler (scipy COO / CSR and numpy only) and
    binarised like DiffKG (any nonzero value is an interaction; the count of values other than
    1 is ``meta['non_binary_values']``). All matrices must share one shape, which may not hold
    far more users or items than occur (``sparse_ids``). Without ``valMat.pkl`` a validation
    split is carved out of train (module docstring).
    """
    max_id = _check_options(max_id, valid_fraction)
    root = _dir(path)
    mats, non_binary = _load_matrices(root, max_id)
    kg_path = root / "kg.txt"
    triplets, kg_lines = read_triplet_lines(kg_path, max_id)
    n_users, n_items = mats["train"][1].shape
    _check_dense("user", n_users, [(p, m.row, None) for p, m in mats.values()], sparse_ids)
    items = [(p, m.col, None) for p, m in mats.values()]
    _check_dense("item", n_items, items, sparse_ids)
    kg_src = _triplet_sources(kg_path, triplets, kg_lines)
    ent_span = max(n_items, int(triplets[:, [0, 2]].max()) + 1)
    _check_dense("entity", ent_span, items + kg_src["entity"], sparse_ids)
    _check_dense("relation", int(triplets[:, 1].max()) + 1, kg_src["relation"], sparse_ids)
    # Pickled matrices carry no line numbers: an overlap names the user instead.
    splits = {s: (p, m.row.astype(np.int64) * n_items + m.col, None)
              for s, (p, m) in mats.items()}
    files = [*sorted(p.name for p, _ in mats.values()), "kg.txt"]
    meta = {"source": "diffkg", "non_binary_values": non_binary, "files": files}
    return _build(root.name, splits, (n_users, n_items), triplets, meta,
                  (valid_fraction, seed))
