#!/usr/bin/env bash
# The one GPU call: `bash bench/gpu_suite.sh OUTDIR` on a GPU machine holding this tree, offline.
# Installs the project without fetching anything, records the card and the versions, runs every
# GPU test, then every GPU benchmark with --benchmark-json, and writes a summary table last; all
# under OUTDIR (env.txt, install.log, gpu-tests.txt, bench.txt, bench-*.json, summary.md, and
# multi-gpu.txt), within 9 minutes on one GPU (each step has its own time limit; a failing step
# is recorded and the next one runs; the large-KG scaling steps take what is left of 9.5
# minutes); with several GPUs the multi-GPU step adds up to 8 minutes.
set -uo pipefail
OUT=${1:?usage: bench/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$(date +%s)
step() { echo "== $1 ($(($(date +%s) - t0)) s)"; }

step "environment" >"$OUT/env.txt"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" - <<'PY'
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton.__version__}, device {torch.cuda.get_device_name(0)}, "
      f"capability {torch.cuda.get_device_capability(0)}")
PY
    git rev-parse HEAD 2>/dev/null || true
} >>"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --no-deps: nothing to fetch (the machine is offline; its image holds the dependencies);
# --no-build-isolation: torch is importable, so setup.py builds the C++/CUDA extension now.
step "install" | tee "$OUT/install.log"
timeout 150 "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1
echo "install exit $?" | tee -a "$OUT/install.log"

step "GPU tests" | tee "$OUT/gpu-tests.txt"
# Kernel tests first, test_c*.py (the end-to-end training test, the slowest) last: a run out
# of time loses it rather than the kernels' checks. (Files in the order given; `tests` as a
# folder would be collected in name order, test_checkpoint.py first.)
# Much of these tests' time is Triton's first compile of each kernel variant they launch (the
# cache is empty on a fresh machine; the compile check here does 568 compiles in ~250 s on two
# cores, ~0.9 s of CPU each), so with pytest-xdist (in the GPU image: KINDS.md) the files run
# in 8 processes, one file per process: the kernels compile in parallel on the machine's 16
# cores, and each file's tests keep their order.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8 --dist loadfile); fi
timeout -s INT -k 15 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${XDIST[@]}" \
    tests/test_[!c]*.py tests/test_c*.py >>"$OUT/gpu-tests.txt" 2>&1
echo "gpu tests exit $?" | tee -a "$OUT/gpu-tests.txt"
tail -5 "$OUT/gpu-tests.txt"

# One pytest run per file, each with its own limit and JSON. The limit sends SIGINT (then KILL
# 15 s later): pytest stops as on Ctrl-C and pytest-benchmark still writes the JSON and the
# table of the benchmarks that finished (a plain SIGTERM lost the whole file: checked with
# `timeout -s INT` on a CPU run of bench_spmm), so a file that runs out of time keeps what ran.
step "benchmarks" | tee "$OUT/bench.txt"
for b in attention:80 spmm:90 diffusion:100; do
    name=${b%%:*}
    timeout -s INT -k 15 "${b##*:}" "$PY" -m pytest -q -p no:cacheprovider "bench/bench_$name.py" \
        --benchmark-only --benchmark-json "$OUT/bench-$name.json" \
        --benchmark-columns=median,iqr,rounds >>"$OUT/bench.txt" 2>&1
    echo "bench_$name exit $?" | tee -a "$OUT/bench.txt"
done

