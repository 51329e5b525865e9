"""DiffRec (Wang, Xu, Feng, Lin, He, Chua: "Diffusion Recommender Models", SIGIR 2023): a
Gaussian diffusion over each user's 0/1 interaction row, denoised by an MLP that predicts x0.

    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps           x0 = the user's training row (I,)
    x̂0    = f(x_t, t)      Linear(I + emb, H) → tanh → Linear(H, I), emb(t) sinusoidal → Linear
    (t, pt) ~ importance sampler; uniform with pt = 1 until every step has 10 recorded losses
    loss  = mean_b[ w_t ‖x0 - x̂0‖² / I / pt_b ],  w_t = SNR(t-1) - SNR(t), w_0 = 1  (reweight)
    score = the reverse walk from x0 itself (sampling_steps = 0; else q_sample(x0, T'-1)):
            x <- c1_t f(x, t) + c2_t x,  t = steps-1 … 0, no noise  (c2_0 = 0: the last f)

One implementation with DiffKG's diffusion (:mod:`diffkg_fast.ops.diffusion`): the schedule
(:class:`~diffkg_fast.ops.diffusion.DiffusionSchedule`), the denoiser
(:class:`~diffkg_fast.ops.diffusion.Denoiser`), ``q_sample`` / the loss
(:func:`~diffkg_fast.ops.diffusion.diffusion_loss`, ``e_loss = 0``: its CKGC term is DiffKG's
only) and the sampler (:func:`~diffkg_fast.ops.diffusion.sample`), fused backends included.

Where DiffRec's code (YiyanXu/DiffRec ``DiffRec/models/gaussian_diffusion.py``, ``models/DNN.py``,
``DiffRec/main.py``; RecBole 1.2.1 ``recbole/model/general_recommender/diffrec.py``) and DiffKG's
(HKUDS/DiffKG, whose diffusion follows DiffRec's code) AGREE — the shared ops compute exactly this:

- "linear-var" betas: ``var = linspace(scale·min, scale·max, T)``, ``beta_t = min(1 -
  (1-var_t)/(1-var_{t-1}), 0.999)``, ``beta_0`` fixed, ``abar`` recomputed as ``cumprod(1-beta)``;
- the x0 target (``mean_type="x0"``), the SNR weight ``SNR(t-1) - SNR(t)`` with ``w_0 = 1``
  (``reweight=True``), the per-row mean over items and the batch mean; ``F.normalize`` over
  the items;
- the denoiser: ``concat[x, emb_layer(sinusoid(t))] → Linear → tanh → Linear``, input dropout
  0.5 before the concat, optional L2 norm of the input, weights ``N(0, sqrt(2/(fan_in+fan_out)))``
  and biases ``N(0, 1e-3)`` (DiffRec's ``DNN.init_weights``, YiyanXu/DiffRec ``models/DNN.py``;
  RecBole's xavier_normal has the same weight law but zero biases);
- inference: ``sampling_noise=False`` posterior means, started at ``x0`` itself
  (``sampling_steps=0``) or at ``q_sample(x0, sampling_steps-1)``, and walked through ALL
  ``steps`` steps (``indices = range(self.steps)[::-1]`` in both codes, whatever
  ``sampling_steps`` is: it only sets the start's noise level).

Where they DIFFER (each handled by a flag of the shared ops, DiffKG's default unchanged):

- ``beta_0``: DiffRec's ``beta_fixed`` writes 1e-5, DiffKG's 1e-4 (``DiffusionSchedule.beta_0``);
- the schedule: RecBole's default is ``"linear"`` (``beta_t = linspace`` itself, no clip), the
  authors' ``main.py`` default ``"linear-var"`` (``noise_schedule``);
- timesteps: DiffRec samples ``t`` by importance (module
  :mod:`~diffkg_fast.ops.diffusion_importance`) and divides each row's loss by ``pt``
  (``diffusion_loss(row_weights=1/pt)``); DiffKG draws ``t`` uniformly;
- ``reweight=False`` (RecBole: weight 1, plain MSE; ``diffusion_loss(step_weights=ones)``).
  In the authors' ``training_losses`` that branch leaves ``loss`` unbound, and ``--reweight`` is
  an argparse ``type=bool``, so ``--reweight 0`` still means True: their runs all reweighted;
- the input norm: off in DiffRec (``main.py``'s ``--norm`` False; RecBole's ``DiffRec.yaml``
  sets no ``norm``, so ``config["norm"]`` is None: off), on in DiffKG;
- the CKGC term and the KG: DiffKG only. DiffRec's weights are float64 (SNR in float64 times a
  float32 MSE promotes), here float32 like DiffKG's; not supported: ``mean_type="eps"``,
  ``sampling_noise=True``, several hidden layers (the authors' ML-1M runs use ``[200, 600]``),
  T-DiffRec's time weights, L-DiffRec.

Defaults, RecBole 1.2.1 ``recbole/properties/model/DiffRec.yaml`` (the parity target) unless said:
``steps`` 5 (DiffRec ``main.py``: 100; the authors' tuned runs 5–40), ``noise_schedule``
"linear" (``main.py``: "linear-var"), ``noise_scale`` 0.001 (``main.py``: 0.1), ``noise_min``
0.0005 (``main.py``: 1e-4), ``noise_max`` 0.005 (``main.py``: 0.02), ``beta_fixed`` True (both),
``reweight`` True (both), ``sampling_steps`` 0 (both), ``history_num_per_term`` 10 (both),
``dims`` [300] (RecBole ``dims_dnn``; ``main.py``: [1000]), ``emb_size`` 10 (RecBole
``embedding_size``; ``main.py`` too), ``norm`` False (``main.py``; RecBole: unset, off),
``denoiser_dropout`` 0.5 (both hard-code ``DNN(dropout=0.5)``). ``lr`` and ``batch`` are the
trainer's, 1e-3 and 1024: RecBole's ``learning_rate`` is 1e-3 (Adam, no weight decay; DiffRec:
AdamW, weight decay 0, lr 1e-4 default, 1e-5–1e-3 tuned), its ``train_batch_size`` 2048
(DiffRec: 400).

Randomness: the denoiser's weights from stream ``init``, ``t`` and the noise from
``diffusion``, its input dropout from ``dropout`` (:func:`~diffkg_fast.utils.seed.rng_stream`);
the loss history and the streams are extra state, so a resumed run draws what the run would have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from diffkg_fast.model.base import Patients, Recommender, UserBatch, check_options
from diffkg_fast.ops.diffusion import (
    SCHEDULES,
    Denoiser,
    DiffusionSchedule,
    diffusion_loss,
    dropout_mask,
    sample,
)
from diffkg_fast.ops.diffusion_importance import ImportanceSampler
from diffkg_fast.utils.distributed import whole_batch
from diffkg_fast.utils.seed import rng_stream

__all__ = ["DiffRec"]

BETA_FIXED = 1e-5  # DiffRec's beta_0 when beta_fixed ("Deep Unsupervised Learning ..." 2.4.1)
STREAMS = ("diffusion", "dropout")


class DiffRec(Recommender):
    """DiffRec over ``train`` (``n_users × n_items``, nonzero = 1), kept to score the users'
    own rows. Patients are scored from their known medications alone (``meds``)."""

    name = "diffrec"
    batch_kind = "users"

    def __init__(self, n_users: int, n_items: int, train: sp.spmatrix, *,
                 dims: Sequence[int] = (300,), emb_size: int = 10, norm: bool = False,
                 denoiser_dropout: float = 0.5, steps: int = 5, noise_schedule: str = "linear",
                 noise_scale: float = 0.001, noise_min: float = 0.0005,
                 noise_max: float = 0.005, beta_fixed: bool = True, reweight: bool = True,
                 sampling_steps: int = 0, history_num_per_term: int = 10, seed: int = 421,
                 device: str = "cpu") -> None:
        super().__init__()
        self.check_options(locals())
        dev = torch.device(device)
        self.n_users, self.n_items, self.seed = n_users, n_items, seed
        self.sampling_steps, self.reweight = sampling_steps, reweight
        self.train_rows = (sp.csr_matrix(train) != 0).astype(np.float32).tocsr()
        self.schedule = _schedule(steps, noise_schedule, noise_scale, noise_min, noise_max,
                                  beta_fixed)
        self.generators = {name: rng_stream(seed, name) for name in STREAMS}
        self.denoiser = Denoiser(n_items, int(dims[0]), emb_size, norm=norm,
                                 dropout=denoiser_dropout, generator=rng_stream(seed, "init"),
                                 device=dev, dropout_generator=self.generators["dropout"])
        self.importance = ImportanceSampler(steps, history_num_per_term)
        # reweight=False: weight 1 at every step (RecBole); the CKGC tables: zero, 1 column.
        self.register_buffer("step_weights", None if reweight else torch.ones(
            steps, dtype=torch.float64), persistent=False)
        self.register_buffer("no_kg", torch.zeros(n_items, 1, device=dev), persistent=False)

    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> DiffRec:
        return cls(ds.n_users, ds.n_items, ds.train, **options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_options(options, positive=("emb_size", "steps", "noise_scale",
                                         "history_num_per_term"),
                      non_negative=("noise_min", "noise_max", "sampling_steps", "seed"),
                      unit=("denoiser_dropout",),
                      choices={"noise_schedule": SCHEDULES, "norm": (True, False),
                               "beta_fixed": (True, False), "reweight": (True, False)})
        dims = options.get("dims", (300,))
        if len(dims) != 1 or int(dims[0]) < 1:
            # The shared Denoiser has one hidden layer (RecBole's and DiffRec's default).
            raise ValueError(f"dims must be one positive hidden size, got {list(dims)}")
        steps = options.get("steps", 5)
        if options.get("sampling_steps", 0) > steps:
            raise ValueError(f"sampling_steps={options['sampling_steps']} > steps={steps}")
        sched = _schedule(steps, options.get("noise_schedule", "linear"),
                          options.get("noise_scale", 0.001), options.get("noise_min", 0.0005),
                          options.get("noise_max", 0.005), options.get("beta_fixed", True))
        if not bool(((sched.betas > 0) & (sched.betas <= 1)).all()):
            # DiffRec's own assert: a zero beta freezes abar (noise_min >= noise_max).
            raise ValueError(f"the schedule's betas must be in (0, 1], got "
                             f"{sched.betas.tolist()} (noise_min < noise_max?)")

    # ------------------------------------------------------------------ training
    def forward(self, batch: UserBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The importance-weighted diffusion loss of one batch of users' training rows; the
        batch's per-row losses then join the sampler's history (module docstring)."""
        x0 = batch.rows.to(self.no_kg.device, self.no_kg.dtype)  # the model's dtype
        span = batch.span
        if span is None:
            t, pt, noise = self.importance.draw(x0, self.generators["diffusion"])
            loss, parts = self._loss(x0, t, pt, noise)
            self.importance.record(t, parts["rows"])
            return loss, {"diff": parts["diff"]}
        # A data-parallel step: the whole batch's draws (steps, noise, dropout mask) in the
        # single process's order, this rank's rows of them; every rank records the whole
        # batch's losses, gathered, so the histories (and the next draws) stay the same.
        whole = x0.new_zeros(()).expand(span.total, x0.shape[1])  # shape only, no storage
        t, pt, noise = self.importance.draw(whole, self.generators["diffusion"])
        den = self.denoiser
        mask = None
        if den.dropout > 0:
            mask = span.cut(dropout_mask(whole, den.dropout, den.dropout_generator))
        with den.masked(mask):
            loss, parts = self._loss(x0, span.cut(t), span.cut(pt), span.cut(noise))
        self.importance.record(t, whole_batch(parts["rows"], span, self.dist))
        return loss, {"diff": parts["diff"]}

    def _loss(self, x0: Tensor, t: Tensor, pt: Tensor, noise: Tensor,
              ) -> tuple[Tensor, dict[str, Tensor]]:
        """The importance-weighted loss of the rows ``x0`` at the draws ``t``, ``pt``, ``noise``."""
        return diffusion_loss(
            self.denoiser, x0, t, noise, self.schedule, self.n_items, self.no_kg,
            self.no_kg.new_zeros(x0.shape[0], 1), 0.0, row_weights=1.0 / pt,
            step_weights=self.step_weights)

    def epoch_info(self) -> dict[str, Any]:
        """Whether ``t`` is drawn by importance now, after the epoch (every step's history
        full; before, uniformly)."""
        return {"importance": self.importance.ready}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def denoise(self, rows: Tensor) -> Tensor:
        """The reverse walk from the 0/1 rows ``rows`` (B × n_items) → scores (B × n_items).

        With ``sampling_steps > 0`` the start's noise comes from a fresh copy of stream
        ``diffusion`` per call: scoring never moves the training draws, and a call is
        reproducible."""
        gen = rng_stream(self.seed, "diffusion") if self.sampling_steps else None
        x = rows.to(self.no_kg.device, self.no_kg.dtype)
        return sample(self.denoiser, x, self.schedule, self.sampling_steps, generator=gen)

    @torch.no_grad()
    def score(self, users: Tensor) -> Tensor:
        """The denoised training rows of ``users``."""
        rows = self.train_rows[users.cpu().numpy()].toarray()
        return self.denoise(torch.from_numpy(rows))

    @property
    def patient_inputs(self) -> frozenset[str]:
        return frozenset({"meds"})

    @property
    def scores_unseen(self) -> bool:
        return True  # the denoiser reads the medication row alone

    @torch.no_grad()
    def score_patients(self, patients: Patients) -> Tensor:
        """The denoised ``meds`` rows (sparse CSR, B × n_items); the users' training rows when
        ``meds`` is not given."""
        if patients.meds is None:
            return super().score_patients(patients)
        meds = patients.meds
        dense = meds.to_dense() if meds.layout != torch.strided else meds
        return self.denoise((dense != 0).float())

    def get_extra_state(self) -> dict[str, Any]:
        return {"importance": self.importance.state_dict(),
                "generators": {k: g.get_state() for k, g in self.generators.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if set(state["generators"]) != set(self.generators):
            raise ValueError(f"random streams {sorted(state['generators'])} in the state, "
                             f"expected {sorted(self.generators)}")
        self.importance.load_state_dict(state["importance"])
        for name, g in self.generators.items():
            g.set_state(state["generators"][name])


def _schedule(steps: int, noise_schedule: str, noise_scale: float, noise_min: float,
              noise_max: float, beta_fixed: bool) -> DiffusionSchedule:
    return DiffusionSchedule(steps, noise_scale, noise_min, noise_max, noise_schedule,
                             BETA_FIXED if beta_fixed else None)
