"""Load the public KG-recommendation benchmarks: DiffKG's pickles and KGAT's text files.

- DiffKG: ``trnMat.pkl`` / ``tstMat.pkl`` (and our exporter's ``valMat.pkl``), pickled scipy
  user × item matrices that DiffKG binarises, plus ``kg.txt`` (``h r t`` lines).
- KGAT / SSLRec: ``train.txt`` / ``test.txt`` (and optional ``valid.txt``), each line a user id
  followed by its item ids, plus ``kg_final.txt`` (``h r t`` lines).

Text files are read as bytes and tokenised by one numba scanner (no Python work per line): on a
Last-FM-size KGAT dataset (3.0 M interactions, 465 k triplets) a load takes about a second (see
``bench/bench_load.py``). Items are entities ``0 … n_items-1``, the KGAT convention.
"""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp

from diffkg_fast.data.dataset import KGDataset, csr_from_keys, unique_int, unique_triplets
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.unpickle import SPARSE_GLOBALS, load_plain_pickle
from diffkg_fast.utils.io import atomic_write

# Ids size dense per-id arrays (CSR row pointers, entity types), so an id of 10**9 typed by
# mistake would allocate gigabytes before anything looks wrong. The largest public benchmarks
# have ~10**5 ids; callers with bigger id spaces pass ``max_id``. Never above int32 (CSR indices).
DEFAULT_MAX_ID = 100_000_000
_INT32_MAX = 2**31 - 1

# Scanner status codes.
_OK, _BAD_BYTE, _TOO_LARGE = 0, 1, 2


@numba.njit(cache=True, nogil=True)
def _scan(buf: np.ndarray, max_value: int) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Tokenise ASCII non-negative ints separated by spaces / tabs, lines by ``\\n`` or ``\\r\\n``.

    Returns ``(values, line_of_value, n_lines, status, position)``: ``status`` is ``_OK``, or
    ``_BAD_BYTE`` / ``_TOO_LARGE`` with ``position`` the offending byte (values cut there).
    """
    n = buf.size
    # First pass counts digit runs so that the output arrays are allocated once, exactly.
    count = 0
    prev_digit = False
    for i in range(n):
        d = 48 <= buf[i] <= 57
        if d and not prev_digit:
            count += 1
        prev_digit = d
    vals = np.empty(count, np.int64)
    lines = np.empty(count, np.int64)
    k = 0
    line = 0
    i = 0
    while i < n:
        c = buf[i]
        if 48 <= c <= 57:
            v = 0
            while i < n and 48 <= buf[i] <= 57:
                v = v * 10 + (buf[i] - 48)
                if v > max_value:
                    return vals[:k], lines[:k], line + 1, _TOO_LARGE, i
                i += 1
            if i < n and not (buf[i] == 32 or buf[i] == 9 or buf[i] == 10 or buf[i] == 13):
                return vals[:k], lines[:k], line + 1, _BAD_BYTE, i
            vals[k] = v
            lines[k] = line
            k += 1
        elif c == 32 or c == 9:
            i += 1
        elif c == 10:
            line += 1
            i += 1
        elif c == 13 and i + 1 < n and buf[i + 1] == 10:
            i += 1
        else:
            return vals[:k], lines[:k], line + 1, _BAD_BYTE, i
    return vals, lines, line + 1, _OK, -1


def _read(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError("missing file", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", path=path) from exc


def _token_at(buf: np.ndarray, pos: int) -> tuple[int, str]:
    """1-based line and the whitespace-delimited token around byte ``pos`` (error path only)."""
    line = int(np.count_nonzero(buf[:pos] == 10)) + 1
    ws = (32, 9, 10, 13)
    lo = pos  # at most 40 bytes either side: a bad "token" may be megabytes without a blank
    while lo > 0 and buf[lo - 1] not in ws and pos - lo < 40:
        lo -= 1
    hi = pos + 1
    while hi < len(buf) and buf[hi] not in ws and hi - pos < 40:
        hi += 1
    return line, bytes(buf[lo:hi]).decode("utf-8", errors="replace")


def scan_ints(path: Path, max_id: int) -> tuple[np.ndarray, np.ndarray]:
    """All integers of a whitespace-separated text file and the 0-based line of each.

    Raises :class:`DataError` naming the file, the 1-based line and the token for anything that
    is not a non-negative integer ``<= max_id``, and for a file without any value.
    """
    buf = _read(path)
    vals, lines, _n_lines, status, pos = _scan(buf, max_id)
    if status != _OK:
        line, token = _token_at(buf, pos)
        if status == _TOO_LARGE:
            what = f"id {token!r} is larger than max_id={max_id} (pass a larger max_id)"
        elif token.startswith("-") and token[1:].isdigit():
            what = f"negative id {token!r}: ids are non-negative integers"
        elif buf[pos] == 13:
            what = "a carriage return not followed by a newline: lines end in \\n or \\r\\n"
        else:
            what = (f"bad token {token!r} (byte {bytes(buf[pos:pos + 1])!r}): expected "
                    "non-negative integers separated by spaces or tabs")
        raise DataError(what, path=path, line=line)
    if len(vals) == 0:
        raise DataError("empty file: no integer in it", path=path)
    return vals, lines


def _line_starts(lines: np.ndarray) -> np.ndarray:
    first = np.ones(len(lines), dtype=bool)
    first[1:] = lines[1:] != lines[:-1]
    return first


def read_interactions(path: Path, max_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A KGAT interaction file (``user item item …`` lines, blank lines allowed).

    Returns the user id of every non-blank line (users without items included) and a
    ``(3, n)`` int64 array whose columns are the interactions' user, item and 0-based line.
    """
    vals, lines = scan_ints(path, max_id)
    first = _line_starts(lines)
    users = vals[first]
    owner = users[np.cumsum(first) - 1]  # the first value of its line is each value's user
    item = ~first
    return users, np.stack([owner[item], vals[item], lines[item]])


