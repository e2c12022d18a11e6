#!/usr/bin/env bash
# A real, private SLURM cluster on this one machine: munge, slurmctld and two emulated nodes n1, n2.
#
#   tools/slurm_local.sh up   [DIR]   install (Debian packages, as root) if missing, then start; waits until idle
#   tools/slurm_local.sh down [DIR]   cancel our jobs, stop exactly the daemons `up` started (by pid)
#   tools/slurm_local.sh env  [DIR]   print `export SLURM_CONF=...` for this cluster's sbatch/squeue/scontrol
#
# DIR (default $MMSCALE_SLURM_DIR or /tmp/mmscale-slurm) holds everything: slurm.conf, the munge key and
# socket, state, spool, pid and log files. Nothing under /etc is touched, so clusters in different DIRs (with
# different ports) can run side by side.
#
# Environment knobs:
#   SLURM_LOCAL_PORT  slurmctld port (default 6817); the nodes use PORT+1 and PORT+2
#   SLURM_LOCAL_CPUS  CPUs of each emulated node (default: this machine's core count)
#   SLURM_LOCAL_MEM   memory of each emulated node in MB (default 4000)
#   SLURM_LOCAL_NO_INSTALL=1  fail instead of running apt-get when the daemons are missing
set -euo pipefail

cmd=${1:-}
DIR=${2:-${MMSCALE_SLURM_DIR:-/tmp/mmscale-slurm}}
PORT=${SLURM_LOCAL_PORT:-6817}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM=${SLURM_LOCAL_MEM:-4000}
NODES=(n1 n2)

die() { echo "slurm_local: error: $*" >&2; exit 1; }
log() { echo "[slurm_local] $*" >&2; }

install_if_missing() {
  local missing=()
  for b in munged slurmctld slurmd sbatch; do command -v "$b" >/dev/null || missing+=("$b"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ ${SLURM_LOCAL_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]}; install Debian's slurmctld slurmd slurm-client munge"
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root (apt-get install slurmctld slurmd slurm-client munge)"
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1 ||
    { apt-get update >>"$DIR/apt.log" 2>&1 &&
      apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >>"$DIR/apt.log" 2>&1; } ||
    die "apt-get install failed; see $DIR/apt.log"
}

# pid from a pid file, only if that process is still alive
live_pid() { local f=$1; [[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"; }

write_conf() {
  local conf=$DIR/slurm.conf i=0
  {
    echo "# written by tools/slurm_local.sh: a private two-node cluster on this machine"
    echo "ClusterName=mmscale-local"
    echo "SlurmctldHost=localhost(127.0.0.1)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # a private munge socket; short credential life so requeued jobs restart after ~11 s, not 121 s
    echo "AuthInfo=socket=$DIR/munge-socket/munge.socket,cred_expire=10"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    # no systemd and no cgroups in containers: track processes by parent pid, bind nothing
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "MpiDefault=none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SchedulerParameters=sched_interval=2,bf_interval=2"
    echo "ReturnToService=2"
    # trust the CPUs/memory written here, not the hardware: emulated nodes may claim more than it has
    echo "SlurmdParameters=config_overrides"
    echo "KillWait=30"
    echo "MinJobAge=600"
    for n in "${NODES[@]}"; do
      i=$((i + 1))
      echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } >"$conf"
}

start_munge() {
  local m=$DIR/munge
  mkdir -p "$m"
  [[ -s $m/munge.key ]] || mungekey --create --keyfile="$m/munge.key" >/dev/null
  chown -R munge:munge "$m"
  chmod 700 "$m"
  chmod 600 "$m/munge.key"
  # the socket's dir must be reachable by every user (munged checks), the key's dir must not
  mkdir -p "$DIR/munge-socket"
  chown munge:munge "$DIR/munge-socket"
  chmod 755 "$DIR/munge-socket"
  # munged refuses to run as root; it checks that its own dirs belong to it
  runuser -u munge -- munged --socket="$DIR/munge-socket/munge.socket" --key-file="$m/munge.key" \
    --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" ||
    die "munged did not start; see $m/munged.log"
  for _ in $(seq 50); do [[ -S $DIR/munge-socket/munge.socket ]] && break; sleep 0.1; done
  [[ -S $DIR/munge-socket/munge.socket ]] || die "munged did not open its socket; see $m/munged.log"
  cp "$m/munged.pid" "$DIR/run/munged.pid"
}

up() {
  mkdir -p "$DIR"
  install_if_missing
  if [[ -n $(live_pid "$DIR/run/slurmctld.pid" || true) ]]; then
    log "already running in $DIR"
    return 0
  fi
  mkdir -p "$DIR"/{state,run,log} "${NODES[@]/#/$DIR/spool/}"
  write_conf
  export SLURM_CONF=$DIR/slurm.conf
  start_munge
  # -i: ignore state from an earlier run of this dir (stale jobs would otherwise come back)
  slurmctld -f "$SLURM_CONF" -i || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  for n in "${NODES[@]}"; do
    slurmd -f "$SLURM_CONF" -N "$n" || die "slurmd $n did not start; see $DIR/log/slurmd-$n.log"
  done
  local states=""
  for _ in $(seq 120); do
    states=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
    [[ $states == "idle " ]] && break
    sleep 0.25
  done
  [[ $states == "idle " ]] || die "nodes not idle after 30 s (state: ${states:-no answer}); see $DIR/log"
  log "up: 2 nodes idle; export SLURM_CONF=$SLURM_CONF"
}

down() {
  [[ -d $DIR/run ]] || { log "nothing to stop in $DIR"; return 0; }
  export SLURM_CONF=$DIR/slurm.conf
  # cancel our jobs first: slurmstepd outlives slurmd, so jobs must end while the nodes still run
  if [[ -n $(live_pid "$DIR/run/slurmctld.pid" || true) ]]; then
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 60); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
  local pids=() f p
  for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
    p=$(live_pid "$f" || true)
    [[ -n $p ]] && pids+=("$p") && kill "$p" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$DIR"/run/*.pid
  log "down: stopped ${#pids[@]} daemons from $DIR"
}

case $cmd in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
  *) die "usage: tools/slurm_local.sh up|down|env [DIR]" ;;
esac
