"""Small random medical records shared by the tests."""

from __future__ import annotations

import textwrap

import numpy as np
import torch

from diffkg_fast.data.codes import atc_names, icd9_titles
from diffkg_fast.data.records import MedicalRecords

MEDS = sorted(c for c in atc_names() if len(c) == 4)[:40]
DIAGS = sorted(icd9_titles("diag"))[:60]
PROCS = sorted(icd9_titles("proc"))[:30]


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
