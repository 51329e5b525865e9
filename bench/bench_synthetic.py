"""Benchmark: the synthetic MIMIC-III-sized cohort at the default size.

Run ``pytest bench/bench_synthetic.py --benchmark-only`` (group ``synthetic_default``, provider id
``numpy``: the generator is vectorized numpy only).
"""

from __future__ import annotations

import pytest

from diffkg_fast.data.synthetic import synthetic_records


@pytest.mark.benchmark(group="synthetic_default")
@pytest.mark.parametrize("provider", ["numpy"])
def test_synthetic_default(benchmark, provider: str) -> None:
    """Time ``synthetic_records()`` (6,350 patients, ~15,000 visits, seed 0)."""
    rec = benchmark.pedantic(synthetic_records, rounds=5, iterations=1, warmup_rounds=1)
    assert rec.n_patients == 6350
    assert len(rec.med_voc) == 112
