#!/usr/bin/env bash
# Pre-train on SLURM: one task per GPU, checkpoint on preemption/time limit, requeue, resume.
#
#   sbatch slurm/pretrain.sh CONFIG [section.key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 -p gpu slurm/pretrain.sh configs/x.yaml run.dir=/shared/runs/x
#
# Submit from the repository root (the log folder slurm/logs/ is relative to it) or pass --output.
# Defaults below are #SBATCH lines; sbatch flags override them. Keep --ntasks-per-node equal to
# --gpus-per-node. On a CPU-only cluster pass --gpus-per-node=0 (tasks then run on CPU over gloo).
#
#SBATCH --job-name=mmscale
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#
# --signal=USR2@120: SLURM sends USR2 to every task 120 s before the time limit; the trainer saves a
#   checkpoint and exits 75, and this script requeues the job (`scontrol requeue`). A preemption or
#   `scontrol requeue JOBID` sends SIGTERM instead: the trainer saves and exits 75 the same way and
#   SLURM requeues the job itself. Either way the next start resumes from run.dir.
# --open-mode=append: the requeued starts append to the same log.
#
# Environment (set before sbatch; sbatch exports it to the job):
#   MMSCALE_PYTHON       interpreter (default: $SLURM_SUBMIT_DIR/.venv/bin/python, else python3)
#   MMSCALE_MAX_REQUEUES stop requeueing after this many restarts (default 50)
#   MMSCALE_PRIVATE_SHM  auto|0: give each node its own /dev/shm (for emulated nodes sharing one
#                        machine; needs root, skipped silently otherwise)
#   Data on shared storage or object stores: set data.train / data.val to the shared path or to
#   s3://..., gs://... (with data.cache_dir on node-local disk) and the credentials' usual variables.
set -euo pipefail

die() { echo "pretrain.sh: error: $*" >&2; exit 2; }

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  die "not inside a SLURM allocation; submit it with: sbatch slurm/pretrain.sh CONFIG [overrides]"
fi
[[ $# -ge 1 ]] || die "no config given; usage: sbatch slurm/pretrain.sh CONFIG [section.key=value ...]"
cd "${SLURM_SUBMIT_DIR:-$PWD}"
[[ -f $1 ]] || die "config file '$1' does not exist (relative to $PWD); pass a YAML file such as configs/tiny.yaml"
PY=${MMSCALE_PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=$PWD/.venv/bin/python; else PY=python3; fi
fi

# checks the config against this allocation (batch and engine vs nodes x tasks) and resolves run.dir
plan=$("$PY" -m mmscale.launch sbatch-plan "$@") || exit $?
eval "$plan"
mkdir -p "$RUN_DIR"
RESTARTS=${SLURM_RESTART_COUNT:-0}
echo "[pretrain.sh] job $SLURM_JOB_ID start $RESTARTS on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks" \
  "($SLURM_JOB_NUM_NODES nodes x $TASKS_PER_NODE); run dir $RUN_DIR"
log_path=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -1 || true)
if [[ -n $log_path && -f $log_path ]]; then
  mkdir -p "$RUN_DIR/slurm-logs" && ln -sf "$log_path" "$RUN_DIR/slurm-logs/$SLURM_JOB_ID.out"
fi

first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
if getent hosts "$first_node" >/dev/null 2>&1; then MASTER_ADDR=$first_node; else MASTER_ADDR=127.0.0.1; fi
export MASTER_ADDR MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
export LOCAL_WORLD_SIZE=$TASKS_PER_NODE OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# Each task: its rank from SLURM, and (where we may: root) its node's own /dev/shm, a directory of the
# real one bind-mounted over it. Emulated nodes share one machine: mosaicml-streaming's segments of
# different nodes would collide, while tasks of one node must share them. The directory is removed at
# the end, so segments a killed task leaves behind do not outlive the job either (on this machine; on
# real root-run clusters the other nodes' directories stay until their /dev/shm is cleared).
shm_mode=${MMSCALE_PRIVATE_SHM:-auto}
if [[ $shm_mode != 0 ]] && unshare -m true 2>/dev/null; then
  shm_mode=private
else
  shm_mode=shared
fi
task_script='
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
if [[ $MMSCALE_SHM_MODE == private ]]; then
  d=/dev/shm/mmscale-$SLURM_JOB_ID-$SLURMD_NODENAME
  mkdir -p "$d"
  exec unshare -m --propagation private sh -c "mount --bind $d /dev/shm && exec \"\$@\"" task "$@"
fi
exec "$@"'

cleanup_shm() { rm -rf /dev/shm/mmscale-"$SLURM_JOB_ID"-* 2>/dev/null || true; }
# SIGTERM (preemption, scontrol requeue, scancel) reaches the tasks directly; this shell keeps
# waiting for srun so the tasks can finish their checkpoint, then exits
trap 'echo "[pretrain.sh] SIGTERM: waiting for the tasks to checkpoint" >&2' TERM
trap cleanup_shm EXIT

MMSCALE_SHM_MODE=$shm_mode srun --kill-on-bad-exit=0 bash -c "$task_script" task \
  "$PY" -m mmscale.cli train --config "$CONFIG" "${@:2}" "${EXTRA_OVERRIDES[@]}" &
srun_pid=$!
status=0
while true; do
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # wait returned because of a trapped signal: wait again
done

if [[ $status -eq 75 ]]; then
  if (( RESTARTS >= ${MMSCALE_MAX_REQUEUES:-50} )); then
    echo "[pretrain.sh] stopped after a checkpoint; $RESTARTS restarts reached MMSCALE_MAX_REQUEUES, not requeueing" >&2
    exit 75
  fi
  echo "[pretrain.sh] the trainer checkpointed and stopped (exit 75): requeueing job $SLURM_JOB_ID" >&2
  # fails harmlessly when SLURM is already requeueing the job (preemption, scontrol requeue)
  scontrol requeue "$SLURM_JOB_ID" 2>&1 || true
  exit 75
fi
echo "[pretrain.sh] srun finished with status $status"
exit "$status"
