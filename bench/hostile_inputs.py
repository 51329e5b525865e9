"""Hostile and broken inputs for ``bench/hostile_pass.py``: each maker writes one bad file (or
folder) from a good one, the way a hostile user or a damaged disk would.

Pickles are written opcode by opcode where a real pickler would refuse (a call of ``os.system``,
a bytes object declaring a terabyte), so that nothing here depends on the objects it names.
A probe that could run code writes a file ``PWNED`` when it does; the pass checks that none
appears.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import pickletools
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PWN = "touch PWNED"  # what a hostile pickle would run (in the probe's folder)


# ------------------------------------------------------------------ pickle opcodes
def glob(module: str, name: str) -> bytes:
    """GLOBAL: the stream names ``module.name``."""
    return b"c" + f"{module}\n{name}\n".encode()


def call(fn: bytes, *args: bytes) -> bytes:
    """``fn(*args)``: MARK, the arguments, TUPLE, REDUCE."""
    return fn + b"(" + b"".join(args) + b"tR"


def obj(value: Any) -> bytes:
    """A plain value as opcodes without PROTO, STOP or memo (to splice into a stream)."""
    return pickletools.optimize(pickle.dumps(value, 2))[2:-1]


def stream(body: bytes, proto: int = 2) -> bytes:
    return bytes([0x80, proto]) + body + b"."


def system_call() -> bytes:
    """``os.system(PWN)``: a pickle that runs a shell command when loaded unrestricted."""
    return stream(call(glob("os", "system"), obj(PWN)))


def deep_list(depth: int) -> bytes:
    """Opcodes of a list nested ``depth`` deep (MARKs then LISTs: no recursion to build)."""
    return b"(" * depth + b"l" * depth


def huge_bytes(declared: int) -> bytes:
    """A protocol-4 BINBYTES8 declaring ``declared`` bytes and holding three."""
    return b"\x80\x04\x8e" + declared.to_bytes(8, "little") + b"abc"


# ------------------------------------------------------------------ SafeDrug pickles
def records_shared(n: int = 3000) -> bytes:
    """12 KB describing n × n visits: one visit list referenced n times, that list n times."""
    visit = [[0], [0], [0]]
    return pickle.dumps([[visit] * n] * n, 4)


def records_leaves(fan: int = 1000) -> bytes:
    """One valid patient whose first diagnosis code is a list of fan³ leaves (shared refs)."""
    leaf = [0]
    l1 = [leaf] * fan
    l2 = [l1] * fan
    l3 = [l2] * fan
    return pickle.dumps([[[l3, [0], [0]]]], 4)


def records_deep(depth: int = 100_000) -> bytes:
    """One patient, one visit whose diagnosis list is nested ``depth`` deep."""
    return stream(b"(((" + deep_list(depth) + obj([0]) + obj([0]) + b"lll")


def numpy_scalar_unsized() -> bytes:
    """``numpy.core.multiarray.scalar(dtype('U'), b'xx')``: would resize numpy's 'U' dtype."""
    dtype = call(glob("numpy", "dtype"), obj("U"), obj(False), obj(True))
    return stream(call(glob("numpy.core.multiarray", "scalar"), dtype, obj(b"\0" * 64)))


def array_short_bytes() -> bytes:
    """A numpy array pickle whose state declares 1000 × 1000 float64 and carries 8 bytes."""
    a = np.zeros((1000, 1000))
    f, args, state = a.__reduce__()
    state = (state[0], state[1], state[2], state[3], b"\0" * 8)
    return pickle.dumps(_Reduce(f, args, state), 2)


def dill_import_os() -> bytes:
    """dill's old array form with ``_get_attr(_import_module('os'), 'system')`` as the function."""
    system = call(glob("dill._dill", "_get_attr"), call(glob("dill._dill", "_import_module"),
                                                        obj("os")), obj("system"))
    return stream(call(glob("dill._dill", "_create_array"), system, obj((PWN,)), obj(None),
                       obj(None)))


class _Reduce:
    """Pickles as ``func(*args)`` then BUILD ``state``."""

    def __init__(self, func: Any, args: tuple, state: Any) -> None:
        self.r = (func, args, state)

    def __reduce__(self) -> tuple:
        return self.r


def voc_eval() -> bytes:
    return stream(b"}" + obj("diag_voc") + call(glob("builtins", "eval"), obj("1+1")) + b"s")


