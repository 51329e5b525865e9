"""Top-k of a factored score matrix ``left @ right.T`` without writing it whole.

An embedding model scores a batch of ``B`` users against every item as ``U_B @ Iᵀ``. Ranking
every user of a large catalogue is then dominated not by that product's ``2·B·n·H`` FLOPs but
by what follows it over a ``B × n`` matrix far larger than any cache: the exclusion mask, the
``-inf`` fill (a copy) and ``topk``. At the million-entity KG's shape (336,786 items,
``B = 1,024``, ``H = 64``, one thread) a batch took 3.5 s where its product alone takes 0.52 s
(``bench/results/cpu-ranking.txt``), and 1.4 GB of scores (the million-entity
test ranking was killed at 24 GB with ``B = 1,024``).

:func:`topk_factored`, on a CPU, walks the items in blocks of ``block`` columns: one
``B × block`` product into a reused buffer that stays in cache, then one numba pass per row
that sets the row's excluded items of the block to ``-inf`` and folds the block into a min-heap
of the row's ``k + 1`` best values so far: an item enters only above the heap's minimum, one
compare per item nearly always false. The heap ends holding the top ``k + 1`` VALUES of the
row and every item strictly above the ``(k+1)``-th value, which is all
:func:`~diffkg_fast.eval.topk.topk_items` reads (``topk.order_top``): where the ``k``-th and
``(k+1)``-th values differ the top-``k`` set is unique and is ordered by (score desc, item id
asc); a row tied across that boundary is scored whole and fully sorted, as there.

The same ids as ``topk_items(left @ right.T, exclude, k)`` whenever a block's product has the
bits of the same columns of the whole product: each score is one ``H``-long dot product, which
BLAS kernels do not split at these ``H`` (checked: integer-valued factors in the tests, where
every order is exact; float factors in a test at 5,000 items and in the benchmark at 336,786;
DiffKG and LightGCN runs at 20k entities: every logged metric the same to the last bit).
Memory: ``B × block`` scores and ``B × (k + 1)`` heaps instead of ``B × n``. Other devices
(``topk`` is fast there) and other dtypes rank the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from diffkg_fast.eval.topk import order_top, topk_items

__all__ = ["BLOCK_ITEMS", "FactoredScores", "topk_factored"]

# Items per block: B × 1,024 float32 at B = 1,024 is 4 MiB, inside this CPU's 32 MiB L3, and
# the fastest of 512 … 16,384 in bench/bench_ranking.py (0.79 s a batch against 3.5 s whole).
BLOCK_ITEMS = 1024


@dataclass(frozen=True)
class FactoredScores:
    """The ``B × n_items`` scores ``left @ right.T``, not materialised: ``left`` is ``B × H``
    (the batch's users), ``right`` ``n_items × H`` (every item)."""

    left: Tensor
    right: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[0])

    def dense(self, rows: Tensor | None = None) -> Tensor:
        """The scores of ``rows`` (default all), written whole."""
        left = self.left if rows is None else self.left[rows]
        return left @ self.right.T


@numba.njit(cache=True, nogil=True)
def _sift_down(hv: np.ndarray, hi: np.ndarray, v: float, item: int) -> None:
    """Replace the root of the min-heap ``(hv, hi)`` by ``(v, item)`` and restore the heap."""
    cap = hv.shape[0]
    c = 0
    while True:
        child = 2 * c + 1
        if child >= cap:
            break
        if child + 1 < cap and hv[child + 1] < hv[child]:
            child += 1
        if hv[child] >= v:
            break
        hv[c] = hv[child]
        hi[c] = hi[child]
        c = child
    hv[c] = v
    hi[c] = item


@numba.njit(cache=True, nogil=True)
def _sift_up(hv: np.ndarray, hi: np.ndarray, size: int, v: float, item: int) -> None:
    """Add ``(v, item)`` to the min-heap of ``size`` entries."""
    c = size
    while c > 0:
        p = (c - 1) >> 1
        if hv[p] <= v:
            break
        hv[c] = hv[p]
        hi[c] = hi[p]
        c = p
    hv[c] = v
    hi[c] = item


