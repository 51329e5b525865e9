"""CDAE (Wu, DuBois, Zheng, Ester: "Collaborative Denoising Auto-Encoders for Top-N Recommender
Systems", WSDM 2016): a one-hidden-layer denoising auto-encoder of a user's item row, with a
per-user input node.

For a batch of users ``u`` with 0/1 training rows ``x`` (B × I)::

    x~    = x * m / (1 - q),  m_ui ~ Bernoulli(1 - q)      drop-out corruption, train only
    h     = g(W x~ + b + V_u)       W: d × I, V: n_users × d (the "user node"), g = hid_activation
    o     = W' h + b'               W': I × d
    loss  = sum_{u, i} l(o_ui, x_ui)                          over the batch, ALL items
            + reg_weight_1 (|V|_1 + |W|_1) + reg_weight_2 (||V||_2 + ||W||_2)
    score = f(o) with x~ = x (no corruption)                  f = out_activation

``l`` is ``loss_type``: ``BCE`` the logistic loss ``BCEWithLogits(o, x)`` (``f`` is not applied
in the loss), ``MSE`` the square loss ``(f(o) - x)^2``. The norms of the regulariser are RecBole's:
over the WHOLE user table ``V`` and the input weights ``W`` (not ``W'``, not the biases), and the
L2 term is the Frobenius norm itself, not its square.

Unseen patients. ``V_u`` is trained only through user ``u``'s own training row, so a patient
without training interactions (a held-out patient of the ``visit`` split, a new one) has no
trained node. Such a patient is scored with ``V_u = 0``, CDAE's input-only part
``f(W' g(W x + b) + b')``, from its known medications (its earlier visits' for a held-out
visit); so ``scores_unseen`` is true. Patients with training interactions keep their node.
RecBole has no such case: its ``UserDataLoader`` iterates over EVERY user id (the padding id 0
and users without training interactions included, their rows all zero), so there such a user's
``V_u`` is trained towards predicting nothing, and its evaluation input is its training row (all
zero): RecBole ranks a held-out patient by ``f(W' g(b + V_u) + b')``, the same list for every
such patient, whatever its history.

Defaults: RecBole 1.2.1's ``recbole/properties/model/CDAE.yaml`` (names included) and model
file ``recbole/model/general_recommender/cdae.py``:

- ``embedding_size`` 64, ``corruption_ratio`` 0.5, ``hid_activation`` ``relu``,
  ``out_activation`` ``sigmoid``, ``loss_type`` ``BCE``, ``reg_weight_1`` 0, ``reg_weight_2``
  0.01: YAML;
- the loss summed over batch and items, the norms above, ``xavier_normal_`` on ``V``, ``W``,
  ``W'`` with zero biases, the activation applied to the scores: the model file;
- ``lr`` 1e-3 (RecBole's ``learning_rate``), ``batch`` users per step: the trainer's 1024
  (RecBole's ``train_batch_size`` 2048). As the data loss is a SUM over the batch, the weight of
  the regulariser relative to it scales with ``1 / batch``.

The paper's own choices, where they differ: hidden and output maps ``g``, ``f`` in {identity,
sigmoid}; the regulariser ``lambda/2`` times SQUARED L2 norms of all parameters (``W``, ``W'``,
``V``, ``b``, ``b'``); the loss over the observed items and a sample of negatives per user
rather than all items.

Random draws: the corruption mask from the stream ``dropout`` of ``seed``, the initialisation
from ``init``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkg_fast.model.autoencoder import TrainingRows, known_rows, xavier_normal_init
from diffkg_fast.model.base import Patients, Recommender, UserBatch, check_options
from diffkg_fast.ops.attention import dropout_mask
from diffkg_fast.utils.distributed import Span
from diffkg_fast.utils.seed import rng_stream

__all__ = ["CDAE"]

HID_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
OUT_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid, "relu": torch.relu}
LOSS_TYPES = ("BCE", "MSE")


class CDAE(Recommender):
    """CDAE over the training rows of ``train`` (``n_users × n_items``, nonzero = 1).

    Options: ``embedding_size`` (hidden width ``d``), ``corruption_ratio`` (``q``),
    ``hid_activation``, ``out_activation``, ``loss_type``, ``reg_weight_1``, ``reg_weight_2``,
    ``seed``, ``device`` (module docstring).
    """

    name = "cdae"
    batch_kind = "users"

    def __init__(self, n_users: int, n_items: int, train: sp.spmatrix, *,
                 embedding_size: int = 64, corruption_ratio: float = 0.5,
                 hid_activation: str = "relu", out_activation: str = "sigmoid",
                 loss_type: str = "BCE", reg_weight_1: float = 0.0, reg_weight_2: float = 0.01,
                 seed: int = 421, device: str = "cpu") -> None:
        super().__init__()
        self.check_options(locals())
        self.n_users, self.n_items = n_users, n_items
        self.train_rows = TrainingRows(train)
        self.corruption_ratio = corruption_ratio
        self.hid_activation, self.out_activation = hid_activation, out_activation
        self.loss_type = loss_type
        self.reg_weight_1, self.reg_weight_2 = reg_weight_1, reg_weight_2
        # RecBole's module names, so that a state maps one to one.
        self.h_user = nn.Embedding(n_users, embedding_size)
        self.h_item = nn.Linear(n_items, embedding_size)
        self.out_layer = nn.Linear(embedding_size, n_items)
        xavier_normal_init(self, rng_stream(seed, "init"))
        # Scoring adds the node of users with training interactions only (module docstring).
        self.register_buffer("has_train", self.train_rows.has_train.float().unsqueeze(1),
                             persistent=False)
        self.generator = rng_stream(seed, "dropout")
        self.to(device)

    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> CDAE:
        return cls(ds.n_users, ds.n_items, ds.train, **options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_options(options, positive=("embedding_size",),
                      non_negative=("reg_weight_1", "reg_weight_2", "seed"),
                      unit=("corruption_ratio",),
                      choices={"hid_activation": tuple(HID_ACTIVATIONS),
                               "out_activation": tuple(OUT_ACTIVATIONS),
                               "loss_type": LOSS_TYPES})
        if options.get("corruption_ratio", 0.0) >= 1.0:
            raise ValueError("corruption_ratio must be < 1 (a ratio of 1 leaves no input)")

    # ------------------------------------------------------------------ the network
    def outputs(self, rows: Tensor, user_node: Tensor, corrupt: bool,
                span: Span | None = None) -> Tensor:
        """Pre-activation outputs ``o`` (B × I) of 0/1 ``rows`` and the users' nodes (B × d);
        ``corrupt``: with the drop-out corruption (drawn from the ``dropout`` stream, for the
        whole batch of ``span`` in a data-parallel step, and cut to these rows)."""
        x = rows
        if corrupt and self.corruption_ratio > 0:
            n = x.shape[0] if span is None else span.total
            mask = dropout_mask((n, x.shape[1]), self.corruption_ratio, self.generator,
                                x.device, x.dtype)
            x = x * (mask if span is None else span.cut(mask))
        h = HID_ACTIVATIONS[self.hid_activation](self.h_item(x) + user_node)
        return self.out_layer(h)

    def regularizer(self) -> Tensor:
        """RecBole's: ``reg_weight_1 (|V|_1 + |W|_1) + reg_weight_2 (||V||_2 + ||W||_2)``."""
        v, w = self.h_user.weight, self.h_item.weight
        reg = v.new_zeros(())
        if self.reg_weight_1 > 0:
            reg = reg + self.reg_weight_1 * (v.abs().sum() + w.abs().sum())
        if self.reg_weight_2 > 0:
            reg = reg + self.reg_weight_2 * (v.norm() + w.norm())
        return reg

    def forward(self, batch: UserBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Summed reconstruction loss of the batch's rows plus the regulariser."""
        rows = batch.rows
        out = self.outputs(rows, self.h_user(batch.users), self.training, batch.span)
        if self.loss_type == "BCE":
            data = F.binary_cross_entropy_with_logits(out, rows, reduction="sum")
        else:
            act = OUT_ACTIVATIONS[self.out_activation]
            data = F.mse_loss(act(out), rows, reduction="sum")
        if batch.span is not None:
            # A data-parallel step weighs a rank's loss as a mean over its rows (Recommender.
            # forward): the part's sum, scaled to the whole batch's, comes back as the sum.
            data = data * (batch.span.total / max(batch.span.rows, 1))
        reg = self.regularizer()
        return data + reg, {self.loss_type.lower(): data.detach(), "reg": reg.detach()}

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ scoring
    def _device(self) -> torch.device:
        return self.out_layer.weight.device

    def _nodes(self, users: Tensor | None, n: int) -> Tensor:
        """The user nodes of ``users`` (zero for one without training interactions, and for
        all when ``users`` is None)."""
        if users is None:
            return self.h_user.weight.new_zeros(n, self.h_user.embedding_dim)
        users = users.to(self._device())
        return self.h_user(users) * self.has_train[users]

    @torch.no_grad()
    def scores_of(self, rows: Tensor, users: Tensor | None) -> Tensor:
        """``f(o)`` of 0/1 rows, uncorrupted, with the nodes of ``users`` (module docstring)."""
        out = self.outputs(rows, self._nodes(users, rows.shape[0]), corrupt=False)
        return OUT_ACTIVATIONS[self.out_activation](out)

    @torch.no_grad()
    def score(self, users: Tensor) -> Tensor:
        """Scores of ``users`` from their own training rows and nodes."""
        return self.scores_of(self.train_rows.rows(users, self._device()), users)

    @property
    def patient_inputs(self) -> frozenset[str]:
        return frozenset({"meds"})

    @property
    def scores_unseen(self) -> bool:
        return True  # the input-only part (V_u = 0) scores a patient from its history

    @torch.no_grad()
    def score_patients(self, patients: Patients) -> Tensor:
        """Scores from ``patients.meds`` and, for users with training interactions, their
        nodes; from the users' training rows when ``meds`` is not given."""
        if patients.meds is None:
            return super().score_patients(patients)
        return self.scores_of(known_rows(patients.meds, self._device()), patients.users)