def read_triplets(path: Path, max_id: int) -> np.ndarray:
    """``h r t`` lines (blank lines allowed) as an ``(n, 3)`` int64 array in file order."""
    vals, lines = scan_ints(path, max_id)
    first = _line_starts(lines)
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(vals)))
    bad = np.flatnonzero(counts != 3)
    if len(bad):
        b = starts[bad[0]]
        fields = " ".join(map(str, vals[b : b + min(int(counts[bad[0]]), 5)].tolist()))
        raise DataError(
            f"expected 3 fields 'head relation tail', got {counts[bad[0]]}: {fields!r}"
            f"{' …' if counts[bad[0]] > 5 else ''}",
            path=path, line=int(lines[b]) + 1,
        )
    return vals.reshape(-1, 3)


def _build(
    name: str,
    splits: dict[str, tuple[Path, np.ndarray, np.ndarray | None]],
    n_users: int,
    n_items: int,
    triplets: np.ndarray,
    meta: dict,
) -> KGDataset:
    """Assemble and check a dataset from per-split ``(file, keys, lines)`` and the raw triplets.

    ``keys`` are ``user * n_items + item`` in file order; ``lines`` their 0-based lines (None
    for pickled matrices). An interaction of valid / test already in an earlier split raises
    :class:`DataError` naming the later file and its first offending line (or user).
    """
    shape = (n_users, n_items)
    mats: dict[str, sp.csr_matrix] = {}
    seen: list[tuple[str, np.ndarray]] = []
    dups = {}
    for split in ("train", "valid", "test"):
        if split not in splits:
            mats[split] = csr_from_keys(np.zeros(0, np.int64), shape)
            continue
        path, keys, lines = splits[split]
        uniq = unique_int(keys)
        dups[split] = len(keys) - len(uniq)
        for other, other_keys in seen:
            if not len(other_keys) or not len(keys):
                continue
            pos = np.searchsorted(other_keys, keys)
            pos[pos == len(other_keys)] = 0
            hit = np.flatnonzero(other_keys[pos] == keys)  # in file order: first is reported
            if len(hit):
                u, i = divmod(int(keys[hit[0]]), max(n_items, 1))
                n_hit = len(np.intersect1d(uniq, other_keys, assume_unique=True))
                raise DataError(
                    f"user {u} item {i} is also in {splits[other][0].name} ({n_hit} "
                    f"interactions are in both {other} and {split}; the splits must not overlap)",
                    path=path, line=None if lines is None else int(lines[hit[0]]) + 1,
                    field=None if lines is not None else f"user {u}",
                )
        seen.append((split, uniq))
        mats[split] = csr_from_keys(uniq, shape)
    meta["duplicate_interactions"] = dups
    kg = unique_triplets(triplets)
    meta["duplicate_triplets"] = len(triplets) - len(kg)
    n_rel = int(kg[:, 1].max()) + 1 if len(kg) else 0
    n_ent = max(n_items, int(kg[:, [0, 2]].max()) + 1 if len(kg) else 0)
    entity_type = np.ones(n_ent, dtype=np.int8)
    entity_type[:n_items] = 0
    ds = KGDataset(
        name=name, train=mats["train"], valid=mats["valid"], test=mats["test"],
        kg=kg, n_entities=n_ent,
        relation_names=[f"r{i}" for i in range(n_rel)], entity_type=entity_type,
        entity_type_names=["item", "entity"], split="given", meta=meta,
    )
    ds.validate()
    return ds


