"""Hyper-parameters of DiffKG and of the baselines run by the same trainer.

Defaults are DiffKG's ``Params.py`` (see ``shared/reference/diffkg-reference.md``); the names keep
DiffKG's spelling (``keepRate``, ``latdim`` …) so a published command line maps one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MODELS = ("diffkg", "lightgcn", "mostpop")


@dataclass
class DiffKGConfig:
    """Everything :func:`diffkg_fast.train.train` needs besides the dataset.

    Beyond ``Params.py``:

    - ``use_diffusion``: ``False`` is the diffusion-free ablation (no denoiser is built or run,
      both contrastive views use the original, ``triplet_num``-sampled KG);
    - ``model``: ``"diffkg"``, ``"lightgcn"`` (same harness, no KG, no contrastive loss) or
      ``"mostpop"`` (training popularity, nothing trained);
    - ``patience``: stop after this many epochs without a better validation recall@20
      (``None`` or 0: run all ``epoch`` epochs); the best validation epoch is always the one kept;
    - ``denoiser_dropout``: input dropout of the denoiser (DiffKG hard-codes 0.5);
    - ``patient_codes``: DiffKG represents a patient by its ID embedding PLUS the mean RGAT
      embedding of its diagnoses and procedures (:mod:`diffkg_fast.model.patients`), so held-out
      and new patients are ranked from their codes; used when the dataset has visit features
      (medication datasets), ignored otherwise; ``False`` is DiffKG as published;
    - ``device``: where the model and the graphs live (generators stay on the CPU, so a seed
      gives the same draws on every device, except the diffusion noise on a GPU, drawn there
      from a device generator seeded by the CPU one: host draws would dominate the pass);
    - ``diffusion_precision``: the denoiser's GEMMs in the diffusion pass and the rebuild:
      ``"fp32"`` (default: the reference within float tolerance), ``"tf32"`` (CUDA TF32 tensor
      cores; float32 on a CPU) or ``"bf16"`` (bfloat16 operands, float32 accumulation); see
      :mod:`diffkg_fast.ops.diffusion_sample_fused`.
    """

    lr: float = 1e-3
    batch: int = 1024
    test_batch: int = 1024
    latdim: int = 64
    gnn_layer: int = 2
    reg: float = 1e-7
    layer_num_kg: int = 1
    mess_dropout_rate: float = 0.1
    ssl_reg: float = 0.1
    temp: float = 0.1
    seed: int = 421
    dims: list[int] = field(default_factory=lambda: [1000])
    d_emb_size: int = 10
    norm: bool = True
    steps: int = 5
    noise_scale: float = 0.1
    noise_min: float = 1e-4
    noise_max: float = 0.02
    sampling_steps: int = 0
    rebuild_k: int = 1
    e_loss: float = 0.5
    keepRate: float = 0.5  # DiffKG's spelling
    res_lambda: float = 0.5
    triplet_num: int = 10
    cl_pattern: int = 0
    epoch: int = 25
    topk: int = 20
    denoiser_dropout: float = 0.5
    use_diffusion: bool = True
    patient_codes: bool = True
    model: str = "diffkg"
    patience: int | None = None
    device: str = "cpu"
    diffusion_precision: str = "fp32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if len(self.dims) != 1 or self.dims[0] < 1:
            # The denoiser (ops.diffusion.Denoiser) has one hidden layer, as DiffKG's default.
            raise ValueError(f"dims must be one positive hidden size, got {self.dims}")
        for name in ("lr", "batch", "test_batch", "latdim", "steps", "rebuild_k", "temp",
                     "noise_scale", "topk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gnn_layer", "layer_num_kg", "reg", "ssl_reg", "epoch", "sampling_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("keepRate", "e_loss", "mess_dropout_rate", "denoiser_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.sampling_steps > self.steps:
            raise ValueError(f"sampling_steps={self.sampling_steps} > steps={self.steps}")
        if self.diffusion_precision not in ("fp32", "tf32", "bf16"):
            raise ValueError("diffusion_precision must be 'fp32', 'tf32' or 'bf16', got "
                             f"{self.diffusion_precision!r}")
        if self.cl_pattern not in (0, 1):
            raise ValueError(f"cl_pattern must be 0 or 1, got {self.cl_pattern}")
        if self.triplet_num < -1:
            raise ValueError(f"triplet_num must be -1 (all) or >= 0, got {self.triplet_num}")
        if self.patience is not None and self.patience < 0:
            raise ValueError(f"patience must be >= 0 or None, got {self.patience}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
