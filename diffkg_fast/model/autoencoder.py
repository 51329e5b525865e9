"""What the auto-encoders (MultiVAE, CDAE) share: a patient's input is its 0/1 medication row.

- :class:`TrainingRows` keeps the training matrix (data, not state: a model is always built from
  its dataset) and gives the dense rows of users, what :meth:`Recommender.score` reads;
- :func:`known_rows` turns the ``meds`` of :class:`~diffkg_fast.model.base.Patients` (a torch
  sparse CSR of the known medications) into the same dense 0/1 rows;
- :func:`xavier_normal_init`: RecBole's initialisation of both models, from a seeded stream.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

__all__ = ["TrainingRows", "known_rows", "xavier_normal_init"]


class TrainingRows:
    """The binary training matrix (``n_users × n_items``, nonzero = 1) as float32 CSR."""

    def __init__(self, train: sp.spmatrix) -> None:
        self.matrix = (sp.csr_matrix(train) != 0).astype(np.float32).tocsr()
        self.matrix.sort_indices()

    @property
    def has_train(self) -> Tensor:
        """(n_users,) bool: the users with at least one training interaction."""
        return torch.from_numpy(np.diff(self.matrix.indptr) > 0)

    def rows(self, users: Tensor, device: torch.device | str) -> Tensor:
        """``B × n_items`` dense 0/1 float32 rows of ``users`` (int64), on ``device``."""
        ids = users.detach().cpu().numpy()
        return torch.from_numpy(self.matrix[ids].toarray()).to(device)


def known_rows(meds: Tensor, device: torch.device | str) -> Tensor:
    """``B × n_items`` dense 0/1 float32 rows of a sparse (or dense) ``meds`` matrix, on
    ``device``: any nonzero is a known medication (the evaluation may pass booleans)."""
    dense = meds.to_dense() if meds.layout != torch.strided else meds
    return (dense != 0).to(device=device, dtype=torch.float32)


def xavier_normal_init(module: nn.Module, generator: torch.Generator) -> None:
    """``xavier_normal_`` on every Linear weight and Embedding table, zero biases, in module
    order (RecBole's ``xavier_normal_initialization``, drawn from ``generator``)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.xavier_normal_(m.weight, generator=generator)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
