"""What a recommender is to the trainer: the :class:`Recommender` interface.

The trainer (:mod:`diffkg_fast.train`) drives every registered model through this surface and
nothing else, the way Lightning drives a ``LightningModule`` and RecBole its
``AbstractRecommender``::

    model = Model.from_dataset(ds, seed=421, device="cpu", **options)  # its own hyper-parameters
    opt = model.configure_optimizer(lr)              # None for a model with nothing to train
    for epoch in range(epochs):
        report = model.on_epoch_start(epoch)         # phases the model owns (DiffKG: diffusion
        model.train()                                #   pass and KG rebuild)
        for batch in batches:                        # PairBatch ("pairs"), UserBatch ("users")
            loss, parts = model(batch)               # through forward, so DDP's hooks fire
            opt.zero_grad(); loss.backward(); opt.step()
        report = model.on_epoch_end(epoch)           # KGAT: its KG phase, attention refresh
        scores = model.score(users)                  # B × n_items, eval mode, no gradient
        scores = model.score_patients(Patients(...)) # patients by what is known of them
    model.state_dict()                               # complete: exact resume

Options. A model's hyper-parameters are the keyword-only parameters (after ``*``) of its
``__init__`` and of its ``from_dataset``, with their defaults: :meth:`Recommender.options` reads
them from the signatures, so the CLI's flags, config validation and the model's own constructor
can never disagree. Positional parameters are data (sizes, matrices, graphs). ``seed``, ``lr``,
``batch`` and ``device`` are options a model may share with the trainer (one value for both).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from diffkg_fast.eval.factored import FactoredScores
from diffkg_fast.utils.distributed import SINGLE, Dist, Span
from diffkg_fast.utils.memory_check import MemoryTerm

__all__ = ["EmbeddingRecommender", "EpochReport", "PairBatch", "Patients", "Recommender",
           "UserBatch", "check_options"]


class PairBatch(NamedTuple):
    """BPR triples: ``users``, their positive ``pos`` and sampled negative ``neg`` items (B,).
    ``span``: in a data-parallel step, where these rows lie in the global batch (``None``: the
    batch is the whole step's)."""

    users: Tensor
    pos: Tensor
    neg: Tensor
    span: Span | None = None

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.users.to(device), self.pos.to(device), self.neg.to(device),
                         self.span)


class UserBatch(NamedTuple):
    """Users and their training rows: ``users`` (B,) and ``rows`` (B × n_items, 0/1 float),
    the input of auto-encoder models (RecBole's ``AutoEncoderMixin`` gives the same); ``span``
    as in :class:`PairBatch`."""

    users: Tensor
    rows: Tensor
    span: Span | None = None

    def to(self, device: torch.device | str) -> UserBatch:
        return UserBatch(self.users.to(device), self.rows.to(device), self.span)


class Patients(NamedTuple):
    """What is known of ``B`` patients when they are scored; a field is ``None`` when unknown.

    - ``users`` (B,): their dataset rows, so a model may add what it trained for them;
    - ``codes``: ``B × n_entities`` sparse CSR, each row the mean one-hot of the patient's known
      diagnosis and procedure codes (:func:`~diffkg_fast.model.patients.code_rows`);
    - ``meds``: ``B × n_items`` sparse CSR, the medications already known for the patient (its
      training interactions, or the medications of its earlier visits), 0/1.
    """

    users: Tensor | None = None
    codes: Tensor | None = None
    meds: Tensor | None = None


class EpochReport(NamedTuple):
    """What :meth:`Recommender.on_epoch_start` did: mean loss parts of its phases, seconds per
    phase (keys of :attr:`Recommender.phases`) and facts worth logging (``kg_edges``)."""

    loss: dict[str, float]
    time: dict[str, float]
    info: dict[str, Any]


