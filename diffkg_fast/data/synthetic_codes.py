"""Vocabularies of the synthetic cohort (:mod:`diffkg_fast.data.synthetic`, step 1).

Ten body-system *clusters* (``_CLUSTERS``: circulatory, respiratory, ...) each own ICD-9 diagnosis
chapters, ICD-9 procedure chapters and ATC groups, and a share of the patients (their primary
cluster) and of the codes. Conditions, and so co-occurring codes, live inside a cluster: a heart
failure visit gets circulatory diagnoses and cardiac drugs, as in MIMIC-III.

Real codes are drawn, seeded, from :func:`codes.icd9_titles` / :func:`codes.atc_names`, so a
knowledge graph built from the cohort has the real hierarchy and names. Medications are ATC-3
codes, 80% (``ddi_share``) among the 113 that take part in a TWOSIDES interaction (DDI avoidance
needs interacting drugs), the rest preferably siblings (same ATC-2 parent) of those, so ATC-2
*drug classes* hold several members. DDI pairs are :func:`codes.ddi_pairs` of the vocabulary
(409 pairs, mean degree 7.3, at seed 0). A size beyond the real dictionary (14,567 diagnoses,
3,882 procedures, 269 ATC-3 classes) switches that kind to synthetic codes ``DX_000000`` /
``PX_000000`` / ``MED_000000`` (the index, six digits), split into the clusters as contiguous
blocks; synthetic drugs form classes of 4 consecutive codes and get random DDI pairs with mean
degree ``ddi_degree``, half inside a cluster.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from diffkg_fast.data import codes as codes_mod
from diffkg_fast.data.dataset import unique_int

# name, share of patients' primary clusters (and of codes), diagnosis ICD-9 ranges (first three
# characters, or "V" / "E"), procedure ranges (first two digits), ATC prefixes (longest match wins).
_CLUSTERS: tuple[tuple[Any, ...], ...] = (
    ("circulatory", 0.22, ((390, 459),), ((35, 39),), ("C", "B01")),
    ("respiratory", 0.11, ((460, 519),), ((30, 34), (93, 93), (96, 96)), ("R",)),
    ("digestive", 0.11, ((520, 579),), ((42, 54),), ("A0",)),
    ("endocrine", 0.10, ((240, 279),), ((6, 7),), ("A1", "H")),
    ("infection", 0.10, ((1, 139),), ((99, 99),), ("J", "P")),
    ("neoplasm_blood", 0.09, ((140, 239), (280, 289)), ((40, 41),), ("L", "B")),
    ("neuro_sensory", 0.09, ((290, 389),), ((1, 5), (8, 20)), ("N", "S")),
    ("renal_genitourinary", 0.08, ((580, 679),), ((55, 75),), ("G",)),
    ("musculoskeletal_injury", 0.06, ((710, 739), (800, 999), "E"), ((76, 84),), ("M",)),
    ("skin_other", 0.04, ((680, 709), (740, 799), "V"),
     ((0, 0), (21, 29), (85, 92), (94, 95), (97, 98)), ("D", "V")),
)
N_CLUSTERS = len(_CLUSTERS)
CLUSTER_WEIGHTS = np.array([c[1] for c in _CLUSTERS]) / sum(c[1] for c in _CLUSTERS)


@functools.lru_cache(maxsize=4)
def _pool(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted real codes of ``kind`` that fall in a cluster, and their cluster."""
    if kind == "med":
        code = np.array(sorted(c for c in codes_mod.atc_names() if len(c) == 4))
        cl, best = np.full(len(code), -1), np.zeros(len(code), dtype=int)
        for k, cluster in enumerate(_CLUSTERS):
            for pre in cluster[4]:
                hit = np.char.startswith(code, pre) & (len(pre) > best)
                cl[hit], best[hit] = k, len(pre)
        return code[cl >= 0], cl[cl >= 0]
    code = np.array(sorted(codes_mod.icd9_titles(kind)))
    head, first = code.astype("U3" if kind == "diag" else "U2"), code.astype("U1")
    num = np.where(np.char.isdigit(head), head, "0").astype(int)
    numeric = (first != "V") & (first != "E")
    cl = np.full(len(code), -1)
    for k, cluster in enumerate(_CLUSTERS):
        for r in cluster[2 if kind == "diag" else 3]:
            cl[(first == r) if isinstance(r, str) else numeric & (num >= r[0]) & (num <= r[1])] = k
    return code[cl >= 0], cl[cl >= 0]


