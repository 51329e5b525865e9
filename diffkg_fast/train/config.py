"""The config of a run: the trainer's settings and the model's options, in one flat mapping.

A config is what a user types: ``--set reg=1e-5``, ``--reg 1e-5`` and ``reg: 1e-5`` in a file all
name the key ``reg``. The valid keys are the trainer's (:class:`TrainConfig`) and the chosen
model's options (:meth:`~diffkg_fast.model.base.Recommender.options`, read from its signature);
a key both take (``lr``, ``batch``, ``seed``, ``device`` for DiffKG) has one value for both.

Precedence: defaults (the trainer's and the model's) ← ``--preset`` ← ``--config FILE`` ←
``--set`` and flags ← ``--device``. Every key and type is checked, and every value's range,
before any data is loaded: a bad value is a :class:`DataError` naming the key (and the file).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from diffkg_fast.data.build import check_type
from diffkg_fast.data.errors import DataError, excerpt
from diffkg_fast.eval.ranking import KS
from diffkg_fast.model.base import Recommender
from diffkg_fast.model.registry import get_model
from diffkg_fast.train.config_file import load_config_file
from diffkg_fast.train.presets import preset as preset_values

__all__ = ["RunConfig", "TrainConfig", "config_defaults", "explicit_values", "make_config",
           "resolve_config"]

_SEED_LIMIT = 2**62  # every random stream's seed (seed + 7919 * index) stays an int64


@dataclass(frozen=True)
class TrainConfig:
    """The trainer's settings. Defaults: DiffKG's ``Params.py`` (``epoch``, ``batch``, ``tstBat``
    as ``test_batch``, ``lr``, ``seed``, ``topk``, ``tstEpoch`` as ``eval_every``).

    - ``model``: a registered model (:data:`~diffkg_fast.model.registry.MODELS`);
    - ``topk``, ``valid_metric``: the validation metric that selects the best epoch is
      ``valid_metric@topk`` (``recall`` or ``ndcg``; K one of 10, 20, 40; RecBole's
      ``valid_metric: NDCG@20`` is ``valid_metric=ndcg``);
    - ``patience``: stop after this many evaluations without a better one (``None`` or 0: run
      every epoch); the best validated epoch is always the one kept;
    - ``eval_every``: validate every this many epochs (and after the last one);
    - ``device``: ``cpu``, ``cuda`` or ``cuda:N``: where the model and its graphs live;
    - ``max_epoch_steps``: at most this many optimiser steps an epoch: the training batch grows
      to ``ceil(rows / max_epoch_steps)`` where ``batch`` would take more (0: ``batch`` always;
      :func:`~diffkg_fast.utils.epoch_batch.epoch_batch`); the large-KG regime, where a step's cost
      grows with the graph (docs/large-kg-epochs.md);
    - ``batch_lr_scaling``: ``none`` (the batch loop's Adam at ``lr``) or ``sqrt`` (at
      ``lr · sqrt(grown batch / batch)`` when ``max_epoch_steps`` grew it;
      :func:`~diffkg_fast.train.trainer.batch_lr`);
    - ``valid_users``: validate on a fixed uniform sample of this many of the users with a
      validation target (drawn once from the seed; 0: all of them); the test ranking is always
      complete (:func:`~diffkg_fast.train.trainer.validation_users`);
    - ``target_ddi``: the DDI rate the DDI-aware set rule must stay under on validation
      (:mod:`diffkg_fast.eval.set_choice`); SafeDrug's ``target_ddi`` (0.06), and the same key
      as the DDI loss's target for a model that takes one.
    """

    model: str = "diffkg"
    epoch: int = 25
    batch: int = 1024
    test_batch: int = 1024
    lr: float = 1e-3
    seed: int = 421
    topk: int = 20
    valid_metric: str = "recall"
    patience: int | None = None
    eval_every: int = 1
    device: str = "cpu"
    target_ddi: float = 0.06
    max_epoch_steps: int = 0
    batch_lr_scaling: str = "none"
    valid_users: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        get_model(self.model)
        for name in ("epoch", "batch", "test_batch", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.seed < _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**62), got {self.seed}")
        if self.topk not in KS:
            raise ValueError(f"topk must be one of the evaluated cut-offs {KS}, got {self.topk}")
        if self.valid_metric not in ("recall", "ndcg"):
            raise ValueError(f"valid_metric must be 'recall' or 'ndcg', got {self.valid_metric!r}")
        if self.patience is not None and self.patience < 0:
            raise ValueError(f"patience must be >= 0 or none, got {self.patience}")
        if self.max_epoch_steps < 0:
            raise ValueError(f"max_epoch_steps must be >= 0 (0: no bound), got "
                             f"{self.max_epoch_steps}")
        if self.valid_users < 0:
            raise ValueError(f"valid_users must be >= 0 (0: every user), got {self.valid_users}")
        if self.batch_lr_scaling not in ("none", "sqrt"):
            raise ValueError(f"batch_lr_scaling must be 'none' or 'sqrt', got "
                             f"{self.batch_lr_scaling!r}")
        if not (math.isfinite(self.target_ddi) and 0.0 <= self.target_ddi <= 1.0):
            raise ValueError(f"target_ddi must be in [0, 1], got {self.target_ddi}")
        kind, _, index = self.device.partition(":")
        if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))


def _plain(value: Any) -> Any:
    """A default as a config value: tuples become lists (what JSON and YAML give back)."""
    return list(value) if isinstance(value, tuple) else value


def config_defaults(model: str) -> dict[str, Any]:
    """Every valid key of a run of ``model`` and its default: the trainer's, then the model's
    own options (a shared key keeps the trainer's default, which the model's must equal)."""
    out = {k: _plain(v) for k, v in asdict(TrainConfig(model=model)).items()}
    for key, default in get_model(model).options().items():
        out.setdefault(key, _plain(default))
    return out


class RunConfig(Mapping[str, Any]):
    """A complete, validated config: every key of :func:`config_defaults` with its value.

    A read-only mapping (``cfg["reg"]``); :attr:`train` is the trainer's part and
    :meth:`model_options` what the model's ``from_dataset`` takes. ``to_dict()`` is what
    ``config.json`` and the checkpoint hold.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        model = values.get("model", TrainConfig.model)
        if not isinstance(model, str):
            raise DataError(f"expected a model name, got {excerpt(model)}", field="model")
        expected = config_defaults(model)
        unknown = sorted(set(values) - set(expected), key=str)
        if unknown:
            raise ValueError(f"unknown config keys for model {model!r}: {excerpt(unknown)}")
        # Type-checked here as well: a config read back from a checkpoint never passed through
        # explicit_values, and a value of the wrong type must not reach the range checks.
        self._values = {k: _coerce(k, v, expected[k], None)
                        for k, v in {**expected, **values}.items()}
        self.train = TrainConfig(**{k: self._values[k] for k in TRAIN_KEYS})
        self.train.validate()
        self.model_cls: type[Recommender] = get_model(model)
        self.model_cls.check_options(self.model_options())

    def model_options(self) -> dict[str, Any]:
        """The keyword arguments of ``model_cls.from_dataset``."""
        return {k: self._values[k] for k in self.model_cls.options()}

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RunConfig({self._values!r})"


