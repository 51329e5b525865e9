"""Benchmark: whole DiffKG epochs in the large-KG mode as the KG grows (issue 21 part 4).

Run ``python bench/bench_large_kg_epoch.py --entities 20000 89196 300000 1000000 --out
bench/results/large-kg-epoch/epochs.json`` (hours: the million-entity epoch alone is over an
hour); ``--entities 3000 --limit 2`` checks the script in a minute.

Per size, a KGAT-format synthetic dataset in Alibaba-iFashion's proportions
(``bench_large_kg.shape``: per entity 6.26 KG edges with inverses, 0.337 items and 1.286 users;
15.5 interactions per user) is written and loaded as a user would (``write_kgat_synthetic``,
``load_kgat``: item popularity Zipf(0.8), users uniform, triplets uniform over (head, relation,
tail) with 51 relations, so the degree distributions keep their shape at every size; 80/20
train/test per user, a validation split carved from train). A FRESH child process
(``OMP_NUM_THREADS=--threads``) loads it and runs ``train`` for one epoch with ``LARGE_KG``:
every phase complete (diffusion training pass, rebuild, KG quality measures, the recommender
steps), then validation and test ranking of every user against every item. The child is
``bench_memory``'s: it reports every phase's seconds and its own peak RSS (``VmHWM``, reset at
each boundary).

What grows how (docs/large-kg.md, "Cost"): the diffusion side and each recommender step are
linear in the edges; ``max_epoch_steps`` fixes the recommender's step count, so its epoch is
too. Ranking every user against every item is U x I x d: quadratic, whatever the mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_large_kg import shape  # noqa: E402
from bench_memory import _CHILD, _batches  # noqa: E402
from large_kg_scaling import loglog, slope  # noqa: E402

# Every large-KG option (docs/large-kg.md) at H = 256, where a million entities fit 16 GB.
LARGE_KG: dict[str, Any] = {
    "diffusion_mode": "sampled", "diffusion_negatives": 256, "ckgc_samples": 256,
    "denoiser_adam": "lazy", "rebuild_mode": "sampled", "cl_mode": "sampled",
    "cl_negatives": 1024, "dims": [256], "max_epoch_steps": 128}
RELATIONS = 51
PHASES = ("diffusion", "rebuild", "kg_quality", "recommender", "validation", "test")


def dataset(n_entities: int, folder: Path) -> Path:
    """The synthetic dataset at ``n_entities``, saved as ``.npz`` for the child."""
    from diffkg_fast.data.kgrec import load_kgat, write_kgat_synthetic

    s = shape(n_entities)
    write_kgat_synthetic(folder / "kgat", s["n_users"], s["n_items"], n_entities, RELATIONS,
                         s["interactions"], s["edges"] // 2, seed=0)
    ds = load_kgat(folder / "kgat")
    path = folder / "data.npz"
    ds.save(path)
    return path


def measure(n_entities: int, threads: int, limit: int | None, options: dict[str, Any],
            timeout: float) -> dict[str, Any]:
    """One size: build the data here, train one epoch in a fresh child."""
    from diffkg_fast.data.dataset import KGDataset
    from diffkg_fast.train.config import make_config
    from diffkg_fast.utils.allocator import keep_requested
    from diffkg_fast.utils.epoch_batch import epoch_batch

    cfg = make_config(epoch=1, **options)  # the child's config: its batches and steps
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = dataset(n_entities, Path(tmp))
        data_s = time.perf_counter() - t0
        ds = KGDataset.load(path)
        T = int(ds.train.nnz)
        sizes = {"n_entities": ds.n_entities, "n_users": ds.n_users, "n_items": ds.n_items,
                 "triplets": ds.n_triplets, "train": T, "valid": int(ds.valid.nnz),
                 "test": int(ds.test.nnz)}
        kg_batches, steps = _batches(ds, cfg)
        del ds
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        try:
            out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(limit or 0),
                                  json.dumps(options), str(threads)], env=env,
                                 capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {**sizes, "error": f"timeout after {timeout} s"}
    if out.returncode != 0:
        return {**sizes, "error": out.stderr[-3000:]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    by_name = {p["phase"]: p for p in res["phases"]}
    batch = epoch_batch(T, cfg["batch"], cfg["max_epoch_steps"])
    seconds = {**{k: res["time"][k] for k in ("diffusion", "rebuild", "kg_quality",
                                              "recommender")},
               "validation": by_name["validation ranking (all users)"]["s"],
               "test": by_name["test ranking (all users)"]["s"]}
    if limit is not None:  # evaluation is never limited; the three loops are
        scale = {"diffusion": kg_batches / min(limit, kg_batches),
                 "rebuild": kg_batches / min(limit, kg_batches),
                 "recommender": steps / min(limit, steps)}
        seconds = {k: v * scale.get(k, 1.0) for k, v in seconds.items()}
    return {**sizes, "data_s": data_s, "threads": threads, "options": options, "limit": limit,
            "keep_freed_memory": keep_requested(),  # the child reads the same switch
            "recommender_batch": batch, "recommender_steps": steps, "kg_batches": kg_batches,
            "seconds": seconds, "epoch_plus_eval_s": sum(seconds.values()),
            "peak_rss_mb": max(p["peak_mb"] for p in res["phases"]),
            "peak_phase": max(res["phases"], key=lambda p: p["peak_mb"])["phase"],
            "phases": res["phases"], "kg_edges": res["kg_edges"],
            "denoiser_params": res["denoiser_params"], "model_params": res["model_params"]}


def line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"E={r['n_entities']:>9,}: ERROR {r['error'][-400:]}"
    s = r["seconds"]
    ext = "" if r["limit"] is None else f" (loops extrapolated from {r['limit']} batches)"
    return (f"E={r['n_entities']:>9,}: " + ", ".join(f"{k} {s[k]:,.1f} s" for k in PHASES)
            + f"; total {r['epoch_plus_eval_s']:,.0f} s = {r['epoch_plus_eval_s'] / 60:.1f} "
            f"min; peak RSS {r['peak_rss_mb']:,.0f} MB ({r['peak_phase']}); recommender "
            f"{r['recommender_steps']} steps of {r['recommender_batch']:,}{ext}")


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| entities | users | items | train interactions | " + " | ".join(PHASES)
            + " | epoch + evaluation | peak RSS |")
    lines = [head, "|" + " --- |" * (len(PHASES) + 6)]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['n_entities']:,} | {r['n_users']:,} | {r['n_items']:,} | "
                     f"{r['train']:,} | " + " | ".join(f"{s[k]:,.0f}" for k in PHASES)
                     + f" | {r['epoch_plus_eval_s'] / 60:,.1f} min | "
                     f"{r['peak_rss_mb'] / 1024:.1f} GiB |")
    return "\n".join(lines)


def exponents(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per phase (and the epoch without evaluation, and the total), ``b`` of seconds ∝ E^b."""
    out = {}
    parts = {**{k: [k] for k in PHASES}, "epoch": list(PHASES[:4]), "total": list(PHASES)}
    for name, keys in parts.items():
        pts = [(r["n_entities"], sum(r["seconds"][k] for k in keys)) for r in rows]
        if len(pts) >= 2 and all(y > 0 for _, y in pts):
            out[name] = slope(pts)
    return out


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    series = {**{k: [k] for k in ("diffusion", "rebuild", "recommender", "validation")},
              "epoch": list(PHASES[:4]), "total": list(PHASES)}
    loglog([(name, "o-" if name in ("epoch", "total") else "s--",
             [(r["n_entities"], sum(r["seconds"][k] for k in keys)) for r in rows])
            for name, keys in series.items()],
           f"seconds ({rows[0]['threads']} thread(s))", png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=[20_000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None,
                    help="batches per loop (default: all); evaluation stays complete")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a LARGE_KG option, e.g. max_epoch_steps=256")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per size")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (merged with its rows)")
    ap.add_argument("--table", action="store_true", help="print the --out file's table only")
    ap.add_argument("--png", type=Path, default=None, help="the log-log plot")
    a = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    if a.out and a.out.exists():
        rows = json.loads(a.out.read_text())["results"]
    if not a.table:
        options = {**LARGE_KG, **{k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}}
        for n in a.entities:
            r = measure(n, a.threads, a.limit, options, a.timeout)
            print(line(r), flush=True)
            rows = [x for x in rows if x["n_entities"] != n] + [r]
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps({"results": rows}, indent=1))
    good = sorted((r for r in rows if "error" not in r), key=lambda r: r["n_entities"])
    if good:
        print(table(good))
        for name, b in exponents(good).items():
            print(f"{name}: seconds ∝ E^{b:.2f}")
        if a.png:
            plot(good, a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
