"""Fuzzing the text loaders against a brute-force pure-Python parse.

Whatever bytes land in ``train.txt`` / ``test.txt`` / ``valid.txt`` / ``kg_final.txt`` (KGAT) or
``kg.txt`` (DiffKG), the loader must either return a dataset that passes ``validate()`` and
equals the reference parse below, or raise :class:`DataError` for the same file and line as the
reference. Any other exception is a bug.
"""

from __future__ import annotations

import pickle
import re
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffkg_fast.data.errors import DataError
from diffkg_fast.data.kgrec import DEFAULT_MAX_ID, load_diffkg, load_kgat

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class RefError(Exception):
    def __init__(self, fname: str, line: int | None) -> None:
        super().__init__(fname, line)
        self.fname, self.line = fname, line


# ---------------------------------------------------------------------- the reference
def ref_lines(data: bytes, fname: str, max_id: int,
              allow_empty: bool = False) -> list[tuple[int, list[int]]]:
    """``(0-based line, ints)`` of every non-blank line, or RefError(file, 1-based line)."""
    segments = data.split(b"\n")
    out = []
    for li, seg in enumerate(segments):
        if li < len(segments) - 1 and seg.endswith(b"\r"):  # \r\n; a lone \r is an error
            seg = seg[:-1]
        vals = []
        for tok in re.split(rb"[ \t]+", seg):
            if not tok:
                continue
            if not re.fullmatch(rb"[0-9]+", tok) or int(tok) > max_id:
                raise RefError(fname, li + 1)
            vals.append(int(tok))
        if vals:
            out.append((li, vals))
    if not out and not allow_empty:  # an empty valid.txt is an empty validation split
        raise RefError(fname, None)
    return out


def ref_triplets(data: bytes, fname: str, max_id: int) -> list[tuple[int, int, int]]:
    lines = ref_lines(data, fname, max_id)
    for li, vals in lines:
        if len(vals) != 3:
            raise RefError(fname, li + 1)
    return [tuple(v) for _, v in lines]


def ref_kgat(files: dict[str, bytes], max_id: int) -> dict:
    splits = {}
    users: set[int] = set()
    for split in ("train", "test", "valid"):
        if f"{split}.txt" not in files:
            continue
        inter = []  # (user, item, 1-based line) in file order
        for li, vals in ref_lines(files[f"{split}.txt"], f"{split}.txt", max_id,
                                  allow_empty=split == "valid"):
            users.add(vals[0])
            inter += [(vals[0], i, li + 1) for i in vals[1:]]
        if split == "train" and not inter:
            raise RefError("train.txt", None)
        splits[split] = inter
    kg = ref_triplets(files["kg_final.txt"], "kg_final.txt", max_id)
    seen: list[tuple[str, set]] = []
    for split in ("train", "valid", "test"):
        if split not in splits:
            continue
        for _other, other_set in seen:
            for u, i, line in splits[split]:
                if (u, i) in other_set:
                    raise RefError(f"{split}.txt", line)
        seen.append((split, {(u, i) for u, i, _ in splits[split]}))
    n_items = max((i + 1 for inter in splits.values() for _, i, _ in inter), default=0)
    n_ent = max([n_items] + [max(h, t) + 1 for h, _, t in kg])
    return {
        "sets": {s: {(u, i) for u, i, _ in inter} for s, inter in splits.items()},
        "dups": {s: len(inter) - len({(u, i) for u, i, _ in inter}) for s, inter in splits.items()},
        "kg": sorted(set(kg)),
        "dup_triplets": len(kg) - len(set(kg)),
        "n_users": max(users) + 1,
        "n_items": n_items,
        "n_entities": n_ent,
        "n_relations": max(r for _, r, _ in kg) + 1,
    }


# ---------------------------------------------------------------------- comparison
def pairs(m: sp.csr_matrix) -> set[tuple[int, int]]:
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist(), strict=True))


def check_kgat(files: dict[str, bytes], max_id: int = DEFAULT_MAX_ID) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in files.items():
            (root / name).write_bytes(data)
        try:
            want = ref_kgat(files, max_id)
        except RefError as ref:
            try:
                load_kgat(root, max_id=max_id, valid_fraction=0)
            except DataError as err:
                event(f"DataError in {ref.fname}")
                assert Path(err.path).name == ref.fname, (err, ref.fname)
                assert err.line == ref.line, (err, ref.line)
                return
            raise AssertionError(f"loaded although {ref.fname}:{ref.line} is bad") from None
        # must not raise: the reference accepted it. No carved validation split, so that the
        # splits are the files' (the carving has its own tests).
        ds = load_kgat(root, max_id=max_id, valid_fraction=0)
    event("loaded")
    ds.validate()
    assert (ds.n_users, ds.n_items, ds.n_entities, ds.n_relations) == (
        want["n_users"], want["n_items"], want["n_entities"], want["n_relations"])
    for split in ("train", "valid", "test"):
        assert pairs(getattr(ds, split)) == want["sets"].get(split, set())
    assert ds.meta["duplicate_interactions"] == want["dups"]
    assert ds.meta["validation"] == {"from": "valid.txt" if "valid.txt" in files else "none"}
    assert ds.kg.tolist() == [list(t) for t in want["kg"]]
    assert ds.meta["duplicate_triplets"] == want["dup_triplets"]


