"""Whitespace-separated integer text files (KGAT's interaction and triplet files), fast.

Text files are read as bytes and tokenised by one numba scanner (no Python work per line): on a
Last-FM-size KGAT dataset (3.0 M interactions, 465 k triplets) a load takes about a second (see
``bench/bench_load.py``). Every error names the file, the 1-based line and a bounded excerpt of
the offending token.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np

from diffkg_fast.data.errors import DataError

# Scanner status codes.
_OK, _BAD_BYTE, _TOO_LARGE = 0, 1, 2


@numba.njit(cache=True, nogil=True)
def _scan(buf: np.ndarray, max_value: int) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Tokenise ASCII non-negative ints separated by spaces / tabs, lines by ``\\n`` or ``\\r\\n``.

    Returns ``(values, line_of_value, n_lines, status, position)``: ``status`` is ``_OK``, or
    ``_BAD_BYTE`` / ``_TOO_LARGE`` with ``position`` the offending byte (values cut there).
    """
    n = buf.size
    # First pass counts digit runs so that the output arrays are allocated once, exactly.
    count = 0
    prev_digit = False
    for i in range(n):
        d = 48 <= buf[i] <= 57
        if d and not prev_digit:
            count += 1
        prev_digit = d
    vals = np.empty(count, np.int64)
    lines = np.empty(count, np.int64)
    k = 0
    line = 0
    i = 0
    while i < n:
        c = buf[i]
        if 48 <= c <= 57:
            v = 0
            while i < n and 48 <= buf[i] <= 57:
                v = v * 10 + (buf[i] - 48)
                if v > max_value:
                    return vals[:k], lines[:k], line + 1, _TOO_LARGE, i
                i += 1
            if i < n and not (buf[i] == 32 or buf[i] == 9 or buf[i] == 10 or buf[i] == 13):
                return vals[:k], lines[:k], line + 1, _BAD_BYTE, i
            vals[k] = v
            lines[k] = line
            k += 1
        elif c == 32 or c == 9:
            i += 1
        elif c == 10:
            line += 1
            i += 1
        elif c == 13 and i + 1 < n and buf[i + 1] == 10:
            i += 1
        else:
            return vals[:k], lines[:k], line + 1, _BAD_BYTE, i
    return vals, lines, line + 1, _OK, -1


def _read(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError("missing file", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", path=path) from exc


def _token_at(buf: np.ndarray, pos: int) -> tuple[int, str]:
    """1-based line and the whitespace-delimited token around byte ``pos`` (error path only)."""
    line = int(np.count_nonzero(buf[:pos] == 10)) + 1
    ws = (32, 9, 10, 13)
    lo = pos  # at most 40 bytes either side: a bad "token" may be megabytes without a blank
    while lo > 0 and buf[lo - 1] not in ws and pos - lo < 40:
        lo -= 1
    hi = pos + 1
    while hi < len(buf) and buf[hi] not in ws and hi - pos < 40:
        hi += 1
    return line, bytes(buf[lo:hi]).decode("utf-8", errors="replace")


def scan_ints(path: Path, max_id: int, *, allow_empty: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """All integers of a whitespace-separated text file and the 0-based line of each.

    Raises :class:`DataError` naming the file, the 1-based line and the token for anything that
    is not a non-negative integer ``<= max_id``, and (unless ``allow_empty``) for a file without
    any value.
    """
    buf = _read(path)
    vals, lines, _n_lines, status, pos = _scan(buf, max_id)
    if status != _OK:
        line, token = _token_at(buf, pos)
        if status == _TOO_LARGE:
            what = f"id {token!r} is larger than max_id={max_id} (pass a larger max_id)"
        elif token.startswith("-") and token[1:].isdigit():
            what = f"negative id {token!r}: ids are non-negative integers"
        elif buf[pos] == 13:
            what = "a carriage return not followed by a newline: lines end in \\n or \\r\\n"
        else:
            what = (f"bad token {token!r} (byte {bytes(buf[pos:pos + 1])!r}): expected "
                    "non-negative integers separated by spaces or tabs")
        raise DataError(what, path=path, line=line)
    if len(vals) == 0 and not allow_empty:
        raise DataError("empty file: no integer in it", path=path)
    return vals, lines


def _line_starts(lines: np.ndarray) -> np.ndarray:
    first = np.ones(len(lines), dtype=bool)
    first[1:] = lines[1:] != lines[:-1]
    return first


def read_interactions(path: Path, max_id: int, *, allow_empty: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A KGAT interaction file (``user item item …`` lines, blank lines allowed).

    Returns a ``(2, n_lines)`` int64 array, the user id and 0-based line of every non-blank
    line (users without items included), and a ``(3, n)`` one whose columns are the
    interactions' user, item and 0-based line. An empty file is an error unless ``allow_empty``.
    """
    vals, lines = scan_ints(path, max_id, allow_empty=allow_empty)
    first = _line_starts(lines)
    users = vals[first]
    owner = users[np.cumsum(first) - 1]  # the first value of its line is each value's user
    item = ~first
    return np.stack([users, lines[first]]), np.stack([owner[item], vals[item], lines[item]])


def read_triplets(path: Path, max_id: int) -> np.ndarray:
    """``h r t`` lines (blank lines allowed) as an ``(n, 3)`` int64 array in file order."""
    return read_triplet_lines(path, max_id)[0]


def read_triplet_lines(path: Path, max_id: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_triplets` and the 0-based line of every triplet."""
    vals, lines = scan_ints(path, max_id)
    first = _line_starts(lines)
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(vals)))
    bad = np.flatnonzero(counts != 3)
    if len(bad):
        b = starts[bad[0]]
        fields = " ".join(map(str, vals[b : b + min(int(counts[bad[0]]), 5)].tolist()))
        raise DataError(
            f"expected 3 fields 'head relation tail', got {counts[bad[0]]}: {fields!r}"
            f"{' …' if counts[bad[0]] > 5 else ''}",
            path=path, line=int(lines[b]) + 1,
        )
    return vals.reshape(-1, 3), lines[starts]
