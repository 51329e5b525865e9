"""The probes of ``bench/hostile_pass.py``, by kind: what each runs, on what input, and what a
clean answer is. This module holds the helpers and the data-file kinds (pickles, archives, text,
CSV); ``hostile_probes_runs`` the kinds that run models.

A probe's ``argv`` follows ``diffkg-fast``; ``{fx}`` stands for the shared fixtures' folder
(``small.npz``, ``small_b.npz``: the same shapes, another split; ``runA`` / ``runB``: LightGCN
runs on them; ``runD``: a DiffKG run on ``small.npz``; ``sd``, ``dk``, ``kg``, ``mm``: SafeDrug,
DiffKG, KGAT and MIMIC-III folders). ``make(d, fx)`` writes the probe's own inputs into its
folder ``d``, the probe's working directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hostile_inputs as H

Maker = Callable[[Path, Path], None]


@dataclass
class Probe:
    kind: str
    name: str
    argv: str                       # after ``diffkg-fast``; ``{fx}`` = the fixtures' folder
    make: Maker | None = None
    expect: str = "error"           # "error" (exit 2, one error line), "ok" (exit 0), "either"
    names: str = ""                 # the error line must contain this (the file or option)
    check: Callable[[Path], list[str]] | None = None  # more problems, after the run
    parallel: int = 1               # copies run at once (concurrency): one must win
    allow: tuple[str, ...] = ()     # files an error may leave (a resumable compare.json)
    needs: str = ""                 # "mount": a tmpfs (root), "dill"
    peak_mb: int = 1536             # the most resident memory the run may take
    timeout: int = 300


PROBES: list[Probe] = []


def probe(kind: str, name: str, argv: str, make: Maker | None = None, **kw) -> None:
    PROBES.append(Probe(kind, name, argv, make, **kw))


def write(rel: str, data: bytes | str) -> Maker:
    """A maker writing one file (``rel`` under the probe's folder)."""
    def make(d: Path, fx: Path) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return make


def copy(src: str, dst: str, then: Callable[[Path], None] | None = None) -> Maker:
    """Copy fixture ``src`` (file or folder) to ``dst``, then change it with ``then(d / dst)``."""
    def make(d: Path, fx: Path) -> None:
        s, t = fx / src, d / dst
        (shutil.copytree if s.is_dir() else shutil.copy)(s, t)
        if then is not None:
            then(t)
    return make


def both(*makers: Maker) -> Maker:
    def make(d: Path, fx: Path) -> None:
        for m in makers:
            m(d, fx)
    return make


def in_folder(name: str, data: bytes | str) -> Callable[[Path], None]:
    return lambda p: (p / name).write_bytes(data.encode() if isinstance(data, str) else data)


def replaced(name: str, folder: str, file: str, data: bytes | str, **kw) -> None:
    """A "pickle" probe: the fixture folder ``folder`` ("sd" or "dk") copied with its ``file``
    replaced by ``data`` and built with that source; the error must name the file."""
    argv = {"sd": SD, "dk": DK}[folder]
    probe("pickle", name, argv, copy(folder, folder, in_folder(file, data)), names=file, **kw)


def python_check(code: str) -> Callable[[Path], list[str]]:
    """Run ``code`` in the probe's folder; whatever it prints is a problem."""
    def check(d: Path) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True,
                             text=True, timeout=120)
        return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return check


# A mount maker is filled in by the runner (it needs root); see hostile_pass.mount.
MOUNT: dict[str, Callable[..., None]] = {}


def mounted(rel: str, size: str, readonly: bool = False, fill: Maker | None = None) -> Maker:
    def make(d: Path, fx: Path) -> None:
        if fill is not None:
            fill(d, fx)
        MOUNT["tmpfs"](d / rel, size, readonly)
    return make


LG = "--model lightgcn --set epoch=1 --set latdim=8 --no-plot --no-progress"
TRAIN = f"train --data {{fx}}/small.npz {LG}"
SD = "data build --source safedrug --path sd --out o.npz"
DK = "data build --source diffkg --path dk --out o.npz"
KG = "data build --source kgat --path kg --out o.npz"
MM = "data build --source mimic3 --path mm --out o.npz"

