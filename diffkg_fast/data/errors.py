"""The one error type of the data layer: it always says where (file, line, field) and what."""

from __future__ import annotations

import os


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
        if field is not None:
            where.append(f"field {field!r}")
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
