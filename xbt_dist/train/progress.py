"""Progress reporting: a console line (loss, samples/s, ETA), TensorBoard scalars and trackers.

Every log point's record goes, under the same names (`<stage>/<metric>`), to TensorBoard and to
the experiment trackers the run turned on (W&B, MLflow: `xbt_dist.train.tracking`), on rank 0.

The loss it is given is the global-batch loss: the training loop averages each rank's local
InfoNCE share over ranks (`WorkerContext.mean_over_ranks`) before calling `update`, so rank 0's
line and history report the whole cluster, not its own rows.
Throughput is measured between log points, so start-up cost (model load, Ray start) does not
dilute it. The global rate is the per-worker rate times the world size, which holds because every
worker processes the same local batch size per step.
"""

from __future__ import annotations

import resource
import sys
import time


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux: the process high-water mark, i.e. what the job must be given.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_rate(history: list[dict]) -> float | None:
    """Mean global samples/s over log windows, without the first (warm-up: allocations, first batches)."""
    rates = [h["samples_per_s"] for h in history[1:]] or [h["samples_per_s"] for h in history]
    return sum(rates) / len(rates) if rates else None


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    def __init__(self, name: str, total_steps: int, local_batch: int, world_size: int = 1,
                 rank: int = 0, log_every: int = 10, tb_dir: str | None = None,
                 trackers: list | None = None):
        self.name, self.total = name, total_steps
        self.local_batch, self.world_size, self.rank = local_batch, world_size, rank
        self.log_every = max(1, log_every)
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = 0
        self.history: list[dict] = []
        self.writer = None
        self.trackers = list(trackers or []) if rank == 0 else []
        if tb_dir and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(tb_dir)
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def due(self, step: int) -> bool:
        """Is `step` (1-based) a log point?"""
        return step % self.log_every == 0 or step == self.total

    def update(self, step: int, loss: float, parts: dict[str, float] | None = None,
               lr: float | None = None) -> dict:
        """Record a log point and print the progress line (rank 0)."""
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        worker_sps = (step - self.step_last) * self.local_batch / dt
        global_sps = worker_sps * self.world_size
        elapsed = now - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        rec = {"step": step, "loss": float(loss), "samples_per_s": global_sps,
               "worker_samples_per_s": worker_sps, "elapsed_s": elapsed, "eta_s": eta,
               **({"lr": lr} if lr is not None else {}),
               **{f"loss/{k}": float(v) for k, v in (parts or {}).items()}}
        self.history.append(rec)
        self.t_last, self.step_last = now, step
        if self.rank == 0:
            terms = " ".join(f"{k}={float(v):.3f}" for k, v in (parts or {}).items())
            print(f"[{self.name}] step {step}/{self.total} loss {loss:.4f} {terms} | "
                  f"{global_sps:.1f} samples/s ({worker_sps:.1f}/worker x{self.world_size}) | "
                  f"ETA {_fmt_eta(eta)}", file=sys.stderr, flush=True)
            scalars = {f"{self.name}/{k}": v for k, v in rec.items() if k != "step"}
            if self.writer is not None:
                for k, v in scalars.items():
                    self.writer.add_scalar(k, v, step)
            for tracker in self.trackers:
                tracker.log(scalars, step)
        return rec

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
