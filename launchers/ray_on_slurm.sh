#!/bin/bash
# Start a Ray cluster over the nodes of the current SLURM allocation, run one xbt stage on it,
# and take the cluster down again, whatever way the stage ends.
#
# Usage (inside an allocation: sbatch script, salloc shell, or a submitit job):
#   launchers/ray_on_slurm.sh [--dry-run] STAGE CONFIG [extra stage args ...]
# runs   xbt STAGE --config CONFIG --ray-address HEAD:PORT [--resume] [--workers N --use-gpu] ARGS
#
# --dry-run prints the plan (nodes, tasks, CPUs/GPUs per node, the srun/ray/stage commands, Ray
# workers and their resources, the placement check) and starts nothing. Outside an allocation it
# plans for an allocation described by --nodes N --gpus-per-node G --cpus-per-node C (what
# `sbatch --nodes=N --gpus-per-node=G --exclusive` would give on nodes with C CPUs).
#
# Layout: whole nodes (the .slurm files ask --exclusive --mem=0 --ntasks-per-node=1). The Ray
# head runs on the node that runs this script (the first node of the job), one Ray worker node
# per other node, each as its own job step (`srun --overlap`, sharing the allocation with the
# stage). Each Ray node advertises that node's CPUs (SLURM_JOB_CPUS_PER_NODE) and GPUs
# (SLURM_GPUS_ON_NODE) with explicit --num-cpus/--num-gpus, and its srun step asks for them with
# --cpus-per-task (not inherited by srun since SLURM 22.05: without it the step, and every Ray
# worker in it, may be bound to one CPU) and --gres=gpu:G. Before Ray starts, the placement check
# (python -m xbt_dist.distributed.placement) compares workers x (cpus_per_worker, gpus_per_worker) with
# the allocation and fails with the numbers and the fix.
#
# Signals. SIGTERM (scancel, scontrol requeue, preemption, the time limit) reaches every process
# of every step at once. The Ray processes run with TERM/INT/USR1/USR2 *blocked* (a signal mask
# survives exec and fork; raylet and gcs_server install their own TERM handlers, so ignoring is
# not enough): Ray stays up while the stage checkpoints. Each Ray step's wrapper catches TERM and
# drops a stop request (LOG_DIR/stop_request) that this script forwards to the stage as SIGTERM;
# the stage (its driver touches the STOP file the workers watch) checkpoints at the next log step
# and exits. SIGUSR1 (`#SBATCH --signal=B:USR1@120` before the time limit, or
# `scancel -b -s USR1`) and SIGTERM to this script are forwarded to the stage the same way.
# Afterwards: after USR1, or after a TERM while SLURM is not ending the job (JobState still
# RUNNING: `scancel --signal=TERM JOBID` reaches the steps only), the job requeues itself
# (XBT_SELF_REQUEUE=1) and the requeued run resumes (--resume). After a job-wide TERM (scancel,
# scontrol requeue, preemption) SLURM decides: a requeued or preempted-requeue job resumes, a
# cancelled one stays cancelled. The stage has KillWait seconds (scontrol show config) from
# TERM to SIGKILL. SIGUSR2 is ignored: submitit uses it to reach its own Python handler, which
# forwards SIGUSR1 to this script (see launchers/submit.py).
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
#   XBT_PLACEMENT_CHECK  fail | warn | off: the check before Ray starts and in the driver [fail here]
set -euo pipefail

usage() {
  echo "usage: ray_on_slurm.sh [--dry-run [--nodes N --gpus-per-node G --cpus-per-node C]] STAGE CONFIG [stage args...]" >&2
  echo "       (STAGE: train, pretrain-phi, eval, ...)" >&2
  exit 2
}
DRY_RUN=0
SIM_NODES= SIM_GPUS= SIM_CPUS=
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --nodes) SIM_NODES=${2:?--nodes needs a value}; shift 2 ;;
    --gpus-per-node) SIM_GPUS=${2:?--gpus-per-node needs a value}; shift 2 ;;
    --cpus-per-node) SIM_CPUS=${2:?--cpus-per-node needs a value}; shift 2 ;;
    *) echo "ray_on_slurm.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ $# -ge 2 ]] || usage