# The large-KG scaling benchmarks (docs/large-kg.md, issue 21), in what is left of the suite's
# first 9.5 minutes (a call on the GPU machine is 10 at most), half each:
# - the diffusion side's training pass and rebuild, exact and sampled, at Alibaba-iFashion's
#   89,196 entities, a million, 20k and 300k (its proportions), the first 2 batches of each pass
#   (per-batch seconds, the full pass extrapolated, peak GPU memory); each (size, mode) in its
#   own process, 40 s at most;
# - whole DiffKG epochs in the large-KG mode (bench_large_kg_epoch.py: every phase, the first 2
#   batches of each loop, validation and test ranking complete) at 89,196 entities and a million.
left=$((570 - SECONDS))
if [ "$left" -gt 90 ]; then
    half=$((left / 2))
    step "large-KG scaling (first 2 batches per pass, $half s)" | tee "$OUT/large-kg.txt"
    timeout -s INT -k 10 "$half" "$PY" bench/bench_large_kg.py --device cuda --limit 2 \
        --timeout 40 --entities 89196 1000000 20000 300000 --out "$OUT/large-kg.json" \
        >>"$OUT/large-kg.txt" 2>&1
    echo "bench_large_kg exit $?" | tee -a "$OUT/large-kg.txt"
    tail -8 "$OUT/large-kg.txt"
    left=$((570 - SECONDS))
    step "large-KG epochs (first 2 batches per loop, $left s)" | tee "$OUT/large-kg-epoch.txt"
    timeout -s INT -k 10 "$left" "$PY" bench/bench_large_kg_epoch.py --set 'device="cuda"' \
        --limit 2 --timeout $((left / 2)) --entities 89196 1000000 \
        --out "$OUT/large-kg-epoch.json" >>"$OUT/large-kg-epoch.txt" 2>&1
    echo "bench_large_kg_epoch exit $?" | tee -a "$OUT/large-kg-epoch.txt"
    tail -6 "$OUT/large-kg-epoch.txt"
else
    echo "large-KG scaling: skipped ($SECONDS s used of the first 570)" | tee "$OUT/large-kg.txt"
fi

# Data-parallel training (docs/distributed.md), only where more than one GPU is visible: DiffKG
# on the default medication cohort for 2 epochs on 1 GPU, on all of them (NCCL, one rank per
# GPU), and on all of them with the denoiser sharded (FSDP), the epoch lines of each, and the
# largest parameter difference between the 1-GPU run's checkpoint and each other's (the same
# batches: float reduction order only, expected ~1e-6 or less).
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -gt 1 ]; then
    step "multi-GPU: torchrun on 1 and $NGPU GPUs, and $NGPU with FSDP" | tee "$OUT/multi-gpu.txt"
    for run in 1:replicate "$NGPU":replicate "$NGPU":fsdp; do
        n=${run%%:*}; shard=${run##*:}
        timeout -s INT -k 15 150 "$PY" -m torch.distributed.run --standalone \
            --nproc_per_node="$n" -m diffkg_fast train --device cuda --epoch 2 --no-progress \
            --no-plot --set denoiser_sharding="$shard" --out "$OUT/dist-$n-$shard" \
            >"$OUT/dist-$n-$shard.txt" 2>&1
        echo "torchrun --nproc_per_node=$n denoiser_sharding=$shard exit $?" \
            | tee -a "$OUT/multi-gpu.txt"
        grep -E "^epoch|^data-parallel" "$OUT/dist-$n-$shard.txt" | tee -a "$OUT/multi-gpu.txt"
    done
    for other in "dist-$NGPU-replicate" "dist-$NGPU-fsdp"; do
        "$PY" - "$OUT/dist-1-replicate" "$OUT/$other" >>"$OUT/multi-gpu.txt" 2>&1 <<'PY'
import sys, torch
a, b = (torch.load(f"{d}/checkpoint.pt", map_location="cpu", weights_only=False)["model"]
        for d in sys.argv[1:3])
diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a
           if torch.is_tensor(a[k]) and a[k].is_floating_point() and a[k].numel())
print(f"max |parameter difference| 1 GPU vs {sys.argv[2]}: {diff:.3g}")
PY
        tail -1 "$OUT/multi-gpu.txt"
    done
else
    echo "multi-GPU: skipped ($NGPU GPU visible; it needs 2 or more)" | tee "$OUT/multi-gpu.txt"
fi

step "summary"
"$PY" bench/summarize.py "$OUT"/bench-*.json >"$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
step "done"
