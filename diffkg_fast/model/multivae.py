"""MultiVAE (Liang, Krishnan, Hoffman, Jebara: "Variational Autoencoders for Collaborative
Filtering", WWW 2018): a user's item set decoded through a multinomial over all items.

For a user's 0/1 training row ``x`` (B × I), with ``k = latent_dimension / 2``::

    h          = dropout_p( x / ||x||_2 )                       input dropout (inverted), train only
    [mu ; lv]  = f_enc(h)          f_enc: I -> H_1 -> … -> 2k, tanh between layers, none after
    z          = mu + eps * epsilon_std * exp(lv / 2),  eps ~ N(0, 1)   (train; z = mu to score)
    logits     = f_dec(z)          f_dec: k -> … -> H_1 -> I, tanh between layers, none after
    CE         = mean_u  - sum_i x_ui log softmax(logits_u)_i      multinomial log-likelihood
    KL         = mean_u  -1/2 sum_j (1 + lv_uj - mu_uj^2 - exp(lv_uj))
    loss       = CE + beta_t KL,   beta_t = min(anneal_cap, t / total_anneal_steps)

``t`` counts the training steps, this one included (``t = 1`` at the first step); with
``total_anneal_steps = 0`` beta is ``anneal_cap`` throughout. The counter is model state
(:meth:`MultiVAE.get_extra_state`), so a resumed run anneals exactly as an uninterrupted one.
Scores are the logits of ``z = mu`` without dropout (the softmax does not change a ranking).

The input is the patient's known medications alone, so any patient with a history is scored
(``scores_unseen``): by its training row for ranking (:meth:`score`), by the medications of its
earlier visits for a held-out visit (:meth:`score_patients` with ``Patients.meds``).

Defaults, each RecBole 1.2.1's (``recbole/properties/model/MultiVAE.yaml``, model file
``recbole/model/general_recommender/multivae.py``), option names included, so that a RecBole
config maps one to one:

- ``mlp_hidden_size`` (600,): YAML. The paper: one hidden layer of 600 as well;
- ``latent_dimension`` 128: YAML, the width of the encoder's LAST layer, which RecBole splits
  into mu and log-variance, so the latent code has 64 dimensions (and the decoder starts at 64).
  The paper's latent code has 200 dimensions: ``latent_dimension = 400`` here;
- ``dropout_prob`` 0.5: YAML and the paper (keep probability 0.5 on the normalised input);
- ``anneal_cap`` 0.2, ``total_anneal_steps`` 200000: YAML and the paper's notebook
  (``dawenl/vae_cf``). The notebook computes beta BEFORE counting the step (``t = 0`` first);
  RecBole counts first (``t = 1``), as here;
- ``epsilon_std`` 0.01: RecBole's ``reparameterize`` draws ``eps ~ N(0, 0.01^2)`` (hard-coded,
  no YAML key). The paper's notebook draws ``eps ~ N(0, 1)``: ``epsilon_std = 1``. RecBole's
  choice makes the sampled code nearly ``mu`` (close to the paper's MultiDAE);
- initialisation: ``xavier_normal_`` weights and zero biases (RecBole's
  ``xavier_normal_initialization``; the notebook: Glorot uniform, biases N(0, 0.001^2));
- no weight decay (RecBole's ``weight_decay`` 0; the notebook's ``lam = 0.0`` for MultiVAE);
- ``lr`` 1e-3 (RecBole's ``learning_rate``, the paper), ``batch`` users per step: the trainer's
  1024 (RecBole's ``train_batch_size`` 2048; the paper 500).

Random draws (the input dropout and ``eps``, in that order each step) come from the stream
``dropout`` of ``seed``; the initialisation from ``init``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
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

__all__ = ["MultiVAE", "mlp"]


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through ``dims`` with tanh between them and none after the last
    (RecBole's ``MultiVAE.mlp_layers``, module indices included)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i != len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MultiVAE(Recommender):
    """MultiVAE over the training rows of ``train`` (``n_users × n_items``, nonzero = 1).

    Options: ``mlp_hidden_size``, ``latent_dimension`` (even: mu and log-variance halves),
    ``dropout_prob``, ``anneal_cap``, ``total_anneal_steps``, ``epsilon_std``, ``seed``,
    ``device`` (module docstring).
    """

    name = "multivae"
    batch_kind = "users"

    def __init__(self, n_users: int, n_items: int, train: sp.spmatrix, *,
                 mlp_hidden_size: Sequence[int] = (600,), latent_dimension: int = 128,
                 dropout_prob: float = 0.5, anneal_cap: float = 0.2,
                 total_anneal_steps: int = 200000, epsilon_std: float = 0.01,
                 seed: int = 421, device: str = "cpu") -> None:
        super().__init__()
        self.check_options(locals())
        self.n_users, self.n_items = n_users, n_items
        self.train_rows = TrainingRows(train)
        self.dropout_prob, self.epsilon_std = dropout_prob, epsilon_std
        self.anneal_cap, self.total_anneal_steps = anneal_cap, total_anneal_steps
        self.k = latent_dimension // 2
        hidden = [int(d) for d in mlp_hidden_size]
        self.encoder = mlp([n_items, *hidden, latent_dimension])
        self.decoder = mlp([self.k, *hidden[::-1], n_items])
        xavier_normal_init(self, rng_stream(seed, "init"))
        self.generator = rng_stream(seed, "dropout")
        self.update = 0  # training steps taken: the annealing schedule's t
        self.to(device)

    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> MultiVAE:
        return cls(ds.n_users, ds.n_items, ds.train, **options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_options(options, positive=("latent_dimension",),
                      non_negative=("anneal_cap", "total_anneal_steps", "epsilon_std", "seed"),
                      unit=("dropout_prob",))
        lat = options.get("latent_dimension", 2)
        if lat % 2:
            raise ValueError(f"latent_dimension must be even (mu and log-variance halves), "
                             f"got {lat}")
        if options.get("dropout_prob", 0.0) >= 1.0:
            raise ValueError("dropout_prob must be < 1 (a dropout of 1 leaves no input)")
        hidden = options.get("mlp_hidden_size", ())
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in hidden):
            raise ValueError(f"mlp_hidden_size must be positive integers, got {list(hidden)}")

    # ------------------------------------------------------------------ training
    def anneal(self) -> float:
        """beta of the step ``self.update`` (module docstring)."""
        if self.total_anneal_steps <= 0:
            return self.anneal_cap
        return min(self.anneal_cap, self.update / self.total_anneal_steps)

    def encode(self, rows: Tensor, train: bool, span: Span | None = None,
               ) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of 0/1 rows (B × I); ``train``: with the input dropout, drawn for
        the whole batch of ``span`` (a data-parallel step) and cut to these rows."""
        h = F.normalize(rows, dim=1)  # an empty row stays zero
        if train and self.dropout_prob > 0:
            n = h.shape[0] if span is None else span.total
            mask = dropout_mask((n, h.shape[1]), self.dropout_prob, self.generator,
                                h.device, h.dtype)
            h = h * (mask if span is None else span.cut(mask))
        h = self.encoder(h)
        return h[:, :self.k], h[:, self.k:]

    def forward(self, batch: UserBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Annealed negative ELBO of a batch of users (one training step: ``t`` += 1)."""
        rows, span = batch.rows, batch.span
        if self.training:
            self.update += 1
        mu, logvar = self.encode(rows, self.training, span)
        z = mu
        if self.training and self.epsilon_std > 0:
            n = mu.shape[0] if span is None else span.total
            eps = torch.randn((n, mu.shape[1]), generator=self.generator,
                              device=self.generator.device).to(mu.device, mu.dtype)
            eps = eps if span is None else span.cut(eps)
            z = mu + eps * self.epsilon_std * torch.exp(0.5 * logvar)
        logits = self.decoder(z)
        ce = -(F.log_softmax(logits, dim=1) * rows).sum(1).mean()
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
        beta = self.anneal()
        return ce + beta * kl, {"ce": ce.detach(), "kl": kl.detach()}

    def epoch_info(self) -> dict[str, Any]:
        """The KL weight of the epoch's last step and the steps taken so far."""
        return {"anneal": self.anneal(), "steps": self.update}

    def get_extra_state(self) -> dict[str, Any]:
        return {"update": self.update, "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.update = int(state["update"])
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def scores_of(self, rows: Tensor) -> Tensor:
        """``B × n_items`` logits of 0/1 rows with ``z = mu``, no dropout (any mode)."""
        mu, _ = self.encode(rows, train=False)
        return self.decoder(mu)

    def _device(self) -> torch.device:
        return self.decoder[-1].weight.device

    @torch.no_grad()
    def score(self, users: Tensor) -> Tensor:
        """Scores of ``users`` from their own training rows."""
        return self.scores_of(self.train_rows.rows(users, self._device()))

    @property
    def patient_inputs(self) -> frozenset[str]:
        return frozenset({"meds"})

    @property
    def scores_unseen(self) -> bool:
        return True  # the input is the medication history alone

    @torch.no_grad()
    def score_patients(self, patients: Patients) -> Tensor:
        """Scores from ``patients.meds`` (the known medications); from the users' training
        rows when ``meds`` is not given."""
        if patients.meds is None:
            return super().score_patients(patients)
        return self.scores_of(known_rows(patients.meds, self._device()))
