"""One entry point for every source: ``build_dataset("mimic3", path, seed=1, split="visit")``.

Options are split by name between the source's loader and the medication KG builder
(:func:`diffkg_fast.data.medkg.build_medication_dataset`); ``seed`` goes to both, so one seed
fixes the synthetic cohort and the split. An unknown or mistyped option is a :class:`DataError`
naming it and listing the valid ones.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from diffkg_fast.data.codes import bundled_path
from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError, excerpt
from diffkg_fast.data.medkg import build_medication_dataset
from diffkg_fast.data.records import MedicalRecords

# source -> (module, loader, takes a path, gives MedicalRecords)
SOURCES: dict[str, tuple[str, str, bool, bool]] = {
    "mimic3": ("diffkg_fast.data.mimic3", "load_mimic3", True, True),
    "safedrug": ("diffkg_fast.data.safedrug", "load_safedrug", True, True),
    "synthetic": ("diffkg_fast.data.synthetic", "synthetic_records", False, True),
    "diffkg": ("diffkg_fast.data.kgrec", "load_diffkg", True, False),
    "kgat": ("diffkg_fast.data.kgrec", "load_kgat", True, False),
}


def _loader(source: str) -> tuple[Callable[..., Any], bool, bool]:
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}",
                        field="source")
    module, fn, takes_path, medical = SOURCES[source]
    return getattr(importlib.import_module(module), fn), takes_path, medical


# Loader parameters that are outputs, not user options: ``stats`` is a dict the loader fills.
_NOT_OPTIONS = frozenset({"stats"})


def _options_of(fn: Callable[..., Any], skip: int) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.name not in _NOT_OPTIONS}


def check_type(key: str, value: Any, default: Any, path: str | None = None,
               optional: bool = False) -> Any:
    """Type-check an option ``value`` against its ``default`` (bool, int, float or str).

    Shared by ``data build --set`` and ``train --set`` / config files, so both say the same.
    A float option takes an int (converted). ``none`` is a value only of an ``optional`` option
    (or one without a typed default): elsewhere it would reach code expecting a number.
    """
    def bad(what: str) -> DataError:
        return DataError(f"expected {what}, got {excerpt(value)}", path=path, field=key)

    is_int = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, bool):
        what, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        what, ok = "an integer", is_int
    elif isinstance(default, float):
        what, ok = "a number", is_int or isinstance(value, float)
    elif isinstance(default, str):
        what, ok = "a string", isinstance(value, str)
    else:  # no typed default (inspect.Parameter.empty): nothing to check against
        return value
    if value is None:
        if optional:
            return None
        raise bad(what)
    if not ok:
        raise bad(f"{what} or none" if optional else what)
    if isinstance(default, float):
        try:
            return float(value)
        except OverflowError:  # an integer of 400 digits
            raise bad(what) from None
    return value


# The type an option whose default is None takes, from its annotation ("str | None").
_ANNOTATED: dict[str, Any] = {"str": "", "int": 0, "float": 0.0, "bool": False}


def _check_option(key: str, value: Any, p: inspect.Parameter) -> Any:
    """:func:`check_type` against a loader's or builder's parameter: its default (a default of
    None by its annotation: ``name: str | None = None`` takes strings), none where it may be."""
    kinds = str(p.annotation).replace(" ", "").split("|")
    if p.default is None:
        return check_type(key, value, _ANNOTATED.get(kinds[0]), optional=True)
    return check_type(key, value, p.default, optional="None" in kinds)


def parse_value(text: str) -> Any:
    """``--set`` value: int, float, true/false, none, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``["key=value", …]`` (``--set`` options) → dict, each value through :func:`parse_value`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DataError(f"expected key=value, got {excerpt(pair)}", field="--set")
        out[key.strip()] = parse_value(value)
    return out


def build_dataset(
    source: str, path: str | os.PathLike[str] | None = None, **options: Any
) -> KGDataset:
    """Load ``source`` (from ``path`` where it reads files) and build the dataset."""
    load, takes_path, medical = _loader(source)
    loader_opts = _options_of(load, 1 if takes_path else 0)
    build_opts = _options_of(build_medication_dataset, 1) if medical else {}
    valid = sorted(set(loader_opts) | set(build_opts))
    # A loader with **knobs (the synthetic cohort) checks the names it receives itself.
    open_ended = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(load).parameters.values())
    for key in options:
        if key not in loader_opts and key not in build_opts and not open_ended:
            raise DataError(f"unknown option for source {source!r}; valid options: {valid}",
                            field=key)
    load_kw = {k: _check_option(k, v, loader_opts[k])
               for k, v in options.items() if k in loader_opts}
    if open_ended:
        load_kw.update({k: v for k, v in options.items()
                        if k not in loader_opts and k not in build_opts})
    build_kw = {k: _check_option(k, v, build_opts[k])
                for k, v in options.items() if k in build_opts}
    source_stats: dict[str, Any] = {}
    if "stats" in inspect.signature(load).parameters:
        load_kw["stats"] = source_stats
    if takes_path:
        if path is None:
            if source != "mimic3":
                raise DataError(f"source {source!r} needs --path DIR", field="path")
            path = bundled_path("mimic3-demo")  # the bundled real MIMIC-III demo
        loaded = load(path, **load_kw)
    else:
        if path is not None:
            raise DataError(f"source {source!r} reads no files; drop --path", field="path")
        loaded = load(**load_kw)
    if not medical:
        return loaded
    assert isinstance(loaded, MedicalRecords)
    ds = build_medication_dataset(loaded, **build_kw)
    ds.meta["source_options"] = {k: v for k, v in load_kw.items() if k != "stats"}
    if source_stats:
        ds.meta["source_stats"] = source_stats
    if path is not None:
        ds.meta["source_path"] = str(path)
    return ds
