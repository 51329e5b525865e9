"""Export a built dataset to the formats other recommender tools read, and read RecBole's back.

- ``diffkg``: ``trnMat.pkl`` / ``valMat.pkl`` / ``tstMat.pkl`` (pickled ``scipy.sparse.coo_matrix``,
  float32 ones, users × items: DiffKG's layout; ``valMat.pkl`` is ours, DiffKG ignores it) and
  ``kg.txt`` (``h r t`` lines).
- ``kgat``: ``train.txt`` / ``valid.txt`` / ``test.txt`` (a user id then its item ids; every user
  gets a ``train.txt`` line so that the user count survives) and ``kg_final.txt`` (``h r t``).
- ``recbole``: atomic files ``NAME.inter`` (all interactions), ``NAME.{train,valid,test}.inter``
  (RecBole's ``benchmark_filename`` layout), ``NAME.kg`` (relation tokens are relation names) and
  ``NAME.link`` (item -> entity; items are entities ``0 … n_items-1``).
- ``triplets``: the seed paper's flattened view: diagnosis ids 0–2999, procedures 3000–5999,
  medications 6000–8999. ``patient_triplets.txt`` holds ``patient flat_id 1`` for every
  diagnosis and procedure of a patient's visits and every *training* medication (held-out
  medications are targets, never inputs); ``kg_triplets.txt`` holds the KG triplets between
  those three kinds as ``flat_h r flat_t`` (ATC class entities have no range there and are left
  out). A vocabulary larger than its range of 3000 raises :class:`DataError`.

A format writes all of its files or none (written beside the output folder, then moved in).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.dataset import SPLITS, KGDataset, to_csr, unique_int, unique_triplets
from diffkg_fast.data.errors import DataError, excerpt
from diffkg_fast.utils.io import atomic_directory, atomic_write

FLAT_RANGE = 3000  # ids per kind in the seed's flattened view
FLAT_OFFSET = {"diagnosis": 0, "procedure": 3000, "medication": 6000}


def _write_lines(path: Path, header: str | None, columns: list[np.ndarray]) -> None:
    with atomic_write(path, "w") as f:
        if header is not None:
            f.write(header + "\n")
        if len(columns[0]):
            np.savetxt(f, np.stack(columns, axis=1), fmt="%d", delimiter="\t" if header else " ")


def _write_kgat_interactions(path: Path, m: sp.csr_matrix, all_users: bool) -> None:
    with atomic_write(path, "w") as f:
        for u in range(m.shape[0]):
            items = m.indices[m.indptr[u] : m.indptr[u + 1]]
            if len(items) or all_users:
                f.write(" ".join(map(str, [u, *items.tolist()])) + "\n")


def export_diffkg(ds: KGDataset, out: Path) -> list[Path]:
    files = []
    for split, fname in zip(SPLITS, ("trnMat.pkl", "valMat.pkl", "tstMat.pkl"), strict=True):
        with atomic_write(out / fname, "wb") as f:
            pickle.dump(getattr(ds, split).tocoo(), f, protocol=4)
        files.append(out / fname)
    _write_lines(out / "kg.txt", None, [ds.kg[:, 0], ds.kg[:, 1], ds.kg[:, 2]])
    return [*files, out / "kg.txt"]


def export_kgat(ds: KGDataset, out: Path) -> list[Path]:
    files = []
    for split, fname in zip(SPLITS, ("train.txt", "valid.txt", "test.txt"), strict=True):
        _write_kgat_interactions(out / fname, getattr(ds, split), all_users=split == "train")
        files.append(out / fname)
    _write_lines(out / "kg_final.txt", None, [ds.kg[:, 0], ds.kg[:, 1], ds.kg[:, 2]])
    return [*files, out / "kg_final.txt"]


def export_recbole(ds: KGDataset, out: Path) -> list[Path]:
    name = ds.name
    header = "user_id:token\titem_id:token"
    files = []
    for split in (None, *SPLITS):
        m = ds.train + ds.valid + ds.test if split is None else getattr(ds, split)
        coo = m.tocoo()
        fname = out / (f"{name}.inter" if split is None else f"{name}.{split}.inter")
        _write_lines(fname, header, [coo.row, coo.col])
        files.append(fname)
    with atomic_write(out / f"{name}.kg", "w") as f:
        f.write("head_id:token\trelation_id:token\ttail_id:token\n")
        rel = np.asarray(ds.relation_names, dtype=object)[ds.kg[:, 1]]
        for h, r, t in zip(ds.kg[:, 0].tolist(), rel.tolist(), ds.kg[:, 2].tolist(), strict=True):
            f.write(f"{h}\t{r}\t{t}\n")
    items = np.arange(ds.n_items)
    _write_lines(out / f"{name}.link", "item_id:token\tentity_id:token", [items, items])
    return [*files, out / f"{name}.kg", out / f"{name}.link"]


def _flat_ids(ds: KGDataset) -> np.ndarray:
    """Flattened id of every entity (-1 for kinds outside the view)."""
    flat = np.full(ds.n_entities, -1, dtype=np.int64)
    for kind, offset in FLAT_OFFSET.items():
        if kind not in ds.entity_type_names:
            raise DataError(f"the flattened view needs {kind} entities; this dataset has "
                            f"{ds.entity_type_names}", field="entity_type_names")
        ids = np.flatnonzero(ds.entity_type == ds.entity_type_names.index(kind))
        if len(ids) > FLAT_RANGE:
            raise DataError(
                f"{len(ids)} {kind} codes do not fit the flattened range "
                f"{offset}–{offset + FLAT_RANGE - 1} ({FLAT_RANGE} ids)",
                field=f"{kind} vocabulary",
            )
        flat[ids] = offset + np.arange(len(ids))
    return flat


def export_triplets(ds: KGDataset, out: Path) -> list[Path]:
    if ds.visits is None:
        raise DataError("the flattened triplet view needs patient visits (a medication dataset)",
                        field="visits")
    flat = _flat_ids(ds)
    v = ds.visits
    pats, ents = [], []
    for kind in ("diag", "proc"):
        ptr = getattr(v, f"{kind}_ptr")
        pats.append(np.repeat(v.patient, np.diff(ptr)))
        ents.append(flat[getattr(v, kind)])
    coo = ds.train.tocoo()
    pats.append(coo.row.astype(np.int64))
    ents.append(flat[coo.col])
    p, e = np.concatenate(pats), np.concatenate(ents)
    key = unique_int(p * FLAT_RANGE * 3 + e)
    p, e = np.divmod(key, FLAT_RANGE * 3)
    _write_lines(out / "patient_triplets.txt", None, [p, e, np.ones_like(p)])
    h, t = flat[ds.kg[:, 0]], flat[ds.kg[:, 2]]
    keep = (h >= 0) & (t >= 0)
    _write_lines(out / "kg_triplets.txt", None, [h[keep], ds.kg[keep, 1], t[keep]])
    return [out / "patient_triplets.txt", out / "kg_triplets.txt"]


EXPORTERS: dict[str, Callable[[KGDataset, Path], list[Path]]] = {
    "diffkg": export_diffkg,
    "kgat": export_kgat,
    "recbole": export_recbole,
    "triplets": export_triplets,
}


def export_dataset(ds: KGDataset, fmt: str, out: str | os.PathLike[str]) -> list[Path]:
    """Write ``ds`` in format ``fmt`` into directory ``out``; returns the files written.

    All files or none: they are written into a temporary folder beside ``out`` and moved in
    only when every one is complete (:func:`~diffkg_fast.utils.io.atomic_directory`). An
    error of the operating system (full disk, no permission, ``out`` a file) is a
    :class:`DataError` naming ``out``.
    """
    if fmt not in EXPORTERS:
        raise DataError(f"unknown format {fmt!r}; expected one of {sorted(EXPORTERS)}",
                        field="format")
    out = Path(out)
    try:
        # All or nothing: a full disk after two of six files leaves none of them.
        with atomic_directory(out) as tmp:
            written = EXPORTERS[fmt](ds, tmp)
    except OSError as exc:
        raise DataError(f"cannot write the {fmt} export: {exc.strerror or exc} (nothing was "
                        "written)", path=out) from exc
    return [out / f.relative_to(tmp) for f in written]


def _read_atomic(path: Path, fields: list[str]) -> list[list[str]]:
    if not path.is_file():
        raise DataError("missing RecBole atomic file", path=path)
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header != fields:
            raise DataError(f"header {excerpt(header, 200)} != expected {fields}", path=path,
                            line=1)
        rows = []
        for lineno, line in enumerate(f, start=2):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != len(fields):
                raise DataError(f"expected {len(fields)} tab-separated fields, got {len(parts)}",
                                path=path, line=lineno)
            rows.append(parts)
    return rows


def _int_column(rows: list[list[str]], col: int, path: Path, field: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        if not r[col].isdigit():
            raise DataError(f"expected a non-negative integer token, got {excerpt(r[col])}",
                            path=path, line=i + 2, field=field)
        out[i] = int(r[col])
    return out


def load_recbole(path: str | os.PathLike[str], name: str) -> KGDataset:
    """Read the atomic files :func:`export_recbole` writes (integer user / item / entity tokens).

    Meant for round trips and small files: it parses line by line.
    """
    path = Path(path)
    inter_fields = ["user_id:token", "item_id:token"]
    parts = {}
    for split in SPLITS:
        f = path / f"{name}.{split}.inter"
        rows = _read_atomic(f, inter_fields)
        parts[split] = (_int_column(rows, 0, f, "user_id"), _int_column(rows, 1, f, "item_id"))
    kg_file = path / f"{name}.kg"
    kg_rows = _read_atomic(kg_file, ["head_id:token", "relation_id:token", "tail_id:token"])
    link_file = path / f"{name}.link"
    link = _read_atomic(link_file, ["item_id:token", "entity_id:token"])
    items, ents = (_int_column(link, 0, link_file, "item_id"),
                   _int_column(link, 1, link_file, "entity_id"))
    if np.any(items != ents):
        raise DataError("diffkg-fast reads links only where item id == entity id", path=link_file)
    relation_names: list[str] = []
    rel_id: dict[str, int] = {}
    rels = np.empty(len(kg_rows), dtype=np.int64)
    for i, r in enumerate(kg_rows):
        rels[i] = rel_id.setdefault(r[1], len(rel_id))
        if rels[i] == len(relation_names):
            relation_names.append(r[1])
    heads = _int_column(kg_rows, 0, kg_file, "head_id")
    tails = _int_column(kg_rows, 2, kg_file, "tail_id")
    n_users = 1 + max((int(u.max()) for u, _ in parts.values() if len(u)), default=-1)
    n_items = max(len(items), 1 + max((int(i.max()) for _, i in parts.values() if len(i)),
                                      default=-1))
    kg = unique_triplets(np.stack([heads, rels, tails], axis=1))
    n_entities = max(n_items, 1 + int(max(heads.max(initial=-1), tails.max(initial=-1))))
    ds = KGDataset(
        name=name,
        kg=kg,
        n_entities=n_entities,
        relation_names=relation_names,
        entity_type=(np.arange(n_entities) >= n_items).astype(np.int8),
        entity_type_names=["item", "entity"],
        split="given",
        meta={"source": "recbole"},
        **{s: to_csr(u, i, (n_users, n_items)) for s, (u, i) in parts.items()},
    )
    ds.validate()
    return ds