def _dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a directory (expected a dataset folder)", path=root)
    return root


def _check_max_id(max_id: int) -> int:
    if not 0 <= max_id <= _INT32_MAX - 1:
        raise DataError(f"must be in [0, {_INT32_MAX - 1}] (int32 CSR indices)", field="max_id")
    return int(max_id)


def load_kgat(path: str | os.PathLike[str], *, max_id: int = DEFAULT_MAX_ID) -> KGDataset:
    """Load a KGAT / SSLRec folder: ``train.txt``, ``test.txt``, ``valid.txt``?, ``kg_final.txt``.

    Users number ``max user id + 1`` and items ``max item id + 1`` over all interaction files;
    entities ``max(n_items, max KG entity + 1)``; relations ``max relation id + 1`` (named
    ``r0``, ``r1``, …). Duplicates are dropped and counted in ``meta``. Raises
    :class:`DataError` (file, line, token) on any malformed input or overlapping splits.
    """
    max_id = _check_max_id(max_id)
    root = _dir(path)
    parsed = {}
    for split, fname in (("train", "train.txt"), ("test", "test.txt"), ("valid", "valid.txt")):
        p = root / fname
        if split == "valid" and not p.exists():
            continue
        users, inter = read_interactions(p, max_id)
        if split == "train" and inter.shape[1] == 0:
            raise DataError("no interaction: every line holds only a user id", path=p)
        parsed[split] = (p, users, inter)
    triplets = read_triplets(root / "kg_final.txt", max_id)
    n_users = max(int(u.max()) for _, u, _ in parsed.values()) + 1
    n_items = max(int(x[1].max()) + 1 if x.shape[1] else 0 for _, _, x in parsed.values())
    splits = {s: (p, x[0] * n_items + x[1], x[2]) for s, (p, _, x) in parsed.items()}
    files = [*sorted(p.name for p, _, _ in parsed.values()), "kg_final.txt"]
    meta = {"source": "kgat", "files": files}
    return _build(root.name, splits, n_users, n_items, triplets, meta)


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


def load_diffkg(path: str | os.PathLike[str], *, max_id: int = DEFAULT_MAX_ID) -> KGDataset:
    """Load a DiffKG directory (``trnMat.pkl``, ``tstMat.pkl``, ``valMat.pkl``?, ``kg.txt``).

    The pickles are read by the restricted unpickler (scipy COO / CSR and numpy only) and
    binarised like DiffKG (any nonzero value is an interaction; the count of values other than
    1 is ``meta['non_binary_values']``). All matrices must share one shape.
    """
    max_id = _check_max_id(max_id)
    root = _dir(path)
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
    triplets = read_triplets(root / "kg.txt", max_id)
    n_users, n_items = train_m.shape
    # Pickled matrices carry no line numbers: an overlap names the user instead.
    splits = {s: (p, m.row.astype(np.int64) * n_items + m.col, None)
              for s, (p, m) in mats.items()}
    files = [*sorted(p.name for p, _ in mats.values()), "kg.txt"]
    meta = {"source": "diffkg", "non_binary_values": non_binary, "files": files}
    return _build(root.name, splits, n_users, n_items, triplets, meta)


# ---------------------------------------------------------------------- synthetic KGAT data
def _format_ints(values: np.ndarray, seps: np.ndarray) -> bytes:
    """ASCII of non-negative ``values``, each followed by its byte in ``seps`` (vectorized)."""
    values = np.asarray(values, dtype=np.int64)
    n_digits = np.ones(len(values), dtype=np.int64)
    for p in range(1, 19):
        n_digits += values >= 10**p
    ends = np.cumsum(n_digits + 1)
    out = np.empty(int(ends[-1]) if len(values) else 0, dtype=np.uint8)
    out[ends - 1] = seps
    rest = values.copy()
    for d in range(int(n_digits.max(initial=1))):  # least significant digit first
        live = n_digits > d
        out[(ends - 2 - d)[live]] = 48 + rest[live] % 10
        rest //= 10
    return out.tobytes()


