"""Scaling from 1 to N Ray Train workers (DeepSpeed ZeRO-2 engines), same global batch.

    python -m bench scaling --out bench/results                 # stage 1, 1 and 2 workers
    python -m bench scaling --stage stage2 --workers 1 2 4      # more on bigger machines

Every run uses `run_stage` with `dist.backend=ray`, so it is exactly what `xbt pretrain-phi` /
`xbt train` do on a cluster. The machine's cores are split evenly (`dist.cpus_per_worker =
cores // workers`), so 1 worker x 2 cores vs 2 workers x 1 core is a strong-scaling test of the
distribution overhead (gloo all-gather of features + gradient all-reduce), not of added hardware.
A local (no Ray) run at the same config gives the Ray/DeepSpeed overhead at one worker.
Samples/s is the stage's steady-state global rate (first log window dropped).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import median_of, row
from bench.stage1 import stage1_config
from bench.stage2 import stage2_config
from bench.world import get_world, random_targets, random_text_embeddings
from xbt_dist.pipeline import run_stage
from xbt_dist.train.stage1 import run_stage1
from xbt_dist.train.stage2 import run_stage2


def _config(stage: str, out: Path, run: str, world: dict, workers: int, backend: str, steps: int):
    # Absolute paths: Ray workers do not run in the driver's working directory.
    out = out.resolve()
    if stage == "stage1":
        batch, n = 512, steps * 512
        data = random_text_embeddings(out / "data" / f"s1-768-512-{n}", n, 768, 512)
        cfg = stage1_config(out / "runs" / run, "embeddings", data, 2048, batch, steps, n, 4, world)
    else:
        targets = random_targets(world["train"], out / "data" / "targets-toy", 64)
        cfg = stage2_config(out / "runs" / run, world, "toy", "xbt", 64, steps, 2, targets)
    cfg.dist.backend, cfg.dist.workers, cfg.dist.zero_stage = backend, workers, 2
    cfg.dist.cpus_per_worker = max(1, (os.cpu_count() or 1) // workers)
    return cfg


def bench_scaling(out: str | Path, stage: str = "stage1", workers: tuple[int, ...] = (1, 2),
                  repeats: int = 1, steps: int = 16, toy_root=None) -> dict:
    out = Path(out)
    world = get_world(out, **({"toy_root": toy_root} if toy_root is not None else {}))
    fn = run_stage1 if stage == "stage1" else run_stage2
    # label -> (backend, workers)
    variants = {"local (no Ray), 1 worker": ("local", 1),
                **{f"ray+deepspeed ZeRO-2, {w} worker{'s' if w > 1 else ''}": ("ray", w) for w in workers}}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    errors: dict[str, str] = {}
    walls: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for label, (backend, w) in variants.items():
            if label in errors:
                continue
            cfg = _config(stage, out, f"scaling-{stage}-{backend}-{w}-{r}", world, w, backend, steps)
            t = time.perf_counter()
            try:
                res = run_stage(fn, cfg)
            except Exception as e:  # report the failure as a row instead of losing the other rows
                lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [""]
                errors[label] = f"{type(e).__name__}: {' '.join(lines[-1].split())[:200]}"
                continue
            walls[label].append(time.perf_counter() - t)
            rates[label].append(res["samples_per_s"])
    rows = []
    base = median_of(rates.get("ray+deepspeed ZeRO-2, 1 worker", []))["median"]
    local = median_of(rates["local (no Ray), 1 worker"])["median"]
    for label, (backend, w) in variants.items():
        m = median_of(rates[label])
        if label in errors:
            rows.append(row("scaling", f"{stage}: {label}", "samples/s", None, "failed: " + errors[label]))
            continue
        rows.append(row("scaling", f"{stage}: {label}", "samples/s", m["median"], "samples/s",
                        min=m["min"], max=m["max"], n=m["n"]))
        rows.append(row("scaling", f"{stage}: {label}", "job wall time incl. start-up",
                        median_of(walls[label])["median"], "s"))
        if backend == "ray" and base and m["median"]:
            rows.append(row("scaling", f"{stage}: {label}", "speed-up vs 1 Ray worker",
                            m["median"] / base, f"x (same {os.cpu_count()} cores split {w} ways)"))
    if base and local:
        rows.append(row("scaling", f"{stage}: ray+deepspeed 1 worker", "step time ratio vs local",
                        local / base, "x (Ray/DeepSpeed overhead at 1 worker)"))
    return {"name": f"scaling_{stage}" if stage != "stage1" else "scaling", "rows": rows,
            "details": {"rates": rates, "walls": walls, "errors": errors},
            "config": {"stage": stage, "workers": list(workers), "repeats": repeats, "steps": steps,
                       "zero_stage": 2, "cores": os.cpu_count()},
            "notes": ["global batch fixed across worker counts (512 for stage 1, 64 for stage 2); "
                      "the cores are split between workers, so ideal speed-up is 1.0x here and "
                      "anything below is distribution overhead."]}