# ------------------------------------------------------------------ pickles
replaced("records: 3000 x 3000 shared visits (12 KB)", "sd", "records_final.pkl",
         H.records_shared())
replaced("records: os.system global", "sd", "records_final.pkl", H.system_call())
replaced("records: a code nested 100,000 deep", "sd", "records_final.pkl", H.records_deep())
replaced("records: a code of 10^9 shared leaves (6 KB)", "sd", "records_final.pkl",
         H.records_leaves())
replaced("records: empty file", "sd", "records_final.pkl", b"")
probe("pickle", "records: truncated", SD,
      copy("sd", "sd", lambda p: H.truncate(p / "records_final.pkl", 0.6)),
      names="records_final.pkl")
replaced("records: BINBYTES8 declaring 1 TB", "sd", "records_final.pkl", H.huge_bytes(1 << 40))
replaced("records: BINBYTES8 declaring 3 GB", "sd", "records_final.pkl", H.huge_bytes(3 << 30))
replaced("voc: builtins.eval", "sd", "voc_final.pkl", H.voc_eval())
replaced("ddi_A: dill _import_module('os')", "sd", "ddi_A_final.pkl",
         H.dill_import_os(), needs="dill")
replaced("ddi_A: 1000 x 1000 array with 8 bytes", "sd", "ddi_A_final.pkl", H.array_short_bytes())
replaced("ehr_adj: numpy scalar of unsized 'U'", "sd", "ehr_adj_final.pkl",
         H.numpy_scalar_unsized())
replaced("trnMat: shape 99,999,999^2", "dk", "trnMat.pkl",
         H.coo_matrix_pickle((99_999_999,) * 2, [0], [0]))
probe("pickle", "trnMat, valMat, tstMat: all of shape 99,999,999^2", DK,
      copy("dk", "dk", lambda p: [(p / n).write_bytes(H.coo_matrix_pickle(
          (99_999_999,) * 2, [i], [i])) for i, n in enumerate(
              ("trnMat.pkl", "valMat.pkl", "tstMat.pkl"))]), names="Mat.pkl")
replaced("trnMat: entries outside the shape", "dk", "trnMat.pkl",
         H.coo_matrix_pickle((10, 10), [0, 50], [0, 3]))
replaced("trnMat: os.system global", "dk", "trnMat.pkl", H.system_call())
replaced("tstMat: a plain dict", "dk", "tstMat.pkl", H.pickle.dumps({"a": 1}))
replaced("trnMat: text, not a pickle", "dk", "trnMat.pkl", "0 1 2\n")

# ------------------------------------------------------------------ archives (.npz)
STATS = "data stats x.npz"


def npz(change, resign: bool = True) -> Maker:
    return lambda d, fx: H.npz_changed(fx / "small.npz", d / "x.npz", change, resign)


def _float_visits(a: dict, h: dict) -> None:
    a["visits_diag"] = a["visits_diag"].astype(float)


def _int_codes(a: dict, h: dict) -> None:
    h["entity_codes"] = list(range(len(h["entity_codes"])))


def _odd_meta(a: dict, h: dict) -> None:
    h["meta"]["validation"] = {"from": "train", "fraction": "abc", "interactions": "x"}


probe("archive", "zip bomb: 256 MiB member in 350 KB", STATS,
      lambda d, fx: H.npz_bomb(fx / "small.npz", d / "x.npz"), names="x.npz")
probe("archive", "zip bomb whose directory declares 4 KB", STATS,
      lambda d, fx: H.npz_bomb(fx / "small.npz", d / "x.npz", lie=True), names="x.npz")
probe("archive", "float visit arrays, valid checksum", STATS, npz(_float_visits), names="x.npz")
probe("archive", "float visit arrays, train", f"train --data x.npz {LG}", npz(_float_visits),
      names="x.npz")
probe("archive", "integer entity codes, valid checksum", STATS, npz(_int_codes), names="x.npz")
probe("archive", "object-dtype array (a pickle inside)", STATS,
      npz(lambda a, h: a.update(kg=__import__("numpy").array([[H.PWN]] * 3, object)
                                .reshape(1, 3)), resign=False), names="x.npz")
