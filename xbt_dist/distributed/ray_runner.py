"""Run a stage function as a Ray Train job: N workers, each a DeepSpeed engine, one code path.

    from xbt_dist.distributed.ray_runner import run_on_ray
    from xbt_dist.train.stage1 import run_stage1
    result = run_on_ray(run_stage1, cfg)            # cfg.dist: workers, use_gpu, zero_stage, ...

The driver connects to `cfg.dist.ray_address` or `$RAY_ADDRESS` (an existing cluster: SLURM,
KubeRay, `ray start`), or starts a local Ray with the dashboard bound to 127.0.0.1. A
`TorchTrainer` starts `dist.workers` workers (gloo on CPU, NCCL on GPU); each builds a
`WorkerContext` from `ray.train.get_context()` with the DeepSpeed backend factory and calls
`stage_fn(cfg, ctx, resume=...)`. Rank 0's returned dict comes back as the result.

Before the trainer starts, `placement.check_ray_cluster` checks that `dist.workers` x
(cpus_per_worker, gpus_per_worker) fit the cluster's nodes (Ray would otherwise wait forever).

Fault tolerance: Ray's `FailureConfig(max_failures)` restarts the whole worker group after a
worker dies. Ray checkpoints are not used: the stage's own `Checkpointer` (under cfg.out_dir) is
the source of truth, so a restarted group calls the stage with `resume=True` and it continues
from `latest`. A restart is detected with per-launch marker files (a rank that finds its marker
from an earlier attempt is on attempt > 0); they live under the Ray storage path, which must be
shared by all nodes (as cfg.out_dir must).

Fatal errors: Ray Train v2's default failure policy retries every worker error until
`max_failures` is spent; it has no notion of an error no restart can fix. A stage that stops on
too much bad data (`DataBudgetExceeded`) would therefore fail again at the same sample on every
restart. So the failing rank first writes a per-launch marker (`FATAL.json` under the Ray storage
path, through fsspec), then raises; a restarted group finds the marker and returns at once
without running the stage, and the driver raises the original error and message.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from xbt_dist import storage
from xbt_dist.config import DistConfig, RunConfig
from xbt_dist.storage import is_remote

RESULT_FILE = "result.json"
FATAL_FILE = "FATAL.json"

# Driver environment variables forwarded to workers (Ray workers do not inherit the driver's env).
FORWARD_ENV_PREFIXES = ("XBT_", "DS_", "NCCL_", "GLOO_", "TORCH_", "OMP_NUM_THREADS",
                        "WANDB_", "MLFLOW_")  # trackers: API key, mode, tracking URI (rank 0 logs)


def connect_ray(dist_cfg: DistConfig, include_dashboard: bool | None = None,
                dashboard_host: str | None = None, num_cpus: int | None = None) -> bool:
    """Attach to `dist.ray_address` / `$RAY_ADDRESS`, or start a local Ray; True if we started it.

    A local Ray gets at least `workers * cpus_per_worker` CPUs so a laptop with fewer cores still
    schedules the job (oversubscribed, which is what a CPU smoke run wants). The dashboard listens
    on localhost only unless `dashboard_host` / `$XBT_RAY_DASHBOARD_HOST` says otherwise (it runs
    arbitrary jobs). It is on by default because Ray Train's placement-group cleaner asks the
    state API, which the dashboard serves, every second (without it: a warning per second);
    `include_dashboard=False` or `$XBT_RAY_DASHBOARD=0` turns it off.
    """
    import ray

    if ray.is_initialized():
        return False
    address = dist_cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    need = dist_cfg.workers * dist_cfg.cpus_per_worker
    if include_dashboard is None:
        include_dashboard = os.environ.get("XBT_RAY_DASHBOARD", "1") == "1"
    dashboard_host = dashboard_host or os.environ.get("XBT_RAY_DASHBOARD_HOST", "127.0.0.1")
    # address="local": always a fresh local Ray, never a stale /tmp/ray/ray_current_cluster.
    ray.init(address="local", num_cpus=num_cpus or max(need, os.cpu_count() or 1),
             num_gpus=(None if dist_cfg.use_gpu else 0),
             include_dashboard=bool(include_dashboard), dashboard_host=dashboard_host,
             log_to_driver=True)
    return True


def _storage_path(cfg: RunConfig, storage_path: str | None) -> str:
    if storage_path:
        return storage_path
    if is_remote(cfg.out_dir):  # Ray takes fsspec-style URLs for its own storage too
        return f"{cfg.out_dir.rstrip('/')}/ray"
    return str((Path(cfg.out_dir) / "ray").resolve())


def _json_safe(d: dict) -> dict:
    """Ray metrics must be plain data; tensors and paths become numbers and strings."""
    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.item() if v.numel() == 1 else v.tolist()
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v
    return json.loads(json.dumps({k: conv(v) for k, v in d.items()}, default=str))


def _attempt(marker_dir: str | None, rank: int) -> int:
    """0 on the first start of this rank in this launch, 1+ after Ray restarted the group.

    Only rank r writes rank r's markers, and Ray never runs two rank-r workers at once, so "the
    first free n" needs no exclusive create: it works on any fsspec storage (an object store
    has no O_EXCL), which an `out_dir: s3://...` run's Ray storage is.
    """
    if marker_dir is None:
        return 0
    n = 0
    while storage.exists(storage.join(marker_dir, f"rank{rank:05d}.attempt{n}")):
        n += 1
    storage.write_text(storage.join(marker_dir, f"rank{rank:05d}.attempt{n}"), "")
    return n


def _read_fatal(marker: str | None) -> str | None:
    """The message of a fatal error an earlier attempt of this launch recorded, or None."""
    import fsspec
    if marker is None:
        return None
    fs, path = fsspec.core.url_to_fs(marker)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)["error"]


def _write_fatal(marker: str | None, error: BaseException) -> None:
    import fsspec
    if marker is None:
        return
    fs, path = fsspec.core.url_to_fs(marker)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump({"error": str(error), "type": type(error).__name__}, f)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class ReportThrottle:
    """Decides, at a log point, whether this one goes to `ray.train.report`.

    Every rank calls `due()` at the same log points. ray.train.report is a collective that blocks
    until Ray's controller has polled the previous report (every 2 s), which throttled a fast
    stage 5x when it reported at every log point; so report at most every `interval_s`. The ranks
    agree through `any_rank` (an all-reduce), so either all of them report or none does.
    """

    def __init__(self, interval_s: float, any_rank: Callable[[bool], bool],
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.any_rank, self.clock = interval_s, any_rank, clock
        self.last = float("-inf")  # the first log point always reports

    def due(self) -> bool:
        if not self.any_rank(self.clock() - self.last >= self.interval_s):
            return False
        self.last = self.clock()
        return True


def quiet_print_patch() -> None:
    """Keep Ray Train from printing every worker print() twice (call before the trainer starts).

    Ray Train's print patch (RAY_TRAIN_ENABLE_PRINT_PATCH, on by default) replaces print() in its
    workers: the line goes to the root logger, whose console handler writes it, AND, because Ray
    wraps a worker's sys.stderr, to the original print as well. So each progress line came twice
    in the console, in `ray job logs` and in SLURM logs. Ray Train copies this variable from the
    driver to its controller and workers at `fit()`, so setting it here covers a local Ray, an
    attached cluster and a Ray job alike. A user who sets it to 1 gets Ray's behaviour back.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def _quiet_report_log() -> None:
    """Ray Train 2.60 logs "Reporting training result N: TrainingReport(...)" at INFO on every
    report through a logger named by its *file path*, outside `ray.train`, so our
    LoggingConfig(log_level="WARNING") misses it and the root logger Ray configures at INFO
    prints it. Raise that one logger to WARNING (a no-op on Ray versions without the module)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _worker_entry(config: dict) -> None:
    """Runs on every Ray Train worker."""
    _quiet_report_log()
    for k, v in config["env"].items():
        os.environ[k] = v
    # Ray Train starts workers in its own session directory; configs hold paths relative to where
    # the user ran `xbt` (runs/..., configs/...), so work from the driver's directory, which on a
    # cluster is a shared filesystem path like the out_dir.
    if Path(config["cwd"]).is_dir():
        os.chdir(config["cwd"])
    else:
        print(f"[xbt] driver directory {config['cwd']} does not exist on this node: relative paths in "
              "the config will not resolve; use absolute paths on a shared filesystem",
              file=sys.stderr, flush=True)
    cfg: RunConfig = config["cfg"]
    on_gpu = cfg.dist.use_gpu and torch.cuda.is_available()
    if not on_gpu:
        # Before anything imports deepspeed: its accelerator is fixed at import time.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray.train
    import torch.distributed as dist

    from xbt_dist.distributed.deepspeed_backend import make_deepspeed_backend
    from xbt_dist.train.context import WorkerContext, all_reduce_mean

    tctx = ray.train.get_context()
    rank, world_size = tctx.get_world_rank(), tctx.get_world_size()
    if on_gpu:
        import ray.train.torch
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    # Some torch builds leave OMP at 1 thread in Ray workers; honour cpus_per_worker instead.
    torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))

    def any_rank(flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(obj) -> list:
        out = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    throttle = ReportThrottle(cfg.dist.report_every_s, any_rank)

    def report(metrics: dict) -> None:
        if throttle.due():
            ray.train.report(_json_safe({**metrics, "rank": rank}))

    # Same seed on every rank and every restart: model init is identical across ranks (DeepSpeed
    # also broadcasts rank 0's weights) and across attempts and reruns, so runs are reproducible.
    _seed_everything(cfg.train.seed)
    attempt = _attempt(config["marker_dir"], rank)
    if attempt and rank == 0:
        print(f"[xbt] Ray restarted the worker group (attempt {attempt}): resuming from the latest "
              "checkpoint", file=sys.stderr, flush=True)
    ctx = WorkerContext(rank=rank, world_size=world_size, local_rank=tctx.get_local_rank(), device=device,
                        make_backend=make_deepspeed_backend(cfg.dist, world_size, on_gpu),
                        report=report if config["report"] else None,
                        barrier=dist.barrier, any_rank=any_rank, gather=gather,
                        mean_over_ranks=lambda xs: all_reduce_mean(xs, device, world_size))
    from xbt_dist.data.stream import DataBudgetExceeded
    from xbt_dist.train.loop import StopRequested
    fatal = _read_fatal(config.get("fatal_marker"))
    try:
        if fatal is not None:  # an earlier attempt hit an error no restart fixes: do not run again
            result = {"fatal": fatal}
        else:
            result = config["stage_fn"](cfg, ctx, resume=bool(config["resume"] or attempt > 0),
                                        **config["kwargs"])
    except StopRequested as e:
        # A requested stop (preemption) is not a failure: Ray must not restart the group, the
        # driver re-raises it so the launcher requeues the job.
        result = {"stopped": str(e)}
    except DataBudgetExceeded as e:
        _write_fatal(config.get("fatal_marker"), e)
        raise
    final = _json_safe({**dict(result or {}), "rank": rank, "world_size": world_size,
                        "attempt": attempt, "final": True})
    # Ray Train v2 hands back only metrics that come with a checkpoint, so rank 0 attaches a
    # one-file checkpoint holding the result (the stage's own checkpoints stay in cfg.out_dir).
    if rank == 0:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, RESULT_FILE).write_text(json.dumps(final))
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(final)


def _stop_handlers() -> dict:
    """The driver's SIGTERM/SIGUSR1 handlers now (the CLI's stop handlers: signal -> STOP file)."""
    import signal

    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}


def _restore_stop_handlers(saved: dict) -> None:
    """ray.init replaces the driver's SIGTERM handler with its own (`sys.exit`) and installs a
    C-level failure handler over it, so scancel/preemption would kill the driver instead of
    checkpointing. Put the handlers from before ray.init back (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in saved.items():
        if callable(handler):
            signal.signal(sig, handler)


def run_on_ray(stage_fn: Callable, cfg: RunConfig, resume: bool = False, *, name: str | None = None,
               storage_path: str | None = None, include_dashboard: bool | None = None,
               report_progress: bool = True, shutdown: bool | None = None, **kwargs: Any) -> dict:
    """Run `stage_fn(cfg, ctx, resume=..., **kwargs)` on `cfg.dist.workers` Ray Train workers.

    Returns rank 0's final dict (the stage's result plus `world_size`, `attempt`). Raises the
    worker's error (wrapped by Ray) when the job fails after `dist.max_failures` restarts.
    `shutdown`: stop a Ray we started once done (default: yes when we started it).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.dist
    saved_handlers = _stop_handlers()
    started = connect_ray(d, include_dashboard=include_dashboard)
    _restore_stop_handlers(saved_handlers)
    try:
        # Ray would wait forever for bundles that cannot be placed: fail now with the numbers.
        from xbt_dist.distributed.placement import check_ray_cluster
        check_ray_cluster(d, started_locally=started)
        resources = {"CPU": d.cpus_per_worker}
        if d.use_gpu:
            resources["GPU"] = d.gpus_per_worker
        run_name = name or f"{cfg.name}-{getattr(stage_fn, '__name__', 'stage')}-{uuid.uuid4().hex[:8]}"
        storage_url = _storage_path(cfg, storage_path)
        marker_dir = f"{storage_url}/{run_name}/attempts"
        fatal_marker = f"{_storage_path(cfg, storage_path).rstrip('/')}/{run_name}/{FATAL_FILE}"
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
        quiet_print_patch()
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config={"stage_fn": stage_fn, "cfg": cfg, "resume": resume, "kwargs": kwargs,
                               "env": env, "marker_dir": marker_dir, "report": report_progress,
                               "fatal_marker": fatal_marker,
                               "cwd": os.getcwd()},
            scaling_config=ray.train.ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu,
                                                   resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage_url,
                # WARNING: not Ray Train's INFO line per report (our progress line says it better)
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                failure_config=ray.train.FailureConfig(max_failures=d.max_failures)),
        )
        try:
            result = trainer.fit()
        except Exception as e:
            _raise_fatal(fatal_marker, e)
            raise
        if result.error is not None:
            _raise_fatal(fatal_marker, result.error)
            raise result.error
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                out = json.loads(Path(d, RESULT_FILE).read_text())
        else:
            out = dict(result.metrics or {})
        _raise_fatal(fatal_marker, None)
        if "stopped" in out:
            from xbt_dist.train.loop import StopRequested
            raise StopRequested(out["stopped"])
        return out
    finally:
        if shutdown if shutdown is not None else started:
            ray.shutdown()


def _raise_fatal(marker: str, cause: BaseException | None) -> None:
    """Re-raise, on the driver, the fatal error a worker recorded (see the module docstring)."""
    msg = _read_fatal(marker)
    if msg is not None:
        from xbt_dist.data.stream import DataBudgetExceeded
        raise DataBudgetExceeded(msg) from cause
