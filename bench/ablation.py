"""Toy-world ablation: the paper's baselines and each XBT loss term removed, over seeds.

    python -m bench.ablation --seeds 0 1 --out runs/ablation --md docs/RESULTS.md

Per seed: build the toy world, embed, pretrain phi once, then train and evaluate every variant
(the stage-1 phi and embeddings are shared, so variants differ only in stage 2). Writes a JSON of
all results, the markdown tables, and per-variant eval reports under `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench.common import TOY_FULL_TUNE_LR, link_stage1_phi
from xbt_dist.config import RunConfig
from xbt_dist.eval.ablation import ablation_table
from xbt_dist.eval.compat import verdict
from xbt_dist.eval.evaluate import run_eval
from xbt_dist.pipeline import embed_for_config, run_stage, toy_run_config
from xbt_dist.toy import ToyWorldConfig, build_toy_world
from xbt_dist.train.stage1 import run_stage1
from xbt_dist.train.stage2 import run_stage2

# name -> overrides on top of configs/toy.yaml
# Base / LoRA-only / Full-tune are the paper's (phi from scratch, old model online, no stage 1); the
# three variants after them are what those names meant here before (now renamed).
VARIANTS: dict[str, list[str]] = {
    "XBT": [],
    "Base (paper)": ["train.method=base"],
    "LoRA-only (paper)": ["train.method=lora_only"],
    "Full-tune (paper)": ["train.method=full_tune", f"train.optim.lr={TOY_FULL_TUNE_LR}"],
    "XBT, old model online": ["train.method=xbt_old_online"],
    "LoRA-only, stored targets": ["train.method=lora_only_stored"],
    "Full-tune, stage-1 phi": ["train.method=full_tune_stage1", "train.optim.lr=1e-4"],
    "XBT, synthetic targets": ["train.target_source=synthetic"],
    "XBT - image_to_old_text": ["loss.image_to_old_text=0"],
    "XBT - text_to_old_image": ["loss.text_to_old_image=0"],
    "XBT - new_new": ["loss.new_new=0"],
}


def run_seed(seed: int, out: Path, variants: list[str], overrides: list[str]) -> list[tuple[str, dict]]:
    world = build_toy_world(out / f"seed{seed}" / "toy", ToyWorldConfig(seed=seed))
    base = toy_run_config(world, out / f"seed{seed}", overrides=overrides + [f"train.seed={seed}"])
    embed_for_config(base)
    if not (Path(base.stage_dir("phi")) / "phi.pt").is_file():
        run_stage(run_stage1, base)
    results = []
    for name in variants:
        cfg = toy_run_config(world, out / f"seed{seed}", overrides=overrides + VARIANTS[name]
                             + [f"train.seed={seed}"])
        cfg = _variant_dirs(cfg, base, name)
        eval_json = Path(cfg.stage_dir("eval")) / "eval.json"
        if not eval_json.is_file():
            run_stage(run_stage2, cfg)
            run_eval(cfg)
        res = json.loads(eval_json.read_text())
        results.append((name, res))
        if name == "XBT":  # the stage-1 phi alone, read off the same eval (phi/old case)
            phi_only = copy.deepcopy(res)
            cases = phi_only["compat"]["cases"]
            cases["xbt/old"], cases["xbt/xbt"] = cases["phi/old"], {"t2i": {}, "i2t": {}}
            phi_only["compat"]["verdict"] = verdict(res["compat"]["cases"], candidate="phi")
            results.append(("phi-only (stage 1)", phi_only))
    return results


def _variant_dirs(cfg: RunConfig, base: RunConfig, name: str) -> RunConfig:
    """Each variant trains in its own dir but reads the shared stage-1 phi."""
    cfg = copy.deepcopy(cfg)
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    cfg.out_dir = f"{base.out_dir}/variants/{slug}"
    link_stage1_phi(cfg.out_dir, base.stage_dir("phi"))
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--md", help="also write the markdown tables here")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    t0 = time.perf_counter()
    per_seed = {s: run_seed(s, out, args.variants, args.set) for s in args.seeds}
    tables = []
    for s, results in per_seed.items():
        ref = results[0][1]["compat"]["cases"]["old/old"]
        tables.append(f"### Seed {s}\n\nold/old: t2i R@1 {ref['t2i']['R@1']:.3f}, R@5 {ref['t2i']['R@5']:.3f}; "
                      f"i2t R@1 {ref['i2t']['R@1']:.3f}, R@5 {ref['i2t']['R@5']:.3f}\n\n"
                      + ablation_table(results))
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version()}
    md = "\n\n".join(tables) + f"\n\nMachine: {machine}; wall {time.perf_counter() - t0:.0f} s\n"
    (out / "ablation.md").write_text(md)
    (out / "ablation.json").write_text(json.dumps(
        {"machine": machine, "seeds": {s: [{"variant": n, **r} for n, r in rs] for s, rs in per_seed.items()}},
        indent=1, default=str))
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
