#!/bin/bash
# Train the shipped pretrained ensemble on the corpus (data/corpus/build) and copy it into
# pretrained/. On 2 CPU cores the members (MEMBERS, default 2) train side by side, one torch
# thread each: about 50 minutes.
# The members' logs and the combine step's report go to pretrained/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ROOT=data/corpus/build
OPTS=(--root_dir "$ROOT" --schedule anneal --seed 42)
MEMBERS=${MEMBERS:-2}
mkdir -p pretrained/logs
"$PY" preprocess_and_cache.py --root_dir "$ROOT" --quiet
pids=()
for ((k = 0; k < MEMBERS; k++)); do
    OMP_NUM_THREADS=1 "$PY" delta_coupling.py "${OPTS[@]}" --member "$k" --compile inductor \
        --quiet > "pretrained/logs/member_$k.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed member stops the script
"$PY" delta_coupling.py "${OPTS[@]}" --combine_ensemble --quiet 2>&1 | tee pretrained/logs/combine.log
# the members' final checkpoints and ensemble.json (its paths are relative to it)
for ((k = 0; k < MEMBERS; k++)); do
    mkdir -p "pretrained/member_$k"
    cp "$ROOT/models/member_$k/final_model_delta_learning.pt" "pretrained/member_$k/"
    cp "$ROOT/models/member_$k/metrics.json" "pretrained/member_$k/"
done
cp "$ROOT/models/ensemble.json" "$ROOT/models/ensemble_metrics.json" pretrained/
