"""DiffKG (Jiang, Yang, Xia, Huang: "DiffKG: Knowledge Graph Diffusion Model for
Recommendation", WSDM 2024), as one self-contained module with its diffusion inside.

    ent, u, i   = KGEncoder(kg1)                 RGAT over the KG, LightGCN over users + items
    y_ui        = <u, i>
    loss        = BPR(u) [+ BPR(C ent)] + reg sum ||theta||^2
                  + ssl_reg (InfoNCE_users(view1, view2) + InfoNCE_items(view1, view2))

Every epoch :meth:`DiffKG.on_epoch_start` trains the denoiser one pass over the KG rows and
rebuilds the denoised KG (:class:`~diffkg_fast.model.diffkg.diffusion.KGDiffusion`); view 1 (the
BPR view, and the one scores use) is that denoised KG with ``cl_pattern = 0`` and the original
(``triplet_num``-sampled) KG with ``cl_pattern = 1``; view 2 is the other one. The epoch order is
DiffKG's ``Main.py``: negatives, diffusion pass, rebuild, BPR + contrastive steps, ranking.

Options and their defaults are DiffKG's ``Params.py`` (HKUDS/DiffKG; ``keepRate`` 0.5 as in
commit b6bd81e, a later commit sets 0.1), names included, so a published command line maps one
to one. Beyond ``Params.py``: ``use_diffusion=False`` (the diffusion-free ablation: no denoiser is
built, both views are the sampled original KG), ``patient_codes`` (patients described by their
diagnoses and procedures, ``docs/patients-by-codes.md``; ``False`` is DiffKG as published),
``denoiser_dropout`` (DiffKG hard-codes 0.5), ``diffusion_precision`` (the denoiser's GEMMs:
``fp32``, ``tf32``, ``bf16``), ``diffusion_passes`` (the denoiser's passes over the KG rows per
epoch; DiffKG makes one, which at the medication scale is 4 Adam steps), and SafeDrug's
controllable DDI loss: ``ddi_loss`` (off by default: DiffKG as published), ``target_ddi``
(0.06), ``kp`` (0.05), ``ddi_scale`` (0.0005), with their math, sources and the probabilities of
a BPR ranking in :mod:`diffkg_fast.model.ddi_loss`; each BPR term (the patient's, and the code
representation's) is controlled by the DDI rate of its own top-``k`` sets. The large-KG options
(``docs/large-kg.md``): ``diffusion_mode`` (``"exact"``, DiffKG's; ``"sampled"``: the denoiser's
loss from each row's edges and ``diffusion_negatives`` sampled columns,
:mod:`diffkg_fast.ops.diffusion_sampled`) and ``cl_mode`` (``"all"``, DiffKG's; ``"sampled"``:
InfoNCE denominators from ``cl_negatives`` sampled nodes, :func:`info_nce_sampled`;
``"in_batch"``: over the batch's nodes, :func:`info_nce_in_batch`). Every epoch logs the
denoised KG's quality (:mod:`~diffkg_fast.model.diffkg.quality`). ``lr`` and ``batch`` serve
both the recommender's and the denoiser's Adam, as in ``Params.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from diffkg_fast.model.base import (
    EmbeddingRecommender,
    EpochReport,
    PairBatch,
    Patients,
    check_options,
)
from diffkg_fast.model.ddi_loss import DDILoss, controlled, ddi_pairs_of, set_size_of
from diffkg_fast.model.diffkg.diffusion import (
    DENOISER_ADAMS,
    DIFFUSION_MODES,
    REBUILD_MODES,
    KGDiffusion,
    check_mode,
    check_rebuild,
)
from diffkg_fast.model.diffkg.encoder import KGEncoder
from diffkg_fast.model.diffkg.quality import KGQuality
from diffkg_fast.model.diffkg.sharding import SHARDINGS
from diffkg_fast.model.losses import (
    bpr_loss,
    info_nce,
    info_nce_in_batch,
    info_nce_sampled,
    l2_reg,
)
from diffkg_fast.model.patients import patient_code_matrix
from diffkg_fast.ops.graph import KGCSR, norm_adjacency, torch_csr
from diffkg_fast.ops.rows import rows
from diffkg_fast.utils.distributed import Span, whole_batch
from diffkg_fast.utils.epoch_batch import epoch_batch
from diffkg_fast.utils.memory_check import MemoryTerm
from diffkg_fast.utils.seed import rng_stream

__all__ = ["DiffKG"]

PRECISIONS = ("fp32", "tf32", "bf16")
CL_MODES = ("all", "sampled", "in_batch")


class DiffKG(EmbeddingRecommender):
    """DiffKG on ``n_users`` users and ``n_items`` items, items being the KG entities
    ``0 … n_items-1`` of ``n_entities``.

    Args:
        train: training interactions (``n_users × n_items``, nonzero = 1).
        kg: ``(n, 3)`` integer ``(h, r, t)`` triplets, relations in ``[0, n_relations)``;
            inverses are added (``2 n_relations`` relation rows), one relation per pair.
        codes: ``n_users × n_entities`` row-mean CSR of each patient's TRAINING codes
            (:func:`~diffkg_fast.model.patients.patient_code_matrix`), or ``None``.

    Every random draw comes from a stream of ``seed`` (``init``, ``neighbours``, ``dropout``,
    ``diffusion``, ``rebuild``; :func:`~diffkg_fast.utils.seed.rng_stream`), except the
    denoiser's input dropout, which draws from torch's global generator as DiffKG's does.
    """

    name = "diffkg"
    phases = ("diffusion", "rebuild", "kg_quality")

    def __init__(self, n_users: int, n_items: int, n_entities: int, n_relations: int,
                 train: sp.spmatrix, kg: np.ndarray, codes: sp.spmatrix | None = None,
                 ddi_pairs: np.ndarray | None = None, set_size: int = 1, *,
                 latdim: int = 64, gnn_layer: int = 2, layer_num_kg: int = 1,
                 mess_dropout_rate: float = 0.1, res_lambda: float = 0.5,
                 triplet_num: int = 10, reg: float = 1e-7, ssl_reg: float = 0.1,
                 temp: float = 0.1, cl_pattern: int = 0, use_diffusion: bool = True,
                 dims: Sequence[int] = (1000,), d_emb_size: int = 10, norm: bool = True,
                 steps: int = 5, noise_scale: float = 0.1, noise_min: float = 1e-4,
                 noise_max: float = 0.02, sampling_steps: int = 0, rebuild_k: int = 1,
                 e_loss: float = 0.5, keepRate: float = 0.5, denoiser_dropout: float = 0.5,
                 diffusion_precision: str = "fp32", diffusion_passes: int = 1,
                 diffusion_mode: str = "exact", diffusion_negatives: int = 256,
                 ckgc_samples: int = 0, denoiser_adam: str = "dense",
                 rebuild_mode: str = "exact",
                 denoiser_sharding: str = "replicate",
                 cl_mode: str = "all", cl_negatives: int = 1024,
                 ddi_loss: bool = False, target_ddi: float = 0.06, kp: float = 0.05,
                 ddi_scale: float = 5e-4,
                 lr: float = 1e-3, batch: int = 1024, seed: int = 421,
                 device: str = "cpu") -> None:
        super().__init__()
        self.check_options(locals())
        dev = torch.device(device)
        self.n_users, self.n_items, self.n_entities = n_users, n_items, n_entities
        self.reg, self.ssl_reg, self.temp, self.cl_pattern = reg, ssl_reg, temp, cl_pattern
        self.check_data_options(n_users, n_items, n_entities, use_diffusion, diffusion_mode,
                                diffusion_negatives, cl_mode, cl_negatives, ckgc_samples,
                                denoiser_adam, rebuild_mode)
        self.cl_mode, self.cl_negatives = cl_mode, cl_negatives
        # Its own stream, made only when used: the other streams, and the state of a run
        # without it, stay what they were.
        self.cl_generator = rng_stream(seed, "cl_negatives") if cl_mode == "sampled" else None
        # Built in this order, each from its own stream: the attention edge set is sampled once
        # at build, as DiffKG does.
        adj = norm_adjacency(train, n_users, n_items).to(dev)
        self.kg_full = KGCSR.from_kg(kg, n_entities, n_relations).to(dev)
        self.kg_sampled = self.kg_full.sample_neighbours(triplet_num,
                                                         rng_stream(seed, "neighbours"))
        self.kg_denoised: KGCSR | None = None
        init = rng_stream(seed, "init")
        self.encoder = KGEncoder(
            n_users, n_items, n_entities, self.kg_full.n_relations, adj,
            None if codes is None else torch_csr(codes, dev), latdim=latdim,
            gnn_layer=gnn_layer, layer_num_kg=layer_num_kg, mess_dropout_rate=mess_dropout_rate,
            res_lambda=res_lambda, generator=init).to(dev)
        self.dropout_generator = rng_stream(seed, "dropout")
        self.diffusion = None if not use_diffusion else KGDiffusion(
            self.kg_full, n_items, train, dims=dims, d_emb_size=d_emb_size, norm=norm,
            steps=steps, noise_scale=noise_scale, noise_min=noise_min, noise_max=noise_max,
            sampling_steps=sampling_steps, rebuild_k=rebuild_k, e_loss=e_loss, keepRate=keepRate,
            denoiser_dropout=denoiser_dropout, diffusion_precision=diffusion_precision, lr=lr,
            batch=batch, diffusion_passes=diffusion_passes, diffusion_mode=diffusion_mode,
            diffusion_negatives=diffusion_negatives, ckgc_samples=ckgc_samples,
            denoiser_adam=denoiser_adam, rebuild_mode=rebuild_mode,
            denoiser_sharding=denoiser_sharding,
            seed=seed, init=init)
        self.quality = None if not use_diffusion else KGQuality(self.kg_full, seed)
        if ddi_loss and ddi_pairs is None:
            raise ValueError("ddi_loss=True needs ddi_pairs (the KG's 'ddi' relation)")
        self.ddi = None if not ddi_loss else DDILoss(
            ddi_pairs, n_items, set_size, target_ddi=target_ddi, kp=kp,
            ddi_scale=ddi_scale).to(dev)

    @classmethod
    def from_dataset(cls, ds: Any, *, patient_codes: bool = True, **options: Any) -> DiffKG:
        """DiffKG for a :class:`~diffkg_fast.data.dataset.KGDataset`; with ``patient_codes``
        and a dataset with visits, patients are also described by their training codes. With
        ``ddi_loss``, a dataset without a ``ddi`` relation is a :class:`DataError`."""
        codes = (patient_code_matrix(ds.visits, ds.n_users, ds.n_entities, (0,))
                 if patient_codes and ds.visits is not None else None)
        ddi = options.get("ddi_loss", False)
        return cls(ds.n_users, ds.n_items, ds.n_entities, ds.n_relations, ds.train, ds.kg,
                   codes, ddi_pairs_of(ds) if ddi else None, set_size_of(ds) if ddi else 1,
                   **options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_options(
            options, positive=("latdim", "steps", "rebuild_k", "temp", "noise_scale", "lr",
                               "batch", "d_emb_size", "diffusion_passes", "kp",
                               "diffusion_negatives", "cl_negatives"),
            non_negative=("gnn_layer", "layer_num_kg", "reg", "ssl_reg", "sampling_steps",
                          "noise_min", "noise_max", "seed", "ddi_scale", "ckgc_samples"),
            unit=("keepRate", "e_loss", "mess_dropout_rate", "denoiser_dropout", "target_ddi"),
            choices={"cl_pattern": (0, 1), "diffusion_precision": PRECISIONS,
                     "diffusion_mode": DIFFUSION_MODES, "cl_mode": CL_MODES,
                     "denoiser_sharding": SHARDINGS, "denoiser_adam": DENOISER_ADAMS,
                     "rebuild_mode": REBUILD_MODES})
        for name, low in (("diffusion_negatives", 1), ("cl_negatives", 1), ("ckgc_samples", 0)):
            v = options.get(name, low)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if options.get("diffusion_mode") == "sampled" and \
                options.get("diffusion_precision", "fp32") != "fp32":
            raise ValueError(f"diffusion_mode='sampled' computes in float32 only; got "
                             f"diffusion_precision={options['diffusion_precision']!r}")
        check_rebuild(options.get("rebuild_mode", "exact"),
                      options.get("diffusion_negatives", 256), options.get("rebuild_k", 1),
                      options.get("sampling_steps", 0), options.get("diffusion_precision", "fp32"))
        dims = options.get("dims", (1000,))
        if len(dims) != 1 or int(dims[0]) < 1:
            # The denoiser (ops.diffusion.Denoiser) has one hidden layer, as DiffKG's default.
            raise ValueError(f"dims must be one positive hidden size, got {list(dims)}")
        if options.get("sampling_steps", 0) > options.get("steps", 5):
            raise ValueError(f"sampling_steps={options['sampling_steps']} > "
                             f"steps={options['steps']}")
        if options.get("triplet_num", 10) < -1:
            raise ValueError(f"triplet_num must be -1 (all) or >= 0, got "
                             f"{options['triplet_num']}")

    @staticmethod
    def check_data_options(n_users: int, n_items: int, n_entities: int, use_diffusion: bool,
                           diffusion_mode: str, diffusion_negatives: int, cl_mode: str,
                           cl_negatives: int, ckgc_samples: int = 0,
                           denoiser_adam: str = "dense", rebuild_mode: str = "exact") -> None:
        """The large-KG options against the data's sizes: ``ValueError`` naming the option."""
        for name, value in (("diffusion_mode", diffusion_mode), ("rebuild_mode", rebuild_mode)):
            if value == "sampled" and not use_diffusion:
                raise ValueError(f"{name}='sampled' needs use_diffusion=True (there is no "
                                 f"denoiser to train); drop {name}")
        check_mode(diffusion_mode, diffusion_negatives, n_entities, ckgc_samples=ckgc_samples,
                   denoiser_adam=denoiser_adam, n_items=n_items)
        if cl_mode == "sampled" and cl_negatives >= max(n_users, n_items):
            raise ValueError(
                f"cl_mode='sampled' with cl_negatives={cl_negatives} >= both the {n_users} users "
                f"and the {n_items} items: nothing would be sampled; use cl_mode='all' or "
                f"cl_negatives < {max(n_users, n_items)}")

    @classmethod
    def memory_estimate(cls, ds: Any, config: Mapping[str, Any]) -> list[MemoryTerm]:
        """DiffKG's big tensors, float32, one process (an FSDP-sharded denoiser counted whole):
        the denoiser's 2·E·H weights with gradient and Adam moments (16 B each; 12 B with the
        lazy or deferred Adam's compact gradient), a dense diffusion step's five B × E blocks
        (the exact mode), InfoNCE's B' × (U + I) logits (all users and items; B' the
        recommender's batch, grown by ``max_epoch_steps``) and the recommender's embeddings with
        gradient and moments (16 B per (U + E) × d weight)."""
        E, B, d = ds.n_entities, config["batch"], config["latdim"]
        b_rec = epoch_batch(int(ds.train.nnz), B, config.get("max_epoch_steps", 0))
        H = int(config["dims"][0])
        per_weight = 16 if config["denoiser_adam"] == "dense" else 12
        diffusion = config["use_diffusion"]
        logits = (ds.n_users + ds.n_items if config["cl_mode"] == "all"
                  else 2 * config["cl_negatives"])
        return [
            MemoryTerm("the denoiser's weights, gradients and Adam moments",
                       diffusion * per_weight * 2 * E * H, True,
                       "a smaller dims: its weights are 2 x entities x dims; or "
                       "use_diffusion=false"),
            MemoryTerm("a diffusion step's five batch x entities blocks",
                       diffusion * (config["diffusion_mode"] == "exact") * 5 * 4 * B * E, False,
                       "diffusion_mode=sampled scores a row's edges and sampled negatives; or a "
                       "smaller batch"),
            MemoryTerm("the contrastive loss's batch x (users + items) logits",
                       4 * b_rec * logits, False,
                       "cl_mode=sampled; or a smaller batch (a larger max_epoch_steps)"),
            MemoryTerm("the recommender's embeddings, gradients and Adam moments",
                       16 * (ds.n_users + E) * d, True, "a smaller latdim"),
        ]

    # ------------------------------------------------------------------ graphs
    def views(self) -> tuple[KGCSR, KGCSR]:
        """``(view 1, view 2)`` of this epoch: the denoised and the sampled original KG, in the
        order ``cl_pattern`` gives; both the sampled KG without diffusion (or before the first
        rebuild)."""
        den = self.kg_sampled if self.kg_denoised is None else self.kg_denoised
        return (den, self.kg_sampled) if self.cl_pattern == 0 else (self.kg_sampled, den)

    def epoch_info(self) -> dict[str, Any]:
        return {"kg_edges": self.views()[0].n_edges}

    def on_epoch_start(self, epoch: int, limit_batches: int | None = None) -> EpochReport:
        """One denoiser pass over the KG rows, then the rebuild of this epoch's denoised KG."""
        if self.diffusion is None:
            return EpochReport({}, {}, {})
        t0 = time.perf_counter()
        losses = self.diffusion.train_pass(self.encoder.user, self.encoder.entity,
                                           limit_batches)
        t1 = time.perf_counter()
        self.kg_denoised = self.diffusion.rebuild(limit_batches)
        t2 = time.perf_counter()
        info = self._quality()
        times = {"diffusion": t1 - t0, "rebuild": t2 - t1, "kg_quality": time.perf_counter() - t2}
        return EpochReport(losses, times, info)

    def distribute(self, dist: Any) -> None:
        """The denoiser trains data-parallel over the KG rows and the rebuild is sharded by
        rows (:meth:`KGDiffusion.distribute`); the encoder's DDP is the trainer's."""
        super().distribute(dist)
        if self.diffusion is not None:
            self.diffusion.distribute(dist)

    def _quality(self) -> dict[str, float]:
        """The rebuild's precision and the denoiser's masked-edge recovery (quality.py)."""
        assert self.diffusion is not None and self.quality is not None
        d = self.diffusion
        return {"rebuild_precision": self.quality.precision(*d.last_picks),
                **self.quality.mask_recovery(d.plain_denoiser(), d.schedule, d.sampling_steps)}

    # ------------------------------------------------------------------ training
    def configure_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam over the recommender (the encoder); the denoiser has its own."""
        return torch.optim.Adam(self.encoder.parameters(), lr=lr)

    def forward(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """BPR on view 1 + L2 + ``ssl_reg`` InfoNCE between the views over the batch's users
        and positive items: two graph forwards (one when ``ssl_reg = 0``). With ``ddi_loss``,
        each BPR term is SafeDrug's controlled loss of its own ranking (module docstring).

        With patient codes, a second BPR term ranks with the code representation ALONE, so that
        a patient known only by codes (held out, or new) is ranked by a trained vector."""
        kg1, kg2 = self.views()
        users, pos, neg, span = batch
        v1 = self.encoder(kg1, self.dropout_generator)
        # rows(), not v1.users[users]: the indexing backward sums at two threads in timing order.
        terms = bpr_loss(rows(v1.users, users), rows(v1.items, pos), rows(v1.items, neg),
                         reduce=False)
        parts = {"bpr": terms.mean().detach()}
        bpr = controlled(self.ddi, terms, v1.users, v1.items, users, parts, span=span,
                         dist=self.dist)
        if v1.codes is not None:
            terms = bpr_loss(rows(v1.codes, users), rows(v1.items, pos), rows(v1.items, neg),
                             reduce=False)
            parts["code_bpr"] = terms.mean().detach()
            bpr = bpr + controlled(self.ddi, terms, v1.codes, v1.items, users, parts, "code_",
                                   span=span, dist=self.dist)
        reg = l2_reg(self.encoder.parameters(), self.reg)
        total = bpr + reg
        parts.update(reg=reg.detach(), cl=torch.zeros((), device=bpr.device))
        if self.ssl_reg > 0:
            v2 = self.encoder(kg2, self.dropout_generator)
            cl = (self._info_nce(v1.users, v2.users, users, span)
                  + self._info_nce(v1.items, v2.items, pos, span))
            total = total + self.ssl_reg * cl
            parts["cl"] = cl.detach()
        return total, parts

    def _info_nce(self, view1: Tensor, view2: Tensor, nodes: Tensor, span: Span | None,
                  ) -> Tensor:
        """InfoNCE of ``nodes`` by ``cl_mode``. ``"sampled"`` on a side of at most
        ``cl_negatives`` nodes takes the exact denominator: a sample that large costs more.
        ``"in_batch"`` is over the whole batch's distinct nodes, gathered from the ranks in a
        data-parallel step: a term of the whole batch, the same on every rank."""
        n = view2.shape[0]
        if self.cl_mode == "in_batch":
            return info_nce_in_batch(view1, view2, whole_batch(nodes, span, self.dist),
                                     self.temp)
        if self.cl_mode == "all" or n <= self.cl_negatives:
            return info_nce(view1, view2, nodes, self.temp)
        neg = torch.randint(n, (self.cl_negatives,), generator=self.cl_generator)
        return info_nce_sampled(view1, view2, nodes, self.temp, neg.to(view2.device))

    # ------------------------------------------------------------------ scoring
    def _scoring_key(self) -> object:
        return self.views()[0]

    def _eval_outputs(self) -> tuple[Tensor, ...]:
        e = self.encoder(self.views()[0])
        return e.users, e.items, e.u_prop, e.ent

    @property
    def patient_inputs(self) -> frozenset[str]:
        return frozenset({"codes"}) if self.encoder.codes is not None else frozenset()

    @property
    def scores_unseen(self) -> bool:
        return self.encoder.codes is not None

    @torch.no_grad()
    def score_patients(self, patients: Patients) -> Tensor:
        """With codes: the mean RGAT embedding of each patient's codes, plus, with ``users``,
        its propagated ID embedding (masked for a patient without training interactions)."""
        if patients.codes is None:
            return super().score_patients(patients)
        _, items, u_prop, ent = self._cached()
        u = torch.sparse.mm(patients.codes.to(ent.device), ent)
        if patients.users is not None:
            users = patients.users.to(u.device)
            u = u + u_prop[users] * self.encoder.has_train[users]
        return u @ items.T

    def scoring_state(self) -> dict[str, Any]:
        """Everything but the diffusion side (the denoiser, its optimiser and streams)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("diffusion.")}

    def load_scoring_state(self, state: Mapping[str, Any]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("diffusion.")]
        if missing or unexpected:
            raise RuntimeError(f"scoring state does not fit: missing {missing}, "
                               f"unexpected {unexpected}")

    def get_extra_state(self) -> dict[str, Any]:
        state = {"kg_sampled": torch.from_numpy(self.kg_sampled.to_triplets()),
                 "kg_denoised": (None if self.kg_denoised is None
                                 else torch.from_numpy(self.kg_denoised.to_triplets())),
                 "dropout": self.dropout_generator.get_state()}
        if self.cl_generator is not None:  # only then: a default run's state is unchanged
            state["cl_negatives"] = self.cl_generator.get_state()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Rows are stored in CSR order and from_triplets sorts stably: edge-for-edge the same.
        def graph(triplets: Tensor) -> KGCSR:
            return KGCSR.from_triplets(triplets, self.n_entities, self.kg_full.n_relations
                                       ).to(self.kg_full.rowptr.device)

        self.kg_sampled = graph(state["kg_sampled"])
        self.kg_denoised = None if state["kg_denoised"] is None else graph(state["kg_denoised"])
        self.dropout_generator.set_state(state["dropout"])
        if self.cl_generator is not None and "cl_negatives" in state:
            self.cl_generator.set_state(state["cl_negatives"])