class Recommender(nn.Module):
    """A recommender model that the generic trainer can train, select, checkpoint and score.

    Class attributes a model sets:

    - ``name``: its registry key (``diffkg-fast train --model NAME``);
    - ``batch_kind``: the batches :meth:`forward` takes (``"pairs"``: :class:`PairBatch`;
      ``"none"``: nothing is trained, e.g. popularity);
    - ``phases``: names of the phases :meth:`on_epoch_start` times (logged per epoch).

    ``dist`` is the single process until :meth:`distribute` sets the run's.
    """

    name: ClassVar[str] = ""
    batch_kind: ClassVar[str] = "pairs"
    phases: ClassVar[tuple[str, ...]] = ()
    dist: Dist = SINGLE
    n_users: int
    n_items: int

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> Recommender:
        """The model for dataset ``ds`` (a :class:`~diffkg_fast.data.dataset.KGDataset`)."""
        raise NotImplementedError

    @classmethod
    def options(cls) -> dict[str, Any]:
        """``{name: default}`` of the keyword-only parameters of ``from_dataset`` and
        ``__init__`` (see the module docstring), in signature order."""
        out: dict[str, Any] = {}
        for fn in (cls.from_dataset, cls.__init__):
            for p in inspect.signature(fn).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty:
                    out.setdefault(p.name, p.default)
        return out

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the first option out of range (default: none checked).

        Called by config validation before any data is loaded, and by ``__init__``."""

    @classmethod
    def memory_estimate(cls, ds: Any, config: Mapping[str, Any]) -> list[MemoryTerm]:
        """The big tensors that training on ``ds`` with ``config`` holds, each with the options
        that shrink it (:mod:`diffkg_fast.utils.memory_check` refuses a run whose sum cannot
        fit before anything is allocated). Default: none given, no check."""
        return []

    # ------------------------------------------------------------------ training
    def configure_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """The optimizer of the trainer's batch loop (default: Adam over every parameter);
        ``None`` when the model has nothing to train."""
        params = list(self.parameters())
        return torch.optim.Adam(params, lr=lr) if params else None

    def on_epoch_start(self, epoch: int, limit_batches: int | None = None) -> EpochReport:
        """Work the model owns before the epoch's batches (default: none).

        ``limit_batches`` (benchmarks only) caps every loop of the phase."""
        return EpochReport({}, {}, {})

    def on_epoch_end(self, epoch: int, limit_batches: int | None = None) -> EpochReport:
        """Work the model owns after the epoch's batches, before validation (default: none)."""
        return EpochReport({}, {}, {})

    def distribute(self, dist: Dist) -> None:
        """Called by the trainer once, before the first epoch of a data-parallel run (``dist``:
        a :class:`~diffkg_fast.utils.distributed.Dist`). A model whose epoch phases train or
        compute on their own shards them here (DiffKG: its denoiser's pass and the rebuild).
        Default: keep ``dist`` (the whole-batch terms of :meth:`forward` reduce over it), and
        run the phases whole on every rank, which keeps the ranks' states identical as long as
        they draw only from the model's seeded streams (KGAT's TransR phase and attention
        refresh). An override calls this one."""
        self.dist = dist

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """One training step's loss and its named parts (detached), from a batch of
        :attr:`batch_kind`. Called as ``model(batch)``, never as another method, so that a
        ``DistributedDataParallel`` wrapper sees it.

        Data-parallel runs (``docs/distributed.md``) give each rank a part of the batch
        (``batch.span`` says which) and weigh its loss as a MEAN over rows plus terms that do
        not depend on the rows (a sum over the rows is scaled by ``total / rows`` to that
        form, as CDAE does). Such a loss follows the single process's trajectory when it draws
        per row for the whole batch and keeps its rows (``span.cut``), and computes a term
        over the whole batch (a norm of its embeddings, a mean over its distinct patients)
        from the whole batch's values."""
        raise NotImplementedError

    def epoch_info(self) -> dict[str, Any]:
        """Facts about the state the epoch trained with, logged per epoch (default: none)."""
        return {}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, users: Tensor) -> Tensor:
        """``B × n_items`` scores of ``users`` (int64 ids), eval mode, no gradient."""
        raise NotImplementedError

    @torch.no_grad()
    def ranking_scores(self, users: Tensor) -> Tensor | FactoredScores:
        """:meth:`score`, in the form the ranking metrics read fastest (default: the tensor;
        an embedding model gives its factors, ranked without writing ``B × n_items``)."""
        return self.score(users)

    @property
    def patient_inputs(self) -> frozenset[str]:
        """Which fields of :class:`Patients` besides ``users`` :meth:`score_patients` reads:
        ``"codes"``, ``"meds"`` (default: none)."""
        return frozenset()

    @property
    def scores_unseen(self) -> bool:
        """Whether a patient without training interactions (a held-out patient of the visit
        split, a new one) gets a trained score: false where the only representation is an ID
        embedding that only training interactions train."""
        return False

    @torch.no_grad()
    def score_patients(self, patients: Patients) -> Tensor:
        """``B × n_items`` scores of patients given by what is known of them (default: the
        users' own scores, :meth:`score`)."""
        if patients.users is None:
            raise NotImplementedError(f"model {self.name!r} scores patients by their id only")
        return self.score(patients.users)

    def scoring_state(self) -> dict[str, Any]:
        """The part of :meth:`state_dict` that scoring reads: what the trainer keeps of the best
        epoch and what ``evaluate`` / ``recommend`` load (default: all of it)."""
        return self.state_dict()

    def load_scoring_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`scoring_state`."""
        self.load_state_dict(state)


class EmbeddingRecommender(Recommender):
    """A recommender that scores ``<u, i>`` from one eval-mode forward, cached.

    :meth:`_eval_outputs` returns ``(user_emb, item_emb, …)``; the cache holds every
    parameter's in-place version counter and the object :meth:`_scoring_key` names (DiffKG:
    the KG it scores with), so an optimizer step, ``load_state_dict`` (both in place) or a new
    graph invalidates it without bookkeeping.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[object, tuple, tuple[Tensor, ...]] | None = None

    def _eval_outputs(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _scoring_key(self) -> object:
        return None

    @torch.no_grad()
    def _cached(self) -> tuple[Tensor, ...]:
        versions = tuple(p._version for p in self.parameters())
        key = self._scoring_key()
        # The key object itself is held (not its id), so a new graph never aliases a dead one.
        if self._cache is None or self._cache[0] is not key or self._cache[1] != versions:
            was = self.training
            self.eval()
            out = tuple(t.detach() for t in self._eval_outputs())
            self.train(was)
            self._cache = (key, versions, out)
        return self._cache[2]

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """``(user_emb, item_emb)`` of an eval-mode forward (no dropout), cached."""
        out = self._cached()
        return out[0], out[1]

    @torch.no_grad()
    def score(self, users: Tensor) -> Tensor:
        return self.ranking_scores(users).dense()

    @torch.no_grad()
    def ranking_scores(self, users: Tensor) -> FactoredScores:
        u, i = self.embeddings()
        return FactoredScores(u[users.to(u.device)], i)


def check_options(values: Mapping[str, Any], *, positive: Iterable[str] = (),
                  non_negative: Iterable[str] = (), unit: Iterable[str] = (),
                  choices: Mapping[str, Iterable[Any]] | None = None) -> None:
    """Range checks shared by the models' :meth:`Recommender.check_options`: each named value
    must be finite and ``> 0`` / ``>= 0`` / in ``[0, 1]`` / one of its choices. Names missing
    from ``values`` are skipped (a partial check of the options a caller sets)."""
    def num(name: str) -> float | None:
        if name not in values:
            return None
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        return float(v)

    for name in positive:
        if (v := num(name)) is not None and v <= 0:
            raise ValueError(f"{name} must be > 0, got {values[name]}")
    for name in non_negative:
        if (v := num(name)) is not None and v < 0:
            raise ValueError(f"{name} must be >= 0, got {values[name]}")
    for name in unit:
        if (v := num(name)) is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {values[name]}")
    for name, allowed in (choices or {}).items():
        allowed = tuple(allowed)
        if name in values and values[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {values[name]!r}")
