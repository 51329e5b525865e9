"""Summary table of pytest-benchmark JSON files: ``python bench/summarize.py BENCH.json [...]``.

One row per benchmark: op group, provider, median time, speed-up over the group's
``reference`` provider (the baseline of every group; a group without one may mark its baseline
with ``extra_info["baseline"]``), GB/s on the compulsory bytes (when the
benchmark records ``extra_info["bytes"]``), TFLOP/s (``extra_info["flop"]``: the GEMM FLOPs of
the reference's pass, so an effective rate) and peak memory above the inputs (``peak_bytes``,
GPU runs). Groups are printed in file order, providers in the order they ran.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict


def provider_of(bench: dict) -> str:
    params = bench.get("params") or {}
    if "provider" in params:
        return str(params["provider"])
    m = re.search(r"\[(.*)\]", bench["name"])
    return m.group(1).split("-")[-1] if m else bench["name"]


def table(data: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    machine = data.get("machine_info", {})
    lines = [f"machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}",
             "",
             "| group | provider | median ms | vs reference | GB/s | TFLOP/s | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for group, benches in groups.items():
        # The baseline: the "reference" provider, or the one a benchmark marks as its group's
        # baseline (extra_info["baseline"], e.g. sampler_steps' torch_steps).
        ref = next((b["stats"]["median"] for b in benches if provider_of(b) == "reference"
                    or b.get("extra_info", {}).get("baseline")), None)
        for b in benches:
            med = b["stats"]["median"]
            extra = b.get("extra_info", {})
            ratio = f"{ref / med:.2f}x" if ref else "-"
            gbs = f"{extra['bytes'] / med / 1e9:.3g}" if "bytes" in extra else "-"
            tfs = f"{extra['flop'] / med / 1e12:.3g}" if "flop" in extra else "-"
            peak = f"{extra['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in extra else "-"
            lines.append(f"| {group} | {provider_of(b)} | {med * 1e3:.3f} | {ratio} | {gbs} "
                         f"| {tfs} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    status = 0
    for path in argv:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"cannot read {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"## {path}\n\n{table(data)}\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
