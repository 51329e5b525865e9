"""Small random medical records shared by the tests."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch

from diffkg_fast.data.codes import atc_names, icd9_titles
from diffkg_fast.data.records import MedicalRecords
from diffkg_fast.ops.graph import KGCSR


def _interpreter_skip_reason() -> str | None:
    """Why the Triton interpreter tests cannot run here, or None when they can."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        return "interpreter test: CPU tensors under TRITON_INTERPRET=1 (conftest.py sets it " \
               "where there is no CUDA device)"
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    # Triton 3.6's interpreter turns scalar arguments into Python ints with int() of a 1-element
    # array, which numpy 2.4 made an error (the GPU machines' image pairs triton 3.6 with numpy
    # 2.5); triton 3.7 squeezes first. The compiled kernels are unaffected.
    tv = tuple(int(x) for x in triton.__version__.split(".")[:2])
    nv = tuple(int(x) for x in np.__version__.split(".")[:2])
    if tv < (3, 7) and nv >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {np.__version__} "
                "(only 0-dimensional arrays can be converted); use triton >= 3.7 or numpy < 2.4")
    return None


# The Triton kernels run on CPU tensors in the interpreter (no CUDA device here).
needs_interpreter = pytest.mark.skipif(_interpreter_skip_reason() is not None,
                                       reason=_interpreter_skip_reason() or "")

MEDS = sorted(c for c in atc_names() if len(c) == 4)[:40]
DIAGS = sorted(icd9_titles("diag"))[:60]
PROCS = sorted(icd9_titles("proc"))[:30]


def two_split_files(root, **shape) -> list:
    """Two synthetic datasets of the same ``shape`` (``build_dataset`` knobs) that differ in
    their split (seeds 0 and 1), saved under ``root``: their paths."""
    from diffkg_fast.data.build import build_dataset

    paths = []
    for seed in (0, 1):
        path = root / f"split{seed}.npz"
        build_dataset("synthetic", seed=seed, **shape).save(path)
        paths.append(path)
    return paths


def random_records(n_patients: int, seed: int) -> MedicalRecords:
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(n_patients):
        visits = []
        for _ in range(int(rng.integers(1, 4))):
            # Correlate meds with diagnoses so that lift filtering has something to find.
            d = sorted(set(rng.integers(0, 60, 6).tolist()))
            m = sorted({x % 40 for x in d} | set(rng.integers(0, 40, 3).tolist()))
            p = sorted(set(rng.integers(0, 30, 3).tolist()))
            visits.append([d, p, m])
        recs.append(visits)
    return MedicalRecords.from_nested(recs, DIAGS, PROCS, MEDS, source="test")


# SafeDrug's class, verbatim (data/processing.py).
VOC_SOURCE = textwrap.dedent(
    """
    class Voc(object):
        def __init__(self):
            self.idx2word = {}
            self.word2idx = {}

        def add_sentence(self, sentence):
            for word in sentence:
                if word not in self.word2idx:
                    self.idx2word[len(self.word2idx)] = word
                    self.word2idx[word] = len(self.word2idx)
    """
)


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1.3e-6,
                 atol: float = 1e-5) -> None:
    """allclose that names the first mismatching index (torch.testing's version imports
    DTensor and sympy on first use: ~2 s of test time)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    bad = ~torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=False)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} mismatches, first at {idx}: {a[idx].item()} vs "
                             f"{b[idx].item()}; max abs err {(a - b).abs().max().item():.3g}")


def make_graph(n_ent: int, n_rel: int, n_tri: int, seed: int) -> KGCSR:
    """Odd sizes, duplicates, self loops, isolated heads, degree-1 heads and one long row."""
    rng = np.random.default_rng(seed)
    n_iso = 5  # the last 5 entities never appear
    n_hub = n_ent - n_iso - 2  # the two before them are only linked to each other: degree 1
    h = rng.integers(0, n_hub, n_tri)
    t = rng.integers(0, n_hub, n_tri)
    kg = np.stack([h, rng.integers(0, n_rel, n_tri), t], 1)
    tails = rng.permutation(n_hub)[:150] if n_hub >= 150 else rng.integers(0, n_hub, 150)
    long_row = np.stack([np.zeros(150, int), rng.integers(0, n_rel, 150), tails], 1)
    pair = [[n_hub, 0, n_hub + 1]]
    kg = np.concatenate((kg, kg[:10], long_row, [[1, 0, 1]], pair))
    g = KGCSR.from_kg(kg, n_ent, n_rel)
    deg = g.degree
    assert (deg == 0).any() and (deg == 1).any() and deg.max() >= min(50, n_hub // 2)
    return g


def tables(g: KGCSR, d: int, dtype=torch.float64, scale: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    E = torch.randn(g.n_entities, d, generator=gen, dtype=dtype) * scale
    Rel = torch.randn(g.n_relations, d, generator=gen, dtype=dtype)
    W = torch.empty(2 * d, d, dtype=dtype)
    torch.nn.init.xavier_uniform_(W, gain=torch.nn.init.calculate_gain("relu"), generator=gen)
    return E, Rel, W
