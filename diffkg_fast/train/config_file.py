"""Config files of ``diffkg-fast train --config FILE``: JSON or YAML, one mapping of keys.

The file formats and their error messages live here; keys and types are checked by
:mod:`diffkg_fast.train.config`. Every bad input is a :class:`DataError` naming the file (and,
for a syntax error, the line), so the CLI can print one ``error:`` line.

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

import yaml

from diffkg_fast.data.errors import DataError, cut
from diffkg_fast.utils.io import read_bounded

__all__ = ["YAML_SUFFIXES", "load_config_file"]

YAML_SUFFIXES = (".yaml", ".yml")


# A config is a few dozen keys: a file past these is refused before it costs much (PyYAML
# takes ~1 KB and ~30 µs per node: a 2 MB flow list of 10^6 numbers took 1 GB and 70 s).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 10_000


class _TooLarge(yaml.YAMLError):
    pass


class _YAMLLoader(yaml.SafeLoader):
    """``SafeLoader`` that also reads ``1e-5`` / ``1E+3`` as floats (YAML 1.2, JSON), and
    refuses a document of more than :data:`MAX_YAML_NODES` nodes (an alias is one node: an
    alias bomb stays small until something walks it, and nothing here does)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._nodes = getattr(self, "_nodes", 0) + 1
        if self._nodes > MAX_YAML_NODES:
            raise _TooLarge(f"more than {MAX_YAML_NODES:,} values: not a config file")
        return super().compose_node(parent, index)


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
    except _TooLarge as exc:
        raise DataError(str(exc), path=path) from exc
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML: {exc}", path=path) from exc
    except RecursionError as exc:
        raise DataError("not a config: nests too deeply", path=path) from exc
    except ValueError as exc:  # an integer of 5,000 digits (Python's int() limit)
        raise DataError(f"not valid YAML: {cut(str(exc))}", path=path) from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.yaml`` / ``.yml`` file, or in a JSON file (any other suffix).

    Only the syntax and the top-level shape are checked here; keys and types are checked by
    :func:`~diffkg_fast.train.config.resolve_config`.
    """
    where = str(path)
    try:  # at most MAX_CONFIG_BYTES: the path may name /dev/zero
        text = read_bounded(path, MAX_CONFIG_BYTES, "config").decode("utf-8")
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
        raise DataError(f"not valid JSON: {cut(str(exc))}", path=where) from exc
    except RecursionError as exc:
        raise DataError("not a config: nests too deeply", path=where) from exc
    if not isinstance(loaded, dict):
        raise DataError("a config file holds one JSON object", path=where)
    return loaded
