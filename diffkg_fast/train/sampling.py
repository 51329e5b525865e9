"""Training batches, one sampler per ``Recommender.batch_kind``:

- ``"pairs"`` (:class:`PairSampler`): every training interaction once per epoch, shuffled, with
  one uniform negative each (DiffKG's ``TrnData.negSampling`` and loader, vectorised);
- ``"users"`` (:class:`UserSampler`): every user with a training interaction once per epoch,
  shuffled, with its training row (the auto-encoders' input, as RecBole's ``AutoEncoderMixin``).

The draws come from their own streams of the run's seed (``negatives``, ``shuffle``;
:func:`~diffkg_fast.utils.seed.rng_stream`), so the batches of an epoch depend on the seed and
the epoch number only, never on the model or on what else drew random numbers.

Data-parallel runs (:mod:`diffkg_fast.utils.distributed`): every rank draws the same global
permutation and negatives and :meth:`PairSampler.part_batches` yields its part of each global
batch of ``batch`` rows, with the factor its loss is scaled by (``batch_part``), so ``N`` ranks
step through the single process's batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from diffkg_fast.model.base import PairBatch, UserBatch
from diffkg_fast.utils.distributed import Dist, Span, batch_span
from diffkg_fast.utils.epoch_batch import epoch_batch
from diffkg_fast.utils.negatives import sample_negatives
from diffkg_fast.utils.seed import rng_stream

__all__ = ["SAMPLERS", "PairSampler", "UserSampler", "interactions", "sample_negatives"]


def interactions(train: sp.spmatrix) -> tuple[Tensor, Tensor, Tensor]:
    """``(users, items, sorted keys user * n_items + item)`` of the binary training matrix."""
    m = sp.csr_matrix(train, copy=True)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    users = torch.from_numpy(np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)))
    items = torch.from_numpy(m.indices.astype(np.int64))
    return users, items, users * m.shape[1] + items  # canonical CSR: keys already sorted


class _Streams:
    """A sampler's random streams (``generators``) as checkpoint state."""

    generators: dict[str, torch.Generator]

    def state_dict(self) -> dict[str, Any]:
        return {name: g.get_state() for name, g in self.generators.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.generators):
            raise ValueError(f"sampler streams {sorted(state)}, expected "
                             f"{sorted(self.generators)}")
        for name, g in self.generators.items():
            g.set_state(state[name])


class PairSampler(_Streams):
    """BPR batches of ``batch`` training interactions (the last one shorter; ``batch`` grown by
    :func:`epoch_batch` when ``max_epoch_steps`` bounds the epoch)."""

    def __init__(self, train: sp.spmatrix, batch: int, seed: int,
                 max_epoch_steps: int = 0) -> None:
        self.n_items = train.shape[1]
        self.users, self.items, self.keys = interactions(train)
        self.batch = epoch_batch(self.users.numel(), batch, max_epoch_steps)
        self.generators = {name: rng_stream(seed, name) for name in ("negatives", "shuffle")}

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.users.numel() // self.batch)

    def negatives(self) -> Tensor:
        """This epoch's negative of every interaction (one draw of stream ``negatives``)."""
        return sample_negatives(self.users, self.keys, self.n_items, self.generators["negatives"])

    def batches(self, neg: Tensor, limit: int | None = None) -> Iterator[PairBatch]:
        """The epoch's batches in a shuffled order (one draw of stream ``shuffle``); the first
        ``limit`` only (benchmarks)."""
        for b in _index_batches(self.users.numel(), self.batch, self.generators["shuffle"],
                                limit):
            yield PairBatch(self.users[b], self.items[b], neg[b])

    def part_batches(self, neg: Tensor, d: Dist, limit: int | None = None,
                     ) -> Iterator[tuple[PairBatch, float]]:
        """This rank's part of each of :meth:`batches`' batches and its loss factor
        (:func:`~diffkg_fast.utils.distributed.batch_part`); the same draws on every rank."""
        for b in _index_batches(self.users.numel(), self.batch, self.generators["shuffle"],
                                limit):
            span, factor = batch_span(b.numel(), d)
            b = span.cut(b)
            yield PairBatch(self.users[b], self.items[b], neg[b], span), factor


class UserSampler(_Streams):
    """Batches of ``batch`` users (those with a training interaction), each with its training
    row as a dense 0/1 float tensor (``batch`` grown as :class:`PairSampler`'s)."""

    def __init__(self, train: sp.spmatrix, batch: int, seed: int,
                 max_epoch_steps: int = 0) -> None:
        self.train = (sp.csr_matrix(train) != 0).astype(np.float32).tocsr()
        self.users = torch.from_numpy(np.flatnonzero(np.diff(self.train.indptr)).astype(np.int64))
        self.batch = epoch_batch(self.users.numel(), batch, max_epoch_steps)
        self.generators = {"shuffle": rng_stream(seed, "shuffle")}

    def __len__(self) -> int:
        return -(-self.users.numel() // self.batch)

    def negatives(self) -> None:
        """Nothing to draw before an epoch (the sampler interface of :class:`PairSampler`)."""
        return None

    def batches(self, _neg: None = None, limit: int | None = None) -> Iterator[UserBatch]:
        for b in _index_batches(self.users.numel(), self.batch, self.generators["shuffle"],
                                limit):
            yield self._batch(self.users[b])

    def part_batches(self, _neg: None, d: Dist, limit: int | None = None,
                     ) -> Iterator[tuple[UserBatch, float]]:
        """This rank's part of each of :meth:`batches`' batches and its loss factor."""
        for b in _index_batches(self.users.numel(), self.batch, self.generators["shuffle"],
                                limit):
            span, factor = batch_span(b.numel(), d)
            yield self._batch(self.users[span.cut(b)], span), factor

    def _batch(self, users: Tensor, span: Span | None = None) -> UserBatch:
        return UserBatch(users, torch.from_numpy(self.train[users.numpy()].toarray()), span)


def _index_batches(n: int, batch: int, shuffle: torch.Generator,
                   limit: int | None) -> Iterator[Tensor]:
    """Positions ``0 … n-1`` in one shuffled order (one draw of ``shuffle``), ``batch`` at a
    time; the first ``limit`` batches only."""
    perm = torch.randperm(n, generator=shuffle)
    for start in range(0, n, batch)[:limit]:
        yield perm[start:start + batch]


# batch_kind -> sampler; "none" (nothing to train) has none.
SAMPLERS = {"pairs": PairSampler, "users": UserSampler}
