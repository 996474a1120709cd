"""The toy-world proof for the BLIP family: toy BLIP-architecture OLD and NEW models,
trained from scratch by ITC (`xbt_dist.toy.base_blip`), through embed -> stage 1 -> stage 2 -> eval
with the `hf_blip` backend; the compatibility cases, the Eqn-1 verdict and the on-off check.

    python -m bench.toy_blip --out runs/toy_blip --seed 0            # the toy world's default sizes
    python -m bench.toy_blip --out /tmp/tb --quick                   # a smoke run (minutes)

Writes `<out>/toy_blip.json` and `.md` (bench/common.write_result). One seed, no intervals: the proof over
seeds with bench/compare.py's statistics is `python -m bench.toy_blip_compare`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import row, setup_torch, write_result


def run(out: Path, seed: int = 0, quick: bool = False, epochs: int = 4, world_kw: dict | None = None) -> dict:
    from xbt_dist.eval.evaluate import run_eval
    from xbt_dist.pipeline import embed_for_config, run_stage, toy_run_config
    from xbt_dist.toy import ToyWorldConfig, build_toy_world
    from xbt_dist.toy.base_blip import model_ref, train_toy_blips
    from xbt_dist.train.stage1 import run_stage1
    from xbt_dist.train.stage2 import run_stage2

    t0, seconds = time.perf_counter(), {}
    kw = dict(n_train=512, n_text=2048, n_eval=128, n_zeroshot=64, per_shard=256, text_per_shard=1024,
              batch_size=64) if quick else dict(world_kw or {})
    world = build_toy_world(out / "toy", ToyWorldConfig(seed=seed, train_models=False, **kw))
    seconds["world"] = round(time.perf_counter() - t0, 1)
    t = time.perf_counter()
    base = train_toy_blips(world, out / "models", epochs=1 if quick else epochs,
                           batch_size=64 if quick else 128, seed=seed)
    seconds["base_models"] = round(time.perf_counter() - t, 1)
    overrides = ["train.max_steps=4", "train.batch_size=16", "stage1.epochs=1", "phi.hidden=64"] if quick else []
    cfg = toy_run_config(world, out, overrides=overrides + [f"train.seed={seed}"])
    cfg.old, cfg.new = model_ref(out / "models" / "toy-blip-old"), model_ref(out / "models" / "toy-blip-new")
    for name, fn in (("embed", lambda: embed_for_config(cfg)), ("phi", lambda: run_stage(run_stage1, cfg)),
                     ("train", lambda: run_stage(run_stage2, cfg))):
        t = time.perf_counter()
        fn()
        seconds[name] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    res = run_eval(cfg)
    seconds["eval"] = round(time.perf_counter() - t, 1)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    compat = res["compat"]
    rows = [row("toy_blip", case, f"{d}_R@{k}", compat["cases"][case][d][f"R@{k}"], "fraction")
            for case in ("old/old", "new/old", "phi/old", "xbt/old", "new/new", "xbt/xbt") if case in compat["cases"]
            for d in ("t2i", "i2t") for k in (1, 5, 10)]
    rows += [row("toy_blip", "time", k, v, "s") for k, v in seconds.items()]
    return {"name": "toy_blip", "rows": rows, "verdict": compat.get("verdict"), "on_off": compat.get("on_off"),
            "base_models": base, "seed": seed, "world": dict(world_kw or {}), "quick": quick, "seconds": seconds,
            "config": {"old": str(cfg.old), "new": str(cfg.new), "method": cfg.train.method},
            "notes": [f"verdict: {compat.get('verdict')}", f"on-off: {compat.get('on_off')}"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/toy_blip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-train", type=int, help="toy world training pairs (default: the toy world's 12000)")
    ap.add_argument("--n-text", type=int, help="stage-1 captions (default 60000)")
    ap.add_argument("--n-eval", type=int, help="test gallery images (default 1000)")
    a = ap.parse_args(argv)
    setup_torch()
    world_kw = {k: v for k, v in (("n_train", a.n_train), ("n_text", a.n_text), ("n_eval", a.n_eval)) if v}
    result = run(Path(a.out), a.seed, a.quick, a.epochs, world_kw)
    write_result(Path(a.out), result)
    print(result["notes"])


if __name__ == "__main__":
    main()
