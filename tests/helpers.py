"""Small random medical records shared by the tests."""

from __future__ import annotations

import textwrap

import numpy as np

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
