"""The denoiser's parameters and Adam state sharded over the ranks (``denoiser_sharding="fsdp"``).

DiffKG's denoiser holds ``2·E·H`` weights (E entities, H = ``dims``), and with Adam's two
moments and the gradient four copies of them per rank under DDP: 32 GB at a million entities
and H = 1,000 (docs/distributed.md). With ``"fsdp"`` it is wrapped in PyTorch's
fully-sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``): each rank keeps
``1/N`` of every weight, gradient and Adam moment (rows of each matrix), the weights are
all-gathered for a forward and freed after it, and the gradients are reduce-scattered
(averaged, as DDP averages). The trajectory is DDP's: the same batches, draws and
per-rank loss weights (``KGDiffusion._part_loss``).

Three things here keep the rest of the model unaware of the sharding:

- :func:`shard`: wraps the denoiser and moves its Adam, with the (full) state a resumed run
  restored, onto the shards;
- :func:`full_state` / :func:`shard_state`: the checkpoint holds FULL tensors whatever the
  world size (a sharded run resumes on any number of processes, one included) — the gather is
  a collective, so every rank takes the state together (the trainer does);
- :func:`gathered`: a plain copy of the denoiser with the full weights, for the passes that
  run it without gradients and in unequal numbers per rank (the sharded rebuild, the KG
  quality measures): a sharded module would need every rank in every forward.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from diffkg_fast.ops.diffusion import Denoiser
from diffkg_fast.utils.distributed import Dist

__all__ = ["SHARDINGS", "full_state", "gathered", "is_sharded", "shard", "shard_state"]

SHARDINGS = ("replicate", "fsdp")


def _dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without the distributed package
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is one rank's shard of a tensor (a ``DTensor``)."""
    cls = _dtensor()
    return cls is not None and isinstance(t, cls)


def shard(denoiser: nn.Module, opt: torch.optim.Optimizer, dist: Dist,
          ) -> torch.optim.Optimizer:
    """Shard ``denoiser`` in place over ``dist``'s ranks; its new Adam (``opt``'s settings), with
    ``opt``'s state cut to this rank's rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    full = opt.state_dict()
    mesh = init_device_mesh(torch.device(dist.device).type, (dist.world,))
    fully_shard(denoiser, mesh=mesh)
    new = type(opt)(denoiser.parameters(), **opt.defaults)
    new.load_state_dict(shard_state(full, list(denoiser.parameters())))
    return new


def shard_state(state: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """An optimizer ``state`` of full tensors (``opt.state_dict()``'s layout: ``state`` keyed by
    parameter index) cut like the sharded ``params``; scalars (Adam's ``step``) as they are."""
    from torch.distributed.tensor import distribute_tensor

    out = {"param_groups": copy.deepcopy(state["param_groups"]), "state": {}}
    for i, entry in state["state"].items():
        p = params[int(i)]
        out["state"][i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            if isinstance(v, Tensor) and v.shape == p.shape else v
            for k, v in entry.items()}
    return out


def full_state(value: Any) -> Any:
    """``value`` (a tensor, or dicts / lists of them) with every shard all-gathered into its full
    tensor: a collective, so every rank calls it at the same point."""
    if is_sharded(value):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: full_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full_state(v) for v in value]
    return value


@torch.no_grad()
def gathered(denoiser: Denoiser) -> Denoiser:
    """A plain (unsharded) copy of ``denoiser`` holding its full weights, in eval mode; the
    module itself when it is not sharded. Built on the meta device and then filled, so that
    making it draws nothing from any generator."""
    params = dict(denoiser.named_parameters())
    if not any(is_sharded(p) for p in params.values()):
        return denoiser
    full = {k: full_state(p.detach()) for k, p in params.items()}
    plain = Denoiser(denoiser.n_entities, denoiser.hidden, denoiser.emb_size,
                     norm=denoiser.norm, dropout=denoiser.dropout, device="meta")
    plain = plain.to_empty(device=next(iter(full.values())).device)
    plain.load_state_dict(full)
    return plain.eval()