@numba.njit(cache=True, nogil=True)
def _scan_block(x: np.ndarray, lo: int, indptr: np.ndarray, indices: np.ndarray,
                cursor: np.ndarray, vals: np.ndarray, ids: np.ndarray, fill: np.ndarray) -> bool:
    """Fold the block ``x`` (items ``lo …``) into each row's min-heap of its ``cap`` best
    values so far; the row's excluded items (CSR, sorted columns, ``cursor`` the next one) are
    first set to ``-inf``. Only a value above the heap's minimum enters, so equal values keep
    the ones already held: the heap still holds the top ``cap`` VALUES, and every item strictly
    above the ``cap``-th value. Returns True at the first NaN of a kept item."""
    n_rows, width = x.shape
    cap = vals.shape[1]
    hi_item = lo + width
    for r in range(n_rows):
        e = cursor[r]
        while e < indptr[r + 1] and indices[e] < hi_item:
            x[r, indices[e] - lo] = -np.inf
            e += 1
        cursor[r] = e
        hv = vals[r]
        hid = ids[r]
        j = 0
        while fill[r] < cap and j < width:
            v = x[r, j]
            if v != v:
                return True
            _sift_up(hv, hid, fill[r], v, lo + j)
            fill[r] += 1
            j += 1
        low = hv[0]
        for jj in range(j, width):
            v = x[r, jj]
            if v <= low:  # nearly every item: one compare and a predicted branch
                continue
            if v != v:
                return True
            _sift_down(hv, hid, v, lo + jj)
            low = hv[0]
    return False


def _best_per_row(scores: FactoredScores, exclude: sp.csr_matrix | None, cap: int,
                  block: int) -> tuple[Tensor, Tensor]:
    """Each row's ``cap`` best values (descending) and their item ids, scored ``block`` items
    at a time into one reused buffer; raises on a NaN score of a kept item."""
    left, right = scores.left, scores.right
    n_rows, n_items = scores.shape
    if exclude is None:
        exclude = sp.csr_matrix((n_rows, n_items), dtype=np.int8)
    indptr = exclude.indptr.astype(np.int64)
    indices = exclude.indices.astype(np.int64)
    cursor = indptr[:-1].copy()
    buf = torch.empty((n_rows, block), dtype=torch.result_type(left, right))
    vals = np.empty((n_rows, cap), dtype=buf.numpy().dtype)
    ids = np.empty((n_rows, cap), dtype=np.int64)
    fill = np.zeros(n_rows, dtype=np.int64)
    for lo in range(0, n_items, block):
        hi = min(lo + block, n_items)
        x = buf if hi - lo == block else torch.empty((n_rows, hi - lo), dtype=buf.dtype)
        torch.mm(left, right[lo:hi].T, out=x)
        if _scan_block(x.numpy(), lo, indptr, indices, cursor, vals, ids, fill):
            raise ValueError("scores contain NaN")
    v, order = torch.sort(torch.from_numpy(vals), dim=1, descending=True)
    return v, torch.from_numpy(ids).gather(1, order)


@torch.no_grad()
def topk_factored(scores: FactoredScores, exclude: sp.spmatrix | None, k: int,
                  block: int = BLOCK_ITEMS) -> Tensor:
    """:func:`~diffkg_fast.eval.topk.topk_items` of ``scores.dense()`` (same ids, same
    ``-1`` padding, same ``ValueError`` on a NaN score of a kept item), computed ``block``
    items at a time on a CPU (module docstring); elsewhere, and where a block would not hold
    ``k + 1`` items, the whole matrix. ``exclude``: a CSR with one row per score row, or
    ``None``."""
    n_rows, n_items = scores.shape
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    kk = min(k, n_items)
    dtype = torch.result_type(scores.left, scores.right)
    if (scores.left.device.type != "cpu" or dtype not in (torch.float32, torch.float64)
            or n_rows == 0 or n_items <= block or kk + 1 > block):
        return topk_items(scores.dense(), exclude, k)
    ex = None
    if exclude is not None:
        ex = sp.csr_matrix(exclude, copy=True)
        if ex.shape != (n_rows, n_items):
            raise ValueError(f"exclude has shape {ex.shape}, scores {(n_rows, n_items)}")
        ex.sum_duplicates()  # sorted, unique columns per row: the scan's cursor walks them
        if ex.nnz and (ex.indices.min() < 0 or ex.indices.max() >= n_items):
            # The scan writes at these columns unchecked: refuse what would write outside.
            raise ValueError(f"exclude has a column outside 0 … {n_items - 1}")
    vals, ids = _best_per_row(scores, ex, kk + 1, block)
    top, slow = order_top(vals, ids, kk)
    rows = slow.nonzero().squeeze(1)
    if len(rows):
        # A tie across the boundary: these rows ranked from their whole scores, as topk_items.
        top[rows] = topk_items(scores.dense(rows), None if ex is None else ex[rows.numpy()], kk)
    out = torch.full((n_rows, k), -1, dtype=torch.long)
    out[:, :kk] = top
    return out
