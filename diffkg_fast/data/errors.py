"""The one error type of the data layer: it always says where (file, line, field) and what."""

from __future__ import annotations

import itertools
import os

import numpy as np


class DataError(ValueError):
    """Bad input data. The message names the file, the line or field, and what was expected."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:  # a key read from a file may be a megabyte long
            where.append(f"field {excerpt(field, 100)}")
        self.message = message  # without the place, for re-raising with a fuller one
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class _Lit(str):
    """Text the excerpt emits as is (brackets, separators), unlike a str value, which is quoted."""


def _atom(value: object, limit: int) -> str | None:
    """The bounded repr of a scalar value, or None for a container (list, tuple, dict)."""
    if isinstance(value, list | tuple | dict):
        return None
    if isinstance(value, str | bytes | bytearray):
        return repr(value[: limit + 2])  # a slice first: the value may be a gigabyte string
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        # repr of a 10**6-digit int is slow and, above 4,300 digits, a ValueError.
        return repr(value) if value.bit_length() <= 128 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, np.ndarray):
        return f"array(shape={value.shape}, dtype={value.dtype})"
    if isinstance(value, np.str_ | np.bytes_):
        return repr(value[: limit + 2])
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return repr(value.item())
    return f"<{type(value).__name__} object>"  # never its own repr: it could be anything


def excerpt(value: object, limit: int = 60) -> str:
    """At most ``limit`` characters of a repr of ``value``, in time and memory bounded by ``limit``.

    Error messages quote values read from files, and such a value may be a list of 10**9 leaves
    (a small pickle of shared references) or nested 10**5 deep: its full ``repr`` would take
    gigabytes or raise RecursionError. This walks only what the excerpt shows, iteratively; no
    container shows more than ``limit`` elements, each of which costs at least one character.
    """
    out: list[str] = []
    size = 0
    stack: list[object] = [value]
    while stack and size <= limit:
        item = stack.pop()
        text = item if isinstance(item, _Lit) else _atom(item, limit)
        if text is None:
            text = _open(item, stack, limit)  # type: ignore[arg-type]
        out.append(text)
        size += len(text)
    full = "".join(out)
    if stack or len(full) > limit:
        return full[: max(limit - 1, 0)] + "…"
    return full


def _open(item: list | tuple | dict, stack: list[object], limit: int) -> str:
    """Push a container's closing bracket and its first elements; return its opening bracket."""
    left, right = ("{", "}") if isinstance(item, dict) else ("(", ")") if isinstance(
        item, tuple) else ("[", "]")
    stack.append(_Lit(",)" if isinstance(item, tuple) and len(item) == 1 else right))
    shown = list(itertools.islice(item.items() if isinstance(item, dict) else item, limit))
    if len(item) > len(shown):
        stack.append(_Lit(", …"))
    for i in range(len(shown) - 1, -1, -1):
        if isinstance(item, dict):
            stack += [shown[i][1], _Lit(": "), shown[i][0]]
        else:
            stack.append(shown[i])
        if i:
            stack.append(_Lit(", "))
    return left


def cut(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (messages of exceptions raised on file content)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
