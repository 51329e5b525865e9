"""Recommender models on one interface (:mod:`diffkg_fast.model.base`), found by name in one
registry (:mod:`diffkg_fast.model.registry`): DiffKG, KGCN, KGIN, LightGCN, MostPop."""

from diffkg_fast.model.base import (
    EmbeddingRecommender,
    EpochReport,
    PairBatch,
    Patients,
    Recommender,
    UserBatch,
)
from diffkg_fast.model.diffkg import DiffKG, KGDiffusion, KGEncoder
from diffkg_fast.model.kgcn import KGCN
from diffkg_fast.model.kgin import KGIN
from diffkg_fast.model.lightgcn import LightGCN
from diffkg_fast.model.losses import bpr_loss, emb_loss, info_nce, l2_reg
from diffkg_fast.model.mostpop import MostPop
from diffkg_fast.model.registry import MODELS, get_model

__all__ = ["KGCN", "KGIN", "MODELS", "DiffKG", "EmbeddingRecommender", "EpochReport",
           "KGDiffusion", "KGEncoder", "LightGCN", "MostPop", "PairBatch", "Patients",
           "Recommender", "UserBatch", "bpr_loss", "emb_loss", "get_model", "info_nce", "l2_reg"]
