"""Data-parallel training under ``torchrun``: the process group, the DDP wrapper, clear errors.

``torchrun --nproc_per_node=N -m diffkg_fast train …`` starts ``N`` copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address) in their environment.
:func:`init` reads them and joins the default process group: gloo when the run's device is the
CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``). Without that environment (or with a
world of one) it does nothing and returns the single process, so the command without
``torchrun`` is the same single-process run as before, bit for bit.

What the trainer then does with the :class:`~diffkg_fast.utils.distributed.Dist` it gets: wrap
the recommender in ``DistributedDataParallel`` (:func:`wrap`), step through its part of every
global batch (:mod:`~diffkg_fast.train.sampling`), shard evaluation by users, let the model
shard its own phases (``Recommender.distribute``), and log and write from rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
from torch import nn

from diffkg_fast.data.errors import DataError
from diffkg_fast.utils.distributed import Dist, ddp

__all__ = ["TIMEOUT_ENV", "DistributedError", "env_rank", "init", "report_errors", "shutdown",
           "timeout_s", "wrap"]

# Seconds a collective waits for the other ranks before failing. torch's own default is 30 min
# (NCCL 10 min); shorter here so that a rank that stalls (rather than dies: a dead peer's closed
# socket fails the others at once) ends the job within minutes. The longest legitimate wait is
# rank 0 writing the checkpoint and curves.png while the others wait at the next collective.
TIMEOUT_ENV = "DIFFKG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(DataError):
    """A rank lost the others (one died, or stalled past the timeout); printed by the CLI as one
    ``error:`` line (exit status 2)."""


def env_rank() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` from ``torchrun``'s environment; ``(0, 1, 0)``
    without it."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise DataError(f"not an integer: {exc}", field="RANK/WORLD_SIZE/LOCAL_RANK") from exc


def timeout_s() -> float:
    """The collectives' timeout: ``$DIFFKG_DIST_TIMEOUT`` seconds, else 600."""
    text = os.environ.get(TIMEOUT_ENV)
    try:
        value = DEFAULT_TIMEOUT_S if text is None else float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DataError(f"must be a number of seconds > 0, got {text!r}", field=TIMEOUT_ENV)
    return value


def init(device: str) -> tuple[Dist, str]:
    """Join the process group ``torchrun`` describes; ``(Dist, the device this rank trains
    on)``. ``device`` is the run's: a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per rank;
    ``cuda:N`` names the kind of device, not the GPU, under ``torchrun``). Without ``torchrun``
    (or a world of one): ``(Dist(), device)``, nothing initialised."""
    import torch.distributed as dist

    rank, world, local = env_rank()
    if world <= 1:
        return Dist(), device
    if not dist.is_available():
        raise DataError("this torch build has no torch.distributed", field="torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise DataError(f"LOCAL_RANK {local} but {torch.cuda.device_count()} GPUs are "
                            "visible: --nproc_per_node must not exceed them", field="device")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=timedelta(seconds=timeout_s()))
    return Dist(rank, world, device if cuda else "cpu"), device


def shutdown(d: Dist) -> None:
    """Leave the process group (nothing for the single process)."""
    import torch.distributed as dist

    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer | None, d: Dist) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` over the parameters ``optimizer`` steps (the
    model itself for the single process or a model with nothing to train).

    Parameters the trainer's optimizer does not own (DiffKG's denoiser, with its own Adam and
    its own DDP: ``Recommender.distribute``) are left out, else DDP would wait for gradients
    the batch loss never produces. ``find_unused_parameters``: some models leave a parameter
    out of a step's loss (KGAT's TransR tables in its CF steps); DDP then skips it, and a
    parameter no rank used keeps ``grad`` ``None``, so Adam skips it as in the single process.
    It costs one walk of the autograd graph per step, and torch logs once per rank that it
    found none where a model uses every parameter (the registered models but KGAT).
    Buffers are not re-broadcast: every rank built them identically from the seed."""
    if not d.active or optimizer is None:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    ignore = [n for n, p in model.named_parameters() if id(p) not in owned]
    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return ddp(model, d, find_unused=True)


# Messages of gloo / NCCL / the TCP store when a peer is gone or a collective timed out.
_LOST = ("connection closed by peer", "connection reset", "timed out", "timeout",
         "broken pipe", "socket", "nccl communicator was aborted", "connection refused")


@contextlib.contextmanager
def report_errors(d: Dist) -> Iterator[None]:
    """Turn a collective that failed because another rank is gone into one
    :class:`DistributedError` line saying so, and what to do."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if not d.active or not any(s in str(exc).lower() for s in _LOST):
            raise
        raise DistributedError(
            f"rank {d.rank} of {d.world} lost the other ranks ({text}): one of them died or "
            f"waited past the {timeout_s():g} s timeout (${TIMEOUT_ENV}); the run folder keeps "
            "the last epoch's checkpoint: continue with --resume", field="torchrun") from exc
