"""The one registry of models: the CLI's ``--model`` choices and flags, config validation,
checkpoint loading, ``evaluate`` and ``recommend`` all read :data:`MODELS`; no model name is
tested anywhere else. A new model is one file with a :class:`~diffkg_fast.model.base.Recommender`
subclass, added to the tuple below.
"""

from __future__ import annotations

from diffkg_fast.data.errors import DataError
from diffkg_fast.model.base import Recommender
from diffkg_fast.model.cdae import CDAE
from diffkg_fast.model.diffkg import DiffKG
from diffkg_fast.model.diffrec import DiffRec
from diffkg_fast.model.kgat import KGAT
from diffkg_fast.model.kgcn import KGCN
from diffkg_fast.model.kgin import KGIN
from diffkg_fast.model.lightgcn import LightGCN
from diffkg_fast.model.mostpop import MostPop
from diffkg_fast.model.multivae import MultiVAE

__all__ = ["MODELS", "get_model", "register_model"]

MODELS: dict[str, type[Recommender]] = {
    cls.name: cls for cls in (DiffKG, LightGCN, MostPop, MultiVAE, CDAE, DiffRec, KGAT, KGIN,
                              KGCN)}


def get_model(name: str) -> type[Recommender]:
    """The model class registered as ``name``; an unknown name is a :class:`DataError`
    listing the registered ones."""
    if name not in MODELS:
        raise DataError(f"unknown model {name!r}; registered models: {sorted(MODELS)}",
                        field="model")
    return MODELS[name]


def register_model(cls: type[Recommender]) -> type[Recommender]:
    """Register a model class under its ``name`` (usable as a class decorator): the trainer,
    the CLI, ``evaluate`` and ``recommend`` then take it like the built-in ones."""
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__qualname__} needs a class attribute `name`")
    if cls.name in MODELS and MODELS[cls.name] is not cls:
        raise ValueError(f"a model named {cls.name!r} is already registered")
    MODELS[cls.name] = cls
    return cls