def _vocab(kind: str, n: int, rng: np.random.Generator,
           ddi_share: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Codes, their cluster and their class (drugs: ATC-2 parent) of one vocabulary."""
    pool, cl = _pool(kind)
    if n > len(pool):  # beyond the real dictionary: synthetic codes in contiguous cluster blocks
        prefix = {"diag": "DX", "proc": "PX", "med": "MED"}[kind]
        cluster = np.searchsorted(np.cumsum(CLUSTER_WEIGHTS), (np.arange(n) + 0.5) / n)
        cluster = np.minimum(cluster, N_CLUSTERS - 1)
        within = np.arange(n) - np.searchsorted(cluster, cluster)
        klass = np.unique(cluster * n + within // 4, return_inverse=True)[1]
        return [f"{prefix}_{i:06d}" for i in range(n)], cluster, klass
    if kind == "med":
        deg = np.bincount(codes_mod.ddi_pairs(list(pool)).ravel(), minlength=len(pool))
        ddi = np.flatnonzero(deg > 0)
        n_ddi = min(len(ddi), round(ddi_share * n))
        pick = rng.choice(ddi, n_ddi, replace=False)
        rest = np.setdiff1d(np.arange(len(pool)), pick)
        # Prefer siblings of the chosen codes so ATC-2 classes hold several members.
        w = np.where(np.isin(pool[rest].astype("U3"), pool[pick].astype("U3")), 4.0, 1.0)
        more = rng.choice(rest, n - n_ddi, replace=False, p=w / w.sum())
        idx = np.sort(np.concatenate([pick, more]))
    else:
        share = CLUSTER_WEIGHTS[cl] / np.bincount(cl, minlength=N_CLUSTERS)[cl]
        idx = np.sort(rng.choice(len(pool), n, replace=False, p=share / share.sum()))
    code = pool[idx]
    return code.tolist(), cl[idx], np.unique(code.astype("U3"), return_inverse=True)[1]


def _synthetic_ddi(rng: np.random.Generator, cluster: np.ndarray, degree: float) -> np.ndarray:
    """Random pairs with mean degree ``degree``, half inside a cluster (``cluster`` is sorted)."""
    n = len(cluster)
    m = round(n * degree / 2)
    a = rng.integers(0, n, m)
    size = np.bincount(cluster, minlength=N_CLUSTERS)[cluster[a]]
    inside = np.searchsorted(cluster, cluster[a]) + (rng.random(m) * size).astype(np.int64)
    b = np.where(rng.random(m) < 0.5, inside, rng.integers(0, n, m))
    lo, hi = np.divmod(unique_int(np.minimum(a, b) * n + np.maximum(a, b)), n)
    return np.stack([lo[lo < hi], hi[lo < hi]], axis=1).astype(np.int64)


def vocabularies(rng: np.random.Generator, sizes: dict[str, int], ddi_share: float,
                 ddi_degree: float) -> tuple[dict[str, list[str]], dict[str, np.ndarray],
                                             dict[str, np.ndarray], np.ndarray]:
    """Codes, clusters and classes per kind (keys of ``sizes``), and the DDI pairs of the drugs."""
    voc, cl, klass = {}, {}, {}
    for kind, n in sizes.items():
        voc[kind], cl[kind], klass[kind] = _vocab(kind, n, rng, ddi_share)
    if sizes["med"] <= len(_pool("med")[0]):
        return voc, cl, klass, codes_mod.ddi_pairs(voc["med"])
    return voc, cl, klass, _synthetic_ddi(rng, cl["med"], ddi_degree)