def _coerce(key: str, value: Any, default: Any, where: str | None) -> Any:
    """Type-check ``value`` against the key's default (the same rules as ``data build --set``).
    """
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def bad(what: str) -> DataError:
        return DataError(f"expected {what}, got {excerpt(value)}", path=where, field=key)

    if key == "patience":  # the one optional key: none means "no early stopping"
        if value is not None and not is_int(value):
            raise bad("an integer or none")
        return value
    if isinstance(default, list):  # dims: "32", "[32]" or a list
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad("a list of integers") from None
        if is_int(value):
            value = [value]
        if not isinstance(value, list | tuple) or not all(is_int(v) for v in value):
            raise bad("a list of integers")
        return list(value)
    return check_type(key, value, default, where)


def _model_of(layers: list[tuple[Mapping[str, Any], str | None]], default: str) -> str:
    """The model the layers select: the last one that names it, else ``default``."""
    for values, where in reversed(layers):
        if "model" in values:
            name = values["model"]
            if not isinstance(name, str):
                raise DataError(f"expected a model name, got {excerpt(name)}", path=where,
                                field="model")
            get_model(name)
            return name
    return default


def explicit_values(config_file: str | None = None, sets: Mapping[str, Any] | None = None,
                    device: str | None = None, preset: str | None = None,
                    model: str = TrainConfig.model) -> dict[str, Any]:
    """The values given explicitly, later sources winning (``preset`` ← file ← ``sets`` ←
    ``device``), each key checked against the selected model (``model`` unless a source names
    one) and type-coerced.

    A preset key the model does not take is skipped (presets are a dataset's DiffKG settings);
    any other unknown key is a :class:`DataError` listing the valid ones.
    """
    layers: list[tuple[Mapping[str, Any], str | None]] = []
    if preset is not None:
        layers.append((preset_values(preset), f"preset {preset!r}"))
    if config_file is not None:
        layers.append((load_config_file(config_file), str(config_file)))
    layers.append((sets or {}, None))
    defaults = config_defaults(_model_of(layers, model))
    out: dict[str, Any] = {}
    for values, where in layers:
        for key, value in values.items():
            if key not in defaults:
                if where is not None and where.startswith("preset "):
                    continue
                raise DataError(f"unknown config key; valid keys: {sorted(defaults)}",
                                path=where, field=key)
            out[key] = _coerce(key, value, defaults[key], where)
    if device is not None:
        out["device"] = device
    return out


def make_config(**values: Any) -> RunConfig:
    """A config from keyword values over the defaults (the Python API's
    ``make_config(model="lightgcn", epoch=3)``); a bad value is a :class:`DataError`."""
    return resolve_config(sets=values)


def resolve_config(config_file: str | None = None, sets: Mapping[str, Any] | None = None,
                   device: str | None = None, preset: str | None = None) -> RunConfig:
    """Defaults ← ``preset`` ← ``config_file`` (JSON/YAML) ← ``sets`` ← ``device``, checked.

    The more specific source wins, so a preset can be tuned by a file and a file by one
    ``--set``. Asking for CUDA on a machine without it is refused here, before any work.
    """
    values = explicit_values(config_file, sets, device, preset)
    try:
        cfg = RunConfig(values)
    except ValueError as exc:  # the validators name the key out of range
        if isinstance(exc, DataError):
            raise
        raise DataError(str(exc), field="config") from exc
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise DataError("CUDA is not available on this machine", field="device")
    return cfg
