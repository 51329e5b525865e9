"""Full-ranking metrics: Recall@K and NDCG@K over all items, known items masked.

For a user ``u`` with held-out items ``T_u`` (``|T_u| >= 1``) and a ranking ``r_1, r_2, …`` of
the items that are not excluded (training items, and validation items when testing):

- ``Recall@K = |{r_1 … r_K} ∩ T_u| / |T_u|``;
- ``NDCG@K = DCG@K / IDCG@K`` with ``DCG@K = Σ_{i<K} [r_{i+1} ∈ T_u] / log2(i + 2)`` and
  ``IDCG@K = Σ_{i < min(|T_u|, K)} 1 / log2(i + 2)``;

each averaged over the users with at least one held-out item (the others are skipped, not
counted as zeros). Every K is read off ONE ranking of ``max(ks)`` items per user, so
``Recall@10 <= Recall@20 <= Recall@40`` holds by construction.

Ties are broken by item id, lower id first, so the ranking is a pure function of the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from diffkg_fast.eval.factored import FactoredScores, topk_factored
from diffkg_fast.eval.topk import topk_items

# The cut-offs the harness reports (the seed paper's Table 3 columns, and 40 as SSLRec).
KS = (10, 20, 40)

def _user_batches(users: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [users[i:i + batch_size] for i in range(0, len(users), batch_size)]


def ranking_metrics(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    users: Sequence[int] | np.ndarray | None,
    target: sp.spmatrix,
    exclude: Sequence[sp.spmatrix] = (),
    ks: Sequence[int] = KS,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Recall@K and NDCG@K (see the module docstring) for every ``K`` in ``ks``.

    ``score_fn(user_ids)`` gets a LongTensor of user ids on ``device`` and returns their
    ``B × n_items`` scores (any float dtype, any device), as a tensor or as
    :class:`~diffkg_fast.eval.factored.FactoredScores` (ranked a block of items at a time,
    never written whole: the same ranking). ``users`` restricts the evaluation
    (``None``: all users); only those with at least one ``target`` item are scored and counted.
    ``exclude`` lists the CSR matrices of known items (training; training and validation when
    testing). Users are scored ``batch_size`` at a time, so memory is O(batch × items)
    (O(batch × block) for factored scores).

    Returns ``{"recall@K": …, "ndcg@K": …, "n_users": count}``; with no user counted every
    metric is ``nan`` (an empty average, not a zero).

    A target item that is also excluded can never be hit but still counts in ``|T_u|``: the
    splits are disjoint by construction (``KGDataset.validate``), so this never happens there.
    """
    sums, n = ranking_sums(score_fn, users, target, exclude, ks, batch_size, device)
    out: dict[str, float] = {key: (v / n if n else float("nan")) for key, v in sums.items()}
    out["n_users"] = n
    return out


def ranking_sums(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    users: Sequence[int] | np.ndarray | None,
    target: sp.spmatrix,
    exclude: Sequence[sp.spmatrix] = (),
    ks: Sequence[int] = KS,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    select: Callable[[int], range] | None = None,
) -> tuple[dict[str, float], int]:
    """The per-user Recall@K and NDCG@K SUMMED, and the number of users summed: what
    :func:`ranking_metrics` divides, and what ranks sharing an evaluation add up exactly (a mean
    of per-rank means would weigh users unequally).

    ``select(n_batches)``: the indices of the ``batch_size`` user batches to compute (default
    all); each batch is scored as :func:`ranking_metrics` scores it, so a rank computing a block
    of batches gets the single process's numbers for them.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target = sp.csr_matrix(target)
    n_users, n_items = target.shape
    exclude = [sp.csr_matrix(m) for m in exclude]
    for m in exclude:
        if m.shape != target.shape:
            raise ValueError(f"exclude matrix has shape {m.shape}, target {target.shape}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    all_users = np.arange(n_users) if users is None else np.asarray(users, dtype=np.int64)
    # Duplicate ids would count a user twice; target.getnnz keeps only users with targets.
    all_users = np.unique(all_users)
    all_users = all_users[target.getnnz(axis=1)[all_users] > 0]
    max_k = ks[-1]
    # Position weights 1/log2(i + 2) and their prefix sums (IDCG for n targets = cum_w[n - 1]).
    w = 1.0 / np.log2(np.arange(max_k) + 2.0)
    cum_w = np.cumsum(w)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    batches = _user_batches(all_users, batch_size)
    picked = range(len(batches)) if select is None else select(len(batches))
    n = 0
    for batch in (batches[i] for i in picked):
        b = len(batch)
        scores = score_fn(torch.as_tensor(batch, dtype=torch.long, device=dev))
        if tuple(scores.shape) != (b, n_items):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, "
                             f"expected {(b, n_items)}")
        excl = None
        if exclude:
            known = exclude[0][batch]
            for m in exclude[1:]:
                known = known + m[batch]
            excl = known
        pick = topk_factored if isinstance(scores, FactoredScores) else topk_items
        top = pick(scores, excl, max_k).cpu().numpy()
        # Hits without a dense B × n_items matrix: the canonical CSR's (row, col) keys are sorted,
        # so one searchsorted looks up every ranked (row, item) pair at once.
        tgt = target[batch]
        tgt.sum_duplicates()  # canonical: sorted, unique indices per row
        n_tgt = np.diff(tgt.indptr)
        rows = np.repeat(np.arange(b, dtype=np.int64), n_tgt)
        keys = rows * n_items + tgt.indices
        q = np.arange(b, dtype=np.int64)[:, None] * n_items + top
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        hits = (keys[pos] == q) & (top >= 0)
        dcg = np.cumsum(hits * w, axis=1)
        n_hit = np.cumsum(hits, axis=1)
        for k in ks:
            sums[f"recall@{k}"] += float(np.sum(n_hit[:, k - 1] / n_tgt))
            idcg = cum_w[np.minimum(n_tgt, k) - 1]
            sums[f"ndcg@{k}"] += float(np.sum(dcg[:, k - 1] / idcg))
        n += b
    return sums, n
