"""A seeded synthetic cohort shaped like SafeDrug's MIMIC-III (6,350 patients, ~15,000 visits).

Generative story (vectorized numpy over all patients / visits / entries at once; Python loops run
only over the 10 clusters and, when choosing routine drugs, over a few dozen candidates):

1. **Vocabularies** (:mod:`diffkg_fast.data.synthetic_codes`). Ten body-system *clusters* own
   ICD-9 chapters and ATC groups; real codes are drawn from them (ATC-3 drugs mostly among those
   with a TWOSIDES interaction, ATC-2 parents as drug classes, DDI pairs of the vocabulary), or
   synthetic codes ``DX_000000`` ... with random DDI pairs beyond the real dictionaries.
2. **Latent conditions** (``n_conditions``: 60 = 6 per cluster) each own a contiguous block of
   their cluster's diagnoses and procedures with Zipf weights over a random ranking (a few codes
   dominate), a prevalence (Zipf inside the cluster), a chronicity (chance to be active at a visit)
   and a drug list: a block of its cluster's drug classes, ``extra_classes`` more (the class of an
   interaction partner of one of its own or of a routine drug, as drugs of one organ system often
   interact), and for 30% one class of any cluster. Drugs have a global propensity; a condition
   ranks its list by propensity plus noise and gives its r-th drug probability ``0.95 r^-1.7``.
3. **Patients** pick a primary cluster and ``1 + Poisson(cond_per_patient)`` conditions, each from
   that cluster with probability ``in_cluster`` (comorbidity clusters), else from all. Each has a
   Gamma(mean 1) affinity per drug of each of her conditions and a Beta-distributed probability per
   routine drug: her visits repeat her drugs, so history matters.
4. **Visits.** Visits per patient follow MIMIC's counts (1-5 as counted, then k^-3.75 on 6..29).
   A visit activates each of the patient's conditions with its chronicity (at least one), adds an
   acute condition with probability ``acute_rate``, and has a lognormal severity.
5. **Codes.** Diagnoses: ``1 + Poisson`` draws per active condition plus background draws from a
   global Zipf; procedures likewise (at least one per visit). Medications: ``n_generic`` routine
   ICU drugs (probabilities ``0.89 g^-0.28``, raised by severity), each drug of each active
   condition with probability ``prob x affinity``, the drug linked to each diagnosis / procedure
   code (``link_diag`` / ``link_proc``: drugs depend on the exact codes too), uniform noise.
6. **DDI avoidance.** Each interacting pair is avoided with probability ``q``: the drug with more
   conflicts in the visit (never a routine drug) is swapped for a compatible alternative of its
   condition, or dropped. ``q`` is calibrated by bisection so the DDI rate (interacting share of
   the medication pairs of a visit, pooled over visits) is ``ddi_rate`` = 0.083 when the drawn rate
   is higher. At seed 0 the drawn rate is 0.087 and ``q`` 0.017: as in MIMIC, where models that
   ignore interactions also land near the ground-truth rate. A lower ``ddi_rate`` avoids harder.
7. **Coverage.** A code that sampling left unused is added to one visit where its condition is
   active (24 rare procedures at seed 0), so every vocabulary code appears.

Seed 0, default size: 14,980 visits; 13.3 diagnoses, 4.55 procedures, 19.5 drugs per visit; 178k
patient-drug pairs; top drug in 13,317 visits, median 1,068; top diagnosis in 5,873, median 25;
DDI rate 0.0830. 0.5-0.6 s warm on a 2-core machine (``bench/bench_synthetic.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from diffkg_fast.data.build import check_type
from diffkg_fast.data.dataset import unique_int
from diffkg_fast.data.errors import DataError, cut, excerpt
from diffkg_fast.data.records import KINDS, MedicalRecords
from diffkg_fast.data.synthetic_codes import CLUSTER_WEIGHTS, N_CLUSTERS, vocabularies
from diffkg_fast.data.synthetic_sampling import (
    _Groups,
    _partition,
    _ptr,
    _repeat_range,
    _zipf_in_groups,
)

# MIMIC-III visits per patient: 908 / 3,792 / 949 / 373 / 158 patients with 1..5 visits, then 170
# with 6..29 holding 1,411 visits (mean 8.3); k^-3.75 on 6..29 has mean 8.33.
_TAIL = np.arange(6, 30, dtype=float) ** -3.75
VISIT_PROBS = np.concatenate([[908, 3792, 949, 373, 158], 170.0 * _TAIL / _TAIL.sum()]) / 6350.0

PRESETS: dict[str, dict[str, Any]] = {
    # SafeDrug's MIMIC-III cohort (the defaults).
    "mimic3": {},
    # KGAT's Last-FM: 23,566 users, 48,123 items, 3,034,796 interactions (129 per user), a KG with
    # ~10k non-item entities. Measured: 2,976,452 patient-drug pairs (126 per patient), 13-15 s,
    # 1.5 GB peak RSS.
    "lastfm": dict(n_patients=23566, n_med=48123, n_diag=7000, n_proc=3143, visit_scale=3.0,
                   cond_per_patient=5.0, prevalence_zipf=0.5, cond_med_decay=0.5),
    # KGAT's Alibaba-iFashion: 114,737 users, 30,040 items, 1,781,093 interactions (15.5 per user),
    # a KG with ~29k non-item entities (beyond the ICD-9 dictionaries: synthetic codes).
    # Measured: 1,757,865 patient-drug pairs (15.3 per patient), 6-7 s, 1.1 GB peak RSS.
    "alibaba": dict(n_patients=114737, n_med=30040, n_diag=22000, n_proc=7116, med_scale=0.25,
                    cond_per_patient=1.0, prevalence_zipf=0.5, cond_med_decay=0.5),
}


@dataclass(frozen=True)
class SyntheticKnobs:
    """Parameters of the generative story (module docstring); the defaults fit MIMIC-III."""

    n_conditions: int = 0  # 0: max(60, ceil(n_med / 8))
    cond_per_patient: float = 4.0  # a patient has 1 + Poisson(this) conditions (before dedup)
    prevalence_zipf: float = 1.5  # Zipf exponent of condition prevalence inside a cluster
    in_cluster: float = 0.7  # chance a patient's condition comes from her primary cluster
    acute_rate: float = 0.3  # chance a visit adds an acute condition
    chronicity: tuple[float, float] = (0.45, 0.95)  # uniform range of per-visit activation
    severity_sigma: float = 0.35  # lognormal sigma of the visit severity
    diag_per_condition: float = 8.0  # mean extra diagnosis draws per active condition
    proc_per_condition: float = 1.8  # mean procedure draws per active condition
    diag_background: float = 4.2  # Poisson mean of background diagnosis draws per visit
    proc_background: float = 1.2
    code_zipf: float = 1.9  # Zipf exponent inside a condition's code block
    background_zipf: float = 1.0
    n_generic: int = 20  # routine ICU drugs
    generic_top: float = 0.89  # the most routine drug's probability (MIMIC: 13,421 / 15,032)
    generic_decay: float = 0.28  # routine drug g has probability generic_top * g^-decay
    routine_persistence: float = 1.0  # Beta concentration of a patient's routine-drug probability
    generic_ddi_bias: float = 2.0  # routine drugs are drawn with weight (1 + DDI degree)^bias
    routine_ddi_pairs: int = 10  # at most this many interacting pairs among routine drugs
    extra_classes: int = 2  # drug classes a condition gets beyond its own block
    ddi_affinity: float = 1.0  # chance an extra class is that of an interaction partner
    routine_source: float = 0.5  # chance that partner is sought for a routine drug
    cond_med_top: float = 0.95  # probability of a condition's first-line drug
    cond_med_decay: float = 1.7  # its r-th drug has probability cond_med_top * r^-decay
    first_line_noise: float = 0.3  # noise on the global propensity when a condition ranks drugs
    affinity_shape: float = 0.5  # Gamma shape of the patient's drug affinity (mean 1)
    link_diag: float = 0.8  # chance a diagnosis brings its linked drug
    link_proc: float = 0.8
    noise_meds: float = 0.3  # Poisson mean of uniform random drugs per visit
    med_scale: float = 1.0  # multiplies every drug probability
    visit_scale: float = 1.0  # multiplies the number of visits per patient
    ddi_share: float = 0.8  # share of (real) drugs chosen among the DDI-bearing ATC-3 codes
    ddi_rate: float = 0.083  # DDI rate that avoidance calibrates to
    ddi_degree: float = 7.3  # mean DDI partners per synthetic drug (the real default vocabulary's)

    @classmethod
    def make(cls, **knobs: Any) -> SyntheticKnobs:
        """Knobs by name, each checked: the default's type, finite and >= 0 (> 0 for a shape),
        chances in [0, 1]: numpy would raise deep inside, or a chance of 2 pass unnoticed."""
        defaults = {f.name: f.default for f in fields(cls)}
        out = {}
        for k, v in knobs.items():
            if k not in defaults:
                raise DataError(f"unknown knob; valid knobs: {sorted(defaults)}", field=k)
            pair = isinstance(defaults[k], tuple)  # chronicity: "[0.4, 0.9]" on the command line
            try:
                xs = [float(check_type(k, x, 0.0)) for x in (
                    (json.loads(v) if isinstance(v, str) else v) if pair else [v])]
            except (ValueError, TypeError):  # DataError is a ValueError
                xs = []
            top = 1.0 if k in _CHANCES else math.inf
            if len(xs) != 1 + pair or not all(math.isfinite(x) and 0 <= x <= top for x in xs) \
                    or (k in _SHAPES and xs[0] <= 0) or (pair and xs[0] > xs[1]):
                low = "(0" if k in _SHAPES else "[0"
                sign = ">" if k in _SHAPES else ">="
                what = f"in {low}, 1]" if top == 1 else f"finite and {sign} 0"
                raise DataError(f"must be {'[low, high] ' * pair}{what}, got {excerpt(v)}", field=k)
            out[k] = tuple(xs) if pair else check_type(k, v, defaults[k])
        return cls(**out)


# Chances and shares (in [0, 1]), shapes (> 0); every other knob is a count or scale >= 0.
_CHANCES = frozenset({"in_cluster", "acute_rate", "chronicity", "generic_top", "ddi_affinity",
                      "routine_source", "cond_med_top", "link_diag", "link_proc", "ddi_share",
                      "ddi_rate"})
# Shapes: the Beta draws of a patient's routine drugs take generic_top * med_scale as a
# parameter, so those two must be > 0 as well.
_SHAPES = frozenset({"routine_persistence", "affinity_shape", "med_scale", "generic_top"})


# ----------------------------------------------------------------------------- interactions
def _adjacency(pairs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric CSR (offsets, neighbours) of unordered pairs."""
    a = np.concatenate([pairs[:, 0], pairs[:, 1]])
    b = np.concatenate([pairs[:, 1], pairs[:, 0]])
    return _ptr(a, n), b[np.argsort(a, kind="stable")]


