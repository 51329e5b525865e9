"""Random KGAT datasets of given sizes, for benchmarks and round-trip tests (vectorized)."""

from __future__ import annotations

import os

import numpy as np

from diffkg_fast.data.dataset import unique_int
from diffkg_fast.utils.io import atomic_directory, atomic_write


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
    files: dict[str, bytes] = {}
    for fname, mask in (("train.txt", train), ("test.txt", ~train)):
        u, it = user[mask], item[mask]
        counts = np.bincount(u, minlength=n_users)
        line_users = np.flatnonzero(counts)
        ptr = np.concatenate([[0], np.cumsum(counts[line_users])])
        files[fname] = _format_lines(line_users, ptr, it)

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
    files["kg_final.txt"] = _format_ints(flat, seps)
    with atomic_directory(path) as tmp:  # all three files or none
        for fname, data in files.items():
            with atomic_write(tmp / fname, "wb") as f:
                f.write(data)
