#!/bin/bash
# Start a Ray cluster over the nodes of the current SLURM allocation, run one xbt stage on it,
# and take the cluster down again, whatever way the stage ends.
#
# Usage (inside an allocation: sbatch script, salloc shell, or a submitit job):
#   launchers/ray_on_slurm.sh STAGE CONFIG [extra stage args ...]
# runs   xbt STAGE --config CONFIG --ray-address HEAD:PORT [--resume] [--workers N --use-gpu] ARGS
#
# Layout: the Ray head runs on the node that runs this script (the first node of the job, where
# SLURM starts the batch script), one Ray worker node per other node, each as its own job step
# (`srun --overlap`, so the steps share the allocation's CPUs with the stage instead of
# waiting for them). Per-node CPUs and GPUs come from SLURM_CPUS_ON_NODE / SLURM_GPUS_ON_NODE
# as seen on that node.
#
# Signals: SIGUSR1 (from `#SBATCH --signal=B:USR1@...` before the time limit, or
# `scancel -b -s USR1`) and SIGTERM (scancel, scontrol requeue, preemption) are forwarded to
# the stage, which writes a checkpoint and exits non-zero. After USR1 the job requeues itself
# (XBT_SELF_REQUEUE=1) and the requeued run resumes (the stage gets --resume).
# SIGUSR2 is ignored here and in the Ray daemons: submitit uses it to reach its own Python
# handler, which forwards SIGUSR1 to this script (see launchers/submit.py).
#
# Knobs (environment; defaults in brackets):
#   XBT_CMD              command run instead of `xbt STAGE` (test payloads) [unset]
#   XBT_HOME             repository root; its .venv is activated if xbt is not on PATH [$SLURM_SUBMIT_DIR]
#   XBT_LOG_DIR          parent of the per-job log dir [$XBT_HOME/runs/slurm]
#   XBT_RESUME           1: pass --resume (continue from the latest checkpoint, if any)
#                        [1 for train and pretrain-phi, 0 for other stages]
#   XBT_WORKERS          Ray Train workers; unset: one per GPU on GPU jobs, the config's on CPU
#   XBT_SELF_REQUEUE     1: `scontrol requeue` after a USR1-triggered checkpoint [1]
#   XBT_RAY_CLUSTER      0: start no Ray cluster, the stage starts a local Ray itself (1 node) [1]
#   XBT_RAY_PORT_BASE    first of 100 ports used by this job [20000 + 100 * (SLURM_JOB_ID % 400)]
#   XBT_RAY_TMP          Ray temp dir on each node (sockets: keep it short) [/tmp/xbt-ray-$SLURM_JOB_ID]
#   XBT_RAY_WAIT_S       seconds to wait for all nodes to join [300]
#   XBT_RAY_DASHBOARD    0: no Ray dashboard; 1: on HEAD_IP:PORT_BASE+3, behind the job's token [1]
#                        (Ray Train's placement-group cleaner needs the state API it serves)
#   XBT_RAY_OBJECT_STORE_BYTES  object store size per node [Ray's default, 30% of RAM]
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: ray_on_slurm.sh STAGE CONFIG [stage args...]  (STAGE: train, pretrain-phi, eval, ...)" >&2
  exit 2
fi
STAGE=$1
CONFIG=$2
shift 2
: "${SLURM_JOB_ID:?ray_on_slurm.sh must run inside a SLURM allocation (sbatch, salloc or submitit)}"

