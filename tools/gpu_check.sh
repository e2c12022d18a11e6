#!/usr/bin/env bash
# One prepared GPU run, under 8 minutes: the kernel tests on CUDA for real, the GPU benchmarks, and a
# results table. Meant for a lent H100/H200 (the device tool's `run`), from the repository root:
#
#     bash tools/gpu_check.sh            # results -> $OUT/RESULTS-gpu.md (or benchmarks/gpu-out/)
#
# The device image has torch (CUDA), triton, numpy, pytest, pyyaml, tqdm and sentencepiece; mmscale's
# ops, models and these benchmarks need nothing else. If a package is missing there, carry it as
# wheels in .whl/ (see /work/.library/device/README.md: `pip download --no-deps --only-binary=:all:
# --python-version 3.12 ... -d .whl NAME==VERSION`, `.whl` ignored by git and named in `carry`);
# this script installs whatever .whl/ holds into /tmp/site first.
#
# Each step has its own time limit; a failed or timed-out step is recorded in the table and the
# script goes on. Limits (s): tests 80, op 45 + 20, train step 90, MFU 150, memory 50: 435 s
# worst case, plus ~20 s of checks and start-up, inside the 8 minutes.
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

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "[gpu_check] installing carried wheels: $(ls .whl | tr '\n' ' ')" | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 || { echo "[gpu_check] wheel install failed (see $LOG)"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

# what the steps below import; a clear message instead of a traceback in the middle of a benchmark
if ! "$PY" - >> "$LOG" 2>&1 <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "triton", "yaml", "pytest", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {missing}; carry them as wheels in .whl/ (see this script's header)")
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
import triton; print("triton", triton.__version__)
EOF
then
  echo "[gpu_check] environment check failed:"; tail -5 "$LOG"; exit 1
fi
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

cd benchmarks
step "kernel tests (CUDA)" 80 "$PY" -m pytest -q -p no:cacheprovider ../tests/test_triton_mixing.py ../tests/test_ops.py -m "not slow"
step "token-mixing op, bf16" 45 "$PY" bench_token_mixing.py --device cuda --dtype bf16 --T 256 1024 2048 4096 8192 \
  --d 1024 --batch 8 --block-rows 512 1024 --repeats 10 --out "$RES"
step "token-mixing op, fp32" 20 "$PY" bench_token_mixing.py --device cuda --dtype fp32 --T 4096 \
  --d 1024 --batch 8 --block-rows 1024 --repeats 10 --out "$RES"
step "training step" 90 "$PY" bench_train_step.py --device cuda --tokens 32768 --d 256 512 --T 128 512 2048 \
  --precision bf16 fp32 --repeats 5 --out "$RES"
step "MFU" 150 "$PY" bench_mfu.py --device cuda --d 1024 --layers 16 --T 1024 --batch 16 --out "$RES"
step "memory vs context" 50 "$PY" bench_memory.py --device cuda --d 1024 --layers 8 --T 512 1024 2048 4096 8192 --out "$RES"
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
