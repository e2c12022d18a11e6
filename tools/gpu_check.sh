#!/usr/bin/env bash
# The first GPU run, complete, in at most 8 minutes, under the GPU image's own python3 (not .venv):
#
#     bash tools/gpu_wheels.sh            # here, once: .whl/ (git-ignored, ~11 MB; the device call carries it)
#     bash tools/gpu_check.sh [WHEEL_DIR] # there, from the repository root (WHEEL_DIR defaults to .whl)
#     GPU_CHECK_DRY=1 bash tools/gpu_check.sh   # the plumbing on a CPU machine (tests/test_gpu_readiness.py)
#
# Results go to $OUT when set, else ./gpu_check_out/ (made absolute before anything changes directory):
#   RESULTS-gpu.md (every step's table and a status table), rows.tsv (name, OK|FAILED|SKIPPED|TIMEOUT,
#   detail), gpu_check.log (every command's output).
# Every step is independent: a missing package makes its rows SKIPPED with the reason, a failure FAILED,
# and the script goes on. Each step runs in its own process group (setsid) under its own time limit; on
# the limit the whole group gets SIGTERM, then SIGKILL 5 s later, and so does any process that carries
# the step's tag in its environment (torchrun starts its workers in new sessions). Budgets (seconds),
# each also cut to what is left of the 480 s total:
#   wheels install 30 | versions 30 | Triton vs float64 45 | op benchmark 45 | fullgraph compile 45 |
#   smoke dataset 20 | torchrun runs (bf16, n_ctx 1024): single 60 (the first compiles the Triton kernels
#   for T 1024; the cache serves the rest), ddp, fsdp, zero2, zero3 30 each | MFU single 45, ZeRO-2 45
#                                                                        = 475 s of limits
set -uo pipefail
START=$(date +%s)
DRY=${GPU_CHECK_DRY:-0}
# the limits are for the GPU machine (16 cores); a dry run on a shared 2-core CPU gets 4x (imports alone
# of torch + deepspeed + transformers can take 30 s there)
SCALE=${GPU_CHECK_LIMIT_SCALE:-$( [[ $DRY == 1 ]] && echo 4 || echo 1 )}
TOTAL=${GPU_CHECK_TOTAL_S:-$(( 480 * SCALE ))}
CALLER_PWD=$PWD
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${OUT:-$CALLER_PWD/gpu_check_out}
mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create the results folder $OUT_DIR; set OUT to a writable folder" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
RES=$OUT_DIR/RESULTS-gpu.md
ROWS=$OUT_DIR/rows.tsv
LOG=$OUT_DIR/gpu_check.log
: > "$RES"; : > "$ROWS"; : > "$LOG"
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmscale_gpu_check.XXXXXX")
SITE=${GPU_CHECK_SITE:-$WORK/site}
trap 'rm -rf "$WORK"' EXIT
export TMPDIR=$WORK  # streaming's lock files and the runs' scratch: removed at exit

log() { echo "[gpu_check] $*" | tee -a "$LOG"; }
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$ROWS"; log "$1: $2: $3"; }
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

