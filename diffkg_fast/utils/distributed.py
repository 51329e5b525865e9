"""Where this process stands in a data-parallel run, and the few collectives the code needs.

:class:`Dist` is a plain value (rank, world size, the device collectives run on); ``Dist()`` is
the single process, and every helper here is then the identity, so code written against it runs
unchanged, bit for bit, without ``torch.distributed``. The launcher that creates the process
group from ``torchrun``'s environment is :mod:`diffkg_fast.train.distributed`.

The rules every caller follows, so that ``N`` ranks reproduce one process:

- every rank draws the SAME random numbers (same seed, same streams, same amounts), whole
  batches included, and keeps its part (:func:`batch_part`); nothing here draws;
- work is split in whole units the single process also uses (a batch of users, a batch of KG
  rows: :func:`block`), so each unit is computed with the same shapes and gives the same bits,
  and only sums over units are reduced in another order;
- results that must be identical everywhere (a rebuilt KG, scores) are all-gathered
  (:func:`gather_rows`) and then computed identically on every rank.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["SINGLE", "Dist", "Span", "batch_part", "batch_span", "block", "current", "ddp",
           "gather_rows", "global_sum", "sum_across", "whole_batch"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes; ``device``: where a
    collective's tensors must live (``cpu`` for gloo, this rank's GPU for NCCL)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def active(self) -> bool:
        """More than one process: the collectives below talk to the others."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes the run folder."""
        return self.rank == 0


SINGLE = Dist()  # the single process: a default argument's value


def current() -> Dist:
    """The :class:`Dist` of an initialised default process group (e.g. one a user's own
    launcher made), else the single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Dist()
    dev = "cpu"
    if dist.get_backend() == "nccl":
        dev = f"cuda:{torch.cuda.current_device()}"
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def block(n: int, d: Dist) -> range:
    """This rank's contiguous share of ``n`` units (sizes differ by at most one, lower ranks
    take the extra): concatenated in rank order the blocks are ``range(n)``, so a gather in
    rank order restores the single process's order."""
    lo = d.rank * (n // d.world) + min(d.rank, n % d.world)
    return range(lo, lo + n // d.world + (d.rank < n % d.world))


def batch_part(n: int, d: Dist) -> tuple[slice, float]:
    """This rank's rows of a global batch of ``n`` rows and the factor its mean loss is scaled
    by before ``DistributedDataParallel`` averages the gradients.

    DDP averages over ranks: ``(1/W) Σ_r ∇L_r``. With ``L_r`` a mean over ``n_r`` rows this
    equals the mean over all ``n`` rows only when every ``n_r = n/W``, which the last batch of
    an epoch (or ``n < W``) breaks. Scaling ``L_r`` by ``W n_r / n`` makes the average
    ``Σ_r (n_r / n) L_r``: the global batch mean for a per-row mean, and unchanged for a term
    that does not depend on the rows (an L2 term over the parameters). A rank with no row
    (``n < W``) gets one row with factor 0, so it still joins the gradient all-reduce with
    zeros (a rank that skipped it would hang the others)."""
    r = block(n, d)
    if len(r) == 0:
        return slice(0, 1), 0.0
    return slice(r.start, r.stop), d.world * len(r) / n


class Span(NamedTuple):
    """Where a rank's batch lies in the global batch of a data-parallel step: its rows are
    ``start:stop`` of ``total``. ``real`` is False for a rank with no row of a batch smaller than
    the world (it computes one stand-in row, the global batch's first, with factor 0).

    A model that draws per row draws for all ``total`` rows and keeps :meth:`cut` of the draw,
    so that its rows get the single process's numbers and every rank's generator stays in step;
    a term over the whole batch (a norm of the batch's embeddings, a mean over its distinct
    patients) is computed from the whole batch's values, gathered or all-reduced
    (docs/distributed.md)."""

    start: int
    stop: int
    total: int
    real: bool = True

    @property
    def rows(self) -> int:
        """This rank's real rows of the batch (0 for a stand-in)."""
        return self.stop - self.start if self.real else 0

    def cut(self, whole: Tensor) -> Tensor:
        """This rank's rows of a draw made for the whole batch (``total`` rows)."""
        return whole[self.start:self.stop]


def batch_span(n: int, d: Dist) -> tuple[Span, float]:
    """:func:`batch_part` as a :class:`Span` of the global batch of ``n`` rows."""
    part, factor = batch_part(n, d)
    return Span(part.start, part.stop, n, factor > 0), factor


def whole_batch(x: Tensor, span: Span | None, d: Dist) -> Tensor:
    """The whole batch's values of the per-row ``x`` of this rank's part (ids, scores: no
    gradient flows through the gather), in the global batch's order; ``x`` itself in a single
    process."""
    if span is None or not d.active:
        return x
    return gather_rows(x[:span.rows], d)


def global_sum(x: Tensor, d: Dist) -> Tensor:
    """``x`` summed over the ranks, detached (one all-reduce; float64 for the sum's sake)."""
    x = x.detach()
    if not d.active:
        return x
    import torch.distributed as dist

    t = x.to(torch.device(d.device), torch.float64)
    dist.all_reduce(t)
    return t.to(x.device, x.dtype)


def sum_across(values: dict[str, float], d: Dist) -> dict[str, float]:
    """``values`` summed over the ranks (float64, one all-reduce); keys must agree."""
    if not d.active or not values:
        return dict(values)
    import torch.distributed as dist

    keys = sorted(values)  # one order on every rank, whatever order each filled them in
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    out = dict(zip(keys, t.cpu().tolist(), strict=True))
    return {k: out[k] for k in values}  # the caller's order (log columns follow it)


def gather_rows(x: Tensor, d: Dist) -> Tensor:
    """Every rank's ``x`` (rows of any number, the other dimensions equal), concatenated in
    rank order, on every rank. Uneven counts are padded for the collective and cut after."""
    if not d.active:
        return x
    import torch.distributed as dist

    dev = torch.device(d.device)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    top = max(sizes)
    pad = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=dev)
    pad[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in range(d.world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(x.device)


def ddp(module: nn.Module, d: Dist, find_unused: bool = False) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` on ``d``'s device, its buffers not re-broadcast
    before every forward (every rank builds them identically from the seed, and a phase such
    as KGAT's attention refresh recomputes them identically on every rank)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device(d.device)
    # torch 2.13 renames the switch (and warns on the old name); the GPU machines' 2.11 and
    # the oldest torch allowed (2.4) know only broadcast_buffers.
    new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    sync = {"forward_sync_buffers" if new else "broadcast_buffers": False}
    return DDP(module, device_ids=[dev] if dev.type == "cuda" else None,
               find_unused_parameters=find_unused, **sync)