STAGE=$1
CONFIG=$2
shift 2
if [[ -n $SIM_NODES$SIM_GPUS$SIM_CPUS && $DRY_RUN != 1 ]]; then
  echo "ray_on_slurm.sh: --nodes/--gpus-per-node/--cpus-per-node describe an allocation for --dry-run only" >&2
  exit 2
fi

# ---- the allocation: the real one, or (dry run outside SLURM) the one described -------------
if [[ $DRY_RUN == 1 && ( -z ${SLURM_JOB_ID:-} || -n $SIM_NODES$SIM_GPUS$SIM_CPUS ) ]]; then
  SIM_NODES=${SIM_NODES:-1}
  SIM_CPUS=${SIM_CPUS:-$(nproc)}
  JOB_ID=DRYRUN
  NODES=()
  for ((i = 1; i <= SIM_NODES; i++)); do NODES+=("node$i"); done
  CPUS_SPEC="$SIM_CPUS(x$SIM_NODES)"
  GPUS_PER_NODE=${SIM_GPUS:-0}
  HEAD_NODE=${NODES[0]}
  HEAD_IP=HEAD_IP
else
  : "${SLURM_JOB_ID:?ray_on_slurm.sh must run inside a SLURM allocation (sbatch, salloc or submitit); --dry-run plans without one}"
  JOB_ID=$SLURM_JOB_ID
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  CPUS_SPEC=${SLURM_JOB_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}
  # SLURM_GPUS_ON_NODE: GPUs of this job on this node; SLURM_GPUS_PER_NODE may be "a100:8".
  GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-}
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE##*:}}
  GPUS_PER_NODE=${GPUS_PER_NODE:-0}
  HEAD_NODE=${SLURMD_NODENAME:-$(hostname -s)}
  HEAD_IP=${XBT_RAY_HEAD_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
  HEAD_IP=${HEAD_IP:-$(hostname -i | awk '{print $1}')}
fi
N_NODES=${#NODES[@]}
# SLURM_JOB_CPUS_PER_NODE ("128(x2),96") -> one CPU count per node, in node-list order.
NODE_CPUS=()
IFS=, read -ra _parts <<< "$CPUS_SPEC"
for part in "${_parts[@]}"; do
  if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
    for ((i = 0; i < BASH_REMATCH[2]; i++)); do NODE_CPUS+=("${BASH_REMATCH[1]}"); done
  else
    NODE_CPUS+=("$part")
  fi
done
if [[ ${#NODE_CPUS[@]} -ne $N_NODES ]]; then
  echo "ray_on_slurm.sh: CPUs per node '$CPUS_SPEC' do not match the $N_NODES node(s) ${NODES[*]}" >&2
  exit 2
fi
declare -A CPUS_OF
for i in "${!NODES[@]}"; do CPUS_OF[${NODES[$i]}]=${NODE_CPUS[$i]}; done

XBT_HOME=${XBT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
LOG_DIR=${XBT_LOG_DIR:-$XBT_HOME/runs/slurm}/$JOB_ID
RAY_TMP=${XBT_RAY_TMP:-/tmp/xbt-ray-$JOB_ID}
WAIT_S=${XBT_RAY_WAIT_S:-300}
STOP_REQUEST=$LOG_DIR/stop_request   # dropped by a Ray step that got SIGTERM
STEP_DIR=$LOG_DIR/ray-steps          # each Ray step writes its step id here (cleanup kills it)

# The job inherits the submitting shell's environment; activate the repo venv only if needed,
# so that a user's own environment wins.
if { ! command -v ray >/dev/null || { [[ -z ${XBT_CMD:-} ]] && ! command -v xbt >/dev/null; }; } \
    && [[ -f $XBT_HOME/.venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . "$XBT_HOME/.venv/bin/activate"
fi
if [[ $DRY_RUN != 1 ]]; then
  command -v ray >/dev/null || { echo "ray_on_slurm.sh: 'ray' not on PATH; activate the xbt environment before sbatch" >&2; exit 2; }
  mkdir -p "$LOG_DIR"
  # A requeued job keeps its id, so its log dir: forget the previous run's request and steps.
  rm -rf "$STOP_REQUEST" "$STEP_DIR"
fi

# ---- ports: one block of 100 per job, so that jobs sharing a node do not collide ----------
if [[ $JOB_ID == DRYRUN ]]; then PORT_BASE=${XBT_RAY_PORT_BASE:-20000}
else PORT_BASE=${XBT_RAY_PORT_BASE:-$(( 20000 + 100 * (JOB_ID % 400) ))}; fi
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
if [[ $DRY_RUN != 1 && $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN_PATH:-} && -z ${RAY_AUTH_TOKEN:-} ]]; then
  export RAY_AUTH_TOKEN_PATH=$LOG_DIR/ray_auth_token
  (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH")
fi

export RAY_ADDRESS="$HEAD_IP:$GCS_PORT"
if [[ ${XBT_RAY_DASHBOARD:-1} == 1 ]]; then  # on the cluster address, behind the job's Ray token (token auth is the default)
  HEAD_ARGS+=(--include-dashboard=true --dashboard-host="$HEAD_IP" --dashboard-port=$((PORT_BASE + 3)))
else
  HEAD_ARGS+=(--include-dashboard=false)   # Ray Train then warns every second that the state API is down
fi
# Ray Train would route print() through a logger and print each progress line twice.
export RAY_TRAIN_ENABLE_PRINT_PATCH=${RAY_TRAIN_ENABLE_PRINT_PATCH:-0}

# ---- the commands ------------------------------------------------------------------------
# A Ray step runs launchers/ray_step.sh: Ray with TERM blocked, its own TERM -> stop request.
RAY_STEP=$XBT_HOME/launchers/ray_step.sh
ray_step() {  # ray_step NODE LOGNAME RAY-START-ARGS... -> the srun command, in array STEP_CMD
  local node=$1 log=$2
  shift 2
  STEP_CMD=(srun --overlap --nodes=1 --ntasks=1 -w "$node" --cpus-per-task="${CPUS_OF[$node]}")
  (( GPUS_PER_NODE > 0 )) && STEP_CMD+=(--gres=gpu:"$GPUS_PER_NODE")
  STEP_CMD+=(--job-name="xbt-$log" --output="$LOG_DIR/$log.log"
             bash "$RAY_STEP" "$STEP_DIR" "$STOP_REQUEST" ray start "$@" "${PORT_ARGS[@]}" "${COMMON_ARGS[@]}")
}
ray_step "$HEAD_NODE" ray-head --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
  --num-cpus="${CPUS_OF[$HEAD_NODE]}" --num-gpus="$GPUS_PER_NODE" "${HEAD_ARGS[@]}"
HEAD_CMD=("${STEP_CMD[@]}")
declare -A WORKER_CMDS
for node in "${NODES[@]}"; do
  [[ $node == "$HEAD_NODE" ]] && continue
  ray_step "$node" "ray-worker-$node" --address="$RAY_ADDRESS" \
    --num-cpus="${CPUS_OF[$node]}" --num-gpus="$GPUS_PER_NODE"
  WORKER_CMDS[$node]=$(printf '%q ' "${STEP_CMD[@]}")
done

if [[ -n ${XBT_CMD:-} ]]; then
  read -r -a CMD <<< "$XBT_CMD"
else
  CMD=(xbt "$STAGE")
fi
ARGS=(--config "$CONFIG")
if [[ ${XBT_RAY_CLUSTER:-1} == 1 ]]; then
  ARGS+=(--ray-address "$RAY_ADDRESS")
elif (( N_NODES > 1 )); then
  echo "ray_on_slurm.sh: XBT_RAY_CLUSTER=0 needs a one-node job, this one has $N_NODES nodes" >&2
  exit 2
fi
case $STAGE in train|pretrain-phi) RESUME_DEFAULT=1 ;; *) RESUME_DEFAULT=0 ;; esac
[[ ${XBT_RESUME:-$RESUME_DEFAULT} == 1 ]] && ARGS+=(--resume)
if [[ -n ${XBT_WORKERS:-} ]]; then
  ARGS+=(--workers "$XBT_WORKERS")
  (( GPUS_PER_NODE > 0 )) && ARGS+=(--use-gpu)
elif (( GPUS_PER_NODE > 0 )); then
  ARGS+=(--workers $(( N_NODES * GPUS_PER_NODE )) --use-gpu)
fi

# ---- the plan, and the placement check -----------------------------------------------------
KILL_WAIT=$(scontrol show config 2>/dev/null | awk -F= '/^KillWait/ {gsub(/[^0-9]/, "", $2); print $2}' || true)
{
  echo "job=$JOB_ID restart=${SLURM_RESTART_COUNT:-0} stage=$STAGE config=$CONFIG"
  echo "nodes=$N_NODES (${NODES[*]}) tasks_per_node=1 head=$HEAD_NODE ray_address=$RAY_ADDRESS"
  echo "cpus_per_node=$CPUS_SPEC gpus_per_node=$GPUS_PER_NODE ray_tmp=$RAY_TMP kill_wait_s=${KILL_WAIT:-?}"
} | { if [[ $DRY_RUN == 1 ]]; then sed 's/^/plan: /'; else tee -a "$LOG_DIR/job.txt"; fi; }
if [[ $DRY_RUN == 1 ]]; then
  if [[ ${XBT_RAY_CLUSTER:-1} == 1 ]]; then
    echo "plan: ray head on $HEAD_NODE: $(printf '%q ' "${HEAD_CMD[@]}")"
    for node in "${NODES[@]}"; do
      [[ $node == "$HEAD_NODE" ]] || echo "plan: ray worker on $node: ${WORKER_CMDS[$node]}"
    done
  else
    echo "plan: no Ray cluster (XBT_RAY_CLUSTER=0): the stage starts a local Ray"
  fi
  echo "plan: stage: $(printf '%q ' "${CMD[@]}" "${ARGS[@]}" "$@")"
fi

PLACEMENT_RC=0
if [[ -z ${XBT_CMD:-} && ${XBT_PLACEMENT_CHECK:-fail} != off ]] && [[ $STAGE == train || $STAGE == pretrain-phi ]]; then
  set +e
  python -m xbt_dist.distributed.placement --node-cpus "$CPUS_SPEC" --gpus-per-node "$GPUS_PER_NODE" \
    --node-names "${NODES[*]}" "${ARGS[@]}" "$@" 2>&1 \
    | { if [[ $DRY_RUN == 1 ]]; then sed 's/^/plan: /'; else tee -a "$LOG_DIR/job.txt"; fi; }
  PLACEMENT_RC=${PIPESTATUS[0]}
  set -e
  if [[ $PLACEMENT_RC -ne 0 && ${XBT_PLACEMENT_CHECK:-fail} == warn ]]; then
    echo "ray_on_slurm.sh: placement check failed; going on (XBT_PLACEMENT_CHECK=warn)" >&2
    PLACEMENT_RC=0
  fi
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "plan: dry run, nothing started"
  exit "$PLACEMENT_RC"
fi
if [[ $PLACEMENT_RC -ne 0 ]]; then
  echo "ray_on_slurm.sh: the workers do not fit this allocation (see above); nothing started" | tee -a "$LOG_DIR/job.txt" >&2
  exit "$PLACEMENT_RC"
fi

# ---- cleanup: runs on every exit path (success, failure, signal) -------------------------
RAY_PIDS=()
STAGE_PID=
# Stop the Ray steps with SIGKILL through SLURM: their processes block SIGTERM, and slurmd
# reaches every process of a step (raylet, workers), wherever it runs. `ray stop` is NOT
# used: it kills every Ray process of this user on the node, including other jobs' clusters.
stop_ray_steps() {
  if [[ ${#RAY_PIDS[@]} -gt 0 ]]; then
    for f in "$STEP_DIR"/*; do
      [[ -s $f ]] && scancel --signal=KILL "$SLURM_JOB_ID.$(cat "$f")" 2>/dev/null
    done
    for _ in $(seq 1 20); do
      kill -0 "${RAY_PIDS[@]}" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "${RAY_PIDS[@]}" 2>/dev/null
  fi
  RAY_PIDS=()
}
cleanup() {
  local rc=$?
  trap - EXIT
  set +e
  stop_ray_steps
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
  echo "ray_on_slurm.sh: got SIG$1${2:+ $2}, forwarding to the stage" | tee -a "$LOG_DIR/job.txt"
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
"${HEAD_CMD[@]}" &
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
  eval "${WORKER_CMDS[$node]}" &
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
else
  unset RAY_ADDRESS
fi

# ---- run the stage -----------------------------------------------------------------------
echo "ray_on_slurm.sh: running ${CMD[*]} ${ARGS[*]} $*" | tee -a "$LOG_DIR/job.txt"

# In the background, so the traps above run while it works (bash defers traps during a
# foreground child). Its output also goes to the per-job log.
# tee ignores the signals: SLURM signals every process of the job, and a dead tee would
# break the stage's stdout just while it writes its checkpoint.
"${CMD[@]}" "${ARGS[@]}" "$@" > >(trap '' TERM INT USR1 USR2; exec tee -a "$LOG_DIR/stage.log") 2>&1 &
STAGE_PID=$!
# Poll rather than `wait` alone: a stop request from a Ray step arrives as a file, not a signal.
while kill -0 "$STAGE_PID" 2>/dev/null; do
  if [[ -z $GOT_SIGNAL && -e $STOP_REQUEST ]]; then
    on_signal TERM "(a Ray step got SIGTERM)"
  fi
  sleep 1 &
  wait $! 2>/dev/null || true   # returns at once when a trapped signal arrives
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

if [[ -n $GOT_SIGNAL && $GOT_SIGNAL != INT && $RC -ne 0 && ${XBT_SELF_REQUEUE:-1} == 1 ]]; then
  # The stage saved a checkpoint. After USR1 (time limit ahead), or after a TERM that is not
  # SLURM ending the job (`scancel --signal=TERM` reaches the steps and leaves the job RUNNING),
  # put the job back in the queue; the requeued run resumes. Otherwise (scancel, scontrol
  # requeue, preemption: the job is already COMPLETING) SLURM's decision stands.
  STATE=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
  if [[ $GOT_SIGNAL == USR1 || $STATE == RUNNING ]]; then
    echo "ray_on_slurm.sh: requeueing job $SLURM_JOB_ID (after SIG$GOT_SIGNAL, state ${STATE:-?})" | tee -a "$LOG_DIR/job.txt"
    # Ray first: its steps block SIGTERM, so a requeue with them still up would wait KillWait
    # seconds for SLURM's SIGKILL before the job could go back to the queue.
    stop_ray_steps || true   # (errexit off inside: a step already gone is fine)
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "ray_on_slurm.sh: job $SLURM_JOB_ID is ${STATE:-gone}: SLURM decides whether it requeues" | tee -a "$LOG_DIR/job.txt"
  fi
fi
exit "$RC"
