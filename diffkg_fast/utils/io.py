"""Atomic file output: a crash never leaves a half-written file or folder under the final name."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from diffkg_fast.data.errors import DataError, cut


def _default_mode(path: str | os.PathLike[str], directory: bool = False) -> None:
    # mkstemp / mkdtemp create 0600 / 0700; give what open() / mkdir() would (0666 / 0777 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    The temporary file lives in the same directory so that ``os.replace`` is an atomic rename
    on POSIX and Windows. On any exception the temporary file is removed and ``path`` is left
    exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; its files land in ``path`` on success.

    All or nothing. A ``path`` that does not exist yet is the temporary folder renamed (one
    atomic rename). Into an existing folder the files move one by one, each old file of the same
    name set aside first; if a move fails, the moved files are taken out and the old ones put
    back. On any exception ``path`` is left as it was and the temporary folder is removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            _merge(tmp, path)
        else:
            _default_mode(tmp, directory=True)
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a rename


def _merge(src: Path, dst: Path) -> None:
    """Move the files of ``src`` into ``dst``: all of them, or none (old files restored)."""
    names = sorted(p.name for p in src.iterdir())
    backup = Path(tempfile.mkdtemp(prefix=".old.", dir=src))  # removed with src
    done: list[str] = []
    try:
        for name in names:
            target = dst / name
            if target.exists() or target.is_symlink():
                os.replace(target, backup / name)
            done.append(name)
            os.replace(src / name, target)
    except BaseException:
        for name in reversed(done):
            if not (src / name).exists():  # the new file had moved in: take it out
                with contextlib.suppress(OSError):
                    os.unlink(dst / name)
            if (backup / name).exists():
                os.replace(backup / name, dst / name)
        raise


def describe_os_error(exc: OSError) -> str:
    """``FILE: what went wrong`` for an error of the operating system, on one line."""
    what = exc.strerror or str(exc)
    where = exc.filename if exc.filename is not None else None
    return f"{where}: {what}" if where is not None else what


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OS error while writing ``path`` (a read-only folder, a full disk, a file where the
    folder should be) as one :class:`DataError` naming it: the error of a write to an open file
    names no file. torch's stream writer reports a full disk as a ``RuntimeError``. With atomic
    writes the file's previous version is intact."""
    try:
        yield
    except OSError as exc:
        raise DataError(f"cannot write: {exc.strerror or exc}", path=path) from exc
    except RuntimeError as exc:
        if "write" not in str(exc).lower():
            raise
        raise DataError(f"cannot write: {cut(str(exc))}", path=path) from exc


def read_bounded(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The bytes of a small file (a config, ``data.json``, a lock), refused past ``limit``: a
    path may name ``/dev/zero`` or a file of gigabytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise DataError(f"cannot read {what}: {exc.strerror or exc}", path=path) from exc
    if len(data) > limit:
        raise DataError(f"larger than {limit:,} bytes: not a {what}", path=path)
    return data
