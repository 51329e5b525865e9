"""MostPop: every item scored by its number of training interactions, the same for every user.

The floor every personalised model must clear (nothing is trained; ties rank by item id in the
evaluation's stable top-k).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from diffkg_fast.model.base import Patients, Recommender

__all__ = ["MostPop"]


class MostPop(Recommender):
    """Popularity of each item in ``train`` (``n_users × n_items``, nonzero = 1)."""

    name = "mostpop"
    batch_kind = "none"

    def __init__(self, n_users: int, n_items: int, train: sp.spmatrix, *,
                 device: str = "cpu") -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        counts = np.asarray((sp.csr_matrix(train) != 0).sum(axis=0), dtype=np.float32).ravel()
        self.register_buffer("popularity", torch.from_numpy(counts).to(device))

    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> MostPop:
        return cls(ds.n_users, ds.n_items, ds.train, **options)

    @torch.no_grad()
    def score(self, users: Tensor) -> Tensor:
        """``B × n_items``: the popularity row repeated for each user."""
        return self.popularity.unsqueeze(0).expand(users.numel(), -1)

    @property
    def scores_unseen(self) -> bool:
        return True  # popularity needs nothing of the patient

    @torch.no_grad()
    def score_patients(self, patients: Patients) -> Tensor:
        n = next(f.shape[0] for f in patients if f is not None)
        return self.popularity.unsqueeze(0).expand(n, -1)
