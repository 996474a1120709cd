"""`xbt embed` as a distributed job: a queue of small shard tasks over the Ray cluster.

Embedding is embarrassingly parallel over shards, so this uses plain Ray tasks rather than a
Ray Train worker group (no process group, no collective to hang on). The pending shards (those
without a complete output) are cut into many small tasks of `shards_per_task` shards; the driver
keeps at most `max_in_flight` of them submitted and hands out the next as each finishes, so fast
nodes take more shards and the slowest node no longer sets the finish time (the old job cut the
work into exactly `dist.workers` static parts). Largest tasks go first (shard sizes from
`sizes.json` when present), so the tail is short.

A task reserves what it uses: `num_cpus = dist.cpus_per_worker` = 1 forward thread +
`decode_workers` DataLoader processes (default cpus_per_worker - 1), and `dist.gpus_per_worker`
GPUs with `dist.use_gpu` (the forward then runs under bf16 autocast). A worker process keeps its
loaded encoders between tasks, so a model is loaded once per Ray worker, not once per task.

Failures: a task that raises or whose node dies is retried (`retries`, Ray's own task retry);
its retry skips the shards the first attempt finished, since every output shard is written
atomically and holds the input's keys in order. A task that still fails is reported by shard
name after the others finish, and a rerun redoes only the missing shards. The driver writes the
manifest once every shard is present.

    from xbt_dist.distributed.embed_job import embed_on_ray
    embed_on_ray("shards/text", "emb/text", {"old": cfg.old, "new": cfg.new},
                 ["text_old", "text_new"], dist_cfg=cfg.dist)

Test hook: `XBT_EMBED_FAULT_SHARD=<shard name>` (read by the driver, passed to the tasks) makes
the first attempt that reaches that shard raise once (a marker file in the output dir records it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from xbt_dist.config import DistConfig

FAULT_ENV = "XBT_EMBED_FAULT_SHARD"
_ENCODERS: dict[tuple, Any] = {}  # per Ray worker process: loaded models, reused by later tasks


def task_groups(shards: Sequence[str], per_task: int, sizes: dict[str, int] | None = None
                ) -> list[list[str]]:
    """Consecutive groups of `per_task` shards, the groups ordered largest first."""
    from xbt_dist.data.shards import shard_name

    sizes = sizes or {}
    weight = {s: sizes.get(shard_name(s) + ".tar", sizes.get(shard_name(s), 1)) for s in shards}
    groups = [list(shards[i:i + per_task]) for i in range(0, len(shards), max(1, per_task))]
    return sorted(groups, key=lambda g: -sum(weight[s] for s in g))


def _needed_encoders(encoders: dict[str, Any], fields: Sequence[str], device: str) -> dict[str, Any]:
    """The encoders the fields use, ModelRefs loaded once per process (cached across tasks)."""
    from xbt_dist.data.embed import Encoder

    out = {}
    for f in fields:
        key = f if f in encoders else f.split("_", 1)[1]
        value = encoders.get(key)
        if type(value).__name__ == "ModelRef":
            cache_key = (repr(value), device)
            if cache_key not in _ENCODERS:
                _ENCODERS[cache_key] = Encoder.from_ref(value, device=device)
            value = _ENCODERS[cache_key]
        if value is not None:
            out[key] = value
    return out


def _fault_hook(out_dir: str, fault_shard: str | None) -> Callable[[str], None] | None:
    if not fault_shard:
        return None

    def hook(name: str) -> None:
        marker = Path(out_dir) / f".fault_{name}"
        if name == fault_shard and not marker.exists():
            marker.write_text(str(os.getpid()))
            raise RuntimeError(f"injected fault before shard {name} ({FAULT_ENV})")
    return hook


def _embed_task(src: str, out_dir: str, encoders: dict[str, Any], fields: list[str], batch_size: int,
                shards: list[str], device: str, cpus: int, decode_workers: int,
                fault_shard: str | None = None) -> dict:
    """Body of one Ray task (also callable in-process): embed `shards`, skipping finished ones."""
    import socket

    import torch

    from xbt_dist.data.embed import embed_shards

    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cpus - decode_workers))  # the decode workers have the other CPUs
    try:
        res = embed_shards(src, out_dir, _needed_encoders(encoders, fields, device), fields,
                           batch_size=batch_size, shards=shards, device=device, manifest=False,
                           progress=None, decode_workers=decode_workers,
                           before_shard=_fault_hook(out_dir, fault_shard))
    finally:
        torch.set_num_threads(threads)
    return {**res, "shards": list(shards), "host": socket.gethostname(), "pid": os.getpid(),
            "wall_s": time.time() - t0}


def pending_shards(src: str, out_dir: str, fields: Sequence[str]) -> list[str]:
    """Input shards whose output is missing or lacks one of `fields`."""
    from xbt_dist.data.embed import _shard_done
    from xbt_dist.data.shards import list_shards, shard_name

    out = Path(out_dir)
    return [s for s in list_shards(src) if not _shard_done(out, shard_name(s), list(fields))]


def embed_on_ray(src: str, out_dir: str, encoders: dict[str, Any], fields: Sequence[str],
                 batch_size: int = 64, dist_cfg: DistConfig | None = None, shards_per_task: int = 1,
                 decode_workers: int | None = None, retries: int = 3, max_in_flight: int | None = None,
                 include_dashboard: bool | None = None,
                 progress: Callable[[str], None] | None = lambda s: print(s, file=sys.stderr)) -> dict:
    """Embed `fields` of every shard of `src` into `out_dir` with a queue of Ray tasks.

    `encoders` as for `embed_shards`, but picklable: ModelRefs (each worker loads the model on its
    CPU/GPU once) or importable functions. Returns the summed counts, one report per task, the
    shards that failed after `retries`, and whether the set is complete (then `manifest.json` is
    written). Raises after all tasks ended if some shards failed, naming them.
    """
    import ray

    from xbt_dist.data.embed import describe_encoders, embed_shards, record_models
    from xbt_dist.data.shards import shard_name, shard_sizes
    from xbt_dist.distributed.ray_runner import connect_ray

    d = dist_cfg or DistConfig(backend="ray")
    fields = list(fields)
    cpus = max(1, d.cpus_per_worker)
    decode = max(0, cpus - 1) if decode_workers is None else decode_workers
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    todo = pending_shards(src, out_dir, fields)
    if todo:    # once, before any task: the tasks then only find their own models recorded
        record_models(out_dir, describe_encoders(encoders))
    started = connect_ray(d, include_dashboard=include_dashboard)
    reports: list[dict] = []
    failed: dict[str, str] = {}
    t0 = time.time()
    try:
        if todo:
            try:
                sizes = shard_sizes(src)
            except Exception:  # noqa: BLE001 - sizes are only a scheduling hint
                sizes = {}
            queue = task_groups(todo, shards_per_task, sizes)
            n_tasks = len(queue)
            task = ray.remote(_embed_task).options(
                num_cpus=cpus, num_gpus=d.gpus_per_worker if d.use_gpu else 0,
                max_retries=retries, retry_exceptions=retries > 0)
            device = "cuda" if d.use_gpu else "cpu"
            fault = os.environ.get(FAULT_ENV)
            # enough submitted to keep every slot busy, not 40k task specs at once on the GCS
            limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1) // cpus))
            inflight: dict[Any, list[str]] = {}
            failed_tasks = 0
            while queue or inflight:
                while queue and len(inflight) < limit:
                    group = queue.pop(0)
                    ref = task.remote(src, out_dir, encoders, fields, batch_size, group, device, cpus,
                                      decode, fault)
                    inflight[ref] = group
                done, _ = ray.wait(list(inflight), num_returns=1)
                group = inflight.pop(done[0])
                try:
                    reports.append(ray.get(done[0]))
                except Exception as e:  # noqa: BLE001 - retries are spent: record, go on
                    failed_tasks += 1
                    for s in group:
                        failed[shard_name(s)] = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
                if progress is not None:
                    n = sum(r["samples"] for r in reports)
                    progress(f"[embed] tasks {len(reports) + failed_tasks}/{n_tasks} | "
                             f"{n} samples, {n / max(time.time() - t0, 1e-9):.1f} samples/s | "
                             f"failed shards {len(failed)}")
    finally:
        if started:
            ray.shutdown()
    # All shards present -> this call only checks them and writes the manifest (no model loads).
    final = embed_shards(src, out_dir, encoders, fields, batch_size=batch_size, shards=[], progress=None)
    result = {"written": sum(r["written"] for r in reports), "samples": sum(r["samples"] for r in reports),
              "pending_before": len(todo), "tasks": reports, "failed": failed,
              "complete": final["complete"], "wall_s": time.time() - t0}
    if failed:
        raise RuntimeError(f"{len(failed)} shards failed after {retries} retries each: "
                           + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:10])
                           + f". The other {len(todo) - len(failed)} shards are written; rerun the "
                           "same command to retry only the missing ones")
    return result
