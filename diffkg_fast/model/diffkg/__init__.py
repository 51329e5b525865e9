"""DiffKG as a drop-in module: the model, its recommender side and its diffusion side."""

from diffkg_fast.model.diffkg.diffusion import KGDiffusion
from diffkg_fast.model.diffkg.encoder import Encoded, KGEncoder
from diffkg_fast.model.diffkg.model import DiffKG

__all__ = ["DiffKG", "Encoded", "KGDiffusion", "KGEncoder"]
