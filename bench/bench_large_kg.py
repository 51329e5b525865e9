"""Benchmark: the diffusion side of a DiffKG epoch, exact against sampled, as the KG grows.

Run ``OMP_NUM_THREADS=1 python bench/bench_large_kg.py --entities 20000 89196 300000 1000000
--out bench/results/cpu-large-kg.json`` (hours at the large sizes: not run yet; a toy size,
``--entities 2000 --limit 2``, checks the script in seconds). ``--device cuda`` runs the same
on a GPU (``bench/gpu_suite.sh`` does, with ``--limit``: per-batch figures, extrapolated).

Each (size, mode) runs in a FRESH child process (one thread), so its peak RSS (``VmHWM``) is its
own. The graphs keep Alibaba-iFashion's proportions as DiffKG uses it (89,196 entities, 558,310 KG
edges with inverses, 30,040 items, 114,737 users, 1,781,093 interactions): per entity 6.26
edges, 0.337 items and 1.286 users, 15.5 interactions per user; Zipf(0.8) degrees
(``bench/_graphs.py``) for the KG and the items' popularity. The denoiser is DiffKG's
(``dims=[1000]``, 5 steps, batch 1024), the tables random (d = 64).

Modes: ``exact`` (DiffKG's dense rows), ``sampled`` (``diffusion_mode=sampled``: sampled
columns, exact CKGC, torch's dense Adam, the exact rebuild), ``linear`` (``sampled`` with
``ckgc_samples=--ckgc``, ``denoiser_adam=lazy`` and ``rebuild_mode=sampled``: a step reads and
moves only the entities it touches, and the rebuild ranks each row's edges against ``n``
competitor columns), ``deferred`` (``linear`` with ``denoiser_adam=deferred``: the touched
entities move as dense Adam would move them, their skipped steps made up in closed form).

Per child: ``setup_s`` (graphs, denoiser, Adam), the training pass and the rebuild (each its
first ``--limit`` batches, or all without it; ``*_per_batch_s`` and the full pass extrapolated
as ``*_full_s_extrapolated`` when limited; the rebuild's one-off factors, ``rebuild_factors_s``,
timed alone and not multiplied), ``peak_rss_mb``, and the multiply-adds per row that
the module docstrings count: exact ``5 E H``; the others ``6 (deg + n) H + 3 H d``.
Per step, ``per_step_macs``: in ``exact`` and ``sampled`` the CKGC product ``I H d`` and Adam
over the ``2 E H`` weights, O(E H); in ``linear`` and ``deferred`` the sampled items' ``m H d``
product and its gradient, the item product moved by the touched items (at most ``min(I, K)``
rows of ``H d``), and Adam over the K touched entities (at most ``B deg + 2n + m``), O(H) per
row and sample (``deferred``: twice, the skipped steps made up, then the step).
The rebuild: in ``exact`` and ``sampled`` one ``B × H × E`` GEMM and a top-k per batch, O(E² H)
per epoch; in ``linear`` ``(deg + n) H`` a row; in every mode the hidden-space chain's factors,
``2 E H²`` once per rebuild.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PER_ENTITY = {"edges": 558_310 / 89_196, "items": 30_040 / 89_196, "users": 114_737 / 89_196}
INTERACTIONS_PER_USER = 1_781_093 / 114_737
HERE = Path(__file__).resolve().parent


def shape(n_entities: int) -> dict[str, int]:
    """The graph sizes at ``n_entities`` in Alibaba-iFashion's proportions."""
    users = max(1, round(n_entities * PER_ENTITY["users"]))
    return {"n_entities": n_entities, "edges": round(n_entities * PER_ENTITY["edges"]),
            "n_items": max(1, round(n_entities * PER_ENTITY["items"])), "n_users": users,
            "interactions": round(users * INTERACTIONS_PER_USER)}


MODES = ("exact", "sampled", "linear", "deferred")


def options(mode: str, negatives: int, ckgc: int) -> dict[str, Any]:
    """The KGDiffusion options of a benchmark mode (module docstring)."""
    if mode in ("linear", "deferred"):
        return {"diffusion_mode": "sampled", "diffusion_negatives": negatives,
                "ckgc_samples": ckgc, "denoiser_adam": "lazy" if mode == "linear" else mode,
                "rebuild_mode": "sampled"}
    return {"diffusion_mode": mode, "diffusion_negatives": negatives}