XBT_HOME=${XBT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
LOG_DIR=${XBT_LOG_DIR:-$XBT_HOME/runs/slurm}/$SLURM_JOB_ID
RAY_TMP=${XBT_RAY_TMP:-/tmp/xbt-ray-$SLURM_JOB_ID}
WAIT_S=${XBT_RAY_WAIT_S:-300}
mkdir -p "$LOG_DIR"

# The job inherits the submitting shell's environment; activate the repo venv only if needed,
# so that a user's own environment wins.
if { ! command -v ray >/dev/null || { [[ -z ${XBT_CMD:-} ]] && ! command -v xbt >/dev/null; }; } \
    && [[ -f $XBT_HOME/.venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . "$XBT_HOME/.venv/bin/activate"
fi
command -v ray >/dev/null || { echo "ray_on_slurm.sh: 'ray' not on PATH; activate the xbt environment before sbatch" >&2; exit 2; }

# ---- ports: one block of 100 per job, so that jobs sharing a node do not collide ----------
PORT_BASE=${XBT_RAY_PORT_BASE:-$(( 20000 + 100 * (SLURM_JOB_ID % 400) ))}
GCS_PORT=$PORT_BASE
PORT_ARGS=(
  --node-manager-port=$((PORT_BASE + 1)) --object-manager-port=$((PORT_BASE + 2))
  --dashboard-agent-listen-port=$((PORT_BASE + 4)) --dashboard-agent-grpc-port=$((PORT_BASE + 5))
  --metrics-export-port=$((PORT_BASE + 6)) --runtime-env-agent-port=$((PORT_BASE + 8))
  --min-worker-port=$((PORT_BASE + 10)) --max-worker-port=$((PORT_BASE + 99))
)
HEAD_ARGS=(--ray-client-server-port=$((PORT_BASE + 7)))
COMMON_ARGS=(--temp-dir="$RAY_TMP" --disable-usage-stats --block)
[[ -n ${XBT_RAY_OBJECT_STORE_BYTES:-} ]] && COMMON_ARGS+=(--object-store-memory="$XBT_RAY_OBJECT_STORE_BYTES")

# ---- authentication: a per-job Ray token ---------------------------------------------------
# Only processes holding this job's token can talk to its cluster, and a token another Ray
# cluster left in ~/.ray cannot lock the stage out of its own cluster. The file lives in the
# job's log dir, which every node of the job sees. RAY_AUTH_MODE=disabled turns this off.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN_PATH:-} && -z ${RAY_AUTH_TOKEN:-} ]]; then
  export RAY_AUTH_TOKEN_PATH=$LOG_DIR/ray_auth_token
  (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH")
fi

# ---- nodes -------------------------------------------------------------------------------
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${SLURMD_NODENAME:-$(hostname -s)}
HEAD_IP=${XBT_RAY_HEAD_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
HEAD_IP=${HEAD_IP:-$(hostname -i | awk '{print $1}')}
N_NODES=${#NODES[@]}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
export RAY_ADDRESS="$HEAD_IP:$GCS_PORT"
if [[ ${XBT_RAY_DASHBOARD:-1} == 1 ]]; then  # on the cluster address, behind the job's Ray token (token auth is the default)
  HEAD_ARGS+=(--include-dashboard=true --dashboard-host="$HEAD_IP" --dashboard-port=$((PORT_BASE + 3)))
else
  HEAD_ARGS+=(--include-dashboard=false)   # Ray Train then warns every second that the state API is down
fi
# Ray Train would route print() through a logger and print each progress line twice.
export RAY_TRAIN_ENABLE_PRINT_PATCH=${RAY_TRAIN_ENABLE_PRINT_PATCH:-0}

{
  echo "job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} stage=$STAGE config=$CONFIG"
  echo "nodes=${NODES[*]} head=$HEAD_NODE ray_address=$RAY_ADDRESS"
  echo "cpus_per_node=${SLURM_CPUS_ON_NODE:-?} gpus_per_node=$GPUS_PER_NODE ray_tmp=$RAY_TMP"
} | tee -a "$LOG_DIR/job.txt"

# ---- cleanup: runs on every exit path (success, failure, signal) -------------------------
RAY_PIDS=()
STAGE_PID=
cleanup() {
  local rc=$?
  trap - EXIT
  set +e
  # Stop the Ray steps by signalling their srun: srun forwards SIGTERM to `ray start --block`,
  # whose children share its fate. `ray stop` is NOT used: it kills every Ray process of this
  # user on the node, including other jobs' clusters.
  if [[ ${#RAY_PIDS[@]} -gt 0 ]]; then
    kill -TERM "${RAY_PIDS[@]}" 2>/dev/null
    for _ in $(seq 1 20); do
      kill -0 "${RAY_PIDS[@]}" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "${RAY_PIDS[@]}" 2>/dev/null
  fi
  # Keep the head's Ray logs with the job's logs; drop the sockets and object spill files.
  if [[ -d $RAY_TMP/session_latest/logs ]]; then
    mkdir -p "$LOG_DIR/ray-logs"
    cp -rL "$RAY_TMP/session_latest/logs/." "$LOG_DIR/ray-logs/" 2>/dev/null
  fi
  [[ -z ${XBT_RAY_TMP:-} ]] && rm -rf "$RAY_TMP"
  echo "ray_on_slurm.sh: exit $rc" | tee -a "$LOG_DIR/job.txt"
  exit "$rc"
}
trap cleanup EXIT

# Signals are recorded and forwarded; the main loop below decides what follows.
GOT_SIGNAL=
on_signal() {
  GOT_SIGNAL=$1
  echo "ray_on_slurm.sh: got SIG$1, forwarding to the stage" | tee -a "$LOG_DIR/job.txt"
  if [[ -n $STAGE_PID ]]; then
    kill -s "$1" "$STAGE_PID" 2>/dev/null || true
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap '' USR2

# ---- start Ray ---------------------------------------------------------------------------
start_ray_cluster() {
# Every Ray process ignores USR1/USR2: only the stage should react to a checkpoint signal, and
# SLURM's --signal (without B:) reaches every process of every step.
RAY_WRAP="trap '' USR1 USR2; exec \"\$@\""
srun --overlap --nodes=1 --ntasks=1 -w "$HEAD_NODE" --output="$LOG_DIR/ray-head.log" \
  bash -c "$RAY_WRAP" ray-head ray start --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
  --num-cpus="${SLURM_CPUS_ON_NODE:-1}" --num-gpus="$GPUS_PER_NODE" \
  "${HEAD_ARGS[@]}" "${PORT_ARGS[@]}" "${COMMON_ARGS[@]}" &
RAY_PIDS+=($!)

# Wait for the head's GCS port before starting workers: they would otherwise retry and log noise.
deadline=$(( SECONDS + WAIT_S ))
until (exec 3<>"/dev/tcp/$HEAD_IP/$GCS_PORT") 2>/dev/null; do
  if (( SECONDS > deadline )); then
    echo "ray_on_slurm.sh: Ray head did not open $RAY_ADDRESS within ${WAIT_S}s; see $LOG_DIR/ray-head.log" >&2
    exit 1
  fi
  kill -0 "${RAY_PIDS[0]}" 2>/dev/null || { echo "ray_on_slurm.sh: Ray head exited; see $LOG_DIR/ray-head.log" >&2; exit 1; }
  sleep 1
done

for node in "${NODES[@]}"; do
  [[ $node == "$HEAD_NODE" ]] && continue
  # SLURM_*_ON_NODE are expanded on the worker node itself (nodes may differ).
  srun --overlap --nodes=1 --ntasks=1 -w "$node" --output="$LOG_DIR/ray-worker-$node.log" \
    bash -c "trap '' USR1 USR2; exec ray start --address=$RAY_ADDRESS \
      --num-cpus=\${SLURM_CPUS_ON_NODE:-1} --num-gpus=\${SLURM_GPUS_ON_NODE:-0} \
      ${PORT_ARGS[*]} ${COMMON_ARGS[*]}" &
  RAY_PIDS+=($!)
done

# One driver connection polls the node table (cheaper than repeated `ray status` calls).
XBT_N_NODES=$N_NODES XBT_WAIT_S=$(( deadline - SECONDS )) python - <<'PY' || exit 1
import os, sys, time
import ray
want, budget = int(os.environ["XBT_N_NODES"]), max(int(os.environ["XBT_WAIT_S"]), 10)
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
end = time.time() + budget
while True:
    alive = [n["NodeManagerHostname"] for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        print(f"ray_on_slurm.sh: all {want} node(s) joined: {' '.join(sorted(alive))}", flush=True)
        sys.exit(0)
    if time.time() > end:
        print(f"ray_on_slurm.sh: only {len(alive)} of {want} nodes joined the Ray cluster within "
              f"the wait ({alive}); see the ray-worker-*.log files next to job.txt", file=sys.stderr)
        sys.exit(1)
    time.sleep(2)
PY
}

if [[ ${XBT_RAY_CLUSTER:-1} == 1 ]]; then
  start_ray_cluster
elif (( N_NODES > 1 )); then
  echo "ray_on_slurm.sh: XBT_RAY_CLUSTER=0 needs a one-node job, this one has $N_NODES nodes" >&2
  exit 2
fi

# ---- run the stage -----------------------------------------------------------------------
if [[ -n ${XBT_CMD:-} ]]; then
  read -r -a CMD <<< "$XBT_CMD"
else
  CMD=(xbt "$STAGE")
fi
ARGS=(--config "$CONFIG")
if [[ ${XBT_RAY_CLUSTER:-1} == 1 ]]; then
  ARGS+=(--ray-address "$RAY_ADDRESS")
else
  unset RAY_ADDRESS
fi
case $STAGE in train|pretrain-phi) RESUME_DEFAULT=1 ;; *) RESUME_DEFAULT=0 ;; esac
[[ ${XBT_RESUME:-$RESUME_DEFAULT} == 1 ]] && ARGS+=(--resume)
if [[ -n ${XBT_WORKERS:-} ]]; then
  ARGS+=(--workers "$XBT_WORKERS")
  (( GPUS_PER_NODE > 0 )) && ARGS+=(--use-gpu)
elif (( GPUS_PER_NODE > 0 )); then
  ARGS+=(--workers $(( N_NODES * GPUS_PER_NODE )) --use-gpu)
fi
echo "ray_on_slurm.sh: running ${CMD[*]} ${ARGS[*]} $*" | tee -a "$LOG_DIR/job.txt"

# In the background, so the traps above run while it works (bash defers traps during a
# foreground child). Its output also goes to the per-job log.
# tee ignores the signals: SLURM signals every process of the job, and a dead tee would
# break the stage's stdout just while it writes its checkpoint.
"${CMD[@]}" "${ARGS[@]}" "$@" > >(trap '' TERM INT USR1 USR2; exec tee -a "$LOG_DIR/stage.log") 2>&1 &
STAGE_PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting until the stage is gone.
while kill -0 "$STAGE_PID" 2>/dev/null; do
  wait "$STAGE_PID" || true
done
set +e
wait "$STAGE_PID"
RC=$?
set -e
STAGE_PID=
echo "ray_on_slurm.sh: stage exited with $RC" | tee -a "$LOG_DIR/job.txt"

# A finished stage-2 run is evaluated right away (XBT_EVAL=0 skips it), so the job leaves the
# compatibility report next to the adapters. Eval runs in this process, not on the Ray cluster.
if [[ $RC -eq 0 && $STAGE == train && -z ${XBT_CMD:-} && ${XBT_EVAL:-1} == 1 ]]; then
  set +e
  xbt eval --config "$CONFIG" "$@" 2>&1 | tee -a "$LOG_DIR/stage.log"
  RC=${PIPESTATUS[0]}
  set -e
  echo "ray_on_slurm.sh: eval exited with $RC" | tee -a "$LOG_DIR/job.txt"
fi

if [[ $GOT_SIGNAL == USR1 && $RC -ne 0 && ${XBT_SELF_REQUEUE:-1} == 1 ]]; then
  # The stage saved a checkpoint; put the job back in the queue. The requeued run starts this
  # script again and the stage continues with --resume.
  echo "ray_on_slurm.sh: requeueing job $SLURM_JOB_ID" | tee -a "$LOG_DIR/job.txt"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$RC"
