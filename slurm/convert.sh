#!/usr/bin/env bash
# Convert a run's latest checkpoint (any engine) to a consolidated export, then evaluate it, as a job.
#
#   sbatch slurm/convert.sh RUN_DIR [EXPORT_DIR] [EVAL_DATA ...]
#   sbatch --dependency=afterok:JOBID slurm/convert.sh runs/x runs/x/export data/prepared
#
# EXPORT_DIR defaults to RUN_DIR/export. EVAL_DATA: prepared datasets or text files for `mmscale eval`
# (its result goes to EXPORT_DIR/eval.json); no evaluation when none are given. One task, no GPU:
# conversion reads the sharded checkpoint from disk on one process.
#
#SBATCH --job-name=mmscale-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#
# Environment: MMSCALE_PYTHON (default: $SLURM_SUBMIT_DIR/.venv/bin/python, else python3);
#   MMSCALE_CONVERT_ARGS flags for `mmscale convert` (default --verify: reload the export in a fresh
#   process and compare its logits with the checkpoint's; e.g. "--verify --dtype bf16").
set -euo pipefail

die() { echo "convert.sh: error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM allocation; submit it with: sbatch slurm/convert.sh RUN_DIR [EXPORT_DIR] [EVAL_DATA ...]"
[[ $# -ge 1 ]] || die "no run directory given; usage: sbatch slurm/convert.sh RUN_DIR [EXPORT_DIR] [EVAL_DATA ...]"
cd "${SLURM_SUBMIT_DIR:-$PWD}"
RUN_DIR=$1
EXPORT_DIR=${2:-$RUN_DIR/export}
EVAL_DATA=("${@:3}")
[[ -d $RUN_DIR/checkpoints ]] || die "'$RUN_DIR' has no checkpoints/ folder; pass the run.dir of a training run"
[[ ! -e $EXPORT_DIR ]] || die "'$EXPORT_DIR' already exists; pass another EXPORT_DIR or remove it first"
for d in "${EVAL_DATA[@]}"; do [[ -e $d ]] || die "evaluation data '$d' does not exist"; done

PY=${MMSCALE_PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=$PWD/.venv/bin/python; else PY=python3; fi
fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

echo "[convert.sh] job $SLURM_JOB_ID: $RUN_DIR -> $EXPORT_DIR"
# shellcheck disable=SC2086  # MMSCALE_CONVERT_ARGS is a list of flags
"$PY" -m mmscale.cli convert "$RUN_DIR" --out "$EXPORT_DIR" ${MMSCALE_CONVERT_ARGS---verify}
if [[ ${#EVAL_DATA[@]} -gt 0 ]]; then
  "$PY" -m mmscale.cli eval "$EXPORT_DIR" --data "${EVAL_DATA[@]}" --json "$EXPORT_DIR/eval.json"
  echo "[convert.sh] evaluation: $EXPORT_DIR/eval.json"
fi
echo "[convert.sh] done"
