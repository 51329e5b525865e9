"""End-to-end build of the bundled default (synthetic cohort -> medication KG dataset -> file).

Target (issue 2): under 10 s on the 2-core CI machine. Run: ``pytest bench --benchmark-only``.
"""

from __future__ import annotations

from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.codes import bundled_path
from diffkg_fast.data.mimic3 import load_mimic3


def test_build_synthetic_default(benchmark, tmp_path):
    benchmark.group = "build_synthetic_default"

    def run():
        ds = build_dataset("synthetic")
        ds.save(tmp_path / "synthetic.npz")
        return ds

    ds = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(patients=ds.n_users, triplets=ds.n_triplets,
                                interactions=int(ds.train.nnz + ds.valid.nnz + ds.test.nnz))


def test_load_mimic3_demo(benchmark):
    benchmark.group = "load_mimic3_demo"
    rec = benchmark.pedantic(load_mimic3, args=(bundled_path("mimic3-demo"),), rounds=3,
                             iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(visits=rec.n_visits, patients=rec.n_patients)
