#!/bin/bash
# Measure the shipped pretrained ensemble (pretrained/ensemble.json) and write the reports the
# README's "Use the pretrained model" quotes into pretrained/logs/:
#
#   holdout_corpus.md  the grouped hold-out (the members' shared test split), per subset
#   val_corpus.md      the validation split, per subset (it chose nothing: --keep final)
#   s66_transfer.md    S66 per category on the systems with no near-copy in the corpus, beside
#                      HF and HF + D4, and the ensemble's calibration
#   predict_*.log      what --predict printed
#
# Needs the built corpus (data/corpus/build) and S66 (data/s66/build), both with --dispersion d4.
# --predict writes predictions.csv (git-ignored) into each data folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODEL=pretrained/ensemble.json
LOGS=pretrained/logs
mkdir -p "$LOGS"

"$PY" delta_coupling.py --predict --root_dir data/corpus/build --checkpoint "$MODEL" \
    --device cpu --quiet 2>&1 | tee "$LOGS/predict_corpus.log"
"$PY" data/corpus/holdout_report.py data/corpus/build/predictions.csv --split test | tee "$LOGS/holdout_corpus.md"
"$PY" data/corpus/holdout_report.py data/corpus/build/predictions.csv --split val > "$LOGS/val_corpus.md"

"$PY" delta_coupling.py --predict --root_dir data/s66/build --checkpoint "$MODEL" \
    --device cpu --quiet 2>&1 | tee "$LOGS/predict_s66.log"
"$PY" data/s66/transfer_report.py data/s66/build/predictions.csv --folder data/s66/build \
    --out "$LOGS/s66_transfer.md"   # it prints the report too
