#!/bin/bash
# Stop the one-node SLURM cluster started by setup_local_slurm.sh (daemons only; packages stay).
set -euo pipefail
# Stop in reverse order of start; each daemon writes a pid file we trust more than a name.
for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
  if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
done
if [[ -s /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
  kill "$(cat /run/munge/munged.pid)"
fi
echo "local SLURM stopped"
