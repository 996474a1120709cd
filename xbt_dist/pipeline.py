"""Stage orchestration: run a stage locally or on Ray, the config-driven embed step, the demo.

`run_stage` is the single switch between "this process" and "Ray Train workers with DeepSpeed"
(`dist.backend`); the stage functions are the same either way. `run_demo` chains the toy world,
embedding, stage 1, stage 2 and evaluation, skipping every step whose inputs and config are
unchanged since it last finished (a `cache.json` per step holds the digest).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Callable

from xbt_dist.artifacts import atomic_write_text, config_digest
from xbt_dist.config import RECIPE_DIR, ModelRef, RunConfig, dump_config, load_config, to_dict, with_fields

CONFIG_DIR = RECIPE_DIR  # the shipped recipes (package data); old name kept for bench/


def run_stage(stage_fn: Callable, cfg: RunConfig, resume: bool = False):
    """Run `stage_fn(cfg, ctx, resume)` here (dist.backend=local) or on Ray workers (ray)."""
    if cfg.dist.backend == "ray":
        from xbt_dist.distributed.ray_runner import run_on_ray  # Ray/DeepSpeed only when asked for
        return run_on_ray(stage_fn, cfg, resume=resume)
    return stage_fn(cfg, None, resume)


def embed_for_config(cfg: RunConfig, batch_size: int = 256) -> dict:
    """Precompute what the config reads from embedding shards and does not have yet.

    - stage-1 corpus: `text_new`, `text_old` of `stage1.text_shards` -> `stage1.embeddings`
    - stage-2 targets: `image_old`, `text_old` of `train.train_shards` -> `train.targets`
      (what a retrieval system already stores for its gallery; the old model runs once, here)
    """
    jobs = []
    if cfg.stage1.source == "embeddings" and cfg.stage1.embeddings and cfg.stage1.text_shards:
        jobs.append((cfg.stage1.text_shards, cfg.stage1.embeddings, ["text_new", "text_old"]))
    if cfg.train.target_source == "precomputed" and cfg.train.targets and cfg.train.train_shards:
        jobs.append((cfg.train.train_shards, cfg.train.targets, ["image_old", "text_old"]))
    if not jobs:
        raise ValueError("nothing to embed: set stage1.text_shards + stage1.embeddings and/or "
                         "train.train_shards + train.targets")
    if cfg.dist.backend == "ray":
        from xbt_dist.distributed.embed_job import embed_on_ray
        return {out: embed_on_ray(src, out, {"old": cfg.old, "new": cfg.new}, fields, batch_size, cfg.dist)
                for src, out, fields in jobs}
    from xbt_dist.data.embed import embed_shards
    return {out: embed_shards(src, out, {"old": cfg.old, "new": cfg.new}, fields, batch_size,
                              progress=lambda s: print(s, file=sys.stderr))
            for src, out, fields in jobs}


# -- demo ------------------------------------------------------------------------------------

def _cached(step_dir: Path, key: dict) -> bool:
    f = step_dir / "cache.json"
    return f.is_file() and json.loads(f.read_text()).get("digest") == config_digest(key)


def _mark(step_dir: Path, key: dict) -> None:
    atomic_write_text(step_dir / "cache.json", json.dumps({"digest": config_digest(key)}) + "\n")


def toy_run_config(world: dict, out: Path, recipe: str | Path | None = None,
                   overrides: list[str] | None = None, fields: dict | None = None) -> RunConfig:
    """The toy recipe with the toy world's paths filled in (and typed `fields`, e.g. CLI flags)."""
    cfg = load_config(recipe or CONFIG_DIR / "toy.yaml", overrides)
    paths = {"out_dir": str(out / "run"),
             "old": to_dict(ModelRef(world["old_arch"], world["old_checkpoint"], world["models_dir"])),
             "new": to_dict(ModelRef(world["new_arch"], world["new_checkpoint"], world["models_dir"])),
             "stage1.text_shards": world["text"], "stage1.embeddings": str(out / "emb" / "text"),
             "train.train_shards": world["train"], "train.targets": str(out / "emb" / "train"),
             "eval.eval_shards": world["eval"], "eval.val_shards": world.get("val"),
             "eval.zeroshot_shards": world["zeroshot"]}
    return with_fields(cfg, {**paths, **(fields or {})})


def run_demo(out: str | Path = "runs/demo", seed: int = 0, overrides: list[str] | None = None,
             recipe: str | Path | None = None, quick: bool = False, fields: dict | None = None) -> dict:
    """Toy world -> embed -> stage 1 -> stage 2 -> eval; returns the eval result.

    `overrides` are `--set` strings; `fields` typed `section.key` values (the demo's flags)."""
    from xbt_dist.eval.evaluate import run_eval
    from xbt_dist.toy import ToyWorldConfig, build_toy_world
    from xbt_dist.train.stage1 import run_stage1
    from xbt_dist.train.stage2 import run_stage2

    out = Path(out)
    t0 = time.perf_counter()
    toy_cfg = ToyWorldConfig(seed=seed)
    if quick:  # a world of a few hundred samples and one-epoch base models: a smoke run
        toy_cfg = ToyWorldConfig(seed=seed, n_train=256, n_text=1024, n_eval=64, n_zeroshot=64,
                                 per_shard=128, text_per_shard=512, old_epochs=1, new_epochs=1,
                                 batch_size=64)
    world = build_toy_world(out / "toy", toy_cfg)
    cfg = toy_run_config(world, out, recipe, overrides, fields)
    if quick:
        cfg = _quick(cfg)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.out_dir) / "config.yaml", dump_config(cfg))
    d = to_dict(cfg)
    models = {"old": d["old"], "new": d["new"], "world": toy_cfg}
    steps = [
        ("embed", out / "emb", {**models, "s1": d["stage1"], "t": d["train"]["train_shards"]},
         lambda: embed_for_config(cfg)),
        ("phi", Path(cfg.stage_dir("phi")), {**models, "phi": d["phi"], "s1": d["stage1"]},
         lambda: run_stage(run_stage1, cfg)),
        ("train", Path(cfg.stage_dir("train")),
         {**models, "phi": d["phi"], "s1": d["stage1"], "adapters": d["adapters"],
          "loss": d["loss"], "train": d["train"], "dist": d["dist"]},
         lambda: run_stage(run_stage2, cfg)),
    ]
    timings = {}
    for name, step_dir, key, fn in steps:
        if _cached(step_dir, key):
            print(f"[demo] {name}: up to date, skipped", file=sys.stderr)
            continue
        ts = time.perf_counter()
        print(f"[demo] {name} ...", file=sys.stderr)
        fn()
        step_dir.mkdir(parents=True, exist_ok=True)
        _mark(step_dir, key)
        timings[name] = round(time.perf_counter() - ts, 1)
    result = run_eval(cfg)
    result["timings_s"] = {**timings, "total": round(time.perf_counter() - t0, 1)}
    result["config"] = str(Path(cfg.out_dir) / "config.yaml")
    return result


def _quick(cfg: RunConfig) -> RunConfig:
    """A seconds-long variant for smoke tests: few steps, small batches."""
    cfg = copy.deepcopy(cfg)
    cfg.stage1.epochs, cfg.stage1.batch_size, cfg.stage1.log_every = 1.0, 64, 2
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.log_every = 4, 16, 2
    cfg.phi.hidden = 64
    cfg.eval.tsne_points = 40
    return cfg
