"""`xbt embed` as a distributed job: input shards spread over Ray tasks, resumable per shard.

Embedding is embarrassingly parallel over shards, so this uses plain Ray tasks rather than a
Ray Train worker group (no process group, no collective to hang on): each task loads the
encoders once and calls the single-process `xbt_dist.data.embed.embed_shards(..., shards=subset)`
on its share. Every output shard `X.npz` is written atomically next to its input `X.tar` and
holds the input's keys in order, so outputs are aligned by key whoever wrote them; shards already
written are skipped, so a rerun (or a Ray task retry after a lost node, `dist.max_failures`)
only does what is missing. The driver writes the manifest once every shard is present.

    from xbt_dist.dist.embed_job import embed_on_ray
    embed_on_ray("shards/text", "emb/text", {"old": cfg.old, "new": cfg.new},
                 ["text_old", "text_new"], dist_cfg=cfg.dist)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from xbt_dist.config import DistConfig


def split_shards(shards: Sequence[str], parts: int, sizes: dict[str, int] | None = None) -> list[list[str]]:
    """Split shards into `parts` lists of similar total size (largest first onto the lightest).

    Without sizes every shard counts as 1 (round robin). Order inside a part is the canonical
    (sorted) order, so progress lines read naturally. Empty parts are dropped.
    """
    from xbt_dist.data.shards import shard_name

    sizes = sizes or {}
    weight = {s: sizes.get(shard_name(s) + ".tar", sizes.get(shard_name(s), 1)) for s in shards}
    bins: list[list[str]] = [[] for _ in range(max(1, parts))]
    load = [0] * len(bins)
    for s in sorted(shards, key=lambda s: -weight[s]):
        i = load.index(min(load))
        bins[i].append(s)
        load[i] += weight[s]
    order = {s: i for i, s in enumerate(shards)}
    return [sorted(b, key=order.__getitem__) for b in bins if b]


def _embed_subset(src: str, out_dir: str, encoders: dict[str, Any], fields: list[str], batch_size: int,
                  shards: list[str], device: str) -> dict:
    """Body of one Ray task (also callable in-process)."""
    import os
    import socket

    from xbt_dist.data.embed import embed_shards

    t0 = time.time()
    res = embed_shards(src, out_dir, encoders, fields, batch_size=batch_size, shards=shards,
                       device=device, manifest=False)
    return {**res, "shards": len(shards), "host": socket.gethostname(), "pid": os.getpid(),
            "wall_s": time.time() - t0}


def pending_shards(src: str, out_dir: str, fields: Sequence[str]) -> list[str]:
    """Input shards whose output is missing or lacks one of `fields`."""
    from xbt_dist.data.embed import _shard_done
    from xbt_dist.data.shards import list_shards, shard_name

    out = Path(out_dir)
    return [s for s in list_shards(src) if not _shard_done(out, shard_name(s), list(fields))]


def embed_on_ray(src: str, out_dir: str, encoders: dict[str, Any], fields: Sequence[str],
                 batch_size: int = 64, dist_cfg: DistConfig | None = None, tasks: int | None = None,
                 include_dashboard: bool | None = None) -> dict:
    """Embed `fields` of every shard of `src` into `out_dir` with `dist.workers` Ray tasks.

    `encoders` as for `embed_shards`, but picklable: ModelRefs (each task loads the model on its
    CPU/GPU) or importable functions. Returns the summed counts, per-task reports and whether the
    set is complete (then `manifest.json` is written).
    """
    import ray

    from xbt_dist.data.embed import embed_shards
    from xbt_dist.data.shards import shard_sizes
    from xbt_dist.dist.ray_runner import connect_ray

    d = dist_cfg or DistConfig(backend="ray")
    fields = list(fields)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    todo = pending_shards(src, out_dir, fields)
    started = connect_ray(d, include_dashboard=include_dashboard)
    reports: list[dict] = []
    try:
        if todo:
            try:
                sizes = shard_sizes(src)
            except Exception:  # noqa: BLE001 - sizes are only a balancing hint
                sizes = {}
            parts = split_shards(todo, tasks or d.workers, sizes)
            task = ray.remote(_embed_subset).options(
                num_cpus=d.cpus_per_worker, num_gpus=d.gpus_per_worker if d.use_gpu else 0,
                # a retried task skips the shards its first attempt finished
                max_retries=d.max_failures, retry_exceptions=d.max_failures > 0)
            device = "cuda" if d.use_gpu else "cpu"
            refs = [task.remote(src, out_dir, encoders, fields, batch_size, part, device) for part in parts]
            reports = ray.get(refs)
    finally:
        if started:
            ray.shutdown()
    # All shards present -> this call only checks them and writes the manifest (no model loads).
    final = embed_shards(src, out_dir, encoders, fields, batch_size=batch_size, shards=[], progress=None)
    return {"written": sum(r["written"] for r in reports), "samples": sum(r["samples"] for r in reports),
            "pending_before": len(todo), "tasks": reports, "complete": final["complete"]}
