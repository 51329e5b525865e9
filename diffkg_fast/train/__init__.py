"""Training: the generic trainer, its config, run folders, evaluation and the commands.

``train`` and ``TrainResult`` are imported on first use (PEP 562), so that the torch-free parts
of this package (the preset names the CLI lists) never import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "make_config", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainResult", "train"):
        from diffkg_fast.train import trainer

        return getattr(trainer, name)
    if name == "make_config":
        from diffkg_fast.train.config import make_config

        return make_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
