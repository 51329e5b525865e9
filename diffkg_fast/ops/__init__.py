"""Compute-heavy ops of DiffKG behind one interface each (``backend="auto" | "reference" | …``).

Importing this package registers every op's reference implementation (the specification and the
oracle of the kernels); :mod:`diffkg_fast.ops.backend` chooses per device.
"""

from diffkg_fast.ops import (
    attention_fused,  # noqa: F401 (registers the fused backends)
    contrastive,  # noqa: F401
    diffusion_loss_fused,  # noqa: F401
    diffusion_sample_fused,  # noqa: F401
)
from diffkg_fast.ops.attention import rgat_aggregate, rgat_forward
from diffkg_fast.ops.diffusion import (
    Denoiser,
    DiffusionSchedule,
    diffusion_loss,
    kg_rows,
    q_sample,
    sample,
    sample_topk,
)
from diffkg_fast.ops.diffusion_sampled import diffusion_loss_sampled
from diffkg_fast.ops.graph import KGCSR, is_symmetric, kg_with_inverses, norm_adjacency
from diffkg_fast.ops.propagation import lightgcn_propagate
from diffkg_fast.ops.rebuild import rebuild_kg
from diffkg_fast.ops.segment import segment_softmax
from diffkg_fast.ops.spmm import csr_spmm

__all__ = [
    "KGCSR",
    "Denoiser",
    "DiffusionSchedule",
    "csr_spmm",
    "diffusion_loss",
    "diffusion_loss_sampled",
    "is_symmetric",
    "kg_rows",
    "kg_with_inverses",
    "lightgcn_propagate",
    "norm_adjacency",
    "q_sample",
    "rebuild_kg",
    "rgat_aggregate",
    "rgat_forward",
    "sample",
    "sample_topk",
    "segment_softmax",
]
