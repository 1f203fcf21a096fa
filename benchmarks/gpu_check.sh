#!/usr/bin/env bash
# The GPU check: every CUDA path of DeltaCoupling in one prepared command, each figure written
# to one file, in under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check_out (or $OUT)
#
# Steps (each with its own time limit; a failed step is reported and the next one runs):
#   1. the machine: nvidia-smi, torch / CUDA / e3nn / PyG versions;
#   2. the suite's CUDA tests (pytest -k cuda: AMP bf16 steps, inductor on the GPU, ...);
#   3. a short training on a copy of the bundled example on the GPU: AMP (bf16 where the card
#      has it) and torch.compile(inductor), with its per-epoch times and final metrics;
#   4. torchrun on one GPU (NCCL), the same data, a few epochs;
#   5. the training benchmark with --device cuda --amp both (modes eager and inductor).
# Writes OUT_DIR/gpu_check.txt (every step's figures and exit status) plus each step's full log
# and the benchmark's JSON. Exit status: 0 every step passed, 1 some step failed, 3 no GPU.
#
# Python: $PYTHON, else python3. It needs requirements.txt's runtime packages; where the
# machine lacks one (openpyxl on a machine image that has torch, e3nn and PyG but no Excel
# reader), put its wheels in .whl/ beside this repository's files and the script installs
# them into a temporary folder first (pip install --no-index --target).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu_check.txt"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False, or torch is missing" \
       "for $PY); nothing was run" >&2
  exit 3
fi
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('e3nn', 'torch_geometric', 'numpy', 'pandas', 'openpyxl',
                           'matplotlib', 'tqdm', 'pytest') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "gpu_check: $PY lacks: $missing (install them, or put their wheels in .whl/)" >&2
  exit 3
fi

export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$REPORT"
FAILED=0
say() { echo "$*" | tee -a "$REPORT"; }

# step NAME LIMIT_S COMMAND...: run it with its log in OUT_DIR/NAME.log; report time and status
step() {
  local name=$1 limit=$2
  shift 2
  say ""
  say "=== $name (limit ${limit}s): $*"
  local start=$SECONDS rc=0
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1 || rc=$?
  say "--- $name: exit $rc, $((SECONDS - start)) s wall"
  [ "$rc" -eq 0 ] || FAILED=1
  return 0
}

say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader \
  2>/dev/null | sed 's/^/gpu: /' | tee -a "$REPORT" || true
"$PY" -c "
import torch, e3nn, torch_geometric
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0),
      'bf16', torch.cuda.is_bf16_supported())
print('e3nn', e3nn.__version__, 'torch_geometric', torch_geometric.__version__)" | tee -a "$REPORT"

# 2. the suite's CUDA tests
step cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -k cuda test_delta_coupling.py
tail -n 3 "$OUT_DIR/cuda_tests.log" | tee -a "$REPORT"

# 3. AMP + compile training on the GPU
cp -r examples/s22x5 "$WORK/train"
rm -rf "$WORK/train/models" "$WORK/train/plots" "$WORK"/train/cached_graphs*
step train_amp_inductor 200 "$PY" delta_coupling.py --root_dir "$WORK/train" --device cuda \
  --compile inductor --epochs 30 --log_every 5 --quiet
grep -E "^(epoch |train |val |test |schedule)|compil|bf16|fp16|AMP" \
  "$OUT_DIR/train_amp_inductor.log" | tee -a "$REPORT" || true
"$PY" -c "import json, sys; c = json.load(open(sys.argv[1])); print('run_config device:',
c['device'], '| args:', {k: c['args'].get(k) for k in ('device', 'compile', 'epochs')})" \
  "$WORK/train/models/run_config.json" 2>/dev/null | tee -a "$REPORT" || true

# 4. torchrun on one GPU
cp -r examples/s22x5 "$WORK/ddp"
rm -rf "$WORK/ddp/models" "$WORK/ddp/plots" "$WORK"/ddp/cached_graphs*
step torchrun_1gpu 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
  delta_coupling.py --root_dir "$WORK/ddp" --device cuda --compile off --epochs 5 --quiet
grep -E "^(epoch |train |val |test |saved|parameter sha256)" "$OUT_DIR/torchrun_1gpu.log" \
  | tee -a "$REPORT" || true

# 5. the training benchmark
step bench_training 200 "$PY" benchmarks/bench_training.py --device cuda --amp both \
  --modes reference,eager,inductor --repeats 3 --json "$OUT_DIR/bench_training_cuda.json"
grep -v "^\s*$" "$OUT_DIR/bench_training.log" | tail -n 25 | tee -a "$REPORT"

say ""
say "gpu_check: $([ "$FAILED" -eq 0 ] && echo 'every step passed' || echo 'some step FAILED: see its log')"
exit "$FAILED"