class _Lookup:
    """Position of int64 keys in a sorted array: a dense table when small (40x faster)."""

    def __init__(self, keys: np.ndarray, size: int) -> None:
        self.keys = keys
        self.dense: np.ndarray | None = None
        if size <= 16_000_000:  # 64 MB of int32 at most
            self.dense = np.full(size, -1, dtype=np.int32)
            self.dense[keys] = np.arange(len(keys))

    def index(self, k: np.ndarray) -> np.ndarray:
        """Position of each key, -1 when absent."""
        if self.dense is not None:
            return self.dense[k].astype(np.int64)
        at = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
        return np.where(self.keys[at] == k, at, -1)


def _partners_present(look: _Lookup, n_med: int, adj_ptr: np.ndarray, adj: np.ndarray,
                      visit: np.ndarray, med: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query row, entry position) of every interacting drug present in the query's visit.

    In chunks of ~4M look-ups: unchunked, the Last-FM preset peaked at 2.4 GB here.
    """
    deg = adj_ptr[med + 1] - adj_ptr[med]
    chunk = 4_000_000
    ends = np.searchsorted(np.cumsum(deg), np.arange(1, 1 + int(deg.sum()) // chunk) * chunk)
    rows, ats = [], []
    for lo, hi in zip(np.r_[0, ends], np.r_[ends, len(med)], strict=True):
        d = deg[lo:hi]
        row = lo + np.repeat(np.arange(hi - lo), d)
        partner = adj[np.repeat(adj_ptr[med[lo:hi]], d) + _repeat_range(d)]
        at = look.index(visit[row] * n_med + partner)
        rows.append(row[at >= 0])
        ats.append(at[at >= 0])
    return np.concatenate(rows), np.concatenate(ats)


def _routine_drugs(rng: np.random.Generator, ddi: np.ndarray, deg: np.ndarray, n: int,
                   bias: float, max_pairs: int) -> np.ndarray:
    """``n`` routine drugs, weight (1 + DDI degree)^bias, at most ``max_pairs`` interacting.

    The cap matters: a routine pair sits in most visits, so drawn freely the routine drugs alone
    moved the DDI rate between 0.05 and 0.11 from seed to seed. Greedy over a weighted random order
    (Efraimidis-Spirakis keys u^(1/w)); the loop stops after a few dozen candidates.
    """
    order = np.argsort(-rng.random(len(deg)) ** (1.0 / (1.0 + deg) ** bias))
    adj = set(map(tuple, ddi.tolist()))
    chosen: list[int] = []
    pairs = 0
    for m in order.tolist():
        k = sum((min(m, c), max(m, c)) in adj for c in chosen)
        if pairs + k <= max_pairs:
            chosen.append(m)
            pairs += k
            if len(chosen) == n:
                break
    return np.array(chosen, dtype=np.int64)


def _avoid_ddi(rng: np.random.Generator, keys: np.ndarray, n_med: int, n_visits: int,
               pairs: np.ndarray, routine: np.ndarray, alt_ptr: np.ndarray, alt: np.ndarray,
               target: float) -> tuple[np.ndarray, dict[str, float]]:
    """Avoid each interacting pair with probability ``q``, calibrated so the DDI rate is ``target``.

    The loser of a pair is the drug with more conflicts in the visit (avoiding a hub lowers the
    rate most per drug changed), never a routine drug; two routine drugs are an established regimen
    and stay. The loser is swapped for the first of four random alternatives (``alt``: drugs of
    its condition) that is new to the visit and compatible with all its drugs, else dropped:
    swapping keeps the number of drugs per visit stable whatever ``q`` the calibration needs.
    """
    info = {"raw_ddi_rate": 0.0, "avoid_prob": 0.0, "swapped": 0.0, "dropped": 0.0}
    if len(pairs) == 0 or len(keys) == 0:
        return keys, info
    visit, med = np.divmod(keys, n_med)
    look = _Lookup(keys, n_visits * n_med)
    # Each interacting pair once: look up only partners with a larger index.
    up_ptr = _ptr(pairs[:, 0], n_med)
    ea, eb = _partners_present(look, n_med, up_ptr, pairs[np.argsort(pairs[:, 0]), 1], visit, med)
    is_routine = np.isin(med, routine)
    score = np.bincount(np.concatenate([ea, eb]), minlength=len(keys)) + rng.random(len(keys))
    score[is_routine] = -1.0
    loser = np.where(score[ea] > score[eb], ea, eb)
    u = np.where(is_routine[ea] & is_routine[eb], 2.0, rng.random(len(ea)))
    # Four alternatives per possible loser (one found a valid swap for ~17% of losers, four ~45%).
    n_try = 4
    cand_of = unique_int(loser)
    n_alt = np.repeat(alt_ptr[med[cand_of] + 1] - alt_ptr[med[cand_of]], n_try)
    cv = np.repeat(visit[cand_of], n_try)
    pick = np.repeat(alt_ptr[med[cand_of]], n_try) + (rng.random(len(cv)) * n_alt).astype(int)
    cand = alt[np.minimum(pick, len(alt) - 1)]
    adj_ptr, adj = _adjacency(pairs, n_med)
    clash = np.bincount(_partners_present(look, n_med, adj_ptr, adj, cv, cand)[0],
                        minlength=len(cand)) > 0
    ok = ((n_alt > 0) & (look.index(cv * n_med + cand) < 0) & ~clash).reshape(-1, n_try)
    valid = np.zeros(len(keys), dtype=bool)
    valid[cand_of] = ok.any(axis=1)
    sub = np.zeros(len(keys), dtype=np.int64)
    sub[cand_of] = cand.reshape(-1, n_try)[np.arange(len(cand_of)), ok.argmax(axis=1)]
    n_v = np.bincount(visit, minlength=n_visits)

    def avoid_at(q: float) -> tuple[np.ndarray, float]:
        out = np.zeros(len(keys), dtype=bool)
        out[loser[u < q]] = True
        left = n_v - np.bincount(visit[out & ~valid], minlength=n_visits)
        total = float((left * (left - 1) // 2).sum())
        return out, float((~out[ea] & ~out[eb]).sum()) / max(total, 1.0)

    info["raw_ddi_rate"] = avoid_at(0.0)[1]
    if info["raw_ddi_rate"] <= target:
        return keys, info
    lo, hi = 0.0, 1.0
    for _ in range(18):  # bisection: the rate falls as q grows (the avoided set only grows)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if avoid_at(mid)[1] > target else (lo, mid)
    out, _ = avoid_at(hi)
    swap = out & valid
    info.update(avoid_prob=hi, swapped=float(swap.sum()), dropped=float((out & ~valid).sum()))
    return unique_int(np.concatenate([keys[~out], visit[swap] * n_med + sub[swap]])), info


# ----------------------------------------------------------------------------- generator
def _drug_lists(rng: np.random.Generator, kn: SyntheticKnobs, n_cond: int, cond_cl: np.ndarray,
                med_cl: np.ndarray, med_class: np.ndarray, ddi: np.ndarray,
                generic: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each condition's drug list (CSR offsets, drugs) and each drug's probability in it."""
    n_med = len(med_cl)
    n_class = int(med_class.max()) + 1
    class_cl = np.zeros(n_class, dtype=np.int64)
    class_cl[med_class] = med_cl
    _, cc, ck = _partition(rng, class_cl, cond_cl)
    members = _Groups(med_class, np.arange(n_med), np.ones(n_med), n_class)

    def drugs_of(cond: np.ndarray, cls: np.ndarray) -> np.ndarray:  # -> cond * n_med + drug
        cnt = np.diff(members.ptr)[cls]
        at = np.repeat(members.ptr[cls], cnt) + _repeat_range(cnt)
        return unique_int(np.repeat(cond, cnt) * n_med + members.item[at])

    block_cond, block_med = np.divmod(drugs_of(cc, ck), n_med)
    # Extra classes: the class of an interaction partner of one of the condition's drugs or of a
    # routine drug (drugs of one organ system often interact), else a random class of its cluster.
    more = np.repeat(np.arange(n_cond), kn.extra_classes)
    own = _Groups(block_cond, block_med, np.ones(len(block_med)), n_cond).sample(rng, more)
    from_routine = rng.random(len(more)) < kn.routine_source
    own[from_routine] = generic[rng.integers(0, len(generic), int(from_routine.sum()))]
    adj_ptr, adj = _adjacency(ddi, n_med)
    deg = np.diff(adj_ptr)[own]
    at = np.minimum(adj_ptr[own] + (rng.random(len(more)) * deg).astype(np.int64), len(adj) - 1)
    partner = adj[at] if len(adj) else own
    uniform = _Groups(class_cl, np.arange(n_class), np.ones(n_class), N_CLUSTERS)
    uniform_class = uniform.sample(rng, cond_cl[more])
    use_ddi = (deg > 0) & (rng.random(len(more)) < kn.ddi_affinity)
    cross = np.flatnonzero(rng.random(n_cond) < 0.3)  # comorbidity drugs of any cluster
    cm_cond, cm_med = np.divmod(drugs_of(
        np.concatenate([cc, more, cross]),
        np.concatenate([ck, np.where(use_ddi, med_class[partner], uniform_class),
                        rng.integers(0, n_class, len(cross))])), n_med)
    # First-line drugs: a global propensity (some drugs are everybody's first choice) plus noise
    # ranks each list; the r-th drug has probability cond_med_top * r^-cond_med_decay.
    propensity = rng.permutation(n_med) / n_med
    rank_key = propensity[cm_med] + kn.first_line_noise * rng.random(len(cm_med))
    prob = _zipf_in_groups(rng, cm_cond, kn.cond_med_decay, rank_key)
    return _ptr(cm_cond, n_cond), cm_med, kn.cond_med_top * kn.med_scale * prob


