#!/usr/bin/env bash
# The first GPU run, complete and short (<= 6 minutes on a bare H100/H200): meant for a lent machine
# (the device tool's `run`), from the repository root:
#
#     bash tools/gpu_check.sh [WHEEL_DIR]     # results -> $OUT/RESULTS-gpu.md (or benchmarks/gpu-out/)
#
# In this order, each step with its own time limit (a stall cannot eat the rest; a failed or timed-out
# step is recorded and the script goes on):
#   1. versions: torch, triton, CUDA, GPU name, and which packages are missing
#   2. the Triton kernels against a float64 reference on random inputs (forward and gradients, T not a
#      multiple of the tile, fp32 and bf16): tests/test_triton_mixing.py                   45 s
#   3. `mmscale train` through torchrun on 1 GPU for single, ddp, fsdp and deepspeed on a tiny dataset
#      it prepares itself: the loss falls, a checkpoint is written, a second start resumes
#      (tools/gpu_smoke.py)                                                                150 s
#   4. one fullgraph torch.compile of a mixer block on the Triton path, forward + backward   30 s
#   5. the op benchmark, dense vs Triton, bf16, T 1024 and 4096                              40 s
#   6. MFU of the real loop (benchmarks/bench_mfu.py runs mmscale.train.train, single engine),
#      d 1024, 16 layers, T 1024, mixer and transformer                                      60 s
# 325 s of limits plus start-up and the version check.
#
# A GPU image may lack deepspeed, mosaicml-streaming and wandb. Give a folder of wheels (WHEEL_DIR, or
# .whl/ by default) and they are installed into /tmp/site first; see /work/.library/device/README.md for
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION`. Steps
# whose packages are missing are reported as skipped, with the reason. wandb is never needed
# (the smoke runs use log.wandb=disabled).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT_DIR"
RES=$OUT_DIR/RESULTS-gpu.md
LOG=$OUT_DIR/gpu_check.log
: > "$RES"
: > "$LOG"
export PYTHONUNBUFFERED=1
start=$(date +%s)

WHEELS=${1:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "[gpu_check] installing wheels from $WHEELS: $(ls "$WHEELS" | tr '\n' ' ')" | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    >> "$LOG" 2>&1 || { echo "[gpu_check] wheel install failed (see $LOG)"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

# 1. versions, and what is missing (said plainly; the steps that need it are skipped)
if ! "$PY" - > "$OUT_DIR/versions.txt" 2>&1 <<'EOF'
import importlib, importlib.util
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name())
for m in ("triton", "deepspeed", "streaming", "sentencepiece", "wandb", "pytest", "yaml", "numpy"):
    if importlib.util.find_spec(m) is None:
        print(f"{m}: MISSING")
    elif m == "streaming":
        print(f"{m}: present")  # importing it pulls in streaming.vision (see the README's install notes)
    else:
        print(f"{m}: {getattr(importlib.import_module(m), '__version__', 'present')}")
EOF
then
  echo "[gpu_check] environment check failed:"; cat "$OUT_DIR/versions.txt"; exit 1
fi
tee -a "$LOG" < "$OUT_DIR/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$LOG" 2>&1 || true

{
  echo "## GPU results ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "Device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)' 2>/dev/null)."
  echo "Command: \`bash tools/gpu_check.sh\`. Each table below names its own command."
  echo
} >> "$RES"

declare -a SUMMARY
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "[gpu_check] $name (limit ${limit}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local status=ok
  [[ $rc == 124 || $rc == 137 ]] && status="timed out"
  [[ $rc != 0 && $status == ok ]] && status="failed (rc $rc)"
  SUMMARY+=("| $name | $status | ${took}s |")
  echo "[gpu_check] $name: $status in ${took}s" | tee -a "$LOG"
}

{ echo "Versions:"; echo; sed 's/^/    /' "$OUT_DIR/versions.txt"; echo; } >> "$RES"
missing() { grep -q "^$1: MISSING" "$OUT_DIR/versions.txt"; }
skip() { SUMMARY+=("| $1 | skipped: $2 | 0s |"); echo "[gpu_check] $1: skipped ($2)" | tee -a "$LOG"; }

if missing pytest || missing triton; then skip "Triton kernels vs float64" "pytest or triton missing"; else
  step "Triton kernels vs float64" 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_mixing.py -m "not slow"
fi
step "mmscale train x4 engines, torchrun" 150 "$PY" tools/gpu_smoke.py --per-engine-timeout 30 --out "$RES"
if missing triton; then skip "fullgraph compile, Triton block" "triton missing"; else
  step "fullgraph compile, Triton block" 30 "$PY" tools/gpu_compile_check.py
fi
cd benchmarks
step "token-mixing op, bf16" 40 "$PY" bench_token_mixing.py --device cuda --dtype bf16 --T 1024 4096 \
  --d 1024 --batch 8 --block-rows 1024 --repeats 10 --out "$RES"
step "MFU of the trainer" 60 "$PY" bench_mfu.py --device cuda --d 1024 --layers 16 --T 1024 --batch 16 \
  --steps 12 --skip 4 --engines single --variants plain --out "$RES"
cd ..

{
  echo
  echo "### Steps"
  echo
  echo "| step | status | time |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "Total: $(( $(date +%s) - start ))s. Full log: gpu_check.log."
} >> "$RES"
cat "$RES"
