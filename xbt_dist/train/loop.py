"""The one training loop both stages share: step, log, checkpoint, stop on request, resume.

A stage provides a `LoopPlan` (how long, how often, where), a `step_fn(batch) -> (loss, parts)`, a
backend (plain PyTorch or DeepSpeed) and a checkpointable data stream; the loop owns the counters. The
step counters, the optimiser and the data position are checkpointed together, so a resumed run
(Ray FailureConfig restart, SLURM requeue, `--resume`) neither repeats nor skips samples.

Stop requests: SIGUSR1/SIGTERM (SLURM preemption, `--signal`) or a `STOP` file in the stage dir
make every rank save a checkpoint at the same step and leave with `StopRequested`; the ranks agree
on the step through `ctx.any_rank`, a collective, so none blocks in a gather the others skipped.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from xbt_dist import storage
from xbt_dist.train.checkpoint import Checkpointer
from xbt_dist.train.context import WorkerContext
from xbt_dist.train.progress import Progress

STOP_FILE = "STOP"
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "checkpointed, requeue me"


class StopRequested(Exception):
    """The run checkpointed and stopped on request (preemption); resume with --resume."""


_signalled = False


def install_stop_handlers(stage_dir: str) -> None:
    """Route SIGUSR1/SIGTERM to a checkpoint-and-stop (main thread only).

    The handler also drops a STOP file in the stage dir: on Ray the signal reaches this driver
    process, not the workers, and the workers watch for that file.
    """
    def on_signal(signum, frame):
        global _signalled
        _signalled = True
        storage.write_text(storage.join(stage_dir, STOP_FILE), "")
        print(f"[xbt] signal {signum}: checkpointing at the next log step, then stopping",
              file=sys.stderr, flush=True)

    try:
        signal.signal(signal.SIGUSR1, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    except ValueError:  # not the main thread: the STOP file still works
        pass


class StepTimes:
    """Where a step's time goes (XBT_STEP_TIMES=1): data, forward (+ loss), backward, optimiser
    step, and the log-point work (the loss all-reduce + progress line, the Ray report, the stop
    vote), in ms per step, printed by rank 0 at the end. Wall clock between phases: exact on CPU,
    where every op is synchronous; on a GPU it charges queued kernels to the phase that waits.
    """

    PHASES = ("data", "forward", "backward", "step", "log", "report", "stop_vote")

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.total = dict.fromkeys(self.PHASES, 0.0)
        self.t = 0.0

    def start(self) -> None:
        if self.enabled:
            import time
            self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.enabled:
            import time
            now = time.perf_counter()
            self.total[phase] += now - self.t
            self.t = now

    def summary(self, steps: int) -> str:
        per = {k: 1e3 * v / max(steps, 1) for k, v in self.total.items()}
        return " ".join(f"{k}={v:.2f}" for k, v in per.items()) + f" | total={sum(per.values()):.2f} ms/step"


@dataclass(frozen=True)
class LoopPlan:
    """What a stage asks of the shared loop: how long it runs, how often it logs and saves, where.

    The runtime objects (worker context, backend, data stream, step function) stay `run_loop`'s
    own arguments; the plan is plain data a stage builds from its config.
    """

    name: str                      # the stage's label in progress lines ("phi", "train:xbt")
    total_steps: int               # optimiser steps to reach; a resumed run continues towards it
    global_batch: int              # samples per optimiser step over all ranks
    stage_dir: str                 # checkpoints, the STOP file, TensorBoard (local path or URL)
    checkpoint_every: int = 0      # save every N steps (0: only at the end and on a stop request)
    log_every: int = 10            # log point every N steps (loss all-reduce, report, stop vote)
    resume: bool = False           # restore the latest checkpoint in stage_dir before the first step
    tb_dir: str | None = None      # TensorBoard dir; dropped when remote (the manifest has the curve)
    trackers: list = field(default_factory=list)  # opened wandb/mlflow trackers (rank 0), or none

    def __post_init__(self):
        # Only values the loop cannot run with: a log period of 0 would divide by zero at step 1.
        for key, least in (("global_batch", 1), ("log_every", 1), ("checkpoint_every", 0)):
            if getattr(self, key) < least:
                raise ValueError(f"LoopPlan({self.name!r}).{key}={getattr(self, key)!r}: must be >= {least}")


@dataclass
class LoopState:
    step: int = 0          # optimiser steps taken
    samples: int = 0       # global samples consumed
    history: list = field(default_factory=list)


def endless(stream) -> Iterator[dict]:
    """Batches across epoch boundaries; the stream advances its own epoch counter.

    One empty pass is normal (a resume from a checkpoint taken at the very end of an epoch); two
    in a row mean the data cannot fill a single batch.
    """
    empty_passes = 0
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield batch
        empty_passes = empty_passes + 1 if empty else 0
        if empty_passes >= 2:
            raise RuntimeError("the data stream yielded no batch in a whole epoch: the shard set is "
                               "empty or smaller than one batch per worker; add data or lower batch_size")


def get_rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _maybe_inject_fault(step: int, rank: int, stage_dir: str) -> None:
    """Test hook: XBT_FAULT_AT_STEP=k kills rank XBT_FAULT_RANK (default 1) once at step k."""
    at = os.environ.get("XBT_FAULT_AT_STEP")
    if not at or step != int(at) or rank != int(os.environ.get("XBT_FAULT_RANK", "1")):
        return
    marker = os.environ.get("XBT_FAULT_MARKER", storage.join(stage_dir, ".fault_injected"))
    if storage.exists(marker):
        return
    storage.write_text(marker, str(step))
    print(f"[xbt] fault injection: rank {rank} exits at step {step}", file=sys.stderr, flush=True)
    os._exit(1)


def resume_from(ckpt: Checkpointer, ctx: WorkerContext, backend, stream, state: LoopState,
                name: str) -> bool:
    """Collective: restore the latest checkpoint into a FRESH backend and stream; False if none.

    Works across world sizes: the backend state is keyed by parameter name and every rank gets
    all old ranks' data-cursor parts. RNG states are restored only for a rank that existed in
    the saving run (same rank, same stream of draws); new ranks keep their seeded state.
    """
    loaded = ckpt.load()
    if loaded is None:
        return False
    backend.load_state_dict(loaded.state)
    stream.load_state_dict([r["data"] for r in loaded.ranks])
    mine = loaded.ranks[ctx.rank] if ctx.rank < loaded.world_size else loaded.ranks[0]
    state.step, state.samples = int(mine["step"]), int(mine["samples"])
    state.history = list(loaded.ranks[0].get("history", []))  # the manifest's curve spans the restart
    if ctx.rank < loaded.world_size and loaded.world_size == ctx.world_size:
        set_rng_state(mine["rng"])  # augmentation draws continue exactly where they left off
    if ctx.is_main:
        moved = "" if loaded.world_size == ctx.world_size else f" (saved by {loaded.world_size} workers)"
        print(f"[{name}] resumed from {loaded.name} at step {state.step}{moved}", file=sys.stderr, flush=True)
    return True


def run_loop(plan: LoopPlan, ctx: WorkerContext, backend, stream, step_fn: Callable) -> LoopState:
    """Train until `plan.total_steps`, saving, logging and honouring stop requests; every rank calls it."""
    name, stage_dir, total_steps, global_batch = plan.name, plan.stage_dir, plan.total_steps, plan.global_batch
    ckpt = Checkpointer(stage_dir, rank=ctx.rank, world_size=ctx.world_size, barrier=ctx.barrier)
    state = LoopState()
    stop_file = storage.join(stage_dir, STOP_FILE)
    if ctx.is_main and not _signalled:
        storage.remove(stop_file)  # left by the stop that preceded this (resumed) run
    ctx.barrier()
    if plan.resume:
        resume_from(ckpt, ctx, backend, stream, state, name)

    def save() -> str:
        # Collective: under ZeRO the backend gathers each trainable tensor and its Adam moments
        # on every rank; only rank 0 writes them, every rank writes its own data cursor and RNG.
        full = backend.state_dict()
        return ckpt.save(state.step, full if ctx.is_main else None,
                         {"data": stream.state_dict(), "step": state.step, "samples": state.samples,
                          "rng": get_rng_state(), "rank": ctx.rank, "world_size": ctx.world_size,
                          "history": state.history if ctx.is_main else []})

    local_batch = global_batch // ctx.world_size
    tb_dir = plan.tb_dir
    if tb_dir and storage.is_remote(tb_dir):
        tb_dir = None  # TensorBoard's writer cannot append to an object store; the manifest has the curve
    progress = Progress(name, total_steps, local_batch, ctx.world_size, ctx.rank, plan.log_every, tb_dir,
                        plan.trackers)
    batches = endless(stream)
    backend.module.train()
    times = StepTimes(os.environ.get("XBT_STEP_TIMES") == "1")
    first_step = state.step
    times.start()
    while state.step < total_steps:
        batch = next(batches)
        times.lap("data")
        loss, parts = step_fn(batch)
        times.lap("forward")
        backend.backward(loss)
        times.lap("backward")
        stepped = backend.step()
        times.lap("step")
        if not stepped:
            continue
        state.step += 1
        state.samples += global_batch
        _maybe_inject_fault(state.step, ctx.rank, stage_dir)
        if plan.checkpoint_every and state.step % plan.checkpoint_every == 0 and state.step < total_steps:
            save()
        if not progress.due(state.step):
            times.lap("step")
            continue
        # Log points only: .item() and the stop vote are sync points we keep off the hot path.
        # The global-batch loss: each rank's loss is its local rows' share, so report the mean
        # over ranks (one all-reduce, entered by every rank at the same log point).
        means = ctx.mean_over_ranks([loss.item(), *(v.item() for v in parts.values())])
        rec = progress.update(state.step, means[0], dict(zip(parts, means[1:])), backend.lr())
        rec["skipped"] = dict(getattr(stream, "skipped", {}))
        state.history.append(rec)
        times.lap("log")
        if ctx.report is not None:
            ctx.report(rec)
        times.lap("report")
        stop = ctx.any_rank(_signalled or storage.exists(stop_file))
        times.lap("stop_vote")
        if stop:
            save()
            progress.close()
            raise StopRequested(f"{name}: checkpointed at step {state.step} on request")
    if times.enabled and ctx.is_main:
        print(f"[{name}] step times (rank 0): {times.summary(state.step - first_step)}", file=sys.stderr, flush=True)
    progress.close()
    save()
    backend.module.eval()
    return state