# ------------------------------------------------------------------ DiffKG matrices
def coo_matrix_pickle(shape: tuple[int, int], row: list[int], col: list[int]) -> bytes:
    """A pickled ``scipy.sparse.coo_matrix`` whose state says ``shape`` and holds the entries
    ``(row, col)``, written without scipy checking them (its ``__dict__`` set by hand)."""
    import scipy.sparse as sp

    m = sp.coo_matrix((np.ones(1), ([0], [0])), shape=(1, 1))
    r, c = np.asarray(row, np.int32), np.asarray(col, np.int32)
    m.__dict__["_shape"] = tuple(shape)
    if "coords" in m.__dict__:
        m.__dict__["coords"] = (r, c)
    else:
        m.__dict__.update(row=r, col=c)
    m.__dict__["data"] = np.ones(len(r))
    return pickle.dumps(m, 4)


# ------------------------------------------------------------------ dataset files (.npz)
def npz_members(src: Path) -> dict[str, np.ndarray]:
    with np.load(src) as z:
        return {k: z[k] for k in z.files}


def header_of(arrays: dict[str, np.ndarray]) -> dict:
    return json.loads(arrays["header"].tobytes())


def write_npz(dst: Path, arrays: dict[str, np.ndarray], header: dict | None = None,
              resign: bool = True) -> None:
    """Save ``arrays`` (with ``header``) as a dataset file; ``resign``: a valid SHA-256."""
    from diffkg_fast.data.dataset import _digest

    arrays = dict(arrays)
    header = dict(header or header_of(arrays))
    arrays.pop("header", None)
    if resign:
        header["sha256"] = _digest(arrays)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with open(dst, "wb") as f:
        np.savez_compressed(f, **arrays)


def npz_changed(src: Path, dst: Path, change: Callable[[dict, dict], Any],
                resign: bool = True) -> None:
    """``src`` with ``change(arrays, header)`` applied, checksum recomputed unless not
    ``resign``."""
    arrays = npz_members(src)
    header = header_of(arrays)
    change(arrays, header)
    write_npz(dst, arrays, header, resign)


def npz_bomb(src: Path, dst: Path, nbytes: int = 256 << 20, lie: bool = False) -> None:
    """``src`` with its ``kg`` member replaced by ``nbytes`` of zeros (a ~1,000 × deflate bomb);
    ``lie``: the zip's central directory declares the original member's size instead."""
    small = npz_members(src)
    rows = nbytes // 24
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for k, a in small.items():
            if k == "kg":
                continue
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a)
            z.writestr(k + ".npy", buf.getvalue())
        with z.open("kg.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<i8", "fortran_order": False, "shape": (rows, 3)})
            chunk = bytes(1 << 20)
            left = rows * 24
            while left:
                f.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
    if lie:  # the central directory's uncompressed size of kg.npy (its last entry) → 4,096
        data = bytearray(dst.read_bytes())
        at = data.rfind(b"PK\x01\x02")
        assert data[at + 46:at + 52] == b"kg.npy"
        data[at + 24:at + 28] = (4096).to_bytes(4, "little")
        dst.write_bytes(bytes(data))


def flip_byte(path: Path, at: float, mask: int = 0x10) -> None:
    """Flip bits of the byte at fraction ``at`` of the file."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= mask
    path.write_bytes(bytes(data))


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# ------------------------------------------------------------------ MIMIC-III tables
def gz_text(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def as_plain_csv(folder: Path, table: str, edit: Callable[[bytes], bytes]) -> None:
    """Replace ``TABLE.csv.gz`` by ``TABLE.csv`` holding ``edit(content)``."""
    src = folder / f"{table}.csv.gz"
    (folder / f"{table}.csv").write_bytes(edit(gz_text(src)))
    src.unlink()


def gzip_of_newlines(path: Path, header: bytes, nbytes: int) -> None:
    """A ``.csv.gz`` of ``header`` and ``nbytes`` of empty lines (~1,000 × compression)."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        chunk = b"\n" * (1 << 20)
        for _ in range(nbytes >> 20):
            f.write(chunk)


# ------------------------------------------------------------------ run folders
def copy_run(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


def resign_checkpoint(path: Path, change: Callable[[dict], Any]) -> None:
    """Load a checkpoint, apply ``change`` and save it with a valid digest: a crafted file."""
    from diffkg_fast.train.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(path)
    ck.pop("format_version")
    change(ck)
    save_checkpoint(path, ck)


def torch_pickle_system(path: Path) -> None:
    """A ``torch.save`` file whose pickle calls ``os.system``."""
    import torch

    torch.save(_Reduce(__import__("os").system, (PWN,), None), path)


# ------------------------------------------------------------------ config files
def yaml_alias_bomb(key: str, levels: int = 9) -> str:
    """The billion-laughs YAML under ``key``: ``10^levels`` leaves from ~500 bytes. Level ``i``
    is the list ``[level i-1, &ai [*a(i-1) × 10]]``, so every anchor precedes its aliases and the
    value of ``key`` is the whole bomb."""
    doc = '&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for i in range(1, levels):
        doc = f"[{doc}, &a{i} [{','.join([f'*a{i - 1}'] * 10)}]]"
    return f"{key}: {doc}\n"