def child(n_entities: int, mode: str, limit: int | None, negatives: int, hidden: int,
          batch: int, device: str = "cpu", ckgc: int = 256) -> dict[str, Any]:
    """One (size, mode) measurement in this (fresh) process."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    sys.path.insert(0, str(HERE))
    from _graphs import zipf_kg

    from diffkg_fast.model.diffkg import KGDiffusion
    from diffkg_fast.ops.diffusion_sample_fused import SamplerFactors

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = shape(n_entities)
    t0 = time.perf_counter()
    kg = zipf_kg(n_entities, s["edges"], 51, device)
    rng = np.random.default_rng(1)
    p = 1.0 / np.arange(1, s["n_items"] + 1) ** 0.8
    items = rng.choice(s["n_items"], s["interactions"], p=p / p.sum())
    users = rng.integers(0, s["n_users"], s["interactions"])
    train = sp.csr_matrix((np.ones(len(items), np.float32), (users, items)),
                          shape=(s["n_users"], s["n_items"]))
    diff = KGDiffusion(kg, s["n_items"], train, dims=(hidden,), batch=batch, seed=1,
                       **options(mode, negatives, ckgc))
    g = torch.Generator().manual_seed(2)
    user = torch.randn(s["n_users"], 64, generator=g).to(device)
    entity = torch.randn(n_entities, 64, generator=g).to(device)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    setup = time.perf_counter() - t0
    n_batches = -(-n_entities // batch)
    run = n_batches if limit is None else min(limit, n_batches)
    t0 = time.perf_counter()
    losses = diff.train_pass(user, entity, limit)
    sync()
    train_s = time.perf_counter() - t0
    # The rebuild's one-off part (the hidden-space sampler's factors, 2 E H² a rebuild), timed
    # alone so that a limited run extrapolates only the per-batch part.
    t0 = time.perf_counter()
    SamplerFactors.build(diff.denoiser, diff.schedule)
    sync()
    factors_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    diff.rebuild(limit)
    sync()
    rebuild_s = time.perf_counter() - t0
    deg = s["edges"] / n_entities
    macs = (5 * n_entities * hidden if mode == "exact"
            else 6 * (deg + negatives) * hidden + 3 * hidden * 64)
    touched = min(n_entities, batch * deg + 2 * negatives + ckgc)
    out = {**s, "mode": mode, "negatives": negatives, "hidden": hidden, "batch": batch,
           "threads": torch.get_num_threads(), "batches_run": run, "batches_full": n_batches,
           "setup_s": setup, "train_s": train_s, "rebuild_s": rebuild_s,
           "rebuild_factors_s": factors_s, "train_per_batch_s": train_s / run,
           "rebuild_per_batch_s": max(rebuild_s - factors_s, 0.0) / run,
           "macs_per_row_train": macs,
           "per_step_macs": ((2 * ckgc + min(s["n_items"], touched)) * hidden * 64
                             + 2 * touched * hidden if mode in ("linear", "deferred")
                             else s["n_items"] * hidden * 64 + 2 * n_entities * hidden),
           "losses": losses, "peak_rss_mb": _vm_hwm_mb(), "device": device}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if run < n_batches:
        out["train_full_s_extrapolated"] = train_s / run * n_batches
        out["rebuild_full_s_extrapolated"] = factors_s + out["rebuild_per_batch_s"] * n_batches
    return out


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=[20_000])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--limit", type=int, default=None,
                    help="batches per pass (default: all; the full pass is then measured)")
    ap.add_argument("--negatives", type=int, default=256)
    ap.add_argument("--ckgc", type=int, default=256, help="the linear mode's ckgc_samples")
    ap.add_argument("--hidden", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per child")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:  # "<entities>:<mode>": print one JSON line
        n, mode = a.child.split(":")
        print(json.dumps(child(int(n), mode, a.limit, a.negatives, a.hidden, a.batch,
                               a.device, a.ckgc)))
        return 0
    results = []
    for n in a.entities:
        for mode in a.modes:
            cmd = [sys.executable, __file__, "--child", f"{n}:{mode}",
                   "--negatives", str(a.negatives), "--ckgc", str(a.ckgc),
                   "--hidden", str(a.hidden),
                   "--batch", str(a.batch), "--device", a.device] + ([] if a.limit is None else
                                              ["--limit", str(a.limit)])
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                      timeout=a.timeout, check=False)
            except subprocess.TimeoutExpired:
                res = {**shape(n), "mode": mode, "error": f"timeout after {a.timeout} s"}
            else:
                res = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                       else {**shape(n), "mode": mode, "error": proc.stderr[-2000:]})
            results.append(res)
            print(_line(res), flush=True)
    if a.out:
        a.out.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    return 0


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"E={r['n_entities']:>9,} {r['mode']:>7}: ERROR {r['error'][-300:]}"
    ext = (f" (full pass extrapolated: train {r['train_full_s_extrapolated']:.1f} s, "
           f"rebuild {r['rebuild_full_s_extrapolated']:.1f} s, from {r['batches_run']} of "
           f"{r['batches_full']} batches)" if "train_full_s_extrapolated" in r else "")
    return (f"E={r['n_entities']:>9,} {r['mode']:>7}: setup {r['setup_s']:.2f} s, train "
            f"{r['train_per_batch_s']:.3f} s/batch, rebuild {r['rebuild_per_batch_s']:.3f} "
            f"s/batch + {r['rebuild_factors_s']:.2f} s factors, peak RSS {r['peak_rss_mb']:.0f} MB"
            + (f", peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else "")
            + f", {r['macs_per_row_train']:.3g} "
            f"MAC/row{ext}")


if __name__ == "__main__":
    raise SystemExit(main())