def synthetic_cohort(n_patients: int = 6350, n_diag: int = 1958, n_proc: int = 1430,
                     n_med: int = 112, seed: int = 0,
                     **knobs: Any) -> tuple[MedicalRecords, dict[str, float]]:
    """:func:`synthetic_records` plus diagnostics of the generation (DDI rate before avoidance,
    the calibrated avoidance probability, swapped / dropped drugs, codes added for coverage)."""
    kn = SyntheticKnobs.make(**knobs)
    sizes = {"diag": n_diag, "proc": n_proc, "med": n_med}
    for name, v in (("n_patients", n_patients), *((f"n_{k}", sizes[k]) for k in KINDS)):
        if int(v) < 1:
            raise DataError(f"must be >= 1, got {v}", field=name)
    rng = np.random.default_rng(seed)
    voc, cl, klass, ddi = vocabularies(rng, sizes, kn.ddi_share, kn.ddi_degree)
    generic = _routine_drugs(rng, ddi, np.bincount(ddi.ravel(), minlength=n_med),
                             min(kn.n_generic, n_med), kn.generic_ddi_bias, kn.routine_ddi_pairs)

    # --- conditions ------------------------------------------------------------------------------
    n_cond = kn.n_conditions or max(60, math.ceil(n_med / 8))
    if n_cond < N_CLUSTERS:
        raise DataError(f"must be >= {N_CLUSTERS}, got {n_cond}", field="n_conditions")
    cond_cl = np.arange(n_cond) % N_CLUSTERS
    prevalence = _zipf_in_groups(rng, cond_cl, kn.prevalence_zipf)
    chronic = rng.uniform(*kn.chronicity, n_cond)
    lam = {"diag": kn.diag_per_condition * rng.gamma(4.0, 0.25, n_cond),
           "proc": kn.proc_per_condition * rng.gamma(1.5, 1 / 1.5, n_cond)}
    dist, owner = {}, {}
    for kind in ("diag", "proc"):
        owner[kind], c, item = _partition(rng, cl[kind], cond_cl)
        dist[kind] = _Groups(c, item, _zipf_in_groups(rng, c, kn.code_zipf), n_cond)
    cm_ptr, cm_med, cm_prob = _drug_lists(rng, kn, n_cond, cond_cl, cl["med"], klass["med"],
                                          ddi, generic)
    cm_cond = np.repeat(np.arange(n_cond), np.diff(cm_ptr))
    first = np.unique(cm_med, return_index=True)[1]  # every drug is in some condition's list
    owner["med"] = np.zeros(n_med, dtype=np.int64)
    owner["med"][cm_med[first]] = cm_cond[first]
    # Each code links to one drug of its condition, first-line drugs more likely.
    first_line = _Groups(cm_cond, cm_med, cm_prob, n_cond)
    link = {kind: first_line.sample(rng, owner[kind]) for kind in ("diag", "proc")}

    # --- patients, their conditions, visits, activations -----------------------------------------
    primary = rng.choice(N_CLUSTERS, n_patients, p=CLUSTER_WEIGHTS)
    draw_p = np.repeat(np.arange(n_patients), 1 + rng.poisson(kn.cond_per_patient, n_patients))
    grp = np.where(rng.random(len(draw_p)) < kn.in_cluster, primary[draw_p], N_CLUSTERS)
    pick = _Groups(np.concatenate([cond_cl, np.full(n_cond, N_CLUSTERS)]),
                   np.tile(np.arange(n_cond), 2),
                   np.concatenate([prevalence, prevalence * CLUSTER_WEIGHTS[cond_cl]]),
                   N_CLUSTERS + 1)
    pc_pat, pc_cond = np.divmod(unique_int(draw_p * n_cond + pick.sample(rng, grp)), n_cond)
    pc_ptr = _ptr(pc_pat, n_patients)
    n_vis = 1 + rng.choice(len(VISIT_PROBS), n_patients, p=VISIT_PROBS)
    if kn.visit_scale != 1.0:
        jitter = kn.visit_scale * rng.uniform(0.75, 1.25, n_patients)
        n_vis = np.maximum(1, np.rint(n_vis * jitter)).astype(np.int64)
    visit_ptr = np.concatenate([[0], np.cumsum(n_vis)]).astype(np.int64)
    V = int(visit_ptr[-1])
    vp = np.repeat(np.arange(n_patients), n_vis)
    severity = rng.lognormal(-0.5 * kn.severity_sigma**2, kn.severity_sigma, V)
    # Activations: (visit, condition, patient-condition pair; -1 for an acute condition).
    a_pair = np.repeat(np.arange(len(pc_pat)), n_vis[pc_pat])
    a_visit = visit_ptr[pc_pat[a_pair]] + _repeat_range(n_vis[pc_pat])
    on = rng.random(len(a_pair)) < chronic[pc_cond[a_pair]]
    a_pair, a_visit = a_pair[on], a_visit[on]
    idle = np.flatnonzero(np.bincount(a_visit, minlength=V) == 0)
    fix = pc_ptr[vp[idle]] + (rng.random(len(idle)) * np.diff(pc_ptr)[vp[idle]]).astype(int)
    acute = np.flatnonzero(rng.random(V) < kn.acute_rate)
    a_visit = np.concatenate([a_visit, idle, acute])
    acute_cond = pick.sample(rng, np.full(len(acute), N_CLUSTERS))
    a_cond = np.concatenate([pc_cond[a_pair], pc_cond[fix], acute_cond])
    a_pair = np.concatenate([a_pair, fix, np.full(len(acute), -1)])
    some_cond = np.zeros(V, dtype=np.int64)
    some_cond[a_visit] = a_cond  # one active condition of each visit

    # --- diagnoses and procedures -------------------------------------------------------------
    entries: dict[str, np.ndarray] = {}
    for kind, bg in (("diag", kn.diag_background), ("proc", kn.proc_background)):
        n = sizes[kind]
        k = rng.poisson(lam[kind][a_cond] * severity[a_visit]) + (kind == "diag")
        code = dist[kind].sample(rng, np.repeat(a_cond, k))
        nb = rng.poisson(bg * severity)
        zipf = (1.0 + rng.permutation(n)) ** -kn.background_zipf
        background = rng.choice(n, int(nb.sum()), p=zipf / zipf.sum())
        keys = unique_int(np.concatenate([np.repeat(a_visit, k) * n + code,
                                          np.repeat(np.arange(V), nb) * n + background]))
        empty = np.flatnonzero(np.bincount(keys // n, minlength=V) == 0)
        entries[kind] = unique_int(
            np.concatenate([keys, empty * n + dist[kind].sample(rng, some_cond[empty])]))

    # --- medications --------------------------------------------------------------------------
    p_gen = np.minimum(kn.generic_top * kn.med_scale
                       * np.arange(1, len(generic) + 1) ** -kn.generic_decay, 0.999)
    # A patient keeps her routine drugs: her probability ~ Beta(mean p, concentration
    # routine_persistence); severity raises it: p' = 1 - (1 - p)^sqrt(severity).
    p_pat = rng.beta(p_gen * kn.routine_persistence, (1.0 - p_gen) * kn.routine_persistence,
                     (n_patients, len(generic)))
    p_vis = 1.0 - (1.0 - p_pat[vp]) ** np.sqrt(severity)[:, None]
    gv, gi = np.nonzero(rng.random((V, len(generic))) < p_vis)
    mv, mm = [gv], [generic[gi]]
    # Condition drugs times the patient's affinity (1 for acute conditions).
    aff_ptr = np.concatenate([[0], np.cumsum(np.diff(cm_ptr)[pc_cond])])
    aff = rng.gamma(kn.affinity_shape, 1.0 / kn.affinity_shape, int(aff_ptr[-1]))
    n_c = np.diff(cm_ptr)[a_cond]
    slot = _repeat_range(n_c)
    rows = np.repeat(np.arange(len(a_cond)), n_c)
    cand = cm_ptr[a_cond[rows]] + slot
    pair = a_pair[rows]
    f = np.where(pair >= 0, aff[aff_ptr[np.maximum(pair, 0)] + slot], 1.0)
    keep = rng.random(len(rows)) < cm_prob[cand] * f
    mv.append(a_visit[rows[keep]])
    mm.append(cm_med[cand[keep]])
    for kind, p_link in (("diag", kn.link_diag), ("proc", kn.link_proc)):
        v, c = np.divmod(entries[kind], sizes[kind])
        keep = rng.random(len(v)) < p_link * kn.med_scale
        mv.append(v[keep])
        mm.append(link[kind][c[keep]])
    nn = rng.poisson(kn.noise_meds, V)
    mv.append(np.repeat(np.arange(V), nn))
    mm.append(rng.integers(0, n_med, int(nn.sum())))
    med_keys = unique_int(np.concatenate(mv) * n_med + np.concatenate(mm))
    info: dict[str, float] = {"n_conditions": float(n_cond),
                              "meds_per_visit_drawn": len(med_keys) / V}
    # Alternatives of a drug: the drugs of its (first) condition's list.
    n_alt = np.diff(cm_ptr)[owner["med"]]
    alt = cm_med[np.repeat(cm_ptr[owner["med"]], n_alt) + _repeat_range(n_alt)]
    entries["med"], avoid = _avoid_ddi(rng, med_keys, n_med, V, ddi, generic,
                                       _ptr(np.repeat(np.arange(n_med), n_alt), n_med), alt,
                                       kn.ddi_rate)
    info.update(avoid)

    # --- coverage: every visit has a drug, every code appears ----------------------------------
    act_order = np.argsort(a_cond, kind="stable")
    act_ptr = _ptr(a_cond[act_order], n_cond)
    for kind in KINDS:
        n = sizes[kind]
        keys = entries[kind]
        if kind == "med":
            empty = np.flatnonzero(np.bincount(keys // n, minlength=V) == 0)
            keys = unique_int(np.concatenate([keys, empty * n + generic[0]]))
        missing = np.flatnonzero(np.bincount(keys % n, minlength=n) == 0)
        oc = owner[kind][missing]
        cnt = act_ptr[oc + 1] - act_ptr[oc]
        at = np.minimum(act_ptr[oc] + (rng.random(len(missing)) * cnt).astype(int), len(a_cond) - 1)
        vis = np.where(cnt > 0, a_visit[act_order[at]], rng.integers(0, V, len(missing)))
        entries[kind] = unique_int(np.concatenate([keys, vis * n + missing]))
        info[f"coverage_added_{kind}"] = float(len(missing))

    arrays: dict[str, np.ndarray] = {}
    for kind in KINDS:
        v, c = np.divmod(entries[kind], sizes[kind])
        arrays[f"{kind}_ptr"] = _ptr(v, V)
        arrays[kind] = c
    rec = MedicalRecords(
        visit_ptr=visit_ptr, diag_voc=voc["diag"], proc_voc=voc["proc"], med_voc=voc["med"],
        patient_ids=[f"SYN{i:06d}" for i in range(1, n_patients + 1)], ddi_pairs=ddi,
        source="synthetic", **arrays,
    )
    rec.validate()
    return rec, info


def synthetic_records(n_patients: int = 6350, n_diag: int = 1958, n_proc: int = 1430,
                      n_med: int = 112, seed: int = 0, **knobs: Any) -> MedicalRecords:
    """A synthetic MIMIC-III-shaped cohort (module docstring), identical for equal arguments.

    ``knobs`` are fields of :class:`SyntheticKnobs` (an unknown one is a :class:`DataError`).
    Sizes beyond the real code dictionaries switch that kind to synthetic codes.
    """
    try:
        return synthetic_cohort(n_patients, n_diag, n_proc, n_med, seed, **knobs)[0]
    except DataError:
        raise
    except (ValueError, FloatingPointError, OverflowError, MemoryError) as exc:
        # A knob far from its default (a Poisson mean of 1e300, a lognormal sigma that
        # overflows, 1e10 times the visits) fails deep in numpy, where no knob is known:
        # name the ones given.
        raise DataError(f"numpy cannot draw this cohort ({cut(str(exc))}); choose values "
                        "nearer the defaults", field=", ".join(sorted(knobs)) or "n_patients"
                        ) from None


def synthetic_records_scaled(preset: str, seed: int = 0, **overrides: Any) -> MedicalRecords:
    """A cohort sized like a benchmark: ``preset`` is a key of :data:`PRESETS` (``"mimic3"``,
    ``"lastfm"``: 23,566 patients x 48,123 drugs, ``"alibaba"``: 114,737 x 30,040)."""
    if preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}",
                        field="preset")
    return synthetic_records(seed=seed, **{**PRESETS[preset], **overrides})