kill_tagged() {  # every process whose environment carries GPU_CHECK_TAG=$1 (escaped sessions included)
  local e p
  for e in /proc/[0-9]*/environ; do
    if tr '\0' '\n' < "$e" 2>/dev/null | grep -qx "GPU_CHECK_TAG=$1"; then
      p=${e#/proc/}; p=${p%/environ}
      [[ $p != "$$" ]] && kill -KILL "$p" 2>/dev/null
    fi
  done
}

# step NAME LIMIT CMD...: run CMD in its own session under LIMIT seconds (cut to the time left). The command
# writes its own rows (tools/gpu_smoke.py --rows); when it writes none, the step's row says OK or FAILED by
# its exit status. A time-out is its own row, TIMEOUT, whatever the command wrote before.
STEP_N=0
step() {
  local name=$1 limit=$2; shift 2
  (( limit >= 10 )) && limit=$(( limit * SCALE ))
  local rem; rem=$(left)
  if (( rem < 5 )); then row "$name" SKIPPED "no time left in the ${TOTAL} s budget"; return; fi
  (( limit > rem )) && limit=$rem
  STEP_N=$((STEP_N + 1))
  local tag="gpu_check_$$_$STEP_N" before after t0 rc=0 timed_out=0
  before=$(wc -l < "$ROWS")
  t0=$(date +%s)
  log "$name (limit ${limit} s)"
  GPU_CHECK_TAG=$tag setsid "$@" >> "$LOG" 2>&1 < /dev/null &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if (( $(date +%s) - t0 >= limit )); then
      timed_out=1
      kill -TERM -- "-$pid" 2>/dev/null
      for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null
      break
    fi
    sleep 0.5
  done
  wait "$pid" 2>/dev/null; rc=$?
  kill -KILL -- "-$pid" 2>/dev/null   # anything left in the group, also after a normal exit
  kill_tagged "$tag"
  after=$(wc -l < "$ROWS")
  local took=$(( $(date +%s) - t0 ))
  if (( timed_out )); then
    row "$name" TIMEOUT "killed after ${limit} s (process group and tagged processes)"
  elif (( after == before )); then
    if (( rc == 0 )); then row "$name" OK "${took} s"; else row "$name" FAILED "exit status $rc after ${took} s (see gpu_check.log)"; fi
  fi
}

HAS_CUDA=  # asked once (a torch import costs seconds), after the wheels are on the path
has_cuda() {
  if [[ -z $HAS_CUDA ]]; then
    HAS_CUDA=no
    [[ $DRY != 1 ]] && "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
      && HAS_CUDA=yes
  fi
  [[ $HAS_CUDA == yes ]]
}
gpu_step() {  # like step, but SKIPPED: no CUDA where there is none
  if has_cuda; then step "$@"; else row "$1" SKIPPED "no CUDA"; fi
}

log "results in $OUT_DIR; repository $REPO; python $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1)"

# 0. the carried wheels, into a private --target dir (nothing of the image is replaced)
WHEELS=${1:-${GPU_CHECK_WHEELS:-.whl}}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  step "install wheels" 30 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  if grep -q "^install wheels	OK" "$ROWS"; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    log "wheels installed into $SITE: $(ls "$WHEELS" | tr '\n' ' ')"
  fi
else
  row "install wheels" SKIPPED "no wheels in $WHEELS (bash tools/gpu_wheels.sh builds them)"
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

SMOKE=("$PY" tools/gpu_smoke.py --rows "$ROWS" --md "$RES")
{
  echo "## GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "Command: \`bash tools/gpu_check.sh\`$( [[ $DRY == 1 ]] && echo ' (GPU_CHECK_DRY=1: plumbing only)')."
  echo
} >> "$RES"

# 1. versions and what is missing
step "versions" 30 "${SMOKE[@]}" versions
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$LOG" 2>&1 || true

# 2. Triton vs float64: T 1000, 1030, 4096; fp32 and bf16; dw upper triangle; dw twice
gpu_step "triton vs float64" 45 "${SMOKE[@]}" kernels --T 1000 1030 4096

# 3. the op benchmark at T 1024, 2048, 4096 in bf16: where Triton starts to beat dense (CUDA_TRITON_MIN_T)
gpu_step "op benchmark" 45 "${SMOKE[@]}" opbench --T 1024 2048 4096 --d 1024 --batch 8 --repeats 10

# 4. fullgraph compile of a Triton mixer block, fwd + bwd, after the trainer's CUDA set-up (TF32 on)
gpu_step "fullgraph compile, Triton block" 45 bash -c \
  "set -o pipefail; \"$PY\" tools/gpu_compile_check.py 2>&1 | tee -a \"$RES\""

# 5. one-process torchrun runs, bf16, n_ctx 1024: 3 steps + checkpoint, resume to 6; a Linear's output dtype
if [[ $DRY == 1 && ${GPU_CHECK_DRY_CPU_STEPS:-0} != 1 ]]; then
  row "smoke dataset" SKIPPED "dry run (GPU_CHECK_DRY_CPU_STEPS=1 prepares a small one on the CPU)"
elif [[ $DRY == 1 ]]; then
  step "smoke dataset" 90 "${SMOKE[@]}" prepare --work "$WORK" --cpu --stories 200
else
  step "smoke dataset" 20 "${SMOKE[@]}" prepare --work "$WORK"
fi
for engine in single ddp fsdp zero2 zero3; do
  gpu_step "train $engine" "$( [[ $engine == single ]] && echo 60 || echo 30 )" "${SMOKE[@]}" train --work "$WORK" \
    --engine "$engine"
done

# 6. MFU of the real loop (benchmarks/bench_mfu.py runs mmscale.train.train), through one-process torchrun
MFU=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/bench_mfu.py --d 1024 --layers 16
     --T 1024 --batch 16 --steps 10 --skip 4 --variants plain --models mixer transformer --out "$RES")
gpu_step "MFU single" 45 "${MFU[@]}" --engines single
gpu_step "MFU ZeRO-2" 45 "${MFU[@]}" --engines deepspeed --zero-stage 2

# dry run only: the time-limit plumbing itself (a step that leaves a child in its own session, past its limit)
if [[ $DRY == 1 ]]; then
  PIDF=$WORK/escaped.pid
  step "timeout plumbing (a step past its limit)" 2 "$PY" -c "
import subprocess, sys, time
p = subprocess.Popen(['sleep', '300'], start_new_session=True)  # as torchrun starts its workers
open(sys.argv[1], 'w').write(str(p.pid))
time.sleep(300)" "$PIDF"
  alive() { [[ -e /proc/$1 ]] && ! grep -q ') Z' "/proc/$1/stat" 2>/dev/null; }  # a zombie is dead
  for _ in 1 2 3 4 5 6; do [[ -s $PIDF ]] && ! alive "$(cat "$PIDF")" && break; sleep 0.5; done
  if [[ -s $PIDF ]] && ! alive "$(cat "$PIDF")"; then
    row "timeout plumbing" OK "the step and the child it started in a new session are gone"
  else
    row "timeout plumbing" FAILED "the child $(cat "$PIDF" 2>/dev/null) outlived its step's time limit"
    kill -KILL "$(cat "$PIDF" 2>/dev/null)" 2>/dev/null
  fi
fi

{
  echo
  echo "### Steps"
  echo
  echo "| step | status | detail |"
  echo "|---|---|---|"
  awk -F'\t' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }' "$ROWS"
  echo
  echo "Total: $(( $(date +%s) - START )) s of the ${TOTAL} s budget. Full log: gpu_check.log."
} >> "$RES"
cat "$RES"
log "done in $(( $(date +%s) - START )) s: $(cut -f2 "$ROWS" | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
