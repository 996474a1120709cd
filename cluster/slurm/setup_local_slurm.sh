#!/bin/bash
# Install and start a one-node SLURM cluster on this machine (Debian bookworm, run as root).
#
# For tests and trials of launchers/*.slurm and launchers/submit.py: one node, all daemons as
# root, no cgroups (containers rarely allow them), no accounting database. Idempotent: if the
# controller answers and the node is usable, it does nothing.
#
# Knobs (environment): XBT_SLURM_CPUS (default 2), XBT_SLURM_PARTITION (default debug),
# XBT_SLURM_CONF_DIR (default /etc/slurm).
set -euo pipefail

CPUS=${XBT_SLURM_CPUS:-2}
PARTITION=${XBT_SLURM_PARTITION:-debug}
CONF_DIR=${XBT_SLURM_CONF_DIR:-/etc/slurm}
NODE=$(hostname -s)
LOG_DIR=/var/log/slurm

if [[ $(id -u) -ne 0 ]]; then
  echo "setup_local_slurm.sh: must run as root (it installs packages and starts daemons)" >&2
  exit 1
fi

node_ready() {
  # The node counts as ready once sinfo reports it in a schedulable state.
  local state
  state=$(sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -1) || return 1
  [[ $state == idle* || $state == mix* || $state == alloc* ]]
}

if command -v sinfo >/dev/null && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null \
   && node_ready; then
  echo "local SLURM already running: $(sinfo -h -N -o '%N %t %c CPUs')"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

# --- munge: slurm authenticates every RPC with it, so it must be up first -------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --keyfile /etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge   # clients (sbatch as any user) need to reach the socket
if ! pgrep -x munged >/dev/null; then
  # munged refuses to run as root; the Debian package owns its files as user munge.
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 1 20); do
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
  sleep 0.5
done
munge -n | unmunge >/dev/null || { echo "munge does not work; see /var/log/munge/munged.log" >&2; exit 1; }

# --- slurm.conf ---------------------------------------------------------------------------
# RealMemory from slurmd -C, so memory requests (--mem) are checked against the real machine.
MEM_MB=$(slurmd -C 2>/dev/null | grep -o 'RealMemory=[0-9]*' | cut -d= -f2 || true)
MEM_MB=${MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))}
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
cat > "$CONF_DIR/slurm.conf" <<CONF
# Written by cluster/slurm/setup_local_slurm.sh: a one-node test cluster.
ClusterName=xbtlocal
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups in containers: track processes by parentage, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# CPUs are the consumable; memory is not enforced (no cgroups anyway).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# A requeued job becomes eligible after cred_expire (below) and then waits for the next
# scheduling pass (backfill every 30 s, the main loop every 60 s by default): passes every 2 s
# start it within seconds, cheap on a one-node cluster.
SchedulerParameters=bf_interval=2,sched_interval=2
# Batch jobs may be requeued (scontrol requeue, --requeue, preemption) and resume.
JobRequeue=1
# A requeued job waits cred_expire seconds before it may start again (default 120 s);
# 10 s keeps requeue tests short. Credentials of running steps are unaffected.
AuthInfo=cred_expire=10
# Forget finished jobs quickly (no accounting DB here): tests poll squeue/scontrol.
MinJobAge=30
# Seconds between SIGTERM and SIGKILL: the time a stage has to write its checkpoint.
KillWait=30
# A node that was down comes back by itself when slurmd registers again.
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
MpiDefault=none
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF

# --- daemons ------------------------------------------------------------------------------
pgrep -x slurmctld >/dev/null || slurmctld
for _ in $(seq 1 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 1; done
scontrol ping | grep -q UP || { echo "slurmctld did not come up; see $LOG_DIR/slurmctld.log" >&2; exit 1; }
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 1 60); do
  node_ready && break
  # A node left DOWN/DRAIN by an earlier unclean stop is not returned by itself.
  state=$(sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -1 || true)
  if [[ $state == down* || $state == drain* ]]; then
    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
  fi
  sleep 1
done
node_ready || { echo "node $NODE not idle: $(sinfo -N 2>&1); see $LOG_DIR/slurmd.log" >&2; exit 1; }
echo "local SLURM up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
