#!/usr/bin/env bash
# One process with 2 threads against 2 data-parallel processes with 1 thread each, on this
# machine's two cores (docs/distributed.md, "Measurements"): LightGCN and DiffKG, one epoch each,
# on the default medication cohort and on a 2x cohort (12,700 patients). Run it on an otherwise
# idle machine; it prints each run's seconds per phase (from log.csv) and its
# whole-process wall time and peak RSS (GNU time).
#
#   bash bench/dist_speed.sh OUT
set -euo pipefail
OUT=$1
mkdir -p "$OUT"
[ -f "$OUT/x2.npz" ] || diffkg-fast data build --source synthetic --set n_patients=12700 \
    --out "$OUT/x2.npz" > /dev/null
for data in synthetic "$OUT/x2.npz"; do
    tag=$([ "$data" = synthetic ] && echo default || echo x2)
    for model in lightgcn diffkg; do
        common=(-m diffkg_fast train --data "$data" --model "$model" --set epoch=1 --no-plot
                --no-progress)
        rm -rf "$OUT/$tag-$model-1x2" "$OUT/$tag-$model-2x1"
        OMP_NUM_THREADS=2 /usr/bin/time -f "%e s wall, %M KB peak RSS (one process)" \
            -o "$OUT/$tag-$model-1x2.time" \
            python "${common[@]}" --out "$OUT/$tag-$model-1x2" > "$OUT/$tag-$model-1x2.log" 2>&1
        OMP_NUM_THREADS=1 /usr/bin/time -f "%e s wall, %M KB peak RSS (largest process)" \
            -o "$OUT/$tag-$model-2x1.time" \
            torchrun --standalone --nproc_per_node=2 "${common[@]}" --out "$OUT/$tag-$model-2x1" \
            > "$OUT/$tag-$model-2x1.log" 2>&1
    done
done
python - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| data | model | layout | phases (s) | whole run |")
print("| --- | --- | --- | --- | --- |")
for tag in ("default", "x2"):
    for model in ("lightgcn", "diffkg"):
        for layout in ("1x2", "2x1"):
            run = out / f"{tag}-{model}-{layout}"
            rows = list(csv.DictReader(open(run / "log.csv")))
            last = rows[-1]
            phases = ", ".join(f"{k[5:]} {float(v):.1f}" for k, v in last.items()
                               if k.startswith("time_") and v not in ("", None))
            time = (out / f"{tag}-{model}-{layout}.time").read_text().strip().splitlines()[-1]
            procs = "1 process x 2 threads" if layout == "1x2" else "2 processes x 1 thread"
            print(f"| {tag} | {model} | {procs} | {phases} | {time} |")
EOF
