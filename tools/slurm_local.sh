#!/usr/bin/env bash
# A real, private SLURM on this one machine: a munged, a slurmctld and two slurmd (fake nodes n1, n2,
# both on 127.0.0.1), everything (config, state, logs, pid files, the munge key and socket) under
# one directory. What tests/launchers/test_slurm_real.py runs the launchers on; also handy by hand.
#
#   tools/slurm_local.sh install        apt-get the Debian packages when missing (root; setup_env.sh calls it)
#   tools/slurm_local.sh up DIR         write DIR/slurm.conf, start the daemons, wait for 2 idle nodes
#   tools/slurm_local.sh down DIR       cancel every job, stop the daemons started by `up DIR` (by pid)
#   export SLURM_CONF=DIR/slurm.conf    then sbatch / squeue / scontrol talk to it
#
# Ports: SLURM_LOCAL_PORT (slurmctld, default 6817); the nodes use the next two. Not here: no system
# file is touched (no /etc/slurm, no /etc/hosts: the launchers read the head node's NodeAddr), and
# nothing is started by systemd. The nodes claim 2 x the real cores each (config_overrides).
# Partitions: `debug` (default) and `high`, which preempts it
# (PreemptMode=REQUEUE, GraceTime=15). AuthInfo=cred_expire=5 lets a requeued job restart in ~10 s.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # slurmctld, slurmd and munged live there
PACKAGES=(slurmctld slurmd slurm-client munge)

usage() { echo "usage: tools/slurm_local.sh install | up DIR | down DIR" >&2; exit 2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "slurm_local: SLURM is not installed and this is not root with apt-get; install ${PACKAGES[*]}" >&2
    return 1
  fi
  echo "slurm_local: apt-get install ${PACKAGES[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
}

write_conf() {  # DIR PORT
  local d=$1 port=$2 cpus mem
  cpus=$(( 2 * $(nproc) ))  # each fake node claims twice the real cores: two 2-node test jobs run side by side
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  cat >"$d/slurm.conf" <<EOF
ClusterName=megaflowlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$d/munge/munge.socket,cred_expire=5
StateSaveLocation=$d/state/ctld
SlurmdSpoolDir=$d/state/%n
SlurmctldPidFile=$d/run/slurmctld.pid
SlurmdPidFile=$d/run/slurmd-%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((port + 1))-$((port + 2)) CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=15
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

alive() {  # PIDFILE NAME: the pid in PIDFILE runs a program called NAME
  local pid
  [ -f "$1" ] && pid=$(cat "$1") && [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

up() {
  local d port n
  d=$(mkdir -p "$1" && cd "$1" && pwd)
  port=${SLURM_LOCAL_PORT:-6817}
  install_packages
  mkdir -p "$d/log" "$d/run" "$d/state/ctld" "$d/state/n1" "$d/state/n2" "$d/munge"
  chmod 0755 "$d" "$d/munge"  # munged refuses a socket directory others cannot traverse
  [ -f "$d/slurm.conf" ] || write_conf "$d" "$port"
  export SLURM_CONF=$d/slurm.conf
  if ! alive "$d/munge/munged.pid" munged; then
    [ -f "$d/munge/munge.key" ] || { mungekey --create --keyfile="$d/munge/munge.key" --bits=1024; chmod 0600 "$d/munge/munge.key"; }
    /usr/sbin/munged --socket="$d/munge/munge.socket" --key-file="$d/munge/munge.key" --pid-file="$d/munge/munged.pid" \
      --log-file="$d/log/munged.log" --seed-file="$d/munge/munged.seed"
  fi
  alive "$d/run/slurmctld.pid" slurmctld || slurmctld -f "$SLURM_CONF"
  for n in n1 n2; do alive "$d/run/slurmd-$n.pid" slurmd || slurmd -f "$SLURM_CONF" -N "$n"; done
  for _ in $(seq 100); do  # up to 20 s
    [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = 2 ] && { echo "slurm_local: up ($SLURM_CONF)"; return 0; }
    sleep 0.2
  done
  echo "slurm_local: the two nodes did not become idle in 20 s; logs in $d/log" >&2
  sinfo -N >&2 || true
  return 1
}

stop_pid() {  # PIDFILE NAME: TERM, then KILL after 10 s
  local pid
  alive "$1" "$2" || return 0
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do [ -d "/proc/$pid" ] || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  local d=$1 n
  [ -d "$d" ] || return 0
  d=$(cd "$d" && pwd)
  export SLURM_CONF=$d/slurm.conf
  if alive "$d/run/slurmctld.pid" slurmctld; then
    scancel --full --quiet --partition=debug,high 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -t running,completing 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for n in n1 n2; do stop_pid "$d/run/slurmd-$n.pid" slurmd; done
  stop_pid "$d/run/slurmctld.pid" slurmctld
  stop_pid "$d/munge/munged.pid" munged
  echo "slurm_local: down ($d)"
}

case "${1:-}" in
  install) install_packages ;;
  up) [ $# = 2 ] || usage; up "$2" ;;
  down) [ $# = 2 ] || usage; down "$2" ;;
  *) usage ;;
esac
