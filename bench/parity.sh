#!/usr/bin/env bash
# The parity runs of docs/parity.md: each Table 3 baseline natively and in RecBole 1.2.1, on the
# default synthetic cohort's interaction split, under one protocol (full ranking, train masked,
# train + valid masked at test, selection on validation NDCG@20, at most 300 epochs, stopping
# after 10 validations without improvement, 2048 training rows a batch, lr 1e-3, one thread).
#
#   bash bench/parity.sh RECBOLE_PYTHON OUT [MODEL ...] [--seeds "421 422 423"]
#
# RECBOLE_PYTHON: the python of a throwaway venv with RecBole (bench/recbole_parity.py says how
# to make one). OUT gets native/ (a `diffkg-fast compare` folder) and recbole.jsonl. Both sides
# resume: a finished (model, seed) is not run again.
set -euo pipefail
RB_PY=$1; OUT=$2; shift 2
SEEDS="421"
MODELS=()
while [ $# -gt 0 ]; do
    case $1 in
        --seeds) SEEDS=$2; shift 2 ;;
        *) MODELS+=("$1"); shift ;;
    esac
done
[ ${#MODELS[@]} -gt 0 ] || MODELS=(MultiVAE CDAE DiffRec KGAT KGIN KGCN)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1
if [ ! -d "$OUT/data/synthetic" ]; then
    diffkg-fast data build --source synthetic --out "$OUT/default.npz" > /dev/null
    diffkg-fast data export "$OUT/default.npz" --format recbole --out "$OUT/data/synthetic"
fi
# RecBole settings that differ from its defaults, so that both sides run the same model:
# KGAT's layers are the paper's 64-32-16 (RecBole's yaml has [64]) with inverse KG relations, as
# the native default; everything else is RecBole's yaml.
declare -A RB_SETS=([KGAT]="--set layers=[64,32,16] --set kg_reverse_r=true")
for model in "${MODELS[@]}"; do
    for seed in $SEEDS; do
        if ! grep -qs "\"model\": \"$model\", \"seed\": $seed," "$OUT/recbole.jsonl"; then
            # shellcheck disable=SC2086
            # In OUT: RecBole writes its log/ and log_tensorboard/ folders where it runs.
            (cd "$OUT" && "$RB_PY" "$HERE/recbole_parity.py" --data "$OUT/data" \
                --model "$model" --seed "$seed" --out "$OUT/recbole.jsonl" --set epochs=300 \
                --set stopping_step=10 --set train_batch_size=2048 --set learning_rate=0.001 \
                ${RB_SETS[$model]:-} > "$OUT/recbole-$model-$seed.log" 2>&1)
        fi
    done
done
# shellcheck disable=SC2086
diffkg-fast compare --data "$OUT/default.npz" --rows "${MODELS[@]}" --seeds $SEEDS \
    --preset diffkg --set valid_metric=ndcg --set epoch=300 --set patience=10 \
    --set batch=2048 --set lr=0.001 --threads 1 --out "$OUT/native"
