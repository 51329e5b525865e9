"""DiffKG's diffusion side: a denoiser over KG rows, trained by its own Adam, and the KG rebuild.

(Jiang et al., WSDM 2024, sections 3.2–3.3; HKUDS/DiffKG ``Model.py`` / ``Main.py``.) Each row
``x0`` of the binary entity × entity KG adjacency (inverses included) is a sample::

    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,     t ~ U{0 … steps-1}
    x̂0    = f(x_t, t)                                    (the denoiser: 2-layer MLP, tanh)
    loss  = (1-λ) mean_b[w_t ‖x0 - x̂0‖² / E] + λ mean_b[‖x̂0[:, :I] (Rᵀ U) - E_b‖² / d]

with ``w_t = SNR(t-1) - SNR(t)`` and the CKGC term (λ = ``e_loss``) pulling each denoised row's
item part, mixed by the users' embeddings ``Rᵀ U``, towards the entity's own embedding. Only the
denoiser learns from it (the user and entity tables are detached). The rebuild denoises every
entity row (no noise added, ``sampling_steps = 0``), keeps the top ``rebuild_k`` columns of each,
adds their reverses, keeps the pairs of the original KG with their relation, and keeps each of
those with probability ``keepRate``: the denoised KG of the epoch, a subset of the original.

The math of each step lives in :mod:`diffkg_fast.ops.diffusion` (the reference) and its fused
kernels; this module owns the state (denoiser, optimiser, random streams) and the two passes.

Data-parallel (:meth:`KGDiffusion.distribute`): the denoiser runs in its own
``DistributedDataParallel``; each global batch of rows is drawn whole on every rank (row order,
timesteps, noise, dropout mask: the single process's draws) and each rank computes the loss of
its part, scaled as the trainer scales its batches (``batch_part``); the rebuild's row batches
are split in blocks over the ranks and their top-k all-gathered, so every rank rebuilds the
single process's KG.

``diffusion_mode="sampled"`` (the large-KG mode) trains on the same loss with each row's
off-support columns sampled (:mod:`diffkg_fast.ops.diffusion_sampled`: the estimator, why it is
unbiased on the output side and moment-matched on the input side): a step costs
O((deg + diffusion_negatives)·H) per row instead of O(E·H), and no dense row is built. Its
draws (steps, noise, columns, dropout, CKGC items) all come from the ``diffusion`` stream.
``rebuild_mode="sampled"`` ranks each row's edges against competitor columns drawn from the
``rebuild`` stream (:mod:`diffkg_fast.ops.rebuild_sampled`) instead of every column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from diffkg_fast.model.diffkg.lazy_adam import DeferredAdam, LazyAdam, RowGrad
from diffkg_fast.model.diffkg.sharding import SHARDINGS, full_state, gathered, shard
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    diffusion_loss,
    draw_timesteps_noise,
    dropout_mask,
    kg_rows,
    sample_topk,
)
from diffkg_fast.ops.diffusion_sampled import (
    EntityWeights,
    ItemProduct,
    diffusion_loss_sampled,
    draw_sampled,
    edge_keys,
    entity_weights,
    touched,
)
from diffkg_fast.ops.graph import KGCSR, torch_csr
from diffkg_fast.ops.rebuild import rebuild_kg
from diffkg_fast.ops.rebuild_sampled import sample_topk_candidates
from diffkg_fast.utils.distributed import (
    Dist,
    batch_span,
    block,
    ddp,
    gather_rows,
    sum_across,
)
from diffkg_fast.utils.seed import rng_stream

__all__ = ["DIFFUSION_MODES", "KGDiffusion"]

DIFFUSION_MODES = ("exact", "sampled")
_ADAMS = {"dense": torch.optim.Adam, "lazy": LazyAdam, "deferred": DeferredAdam}
DENOISER_ADAMS = tuple(_ADAMS)
REBUILD_MODES = ("exact", "sampled")


class KGDiffusion(nn.Module):
    """The denoiser of the KG ``kg`` (with inverses, on the model's device), its Adam and its
    random streams (``diffusion``: row order, timesteps and noise; ``rebuild``: the keepRate
    draws), all part of :meth:`state_dict` (the optimiser and streams as extra state).

    ``train``: the training interactions (``n_users × n_items``) of the CKGC term. ``init``:
    the generator of the denoiser's initial weights (default: stream ``init`` of ``seed``).
    Option names and defaults are DiffKG's ``Params.py`` (``dims`` the hidden size, one layer;
    ``denoiser_dropout`` is the input dropout DiffKG hard-codes at 0.5). ``diffusion_mode``:
    ``"exact"`` (DiffKG's dense rows) or ``"sampled"`` (module docstring), with
    ``diffusion_negatives`` sampled columns per step (``1 <= n < n_entities``); in the sampled
    mode, ``ckgc_samples`` > 0 samples that many of the CKGC's items for the gradient of their
    rows (the value stays exact, through an H × d product kept current; 0: every item) and
    ``denoiser_adam="lazy"`` moves only the rows a step touched, ``"deferred"`` moves them
    as dense Adam would have, their zero-gradient steps made up when next read
    (:mod:`~diffkg_fast.model.diffkg.lazy_adam`; ``"dense"``: torch's Adam, every row).
    ``rebuild_mode="sampled"``: each row's top-k among its own edges and
    ``diffusion_negatives`` competitor columns (:mod:`~diffkg_fast.ops.rebuild_sampled`),
    instead of among all columns (``"exact"``).
    """

    def __init__(self, kg: KGCSR, n_items: int, train: sp.spmatrix, *,
                 dims: Sequence[int] = (1000,), d_emb_size: int = 10, norm: bool = True,
                 steps: int = 5, noise_scale: float = 0.1, noise_min: float = 1e-4,
                 noise_max: float = 0.02, sampling_steps: int = 0, rebuild_k: int = 1,
                 e_loss: float = 0.5, keepRate: float = 0.5, denoiser_dropout: float = 0.5,
                 diffusion_precision: str = "fp32", lr: float = 1e-3, batch: int = 1024,
                 diffusion_passes: int = 1, diffusion_mode: str = "exact",
                 diffusion_negatives: int = 256, ckgc_samples: int = 0,
                 denoiser_adam: str = "dense", rebuild_mode: str = "exact",
                 denoiser_sharding: str = "replicate",
                 seed: int = 421, init: torch.Generator | None = None) -> None:
        super().__init__()
        check_mode(diffusion_mode, diffusion_negatives, kg.n_entities, diffusion_precision,
                   ckgc_samples, denoiser_adam, n_items)
        check_rebuild(rebuild_mode, diffusion_negatives, rebuild_k, sampling_steps,
                      diffusion_precision, kg.n_entities)
        if denoiser_sharding not in SHARDINGS:
            raise ValueError(f"denoiser_sharding must be one of {SHARDINGS}, got "
                             f"{denoiser_sharding!r}")
        self.sharding = denoiser_sharding
        dev = kg.rowptr.device
        self.kg, self.n_items = kg, n_items
        self.steps, self.sampling_steps, self.rebuild_k = steps, sampling_steps, rebuild_k
        self.e_loss, self.keep_rate, self.batch = e_loss, keepRate, batch
        self.passes = diffusion_passes
        self.precision = diffusion_precision
        self.mode, self.n_negatives = diffusion_mode, diffusion_negatives
        self.ckgc_samples, self.adam = ckgc_samples, denoiser_adam
        self.rebuild_mode = rebuild_mode
        # The sampled modes' membership tests (is a sampled column an edge of the row?).
        self.keys = (edge_keys(kg.rowptr, kg.col, kg.n_entities)
                     if self.sampled or rebuild_mode == "sampled" else None)
        self.denoiser = Denoiser(kg.n_entities, dims[0], d_emb_size, norm=norm,
                                 dropout=denoiser_dropout,
                                 generator=rng_stream(seed, "init") if init is None else init,
                                 device=dev)
        self.opt: torch.optim.Optimizer = _ADAMS[denoiser_adam](self.denoiser.parameters(),
                                                                 lr=lr)
        self.schedule = DiffusionSchedule(steps, noise_scale, noise_min, noise_max)
        # R^T (I × U), for R^T U_emb once per pass.
        self.rt = torch_csr((sp.csr_matrix(train) != 0).T.astype(np.float32), dev)
        self.rows = torch.arange(kg.n_entities, device=dev)
        self.generators = {name: rng_stream(seed, name) for name in ("diffusion", "rebuild")}
        self.dist = Dist()
        self._ddp: nn.Module | None = None
        self._plain: Denoiser | None = None  # the gathered denoiser of this epoch (sharding.py)
        self._item_product: ItemProduct | None = None  # the sampled CKGC's, current in a pass
        # Checkpoints hold full tensors whatever the sharding (sharding.full_state).
        self._register_state_dict_hook(_full_tensors)
        # The deferred Adam's rows current before the weights are read into a state.
        self.register_state_dict_pre_hook(_flush_before_state)

    def distribute(self, dist: Dist) -> None:
        """Train the denoiser data-parallel and shard the rebuild over ``dist``'s ranks (module
        docstring); the single process's draws and results, up to float reduction order in the
        denoiser's gradients."""
        if dist.active and self.sampled:
            raise ValueError("diffusion_mode='sampled' does not run data-parallel yet: use "
                             "diffusion_mode='exact' with torchrun, or one process")
        self.dist = dist
        if dist.active and self.sharding == "fsdp":
            self.opt = shard(self.denoiser, self.opt, dist)
        elif dist.active:
            # Kept out of the module tree (object.__setattr__): a DDP holding self, registered
            # in self, would make state_dict() recurse.
            object.__setattr__(self, "_ddp", ddp(self, dist))

    @property
    def sharded(self) -> bool:
        """Whether the denoiser's weights are split over the ranks (``denoiser_sharding``)."""
        return self.dist.active and self.sharding == "fsdp"

    def plain_denoiser(self) -> Denoiser:
        """The denoiser with its full weights, for passes without gradients (the rebuild, the
        quality measures): gathered once after each training pass when sharded (a
        collective: every rank asks at the same point), else the denoiser itself."""
        if not self.sharded:
            return self.denoiser
        if self._plain is None:
            # Out of the module tree (object.__setattr__): a copy, not part of the state.
            object.__setattr__(self, "_plain", gathered(self.denoiser))
        assert self._plain is not None
        return self._plain

    def forward(self, x0: Tensor, t: Tensor, noise: Tensor, r_t_u: Tensor, ent_rows: Tensor,
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """The diffusion + CKGC loss of one batch of KG rows (``x0``: B × E). Sharded, through
        the reference loss: it calls the denoiser as a module, where FSDP gathers the weights
        (the fused kernels read them directly)."""
        backend = "reference" if self.sharded else "auto"
        return diffusion_loss(self.denoiser, x0, t, noise, self.schedule, self.n_items, r_t_u,
                              ent_rows, self.e_loss, backend=backend, precision=self.precision)

    @property
    def sampled(self) -> bool:
        return self.mode == "sampled"

    def train_pass(self, user: Tensor, entity: Tensor, limit: int | None = None,
                   ) -> dict[str, float]:
        """``diffusion_passes`` Adam passes over every entity row (each shuffled, ``batch`` rows
        a step; the first ``limit`` batches only, for benchmarks) against the tables ``user``
        (U × d) and ``entity`` (N × d); returns the mean loss parts."""
        sums = {"diff_loss": 0.0, "diff": 0.0, "ckgc": 0.0}
        self._plain = None  # the weights move
        n_batches = 0
        for _ in range(self.passes):
            n_batches += self._one_pass(user, entity, limit, sums)
        sums = sum_across(sums, self.dist)  # each rank added its share of every batch's loss
        return {k: v / max(n_batches, 1) for k, v in sums.items()}

    def _one_pass(self, user: Tensor, entity: Tensor, limit: int | None,
                  sums: dict[str, float]) -> int:
        """One shuffled pass; adds the loss parts of every step to ``sums``; the step count."""
        kg, gen = self.kg, self.generators["diffusion"]
        self.denoiser.train()
        with torch.no_grad():
            r_t_u = torch.sparse.mm(self.rt, user.detach())  # I × d, once per pass
            ent = entity.detach()
        perm = torch.randperm(kg.n_entities, generator=gen).to(ent.device)
        # The sampled CKGC's exact value reads W2[:I]ᵀ V, formed here and kept current by the
        # steps (V is fixed for the pass).
        self._item_product = (ItemProduct.of(self.denoiser.out_layer.weight,
                                             self.denoiser.out_layer.bias, r_t_u)
                              if self.sampled and self.ckgc_samples else None)
        if ent.device.type != "cpu" and not self.sampled:
            # Off the CPU the B × E noise is drawn on the device, from a generator seeded by the
            # CPU one once per pass (so a seed and a resume still fix it): on the host one
            # Alibaba-size batch of noise takes 1.5 s to draw here (1024 × 89,196 normals, two
            # threads), ~80× the denoiser's GEMMs of that batch on an H200 (estimated from the
            # card's fp32 rate, not measured), plus a 365 MB copy.
            gen = torch.Generator(ent.device).manual_seed(
                int(torch.randint(2**62, (1,), generator=gen)))
        n_batches = 0
        for start in range(0, kg.n_entities, self.batch):
            if limit is not None and n_batches >= limit:
                break
            rows = perm[start:start + self.batch]
            step = self._sampled_step if self.sampled else self._dense_step
            loss, parts, share = step(rows, gen, r_t_u, ent)
            sums["diff_loss"] += share * float(loss.detach())
            sums["diff"] += share * float(parts["diff"])
            sums["ckgc"] += share * float(parts["ckgc"])
            n_batches += 1
        if self.flush_optimizer() and self._item_product is not None:
            # Every row moved: the item product formed anew, current again.
            out = self.denoiser.out_layer
            self._item_product = ItemProduct.of(out.weight, out.bias, r_t_u)
        return n_batches

    def flush_optimizer(self) -> bool:
        """Make the deferred Adam's every row current (:meth:`DeferredAdam.flush`): at each
        pass's end and before a state is read. Whether there was one to flush."""
        if not isinstance(self.opt, DeferredAdam):
            return False
        self.opt.flush()
        return True

    def _dense_step(self, rows: Tensor, gen: torch.Generator, r_t_u: Tensor, ent: Tensor,
                    ) -> tuple[Tensor, dict[str, Tensor], float]:
        """One Adam step on the dense rows ``rows`` (this rank's part when data-parallel):
        the loss, its parts and this rank's share of the batch's mean."""
        kg = self.kg
        if self.dist.active:
            loss, parts, factor = self._part_loss(rows, gen, r_t_u, ent)
        else:
            x0 = kg_rows(kg.rowptr, kg.col, rows, kg.n_entities)
            t, noise = draw_timesteps_noise(x0, self.steps, gen)
            loss, parts = self(x0, t, noise, r_t_u, ent[rows])
            factor = 1.0
        self.opt.zero_grad(set_to_none=True)
        (loss * factor if self.dist.active else loss).backward()
        self.opt.step()
        # Summed over ranks, the shares make the batch's mean.
        return loss, parts, factor / self.dist.world if self.dist.active else 1.0

    def _sampled_step(self, rows: Tensor, gen: torch.Generator, r_t_u: Tensor, ent: Tensor,
                      ) -> tuple[Tensor, dict[str, Tensor], float]:
        """One sampled-mode Adam step on the rows ``rows``: the draws (B × n, small: from the
        CPU stream itself), the loss on compact copies of the touched entities' weights
        (backward fills K × H gradients, not E × H), then the lazy step on those rows, or the
        dense step on the gradients scattered into full ones."""
        kg, den = self.kg, self.denoiser
        batch = draw_sampled(kg.rowptr, kg.col, self.keys, rows, kg.n_entities, self.steps,
                             self.n_negatives, den.dropout, gen,
                             ckgc_samples=self.ckgc_samples, item_count=self.n_items)
        index = touched(batch, self.n_items)
        items = index[:int(torch.searchsorted(index, self.n_items))]  # items: ids 0 … I-1
        before = self._item_rows(items)
        if isinstance(self.opt, DeferredAdam):
            self.opt.catch_up(entity_rows(den, index))
        ew = entity_weights(den, batch, self.n_items, index)
        loss, parts = diffusion_loss_sampled(den, batch, self.schedule, self.n_items, r_t_u,
                                             ent[rows], self.e_loss, weights=ew,
                                             item_product=self._item_product)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = row_grads(den, ew)
        if self.adam == "dense":
            for p, (dim, idx, g) in grads.items():
                p.grad = torch.zeros_like(p).index_copy_(dim, idx, g)
            self.opt.step()
        else:
            self.opt.step(grads)
        if self._item_product is not None:
            self._item_product = self._moved_product(items, before, r_t_u)
        return loss, parts, 1.0

    def _item_rows(self, items: Tensor) -> tuple[Tensor, Tensor] | None:
        """W2's and b2's rows at ``items`` as they are now, for the moved item product."""
        if self._item_product is None or self.adam == "dense":
            return None
        out = self.denoiser.out_layer
        return out.weight[items], out.bias[items]

    def _moved_product(self, items: Tensor, before: tuple[Tensor, Tensor] | None,
                       r_t_u: Tensor) -> ItemProduct:
        """The sampled CKGC's item product after a step: moved by the item rows ``items`` the
        step touched, from their values ``before`` (the lazy and deferred steps move no other
        row), or formed anew (dense Adam moved every row)."""
        out = self.denoiser.out_layer
        if before is None:
            return ItemProduct.of(out.weight, out.bias, r_t_u)
        assert self._item_product is not None
        return self._item_product.moved(items, before, (out.weight[items], out.bias[items]),
                                        r_t_u)

    def _part_loss(self, rows: Tensor, gen: torch.Generator, r_t_u: Tensor, ent: Tensor,
                   ) -> tuple[Tensor, dict[str, Tensor], float]:
        """This rank's loss on its part of the batch ``rows``, through the DDP wrapper, and its
        factor. The whole batch's timesteps, noise and dropout mask are drawn here in the single
        process's order (the stream, then torch's global generator as the loss would), so every
        rank's generators stay in step with the single process's and its rows get the single
        process's draws: the draws are repeated on every rank, the GEMMs are divided."""
        kg, den = self.kg, self.denoiser
        span, factor = batch_span(rows.numel(), self.dist)
        # A stand-in with the batch's shape, dtype and device and no storage.
        whole = torch.zeros((), device=ent.device).expand(rows.numel(), kg.n_entities)
        t, noise = draw_timesteps_noise(whole, self.steps, gen)
        # Copies of the part, so that the whole B × E draws are freed before the forward.
        noise = span.cut(noise).clone()
        mask = None
        if den.dropout > 0:
            # The mask's draw exactly as the loss makes it (dropout_mask / F.dropout on a CPU).
            mask = span.cut(dropout_mask(whole, den.dropout, den.dropout_generator)).clone()
        mine = span.cut(rows)
        x0 = kg_rows(kg.rowptr, kg.col, mine, kg.n_entities)
        step = self if self._ddp is None else self._ddp  # FSDP's hooks are in the denoiser
        with den.masked(mask):
            loss, parts = step(x0, span.cut(t), noise, r_t_u, ent[mine])
        return loss, parts, factor

    @torch.no_grad()
    def rebuild(self, limit: int | None = None) -> KGCSR:
        """The denoised KG (a subset of ``kg``'s edges, with their relations).

        ``limit`` (benchmarks): denoise only the first ``limit`` batches of rows."""
        kg, gen = self.kg, self.generators["rebuild"]
        self.denoiser.eval()
        den = self.plain_denoiser()
        rows = self.rows if limit is None else self.rows[:limit * self.batch]
        if self.rebuild_mode == "sampled":  # cheap: every rank runs it whole, same draws
            _, idx = sample_topk_candidates(den, kg.rowptr, kg.col, self.keys, rows,
                                            self.schedule, self.rebuild_k, self.n_negatives,
                                            batch_size=self.batch, generator=gen)
        elif self.dist.active and self.sampling_steps == 0:
            idx = self._sharded_topk(den, rows)
        else:
            # With sampling_steps > 0 each batch's start noise comes from the stream in batch
            # order, so a rank could not draw its batches' alone: every rank denoises all rows.
            _, idx = sample_topk(den, kg.rowptr, kg.col, rows, self.schedule,
                                 self.rebuild_k, batch_size=self.batch,
                                 sampling_steps=self.sampling_steps, generator=gen,
                                 precision=self.precision)
        self.last_picks = (rows, idx)  # for the quality measures (quality.py)
        h, t, rel = rebuild_kg(idx, (kg.row, kg.col, kg.rel), self.keep_rate, gen, rows=rows,
                               n_entities=kg.n_entities)
        return KGCSR.from_triplets(torch.stack((h, rel, t), 1), kg.n_entities, kg.n_relations)

    def _sharded_topk(self, den: Denoiser, rows: Tensor) -> Tensor:
        """The rebuild's top-k columns of ``rows``: each rank denoises a block of the
        ``batch``-row batches (the single process's batches, so the same bits), all gathered
        in order. No random draw (``sampling_steps = 0``)."""
        kg = self.kg
        mine = block(-(-rows.numel() // self.batch), self.dist)
        lo, hi = mine.start * self.batch, min(mine.stop * self.batch, rows.numel())
        if hi > lo:
            _, idx = sample_topk(den, kg.rowptr, kg.col, rows[lo:hi], self.schedule,
                                 self.rebuild_k, batch_size=self.batch, sampling_steps=0,
                                 precision=self.precision)
        else:  # fewer batches than ranks
            idx = torch.empty((0, self.rebuild_k), dtype=torch.long, device=rows.device)
        return gather_rows(idx, self.dist)

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": full_state(self.opt.state_dict()),
                "generators": {k: g.get_state() for k, g in self.generators.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if set(state["generators"]) != set(self.generators):
            raise ValueError(f"random streams {sorted(state['generators'])} in the state, "
                             f"expected {sorted(self.generators)}")
        for name, g in self.generators.items():
            g.set_state(state["generators"][name])


def _flush_before_state(module: KGDiffusion, _prefix: str, _keep_vars: bool) -> None:
    """``state_dict`` pre-hook: the deferred Adam's rows made current first."""
    module.flush_optimizer()


def _full_tensors(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """``state_dict`` hook: a sharded denoiser's weights as full tensors (sharding.full_state)."""
    for k, v in state.items():
        if k.startswith(prefix):
            state[k] = full_state(v)


def entity_rows(den: Denoiser, index: Tensor) -> dict[Tensor, tuple[int, Tensor]]:
    """The rows of the denoiser's parameters a compact step on the entities ``index`` moves:
    W1's columns (the entities' and the time embedding's), W2's and b2's rows."""
    w1 = den.in_layer.weight
    cols = torch.cat([index, torch.arange(den.n_entities, w1.shape[1], device=w1.device)])
    return {w1: (1, cols), den.out_layer.weight: (0, index), den.out_layer.bias: (0, index)}


def row_grads(den: Denoiser, ew: EntityWeights) -> dict[Tensor, RowGrad]:
    """The gradients of a compact step (:func:`entity_weights`, after backward) at the rows
    :func:`entity_rows` names."""
    assert ew.w1.grad is not None and ew.w1_time.grad is not None
    grads = (torch.cat([ew.w1.grad.t(), ew.w1_time.grad], 1), ew.w2.grad, ew.b2.grad)
    return {p: (dim, idx, g) for (p, (dim, idx)), g
            in zip(entity_rows(den, ew.index).items(), grads, strict=True)}


def check_rebuild(mode: str, negatives: int, k: int, sampling_steps: int,
                  precision: str, n_entities: int | None = None) -> None:
    """Raise ``ValueError`` naming the option when ``rebuild_mode`` cannot run as asked (on a
    KG of ``n_entities``, when given)."""
    if mode not in REBUILD_MODES:
        raise ValueError(f"rebuild_mode must be one of {REBUILD_MODES}, got {mode!r}")
    if mode == "exact":
        return
    if sampling_steps != 0:
        raise ValueError(f"rebuild_mode='sampled' starts from the KG rows themselves: it needs "
                         f"sampling_steps=0, got {sampling_steps}")
    if precision != "fp32":
        raise ValueError(f"rebuild_mode='sampled' computes in float32 only; got "
                         f"diffusion_precision={precision!r}")
    if k > negatives:
        raise ValueError(f"rebuild_mode='sampled' with rebuild_k={k} > diffusion_negatives="
                         f"{negatives} (the competitor columns): raise diffusion_negatives")
    if n_entities is not None and negatives >= n_entities:
        raise ValueError(f"rebuild_mode='sampled' with diffusion_negatives={negatives} >= the "
                         f"KG's {n_entities} entities: ranking against every column is "
                         f"rebuild_mode='exact'; use it, or diffusion_negatives < {n_entities}")


def check_mode(mode: str, negatives: int, n_entities: int, precision: str = "fp32",
               ckgc_samples: int = 0, denoiser_adam: str = "dense", n_items: int = 0) -> None:
    """Raise ``ValueError`` naming the option when ``diffusion_mode`` cannot run on a KG of
    ``n_entities`` (the data-dependent half of :meth:`DiffKG.check_options`)."""
    if mode not in DIFFUSION_MODES:
        raise ValueError(f"diffusion_mode must be one of {DIFFUSION_MODES}, got {mode!r}")
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1:
        raise ValueError(f"diffusion_negatives must be an integer >= 1, got {negatives!r}")
    if isinstance(ckgc_samples, bool) or not isinstance(ckgc_samples, int) or ckgc_samples < 0:
        raise ValueError(f"ckgc_samples must be an integer >= 0, got {ckgc_samples!r}")
    if denoiser_adam not in DENOISER_ADAMS:
        raise ValueError(f"denoiser_adam must be one of {DENOISER_ADAMS}, got "
                         f"{denoiser_adam!r}")
    if mode != "sampled":
        for name, value, default in (("ckgc_samples", ckgc_samples, 0),
                                     ("denoiser_adam", denoiser_adam, "dense")):
            if value != default:
                raise ValueError(f"{name}={value!r} needs diffusion_mode='sampled' (the exact "
                                 f"mode reads every row at every step); drop {name}")
        return
    if ckgc_samples and n_items and ckgc_samples >= n_items:
        raise ValueError(f"ckgc_samples={ckgc_samples} >= the {n_items} items: sampling would "
                         f"cost more than the exact CKGC; use ckgc_samples=0 or < {n_items}")
    if negatives >= n_entities:
        raise ValueError(
            f"diffusion_mode='sampled' with diffusion_negatives={negatives} >= the KG's "
            f"{n_entities} entities: sampling would cost more than the exact rows; use "
            f"diffusion_mode='exact' or diffusion_negatives < {n_entities}")
    if precision != "fp32":
        raise ValueError(f"diffusion_mode='sampled' computes in float32 only; got "
                         f"diffusion_precision={precision!r} (use 'fp32' or "
                         f"diffusion_mode='exact')")
