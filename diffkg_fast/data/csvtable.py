"""Fast reading of chosen columns of large CSV files (``.csv`` or ``.csv.gz``), no pandas.

:func:`csv_table` yields the wanted columns of every row, matching headers in any letter case;
a short row or an unreadable byte is a :class:`DataError` at its line (:func:`locate_row` finds
the line again on the error path only).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain, compress, count, repeat
from operator import contains, itemgetter
from pathlib import Path

from diffkg_fast.data.codes import open_bytes, open_text
from diffkg_fast.data.errors import DataError, cut, excerpt

CHUNK = 1 << 23  # characters per read: large enough that per-chunk work is negligible


def csv_rows(f: io.TextIOBase, index: list[int], chunk: int = CHUNK) -> Iterator[Iterable[tuple]]:
    """Iterables of the ``index`` columns of the rows of ``f``, in order, blank lines skipped.

    What :func:`csv.reader` gives, faster (csv parsing all 19 columns of the 4M-row PRESCRIPTIONS
    is otherwise most of the load time): to csv a line without a quote character is exactly
    ``line.split(",")``, so such lines are split by C code (``map``) and only lines holding a quote
    go through the csv module, one by one. A line that leaves a quoted field open (a field over
    several lines) or a stray carriage return hands the rest of the file to the csv module.
    """
    get = itemgetter(*index) if len(index) > 1 else lambda row, i=index[0]: (row[i],)
    rest = ""
    while True:
        data = f.read(chunk)
        text = rest + data
        cut = text.rfind("\n") + 1 if data else len(text)
        text, rest = text[:cut], text[cut:]
        # Lines end in "\n" or (as in the MIMIC-III files) "\r\n"; any other "\r": csv decides.
        crlf = "\r" in text
        lines = text.split("\r\n" if crlf else "\n")
        rows = None
        if not crlf or text.count("\r") == text.count("\n") == len(lines) - 1:
            # Blank lines dropped: csv gives [] rows for them, which are skipped.
            rows = _split_lines(list(filter(None, lines)), max(index) + 1)
        if rows is None:
            # The rest of the partial last line joins it: csv takes each item as whole lines.
            stream = chain(io.StringIO(text + rest + f.readline(), newline=""), f)
            yield map(get, filter(None, csv.reader(stream)))
            return
        yield map(get, rows)
        if not data:
            return


def _split_lines(lines: list[str], width: int) -> Iterator[list[str]] | None:
    """Lazy csv rows (their first ``width`` fields, then the rest of the line) of complete
    ``lines``, or None where the csv module must read the stream instead.

    Lazy, so that each row list dies right after its columns are picked: holding a chunk of rows
    would make the garbage collector rescan them over and over.
    """
    quoted = list(compress(count(), map(contains, lines, repeat('"'))))
    if len(quoted) * 8 > len(lines):  # mostly quoted (e.g. every field): csv itself is faster
        return None
    parts: list[Iterable[list[str]]] = []
    start = 0
    sep, cut = repeat(","), repeat(width)  # maxsplit: fields past the last needed one stay whole
    for i in quoted:
        parsed = list(csv.reader((lines[i] + "\n", "\n")))
        if len(parsed) != 2:  # the blank line was swallowed: a quoted field runs on
            return None
        parts += (map(str.split, lines[start:i], sep, cut), parsed[:1])
        start = i + 1
    parts.append(map(str.split, lines[start:], sep, cut))
    return chain.from_iterable(parts)


# What a damaged file raises while it is read: bad bytes in UTF-8 text, a damaged or cut gzip
# stream (BadGzipFile is an OSError; zlib.error is not), an unreadable file, a csv quoting error.
READ_ERRORS = (csv.Error, OSError, EOFError, UnicodeDecodeError, zlib.error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, IndexError):
        return "row has fewer fields than the header"
    if isinstance(exc, UnicodeDecodeError):
        return (f"byte 0x{exc.object[exc.start]:02x} is not UTF-8 text; expected a UTF-8 CSV "
                "file (.csv, or .csv.gz compressed)")
    if isinstance(exc, gzip.BadGzipFile | zlib.error | EOFError):
        return (f"damaged or truncated gzip stream ({cut(str(exc), 80)}); expected a "
                "gzip-compressed CSV file")
    if isinstance(exc, OSError):
        return f"cannot read the file: {exc.strerror or cut(str(exc), 80)}"
    return f"unreadable CSV: {cut(str(exc), 80)}"


def _column_index(f: io.TextIOBase, path: Path, columns: tuple[str, ...]) -> list[int]:
    header = next(csv.reader([f.readline()]), None)
    if not header:
        raise DataError(f"empty file; expected a header with {columns}", path=path)
    found = [h.strip().lstrip("\ufeff").strip().upper() for h in header]
    for col in columns:
        if col not in found:
            raise DataError(
                f"missing column {col}; the header has {excerpt(', '.join(header), 200)}",
                path=path, line=1, field=col,
            )
    return [found.index(col) for col in columns]


@contextmanager
def csv_table(path: Path, columns: tuple[str, ...]) -> Iterator[Iterator[tuple[str, ...]]]:
    """The ``columns`` of every row, as tuples (headers matched in any letter case).

    A short row, or a gzip, decoding or csv error (header included), is a :class:`DataError`
    naming the file and the line where reading failed.
    """
    width = 0
    try:
        with open_text(path) as f:
            index = _column_index(f, path, columns)
            width = max(index) + 1
            yield chain.from_iterable(csv_rows(f, index))
    except (IndexError, *READ_ERRORS) as exc:
        line = (undecodable_line(path) if isinstance(exc, UnicodeDecodeError)
                else locate_row(path, width=width))
        raise DataError(_describe(exc), path=path, line=line) from exc


def undecodable_line(path: Path) -> int | None:
    """Line of the first byte that is not UTF-8 (error path only: the text reader decodes in
    blocks, so its position says only which block failed)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    try:
        with open_bytes(path) as f:
            while chunk := f.read(CHUNK):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    # exc.object is the undecoded tail of the last block plus this one; that
                    # tail is part of one multi-byte character, never a newline.
                    return line + exc.object.count(b"\n", 0, exc.start)
                line += chunk.count(b"\n")
    except READ_ERRORS:
        return None
    return None


def locate_row(
    path: Path, column: str | None = None, value: str = "", width: int = 0
) -> int | None:
    """Line of the first row whose ``column`` is ``value``, or (no column) that is shorter than
    ``width`` or unreadable. Error path only: it rereads the file with the csv module."""
    reader = None
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            header = [h.strip().lstrip("\ufeff").strip().upper() for h in next(reader, [])]
            i = header.index(column) if column in header else -1
            for row in reader:
                if (row and len(row) < width) if i < 0 else (len(row) > i and row[i] == value):
                    return reader.line_num
    except READ_ERRORS:
        return None if reader is None else reader.line_num + 1
    return None