probe("archive", "changed array, old checksum", STATS,
      npz(lambda a, h: a.update(kg=a["kg"][::-1].copy()), resign=False), names="sha256")
probe("archive", "one flipped bit in the deflate stream", STATS,
      copy("small.npz", "x.npz", lambda p: H.flip_byte(p, 0.5)), names="x.npz")
probe("archive", "truncated", STATS, copy("small.npz", "x.npz", H.truncate), names="x.npz")
probe("archive", "empty file", STATS, write("x.npz", b""), names="x.npz")
probe("archive", "text named .npz", STATS, write("x.npz", "hello\n"), names="x.npz")
probe("archive", "header meta with odd types, valid checksum (shown as ?)", STATS,
      npz(_odd_meta), expect="ok")
probe("archive", "header nested 100,000 deep", STATS,
      lambda d, fx: _deep_header(fx / "small.npz", d / "x.npz"), names="x.npz")
probe("archive", "header n_users larger than the arrays", STATS,
      npz(lambda a, h: h.update(n_users=h["n_users"] + 5)), names="x.npz")
probe("archive", "a directory named x.npz", STATS, lambda d, fx: (d / "x.npz").mkdir(),
      names="x.npz")
probe("archive", "--max-bytes -5", "data stats {fx}/small.npz --max-bytes -5",
      names="--max-bytes")
probe("archive", "export of data without validation loads back", "data build --source kgat "
      "--path exp --out back.npz", lambda d, fx: _export_no_valid(d, fx), expect="ok")


def _deep_header(src: Path, dst: Path) -> None:
    a = H.npz_members(src)
    a["header"] = __import__("numpy").frombuffer(b"[" * 100_000 + b"]" * 100_000, "uint8")
    import numpy as np
    with open(dst, "wb") as f:
        np.savez_compressed(f, **a)


def _export_no_valid(d: Path, fx: Path) -> None:
    from diffkg_fast.data.build import build_dataset
    from diffkg_fast.data.export import export_dataset

    ds = build_dataset("kgat", fx / "kg", valid_fraction=0.0)
    import scipy.sparse as sp
    ds.valid = sp.csr_matrix(ds.train.shape, dtype="float32")
    export_dataset(ds, "kgat", d / "exp")


# ------------------------------------------------------------------ text (KGAT / DiffKG)
def kg_line(name: str, line: str, mode: str = "a") -> Maker:
    def edit(p: Path) -> None:
        with open(p / name, mode + "b") as f:
            f.write(line.encode("latin-1") if isinstance(line, str) else line)
    return copy("kg", "kg", edit)


probe("text", "train.txt: user id 99,999,999", KG, kg_line("train.txt", "99999999 1 2\n"),
      names="train.txt")
probe("text", "kg_final.txt: relation id 99,999,999", KG,
      kg_line("kg_final.txt", "0 99999999 5\n"), names="kg_final.txt")
probe("text", "train.txt: id beyond int64", KG,
      kg_line("train.txt", "1 99999999999999999999999999\n"), names="train.txt")
probe("text", "train.txt: bytes that are not UTF-8", KG, kg_line("train.txt", "1 2\xff\xfe 3\n"),
      names="train.txt")
probe("text", "train.txt: UTF-16 with BOM", KG,
      copy("kg", "kg", lambda p: (p / "train.txt").write_bytes(
          (p / "train.txt").read_text().encode("utf-16"))), names="train.txt")
probe("text", "train.txt: negative id", KG, kg_line("train.txt", "-3 1 2\n"), names="train.txt")
probe("text", "train.txt: NUL bytes", KG, kg_line("train.txt", "1 2\x00 3\n"), names="train.txt")
probe("text", "train.txt: a 5 MB line of letters", KG, kg_line("train.txt", "1 " + "x" * 5_000_000
                                                             + "\n"), names="train.txt")
probe("text", "train.txt: CRLF line ends", KG,
      copy("kg", "kg", lambda p: (p / "train.txt").write_bytes(
          (p / "train.txt").read_bytes().replace(b"\n", b"\r\n"))), expect="either",
      names="train.txt")