# ---------------------------------------------------------------------- strategies
GOOD_TOKENS = st.integers(0, 12).map(str)
BAD_TOKENS = st.sampled_from(
    ["007", "-1", "1.5", "a", "99999999999", "\r", "\x0c", "1e3", "\xa0", "٣", "+1"])


@st.composite
def token_lines(draw: st.DrawFn, min_tokens: int = 0, max_tokens: int = 5,
                min_lines: int = 0) -> bytes:
    # Half the files use well-formed tokens only, so that many examples get past the scanner.
    tokens = GOOD_TOKENS if draw(st.booleans()) else st.one_of(GOOD_TOKENS, BAD_TOKENS)
    lines = draw(st.lists(st.lists(tokens, min_size=min_tokens, max_size=max_tokens),
                          min_size=min_lines, max_size=8))
    out = ""
    for toks in lines:
        lead = draw(st.sampled_from(["", " ", "\t"]))
        sep = draw(st.sampled_from([" ", "\t", "  ", " \t"]))
        end = draw(st.sampled_from(["\n", "\r\n", " \n"]))
        out += lead + sep.join(toks) + end
    if out and draw(st.booleans()):
        out = out.rstrip("\n")  # no final newline
    return out.encode()


def valid_kg(draw: st.DrawFn) -> bytes:
    triples = draw(st.lists(st.tuples(*[st.integers(0, 15)] * 3), min_size=1, max_size=10))
    return "".join(f"{h} {r} {t}\n" for h, r, t in triples).encode()


@st.composite
def kgat_files(draw: st.DrawFn) -> dict[str, bytes]:
    files = {
        "train.txt": draw(st.one_of(token_lines(), token_lines(2, 5, min_lines=1))),
        "test.txt": draw(token_lines()),
        "kg_final.txt": draw(st.one_of(token_lines(3, 3), token_lines(2, 4),
                                       st.just(b"0 0 1\n"))),
    }
    if draw(st.booleans()):
        files["valid.txt"] = draw(token_lines())
    return files


# ---------------------------------------------------------------------- the fuzz tests
@SETTINGS
@given(files=kgat_files(), max_id=st.sampled_from([DEFAULT_MAX_ID] * 3 + [11]))
def test_fuzz_kgat_token_lines(files: dict[str, bytes], max_id: int) -> None:
    check_kgat(files, max_id=max_id)


@SETTINGS
@given(train=st.binary(max_size=64), kg=st.binary(max_size=64), which=st.sampled_from(["t", "k"]))
def test_fuzz_kgat_random_bytes(train: bytes, kg: bytes, which: str) -> None:
    files = {"train.txt": b"0 1 2\n1 3\n", "test.txt": b"0 4\n", "kg_final.txt": b"0 1 5\n"}
    files["train.txt" if which == "t" else "kg_final.txt"] = train if which == "t" else kg
    check_kgat(files)


@SETTINGS
@given(data=st.data())
def test_fuzz_kgat_mostly_valid(data: st.DataObject) -> None:
    """Valid-shaped files (so that most examples load): duplicates, overlaps, sparse ids."""
    def inter() -> bytes:
        rows = data.draw(st.lists(st.tuples(st.integers(0, 6),
                                            st.lists(st.integers(0, 40), max_size=5)),
                                  min_size=1, max_size=6))
        sep = data.draw(st.sampled_from([" ", "\t", " \t "]))
        end = data.draw(st.sampled_from(["\n", "\r\n", " \n\n"]))
        return "".join(sep.join(map(str, [u, *items])) + end for u, items in rows).encode()

    files = {"train.txt": inter(), "test.txt": inter(), "kg_final.txt": valid_kg(data.draw)}
    if data.draw(st.booleans()):
        files["valid.txt"] = inter()
    check_kgat(files)


@SETTINGS
@given(kg=st.one_of(st.binary(max_size=64), token_lines(3, 3), token_lines(0, 4)))
def test_fuzz_diffkg_kg_txt(kg: bytes) -> None:
    train = sp.coo_matrix((np.ones(3), ([0, 0, 1], [0, 2, 1])), shape=(2, 3))
    test = sp.coo_matrix((np.ones(1), ([1], [2])), shape=(2, 3))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "trnMat.pkl").write_bytes(pickle.dumps(train))
        (root / "tstMat.pkl").write_bytes(pickle.dumps(test))
        (root / "kg.txt").write_bytes(kg)
        try:
            want = ref_triplets(kg, "kg.txt", DEFAULT_MAX_ID)
        except RefError as ref:
            try:
                load_diffkg(root)
            except DataError as err:
                assert Path(err.path).name == "kg.txt" and err.line == ref.line, err
                return
            raise AssertionError("loaded a bad kg.txt") from None
        ds = load_diffkg(root)
    ds.validate()
    assert ds.kg.tolist() == [list(t) for t in sorted(set(want))]
    assert ds.n_entities == max(3, *(max(h, t) + 1 for h, _, t in want))
    assert ds.n_relations == max(r for _, r, _ in want) + 1
