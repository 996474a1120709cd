#!/bin/bash
# One Ray node as a SLURM job step (started by ray_on_slurm.sh through srun):
#   ray_step.sh STEP_DIR STOP_REQUEST ray start ... --block
#
# SIGTERM reaches every process of a step at once (scancel, scontrol requeue, preemption, and
# `scancel --signal=TERM` of the steps). raylet and gcs_server install their own TERM handlers,
# so ignoring the signal is not enough: Ray runs with TERM, INT, USR1 and USR2 *blocked* (the
# signal mask survives exec and fork, so raylet, GCS and every Ray worker inherit it) and stays
# up while the stage's Ray workers write their checkpoint. This wrapper keeps TERM and turns it
# into a stop request (a file ray_on_slurm.sh watches and forwards to the stage as SIGTERM).
# It records its step id in STEP_DIR so ray_on_slurm.sh can end the step with
# `scancel --signal=KILL JOB.STEP` (SIGKILL cannot be blocked) once the stage is done.
set -u
step_dir=$1 stop_request=$2
shift 2
mkdir -p "$step_dir"
echo "${SLURM_STEP_ID:-?}" > "$step_dir/$(hostname -s)"
trap 'touch "$stop_request"' TERM
trap '' USR1 USR2
python -c 'import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2})
os.execvp(sys.argv[1], sys.argv[1:])' "$@" &
pid=$!
rc=1
# `wait` returns early when the TERM trap runs; keep waiting for Ray itself.
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid"
  rc=$?
done
exit "$rc"