probe("text", "valid.txt: empty (legitimate)", KG, kg_line("valid.txt", "", "w"), expect="ok")
probe("text", "train.txt: a directory", KG, copy("kg", "kg", lambda p: (
    (p / "train.txt").unlink(), (p / "train.txt").mkdir())), names="train.txt")
probe("text", "kg.txt (DiffKG): entity id 99,999,999", DK,
      copy("dk", "dk", lambda p: open(p / "kg.txt", "a").write("0 0 99999999\n")),
      names="kg.txt")
probe("text", "--set max_id=-1", KG + " --set max_id=-1", copy("kg", "kg"), names="max_id")
probe("text", "--set max_id=2**40", KG + " --set max_id=1099511627776", copy("kg", "kg"),
      names="max_id")
probe("text", "--set valid_fraction=nan", DK + " --set valid_fraction=nan", copy("dk", "dk"),
      names="valid_fraction")
probe("text", "--set valid_fraction=1.5", DK + " --set valid_fraction=1.5", copy("dk", "dk"),
      names="valid_fraction")

# ------------------------------------------------------------------ MIMIC-III CSV
probe("csv", "DIAGNOSES_ICD: header not UTF-8", MM, copy("mm", "mm", lambda p: H.as_plain_csv(
    p, "DIAGNOSES_ICD", lambda t: b"\xff\xfe" + t)), names="DIAGNOSES_ICD")
probe("csv", "PRESCRIPTIONS.csv.gz: corrupt gzip header", MM, copy("mm", "mm", lambda p: (
    p / "PRESCRIPTIONS.csv.gz").write_bytes(b"\x1f\x8b\x99" + (p / "PRESCRIPTIONS.csv.gz")
                                           .read_bytes()[3:])), names="PRESCRIPTIONS")
probe("csv", "PRESCRIPTIONS.csv.gz: truncated mid-stream", MM,
      copy("mm", "mm", lambda p: H.truncate(p / "PRESCRIPTIONS.csv.gz")), names="PRESCRIPTIONS")
probe("csv", "PROCEDURES_ICD.csv.gz: bad CRC", MM,
      copy("mm", "mm", lambda p: H.flip_byte(p / "PROCEDURES_ICD.csv.gz", 0.9995, 0xff)),
      names="PROCEDURES_ICD")
probe("csv", "DIAGNOSES_ICD: column ICD9_CODE missing", MM, copy("mm", "mm", lambda p: (
    H.as_plain_csv(p, "DIAGNOSES_ICD", lambda t: t.replace(b"ICD9_CODE", b"CODE", 1)))),
    names="ICD9_CODE")
probe("csv", "PRESCRIPTIONS missing", MM, copy("mm", "mm", lambda p: (
    p / "PRESCRIPTIONS.csv.gz").unlink()), names="PRESCRIPTIONS")
probe("csv", "DIAGNOSES_ICD: a 5 MB unterminated quoted field", MM, copy("mm", "mm", lambda p: (
    H.as_plain_csv(p, "DIAGNOSES_ICD", lambda t: t + b'1,2,3,4,"' + b"y" * 5_000_000))),
    expect="either", names="DIAGNOSES_ICD")
probe("csv", "DIAGNOSES_ICD: NUL bytes", MM, copy("mm", "mm", lambda p: H.as_plain_csv(
    p, "DIAGNOSES_ICD", lambda t: t.replace(b"\n", b"\n\x00", 3))), expect="either",
    names="DIAGNOSES_ICD")
probe("csv", "DIAGNOSES_ICD: UTF-8 BOM", MM, copy("mm", "mm", lambda p: H.as_plain_csv(
    p, "DIAGNOSES_ICD", lambda t: b"\xef\xbb\xbf" + t)), expect="either", names="DIAGNOSES_ICD")
probe("csv", "PROCEDURES_ICD.csv.gz: 100 MB of empty lines (gzip bomb)", MM,
      copy("mm", "mm", lambda p: H.gzip_of_newlines(
          p / "PROCEDURES_ICD.csv.gz", H.gz_text(p / "PROCEDURES_ICD.csv.gz"), 100 << 20)),
      expect="either", names="PROCEDURES_ICD")
