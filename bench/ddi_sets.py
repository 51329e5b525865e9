"""The DDI-aware set: the greedy against the exact integer programme, on a trained run's
validation visits: objective, Jaccard, DDI rate and seconds per visit.

    python bench/ddi_sets.py RUN_DIR [--data visit.npz] [--visits 300] [--weights 0.1 0.3 1]

Both maximise ``Σ z_i x_i − W Σ_{i<j} A_ij x_i x_j`` over the visit's set (size ``k_v`` for the
size rules; any size, with ``z − T``, for the threshold rule): the greedy one medication at a
time (:func:`~diffkg_fast.eval.sets.select_sets`), the programme exactly
(:func:`~diffkg_fast.eval.sets.exact_penalty_set`, HiGHS through SciPy). The run's own chosen
base rule is used. What this measured chose the greedy (``docs/medication-safety.md``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffkg_fast.eval.medication import medication_metrics
from diffkg_fast.eval.sets import base_sizes, exact_penalty_set, select_sets, standardise
from diffkg_fast.train.evaluation import ddi_adjacency, visit_arrays
from diffkg_fast.train.run_folder import load_run


def _objective(z: np.ndarray, adj: np.ndarray, sets: np.ndarray, w: float) -> np.ndarray:
    pairs = ((sets @ adj) * sets).sum(axis=1) / 2
    return (z * sets).sum(axis=1) - w * pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--data", default=None)
    ap.add_argument("--visits", type=int, default=300, help="validation visits sampled")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run_dir, args.data)
    assert run.sets is not None, "a visit-split run"
    adj = ddi_adjacency(run.ds)
    assert adj is not None
    v = visit_arrays(run.model, run.ds, "valid", run.config["test_batch"])
    pick = np.random.default_rng(0).permutation(len(v.scores))[: args.visits]
    scores, truth, n_codes = v.scores[pick], v.truth[pick], v.n_codes[pick]
    z = standardise(scores)
    base = run.sets.plain
    sizes = base_sizes(base, z, n_codes)
    pairs = np.argwhere(np.triu(adj > 0, 1))
    print(f"{args.run_dir}: base rule {base.describe()}, {len(pick)} validation visits, "
          f"{len(pairs)} interacting pairs among {run.ds.n_items} medications\n")
    print("| W | solver | objective (mean) | Jaccard | DDI rate | avg meds | ms / visit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for w in args.weights:
        rule = base.with_ddi("penalty", w)
        t0 = time.perf_counter()
        greedy = select_sets(scores, rule, adj, n_codes)
        t_greedy = (time.perf_counter() - t0) / len(pick)
        t0 = time.perf_counter()
        if base.kind == "threshold":
            exact = np.stack([exact_penalty_set(zv - base.param, adj, None, w) for zv in z])
        else:
            exact = np.stack([exact_penalty_set(zv, adj, int(k), w)
                              for zv, k in zip(z, sizes, strict=True)])
        t_exact = (time.perf_counter() - t0) / len(pick)
        shift = base.param if base.kind == "threshold" else 0.0
        obj_g = _objective(z - shift, adj, greedy, w)
        obj_e = _objective(z - shift, adj, exact, w)
        assert (obj_e >= obj_g - 1e-6).all(), "the exact programme lost to the greedy"
        for name, sets, obj, t in (("greedy", greedy, obj_g, t_greedy),
                                   ("exact", exact, obj_e, t_exact)):
            m = medication_metrics(sets, truth, pairs, n_meds=run.ds.n_items)
            print(f"| {w:g} | {name} | {obj.mean():.4f} | {m['jaccard']:.4f} | "
                  f"{m['ddi_rate']:.4f} | {m['avg_meds']:.2f} | {1000 * t:.2f} |")
        gap = obj_e - obj_g
        print(f"| {w:g} | gap | {gap.mean():.4f} (max {gap.max():.4f}; greedy optimal in "
              f"{(gap < 1e-6).mean():.0%} of visits) | | | | |")


if __name__ == "__main__":
    main()
