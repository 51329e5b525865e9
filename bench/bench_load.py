"""Benchmark: load a Last-FM-size KGAT dataset (the hard budget: < 30 s and < 2 GB peak RSS).

Run with ``pytest bench/bench_load.py --benchmark-only``. The files are synthetic (same sizes as
Last-FM in the id space the code uses: 23,566 users, 48,123 items, 3,034,796 interactions,
106,389 entities, 9 relations, 464,567 triplets), written once per module.

The timed rounds run in this process after one warm-up round (numba compiled or loaded from its
cache). The budget is checked on fresh processes, where everything counts: interpreter start,
imports, numba compiling ``_scan`` from scratch (an empty ``NUMBA_CACHE_DIR``) and the load.
Peak memory is the peak RSS of such a process (``VmHWM``; tracemalloc misses numpy / numba
allocations, and ``ru_maxrss`` of a child also carries the forking parent's peak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffkg_fast.data.kgrec import load_kgat, write_kgat_synthetic

LASTFM = {
    "n_users": 23_566,
    "n_items": 48_123,
    "n_entities": 106_389,
    "n_relations": 9,
    "n_interactions": 3_034_796,
    "n_triplets": 464_567,
}
BUDGET_S = 30.0
BUDGET_RSS_MB = 2048.0

_CHILD = """
import json, resource, sys, time


def peak_rss_mb():
    # VmHWM is this process's own peak; ru_maxrss after exec also keeps the peak of the parent
    # that forked it (here the pytest process holding the generated dataset, ~430 MB).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


t0 = time.perf_counter()
from diffkg_fast.data.kgrec import load_kgat
t1 = time.perf_counter()
rss_import = peak_rss_mb()
ds = load_kgat(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({
    "import_s": t1 - t0,
    "load_s": t2 - t1,
    "rss_after_import_mb": rss_import,
    "peak_rss_mb": peak_rss_mb(),
    "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "nnz": int(ds.train.nnz + ds.test.nnz),
}))
"""


@pytest.fixture(scope="module")
def lastfm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lastfm")
    write_kgat_synthetic(root, seed=0, **LASTFM)
    return root


def _fresh_process(root: Path, numba_cache: Path | None) -> dict:
    env = dict(os.environ)
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    # The wall time around the child includes interpreter start-up as a user would see it.
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root)], env=env, check=True,
                         capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t
    return res


@pytest.mark.benchmark(group="load_kgat_lastfm")
@pytest.mark.parametrize("provider", ["numba"])
def test_load_kgat_lastfm(benchmark, lastfm_dir: Path, tmp_path: Path, provider: str) -> None:
    cold = _fresh_process(lastfm_dir, numba_cache=tmp_path / "empty-numba-cache")
    warm = _fresh_process(lastfm_dir, numba_cache=None)
    ds = benchmark.pedantic(load_kgat, args=(lastfm_dir,), rounds=3, iterations=1,
                            warmup_rounds=1)
    assert (ds.n_users, ds.n_items, ds.n_entities, ds.n_relations, ds.n_triplets) == (
        LASTFM["n_users"], LASTFM["n_items"], LASTFM["n_entities"], LASTFM["n_relations"],
        LASTFM["n_triplets"])
    assert ds.train.nnz + ds.test.nnz == LASTFM["n_interactions"] == cold["nnz"]
    benchmark.extra_info.update({
        "provider": provider,
        "cpu_count": os.cpu_count(),
        "peak_rss_mb": round(max(cold["peak_rss_mb"], warm["peak_rss_mb"]), 1),
        "rss_after_import_mb": round(warm["rss_after_import_mb"], 1),
        "ru_maxrss_mb": round(max(cold["ru_maxrss_mb"], warm["ru_maxrss_mb"]), 1),
        "cold_process_s": round(cold["process_s"], 2),  # incl. compiling the scanner
        "cold_load_s": round(cold["load_s"], 2),
        "warm_process_s": round(warm["process_s"], 2),  # numba cache present
        "warm_load_s": round(warm["load_s"], 2),
        "import_s": round(warm["import_s"], 2),
        **LASTFM,
    })
    assert cold["process_s"] < BUDGET_S, cold
    assert max(cold["peak_rss_mb"], warm["peak_rss_mb"]) < BUDGET_RSS_MB, (cold, warm)
