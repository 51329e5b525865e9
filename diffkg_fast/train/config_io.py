"""The config of ``diffkg-fast train``: defaults ← ``--preset`` ← ``--config`` ← ``--set`` ←
``--device``, every key and type checked.

Kept apart from :mod:`diffkg_fast.train.commands` so that the file formats (JSON, YAML) and
their error messages live in one place. Every bad input is a :class:`DataError` naming the
file (and, for a syntax error, the line), so the CLI can print one ``error:`` line.

YAML is read with :func:`yaml.safe_load` semantics (no arbitrary Python objects), plus one
fix: PyYAML follows YAML 1.1, where ``1e-5`` (no dot) is a *string*, so ``reg: 1e-5`` would
be refused as "expected a number". The loader below also resolves YAML 1.2 / JSON style
exponent floats, the spelling every DiffKG command line uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from diffkg_fast.data.build import check_type
from diffkg_fast.data.errors import DataError
from diffkg_fast.model.config import DiffKGConfig
from diffkg_fast.model.presets import preset as preset_values

__all__ = ["YAML_SUFFIXES", "load_config_file", "resolve_config"]

YAML_SUFFIXES = (".yaml", ".yml")


class _YAMLLoader(yaml.SafeLoader):
    """``SafeLoader`` that also reads ``1e-5`` / ``1E+3`` as floats (YAML 1.2, JSON)."""


# add_implicit_resolver copies the resolver table on first use in a subclass, so SafeLoader
# itself is left untouched. Appended after the built-in int and float resolvers: only
# scalars those did not match ("1e-5") reach it.
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _read_yaml(text: str, path: str) -> Any:
    try:
        return yaml.load(text, Loader=_YAMLLoader)  # safe: _YAMLLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise DataError(f"not valid YAML: {what}", path=path,
                        line=None if mark is None else mark.line + 1) from exc
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML: {exc}", path=path) from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.yaml`` / ``.yml`` file, or in a JSON file (any other suffix).

    Only the syntax and the top-level shape are checked here; keys and types are checked by
    :func:`resolve_config`, against :class:`DiffKGConfig`.
    """
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read config: {exc.strerror}", path=where) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read config: not UTF-8 text ({exc.reason})",
                        path=where) from exc
    if Path(path).suffix.lower() in YAML_SUFFIXES:
        loaded = _read_yaml(text, where)
        if not isinstance(loaded, dict):
            raise DataError("a YAML config file holds one mapping of 'key: value' lines, got "
                            f"{type(loaded).__name__}", path=where)
        return loaded
    try:
        loaded = json.loads(text)
    except ValueError as exc:
        raise DataError(f"not valid JSON: {exc}", path=where) from exc
    if not isinstance(loaded, dict):
        raise DataError("a config file holds one JSON object", path=where)
    return loaded


def _coerce(key: str, value: Any, default: Any, where: str | None) -> Any:
    """Type-check ``value`` against the field's default (same rules as ``data build --set``)."""
    def bad(what: str) -> DataError:
        return DataError(f"expected {what}, got {value!r}", path=where, field=key)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if key == "patience":  # the one Optional field: None means "no early stopping"
        if value is not None and not is_int(value):
            raise bad("an integer or none")
        return value
    if isinstance(default, list):  # dims: "--set dims=32", "--set dims=[32]" or a JSON list
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad("a list of integers") from None
        if is_int(value):
            value = [value]
        if not isinstance(value, list) or not all(is_int(v) for v in value):
            raise bad("a list of integers")
        return value
    return check_type(key, value, default, where)


def _apply(values: dict[str, Any], merged: dict[str, Any], defaults: dict[str, Any],
           where: str | None) -> None:
    for key, value in values.items():
        if key not in defaults:
            raise DataError(f"unknown config key; valid keys: {sorted(defaults)}",
                            path=where, field=key)
        merged[key] = _coerce(key, value, defaults[key], where)


def resolve_config(config_file: str | None = None, sets: dict[str, Any] | None = None,
                   device: str | None = None, preset: str | None = None) -> DiffKGConfig:
    """Defaults ← ``preset`` ← ``config_file`` (JSON/YAML) ← ``sets`` ← ``device``.

    The more specific source wins, so a preset can be tuned by a file and a file by one
    ``--set``. Every key and type is checked; a value out of range is refused by
    :meth:`DiffKGConfig.validate`.
    """
    defaults = DiffKGConfig().to_dict()
    merged = dict(defaults)
    if preset is not None:
        _apply(preset_values(preset), merged, defaults, f"preset {preset!r}")
    if config_file is not None:
        _apply(load_config_file(config_file), merged, defaults, str(config_file))
    _apply(sets or {}, merged, defaults, None)
    if device is not None:
        merged["device"] = device
    if merged["device"].startswith("cuda") and not torch.cuda.is_available():
        raise DataError("CUDA is not available on this machine", field="device")
    try:
        return DiffKGConfig(**merged)
    except ValueError as exc:  # validate() names the field out of range
        raise DataError(str(exc), field="config") from exc
