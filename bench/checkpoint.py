"""Checkpoint size and save/load time of the paper run's stage-2 trainables, old layout vs new.

    python -m bench.checkpoint --out bench/results [--repeats 2] [--recipe configs/paper_b32_l14.yaml]

The model is the recipe's (ViT-L/14 new model with its adapters + phi 768->2048->2048->512),
random init on CPU: nothing downloads. One DeepSpeed ZeRO-2 engine (world size 1, gloo, CPU)
takes one optimiser step on two random images so Adam moments exist, then:

- old: what the run-state code wrote before: DeepSpeed `engine.save_checkpoint` (module state
  INCLUDING the frozen towers, plus the ZeRO optimiser partition) and a `trainable.pt`;
- new: `Checkpointer.save` of `backend.state_dict()` (trainable fp32 masters + Adam moments by
  name, scheduler, counters) and a rank file; load = `backend.load_state_dict` into the engine.

Sizes are bytes on disk; times are medians of `--repeats` on this machine's local disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import median_of, row, setup_torch, write_result

ROOT = Path(__file__).resolve().parent.parent


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _engine(recipe: str):
    from xbt_dist.config import DistConfig, load_config
    from xbt_dist.distributed.deepspeed_backend import make_deepspeed_backend
    from xbt_dist.models.clip import load_clip
    from xbt_dist.train.model import resolve_method
    from xbt_dist.train.stage2 import build_model

    cfg = resolve_method(load_config(recipe))
    cfg.new.pretrained = None  # random init: the layout, not the weights, is measured
    cfg.train.phi_init, cfg.train.target_source = "random", "precomputed"
    new = load_clip(cfg.new)
    model = build_model(cfg, new, d_old=512)
    backend = make_deepspeed_backend(DistConfig(zero_stage=2), world_size=1, on_gpu=False)(
        model, cfg.train.optim, 1000, 2)
    size = new.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(2, 3, size, size)
    tokens = new.tokenizer(["a photo", "a dog"])
    out = backend.module(images, tokens)
    loss = -(out["phi_v"] * out["phi_w"]).sum() * out["logit_scale"]
    backend.backward(loss)
    backend.step()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return backend, n_train, n_all


def bench_checkpoint(out: Path, recipe: str, repeats: int = 2) -> dict:
    from xbt_dist.train.checkpoint import Checkpointer

    backend, n_train, n_all = _engine(recipe)
    rows = []
    times: dict[str, list[float]] = {"old_save": [], "new_save": [], "new_load": [], "old_load": []}
    sizes: dict[str, int] = {}
    for i in range(repeats):
        with tempfile.TemporaryDirectory(dir=os.environ.get("XBT_BENCH_TMP")) as tmp:
            tmp = Path(tmp)
            t = time.perf_counter()  # old: the whole engine (frozen towers too) + trainable.pt
            backend.engine.save_checkpoint(str(tmp / "old" / "backend"), tag="engine", save_latest=False)
            torch.save(backend.model.trainable_state_dict(), tmp / "old" / "trainable.pt")
            times["old_save"].append(time.perf_counter() - t)
            sizes["old"] = _du(tmp / "old")
            t = time.perf_counter()
            backend.engine.load_checkpoint(str(tmp / "old" / "backend"), tag="engine")
            times["old_load"].append(time.perf_counter() - t)
            shutil.rmtree(tmp / "old")
            t = time.perf_counter()  # new: trainables + moments by name, one rank file
            ck = Checkpointer(str(tmp / "new"))
            ck.save(i + 1, backend.state_dict(), {"data": {"epoch": 0}, "step": i + 1, "samples": 0})
            times["new_save"].append(time.perf_counter() - t)
            sizes["new"] = _du(tmp / "new")
            t = time.perf_counter()
            backend.load_state_dict(ck.load().state)
            times["new_load"].append(time.perf_counter() - t)
    for layout in ("old", "new"):
        case = f"paper/{layout}"
        rows.append(row("checkpoint", case, "size", sizes[layout] / 2**20, "MiB"))
        for op in ("save", "load"):
            m = median_of(times[f"{layout}_{op}"])
            rows.append(row("checkpoint", case, f"{op} time", m["median"], "s",
                            min=m["min"], max=m["max"], n=m["n"]))
    rows.append(row("checkpoint", "paper", "trainable params", n_train, "params", total_params=n_all))
    return {"name": "checkpoint", "rows": rows,
            "config": {"recipe": recipe, "repeats": repeats, "zero_stage": 2, "world_size": 1,
                       "trainable_params": n_train, "total_params": n_all}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--recipe", default=str(ROOT / "configs" / "paper_b32_l14.yaml"))
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    setup_torch()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from xbt_testing.distributed import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        res = bench_checkpoint(Path(a.out), a.recipe, a.repeats)
    finally:
        dist.destroy_process_group()
    res["command"] = " ".join(["python -m bench.checkpoint", *(argv or sys.argv[1:])])
    write_result(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
