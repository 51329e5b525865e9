"""bench/summarize.py: the summary table that bench/gpu_suite.sh prints last."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "summarize", Path(__file__).resolve().parents[1] / "bench" / "summarize.py")
summarize = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(summarize)


def _bench(group: str, provider: str, median: float, **extra) -> dict:
    return {"group": group, "name": f"test_x[{provider}]", "params": {"provider": provider},
            "stats": {"median": median}, "extra_info": extra}


def test_table_ratios_rates_and_baselines() -> None:
    data = {"machine_info": {"node": "n", "cpu": {"brand_raw": "c"}}, "benchmarks": [
        _bench("spmm", "reference", 2e-3, bytes=4e9),
        _bench("spmm", "cuda", 1e-3, bytes=4e9, peak_bytes=3 * 2**20),
        _bench("steps", "torch_steps", 3e-3, flop=6e9, baseline=True),
        _bench("steps", "triton", 1e-3, flop=6e9, baseline=False),
        _bench("alone", "triton", 1e-3),
    ]}
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in summarize.table(data).splitlines() if line.startswith("| ")}
    assert "| 2.00x | 4e+03 | - | 3 |" in rows[("spmm", "cuda")]
    assert "| 1.00x | 2e+03 |" in rows[("spmm", "reference")]
    assert "| 3.00x | - | 6 | - |" in rows[("steps", "triton")]  # vs the marked baseline
    assert "| - | - | - | - |" in rows[("alone", "triton")]  # no baseline in the group
