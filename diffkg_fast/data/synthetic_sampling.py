"""Vectorized sampling helpers of the synthetic cohort (:mod:`diffkg_fast.data.synthetic`).

Weighted draws inside many groups at once (one ``searchsorted`` over stacked CDFs), Zipf weights
over rankings inside groups, and the split of a cluster's codes into blocks owned by conditions.
"""

from __future__ import annotations

import numpy as np

from diffkg_fast.data.synthetic_codes import N_CLUSTERS


def _repeat_range(counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(c) for c in counts])`` without a loop."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _ptr(group: np.ndarray, n: int) -> np.ndarray:
    """CSR offsets of sorted group ids."""
    return np.concatenate([[0], np.cumsum(np.bincount(group, minlength=n))]).astype(np.int64)


class _Groups:
    """Weighted items per group; sampling by inverse CDF, all groups in one ``searchsorted``."""

    def __init__(self, group: np.ndarray, item: np.ndarray, weight: np.ndarray, n: int) -> None:
        order = np.lexsort((item, group))
        self.group, self.item = group[order], item[order]
        self.ptr = _ptr(self.group, n)
        cum = np.concatenate([[0.0], np.cumsum(weight[order].astype(float))])
        lo, hi = cum[self.ptr[:-1]][self.group], cum[self.ptr[1:]][self.group]
        # Group g's CDF lives in (g, g + 1]; its last entry is exactly g + 1.
        self.cdf = self.group + (cum[1:] - lo) / (hi - lo)
        last = self.ptr[1:][self.ptr[1:] > self.ptr[:-1]] - 1
        self.cdf[last] = self.group[last] + 1.0

    def sample(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        """One item per entry of ``groups``; an empty group (tiny sizes) gives any item."""
        idx = np.searchsorted(self.cdf, groups + rng.random(len(groups)), "right")
        empty = self.ptr[groups + 1] == self.ptr[groups]
        if empty.any():
            idx[empty] = rng.integers(0, len(self.item), int(empty.sum()))
        return self.item[idx]


def _zipf_in_groups(rng: np.random.Generator, group: np.ndarray, s: float,
                    key: np.ndarray | None = None) -> np.ndarray:
    """Zipf weights (1 + rank)^-s over a ranking inside each group (by ``key``, else random)."""
    order = np.lexsort((rng.random(len(group)) if key is None else key, group))
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = _repeat_range(np.bincount(group))
    return (1.0 + rank) ** -s


def _partition(rng: np.random.Generator, item_cluster: np.ndarray,
               cond_cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each cluster's items (in index order) into contiguous blocks, one per condition.

    Returns ``(owner, cond, item)``: each item's condition and the (condition, item) pairs. A
    condition with an empty block gets one random item of its cluster (of all, if it has none).
    """
    n_cond = len(cond_cluster)
    corder = np.argsort(cond_cluster, kind="stable")
    w = rng.gamma(2.0, size=n_cond)  # block sizes: Gamma(2) shares of the cluster's items
    shares = _Groups(cond_cluster[corder], np.arange(n_cond), w[corder], N_CLUSTERS)
    iorder = np.argsort(item_cluster, kind="stable")
    icl = item_cluster[iorder]
    n_k = np.bincount(icl, minlength=N_CLUSTERS)
    slot = np.searchsorted(shares.cdf, icl + (_repeat_range(n_k) + 0.5) / n_k[icl], side="left")
    owner = np.empty(len(item_cluster), dtype=np.int64)
    owner[iorder] = corder[shares.item[np.minimum(slot, n_cond - 1)]]
    empty = np.flatnonzero(np.bincount(owner, minlength=n_cond) == 0)
    size = n_k[cond_cluster[empty]]
    at = (np.cumsum(n_k) - n_k)[cond_cluster[empty]] + (rng.random(len(empty)) * size).astype(int)
    fill = np.where(size > 0, iorder[np.minimum(at, len(iorder) - 1)],
                    rng.integers(0, len(item_cluster), len(empty)))
    return owner, np.concatenate([owner, empty]), np.concatenate([np.arange(len(owner)), fill])
