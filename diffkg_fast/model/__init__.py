"""Recommender models on one interface (:mod:`diffkg_fast.model.base`), found by name in one
registry (:mod:`diffkg_fast.model.registry`): DiffKG, LightGCN, MostPop, MultiVAE, CDAE,
DiffRec, KGAT, KGIN, KGCN."""

from diffkg_fast.model.base import (
    EmbeddingRecommender,
    EpochReport,
    PairBatch,
    Patients,
    Recommender,
    UserBatch,
)
from diffkg_fast.model.cdae import CDAE
from diffkg_fast.model.diffkg import DiffKG, KGDiffusion, KGEncoder
from diffkg_fast.model.diffrec import DiffRec
from diffkg_fast.model.kgat import KGAT
from diffkg_fast.model.kgcn import KGCN
from diffkg_fast.model.kgin import KGIN
from diffkg_fast.model.lightgcn import LightGCN
from diffkg_fast.model.losses import bpr_loss, emb_norm_reg, info_nce, l2_reg
from diffkg_fast.model.mostpop import MostPop
from diffkg_fast.model.multivae import MultiVAE
from diffkg_fast.model.registry import MODELS, get_model

__all__ = ["CDAE", "KGAT", "KGCN", "KGIN", "MODELS", "DiffKG", "DiffRec", "EmbeddingRecommender",
           "EpochReport", "KGDiffusion", "KGEncoder", "LightGCN", "MostPop", "MultiVAE",
           "PairBatch", "Patients", "Recommender", "UserBatch", "bpr_loss", "emb_norm_reg",
           "get_model", "info_nce", "l2_reg"]