def _format_lines(users: np.ndarray, ptr: np.ndarray, items: np.ndarray) -> bytes:
    """``user item item …`` lines: row ``k`` holds ``users[k]`` and ``items[ptr[k]:ptr[k+1]]``."""
    counts = np.diff(ptr)
    starts = ptr[:-1] + np.arange(len(users))  # where each line's user goes in the flat output
    flat = np.empty(len(users) + len(items), dtype=np.int64)
    is_user = np.zeros(len(flat), dtype=bool)
    is_user[starts] = True
    flat[is_user] = users
    flat[~is_user] = items
    seps = np.full(len(flat), 32, dtype=np.uint8)
    seps[starts + counts] = 10
    return _format_ints(flat, seps)


def _top_up(rng: np.random.Generator, required: np.ndarray, target: int, draw) -> np.ndarray:
    """``required`` plus unique keys from ``draw(n)`` batches, ``target`` keys in all, sorted."""
    required = unique_int(required)
    extra = np.zeros(0, dtype=np.int64)
    while len(required) + len(extra) < target:
        batch = draw(int((target - len(required) - len(extra)) * 1.2) + 16)
        extra = unique_int(np.concatenate([extra, batch]))
        pos = np.minimum(np.searchsorted(required, extra), len(required) - 1)
        extra = extra[required[pos] != extra]
    if len(required) + len(extra) > target:
        extra = rng.choice(extra, size=max(target - len(required), 0), replace=False)
    return unique_int(np.concatenate([required, extra]))


def write_kgat_synthetic(
    path: str | os.PathLike[str],
    n_users: int,
    n_items: int,
    n_entities: int,
    n_relations: int,
    n_interactions: int,
    n_triplets: int,
    seed: int,
) -> None:
    """Write a random KGAT dataset (``train.txt``, ``test.txt``, ``kg_final.txt``) of given sizes.

    Item popularity follows a power law (weight ``rank**-0.8``); every user has an interaction,
    about 80 % of each user's interactions go to ``train.txt`` (at least one) and the rest to
    ``test.txt``. The largest user, item, entity and relation ids all occur, so loading the
    files gives exactly these sizes. Vectorized: Last-FM size is written in about 2 s.
    """
    if not (0 < n_items <= n_entities and n_users > 0 and n_relations > 0
            and n_users <= n_interactions <= n_users * n_items
            and 1 <= n_triplets <= n_entities**2 * n_relations):
        raise ValueError("inconsistent sizes for a synthetic KGAT dataset")
    rng = np.random.default_rng(seed)
    pop = rng.permutation(n_items)  # popularity rank -> item id
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -0.8)
    cdf /= cdf[-1]

    def draw_inter(n: int) -> np.ndarray:
        items = pop[np.minimum(np.searchsorted(cdf, rng.random(n)), n_items - 1)]
        return rng.integers(0, n_users, n) * n_items + items

    # One interaction per user first (so every id up to n_users - 1 occurs), the last item too.
    seed_keys = np.arange(n_users) * n_items + pop[rng.integers(0, n_items, n_users)]
    seed_keys = np.append(seed_keys, (n_users - 1) * n_items + n_items - 1)
    keys = _top_up(rng, seed_keys, n_interactions, draw_inter)
    user, item = np.divmod(keys, n_items)
    # Per-user 80/20 split: rank each user's interactions randomly, the first 80 % train.
    order = np.lexsort((rng.random(len(keys)), user))
    user, item = user[order], item[order]
    deg = np.bincount(user, minlength=n_users)
    start = np.concatenate([[0], np.cumsum(deg)[:-1]])
    rank = np.arange(len(user)) - start[user]
    n_train = np.maximum(1, np.round(deg * 0.8).astype(np.int64))
    train = rank < n_train[user]
    root = Path(path)
    for fname, mask in (("train.txt", train), ("test.txt", ~train)):
        u, it = user[mask], item[mask]
        counts = np.bincount(u, minlength=n_users)
        line_users = np.flatnonzero(counts)
        ptr = np.concatenate([[0], np.cumsum(counts[line_users])])
        with atomic_write(root / fname, "wb") as f:
            f.write(_format_lines(line_users, ptr, it))

    def draw_kg(n: int) -> np.ndarray:
        h = rng.integers(0, n_entities, n)
        return (h * n_relations + rng.integers(0, n_relations, n)) * n_entities + rng.integers(
            0, n_entities, n)

    last = np.array([(0 * n_relations + n_relations - 1) * n_entities + n_entities - 1])
    kg = _top_up(rng, last, n_triplets, draw_kg)
    hr, t = np.divmod(kg, n_entities)
    h, r = np.divmod(hr, n_relations)
    flat = np.stack([h, r, t], axis=1).ravel()
    seps = np.tile(np.array([32, 32, 10], dtype=np.uint8), len(kg))
    with atomic_write(root / "kg_final.txt", "wb") as f:
        f.write(_format_ints(flat, seps))
