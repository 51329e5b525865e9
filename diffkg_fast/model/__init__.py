"""DiffKG's recommender (RGAT + LightGCN + contrastive views) and its baselines."""

from diffkg_fast.model.config import DiffKGConfig
from diffkg_fast.model.diffkg import DiffKG, LightGCN, MostPop, bpr_loss, info_nce, l2_reg

__all__ = ["DiffKG", "DiffKGConfig", "LightGCN", "MostPop", "bpr_loss", "info_nce", "l2_reg"]
