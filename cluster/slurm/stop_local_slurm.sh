#!/bin/bash
# Stop the one-node SLURM cluster started by setup_local_slurm.sh (daemons only; packages stay).
set -euo pipefail
# Stop in reverse order of start, each by the pid file it wrote (never by process name), and
# wait for each to exit so that an immediate setup_local_slurm.sh starts fresh daemons.
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
done
echo "local SLURM stopped"
