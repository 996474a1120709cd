"""The toy-world proof for the BLIP family, with the CLIP proof's statistics (bench/compare.py).

    python -m bench.toy_blip_compare --out runs/toy_blip_cmp --seeds 0 1 2 \\
        --n-train 6000 --n-text 20000 --n-eval 1000 --n-val 500 --epochs 6

One toy world; toy BLIP-architecture OLD and NEW (`xbt_dist.toy.base_blip`, trained from scratch by
ITC, once, shared by every seed: the two trainings run side by side in two one-thread processes,
which on the shared 2-core machine is faster than one after the other on two threads); then, per
training seed, stage-1 phi and stage-2 XBT through the `hf_blip` backend, scored against the OLD
gallery of the validation and the test split by `bench.compare.run` (recalls mean +- std over seeds,
paired bootstrap intervals of xbt/old - old/old, flip rates, the cheap baselines). Adds the base
models' own new/new recalls and, with `--on-off`, the adapters-off == untouched-BLIP check of
`xbt eval` on seed 0. Writes `<out>/compare.{json,md}` and `<out>/toy_blip_compare.{json,md}`.

`--methods xbt base` also trains the paper's Base (XBT's trainables, phi from scratch, the OLD model
run online) per seed, scored the same way and against XBT pairwise. A rerun on the same `--out`
reuses every finished stage, so adding a method to a finished run trains only that method.

A variant of stage 2 (`--set ...`) on the same world can take OLD and NEW from an earlier run with
`--base-from <its --out>` instead of training them again; they are copied and checked against this
run's world and base-model recipe.

`--bases-only` stops after OLD and NEW: it scores them on the validation gallery alone (old/old,
new/new, NEW's lead with paired intervals; `<out>/bases.{json,md}`), so that a world and its
base-model recipe can be chosen on how far NEW leads OLD before anything about XBT on it is seen.
A later full run on the same `--out` reuses the models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from bench.common import setup_torch


def _log(msg: str) -> None:
    print(f"[toy_blip_compare] {msg}", file=sys.stderr, flush=True)


def _train_role(world: dict, models: str, role: str, epochs: int, batch_size: int, seed: int) -> dict:
    """One base model (`role`) on one thread, its log in models/train_<role>.log."""
    import contextlib

    from xbt_dist.toy.base_blip import train_toy_blips
    with open(Path(models) / f"train_{role}.log", "a") as f, contextlib.redirect_stdout(f):
        return train_toy_blips(world, models, epochs=epochs, batch_size=batch_size, seed=seed,
                               roles=(role,), threads=1)[role]


def copy_base_models(src: Path, models: Path) -> None:
    """`--base-from`: copy an earlier run's finished OLD and NEW into `models` (absent ones only), so
    a variant of stage 2 does not retrain them (28 min idle for 20 epochs on 8,000 pairs). A copy, not a
    link: nothing this run does can touch the earlier run. `train_toy_blips` then checks that they were
    trained on this world's split with the asked recipe, and raises if not."""
    import shutil
    for role in ("old", "new"):
        s, d = src / f"toy-blip-{role}", models / f"toy-blip-{role}"
        if not (s / "train.json").is_file():
            raise ValueError(f"--base-from: {s} holds no finished toy BLIP (no train.json); pass the --out "
                             "of a run whose base models finished")
        if d.exists():
            continue
        tmp = d.with_name(d.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(s, tmp)
        tmp.rename(d)
        _log(f"{role}: copied from {s}")


def train_bases(world: dict, models: Path, epochs: dict[str, int], batch_size: int, seed: int) -> dict:
    models.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as ex:
        futs = {r: ex.submit(_train_role, world, str(models), r, epochs[r], batch_size, seed) for r in ("old", "new")}
        return {r: f.result() for r, f in futs.items()}


def _seed_worker(cfg, seed: int, out: str, methods: list[str]) -> int:
    """One training seed's stage 1 + each method's stage 2 and gallery views, on one thread (what
    compare.run reuses)."""
    import contextlib

    from bench import compare
    torch.set_num_threads(1)
    with open(Path(out) / f"seed{seed}.log", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        c = compare.seed_config(cfg, seed, Path(out))
        runs = compare.ensure_trained(c, methods)
        for split in compare.SPLITS:
            for run in runs.values():
                compare.gallery(run, split)
    return seed


def train_seeds_parallel(cfg, seeds: list[int], out: Path, methods: list[str]) -> None:
    """Every seed in its own one-thread process. On the shared, oversubscribed 2-core machine (load ~7)
    torch's two-thread kernels mostly wait on each other: stage 2 of one seed on two threads ran at
    20 samples/s, three one-thread seed processes minutes later at 45-62 samples/s each (an
    observation under a changing load, not a benchmark)."""
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(len(seeds), mp_context=get_context("spawn")) as ex:
        for f in [ex.submit(_seed_worker, cfg, s, str(out), methods) for s in seeds]:
            _log(f"seed {f.result()} trained")


def _views(cfg, out: Path, seed: int, split: str, method: str = "xbt") -> dict:
    """A seed's gallery views of a split for one method's run: bench.compare's cache (computed once,
    by the seed worker)."""
    from bench import compare
    return compare.gallery(compare.method_config(compare.seed_config(cfg, seed, out), method), split)


def xbt_only(cfg, out: Path, seeds: list[int], world_seed: int, n_boot: int, command: str, t0: float,
             methods: tuple[str, ...] = ("xbt",)) -> dict:
    """compare.run's statistics for old/old, new/old, phi/old and each trained method's query/old
    only, from the gallery views the seed workers cached (no cheap baselines, no per-query timing:
    minutes less on the loaded machine)."""
    from bench import compare
    from xbt_dist.eval import stats
    per_seed = []
    for seed in seeds:
        ranks = {}
        for split in compare.SPLITS:
            gs = {m: _views(cfg, out, seed, split, m) for m in methods}   # each loaded once
            v, c2i = gs["xbt"]["views"], gs["xbt"]["c2i"]
            ranks[split] = {name: stats.per_query_ranks(v[q], v["old"], c2i)
                            for name, q in (("old/old", "old"), ("new/old", "new"), ("phi", "phi"))}
            for m, g in gs.items():       # each method's adapted query view ("xbt") vs the OLD gallery
                ranks[split][m] = stats.per_query_ranks(g["views"]["xbt"], v["old"], c2i)
            ranks[split]["_c2i"] = c2i
        per_seed.append({"seed": seed, "ranks": ranks, "info": {}})
    summary = compare.summarize(per_seed, n_boot=n_boot)
    meta = {"seeds": seeds, "world_seed": world_seed, "methods": list(methods), "n_boot": n_boot, "alpha": None,
            "wall_s": time.perf_counter() - t0, "command": command, "baselines": False}
    return {"summary": summary, "meta": meta, "markdown": compare.markdown(summary, meta)}


def _recalls(views: dict, c2i, ks=(1, 5, 10)) -> tuple[dict, dict]:
    """old/old and new/new recalls (same model for query and gallery), and the per-query ranks."""
    from xbt_dist.eval import stats
    res, ranks = {}, {}
    for v in ("old", "new"):
        ranks[v] = r = stats.per_query_ranks(views[v], views[v], c2i)
        res[f"{v}/{v}"] = {f"{d} R@{k}": round(float((np.asarray(r[d]) < k).mean()), 4)
                           for d in ("t2i", "i2t") for k in ks}
    return res, ranks


def self_recalls(cfg, out: Path, seed: int, split: str, ks=(1, 5, 10)) -> dict:
    """old/old and new/new recalls of the base models on a split's gallery (views cached by compare)."""
    g = _views(cfg, out, seed, split)
    return _recalls(g["views"], g["c2i"], ks)[0]


def base_lead(cfg, split: str = "val", n_boot: int | None = None) -> dict:
    """The untouched base models on a split's gallery, without any XBT run: old/old, new/new, and
    NEW's lead (new/new - old/old per query, paired bootstrap 95% interval; t2i resampled by image).
    `--bases-only` writes it, so that a world can be judged (is NEW clearly ahead of OLD?) before
    anything about XBT on it is known."""
    from xbt_dist.eval import stats
    from xbt_dist.eval.evaluate import Towers, gallery_shards
    from xbt_dist.models.encoders import load_encoder
    towers = Towers(load_encoder(cfg.old), load_encoder(cfg.new))
    s = towers.stream(gallery_shards(cfg, split), cfg.eval, "retrieval", f"{split} gallery")
    views = {v: {m: x.float() for m, x in d.items()} for v, d in s.views.items()}
    rec, ranks = _recalls(views, s.caption_to_image)
    lead = {f"{d} R@{k}": stats.paired_bootstrap(np.asarray(ranks["new"][d]) < k, np.asarray(ranks["old"][d]) < k,
                                                 groups=s.caption_to_image if d == "t2i" else None,
                                                 n_boot=n_boot or stats.DEFAULT_BOOT)
            for d in ("t2i", "i2t") for k in (1, 5)}
    return {"split": split, **rec, "new_lead": lead}


def write_bases(out: Path, command: str, a, base: dict, lead: dict) -> int:
    """`--bases-only`'s report: <out>/bases.json and bases.md."""
    world = {k: getattr(a, k) for k in ("world_seed", "n_train", "n_val", "epochs", "old_epochs", "batch_size")}
    res = {"command": command, "world": world, "base_models": base, **lead}
    (out / "bases.json").write_text(json.dumps(res, indent=1) + "\n")
    losses = ", ".join(f"{r} ITC loss {b.get('final_loss')}" for r, b in base.items())
    md = [f"# Toy BLIP base models on the {lead['split']} gallery\n", f"`{command}`\n", f"{losses}\n",
          "| | " + " | ".join(lead["old/old"]) + " |", "|---" * (1 + len(lead["old/old"])) + "|"]
    md += [f"| {c} | " + " | ".join(f"{v:.3f}" for v in lead[c].values()) + " |" for c in ("old/old", "new/new")]
    md += ["", "NEW's lead (new/new - old/old) [95% CI]: " + "; ".join(
        f"{k} {g['gain']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]" for k, g in lead["new_lead"].items())]
    (out / "bases.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/toy_blip_cmp")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-text", type=int, default=20000)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--per-shard", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=6, help="base-model ITC epochs (OLD and NEW)")
    ap.add_argument("--old-epochs", type=int, help="OLD's epochs if not --epochs")
    ap.add_argument("--batch-size", type=int, default=128, help="base-model ITC batch")
    ap.add_argument("--boot", type=int, default=None)
    ap.add_argument("--on-off", action="store_true", help="also run `xbt eval` on seed 0 (the on-off check)")
    ap.add_argument("--parallel-seeds", action="store_true",
                    help="train the seeds in one one-thread process each before the (reusing) comparison")
    ap.add_argument("--no-baselines", action="store_true",
                    help="with --parallel-seeds: only old/old, new/old, phi/old and each --methods query/old "
                         "(no cheap baselines)")
    ap.add_argument("--methods", nargs="+", default=["xbt"],
                    help="trained methods (bench.compare's: xbt, base, lora_only, full_tune, ...); xbt among them")
    ap.add_argument("--base-from", metavar="DIR",
                    help="copy OLD and NEW from an earlier run's --out instead of training them (they must "
                         "match this world and --epochs/--old-epochs/--batch-size, else an error)")
    ap.add_argument("--bases-only", action="store_true",
                    help="train (or reuse) OLD and NEW, score them on the validation gallery only (old/old, new/new, "
                         "NEW's lead with intervals: <out>/bases.{json,md}) and stop: judge a world before any XBT run")
    ap.add_argument("--set", nargs="*", default=[], help="pipeline overrides (e.g. train.max_steps=4)")
    a = ap.parse_args(argv)
    if "xbt" not in a.methods:
        ap.error(f"--methods {' '.join(a.methods)}: add xbt (the criterion, the base models' own recalls and "
                 "--on-off read its run)")
    setup_torch()
    from bench import compare
    from xbt_dist.eval import stats
    from xbt_dist.pipeline import embed_for_config, toy_run_config
    from xbt_dist.toy import ToyWorldConfig, build_toy_world
    from xbt_dist.toy.base_blip import model_ref

    out, t0, seconds = Path(a.out), time.perf_counter(), {}
    command = "python -m bench.toy_blip_compare " + " ".join(sys.argv[1:] if argv is None else argv)
    world = build_toy_world(out / "toy", ToyWorldConfig(
        seed=a.world_seed, train_models=False, n_train=a.n_train, n_text=a.n_text, n_eval=a.n_eval,
        n_val=a.n_val, per_shard=a.per_shard, text_per_shard=max(a.per_shard, 10_000)))
    seconds["world"] = round(time.perf_counter() - t0, 1)
    _log(f"world ready ({seconds['world']} s); training OLD and NEW toy BLIPs")
    t = time.perf_counter()
    if a.base_from:
        copy_base_models(Path(a.base_from) / "models", out / "models")
    base = train_bases(world, out / "models", {"old": a.old_epochs or a.epochs, "new": a.epochs}, a.batch_size,
                       a.world_seed)
    seconds["base_models"] = round(time.perf_counter() - t, 1)
    _log(f"base models: {base}")
    cfg = toy_run_config(world, out, overrides=a.set)
    cfg.old, cfg.new = model_ref(out / "models" / "toy-blip-old"), model_ref(out / "models" / "toy-blip-new")
    if a.bases_only:
        return write_bases(out, command, a, base, base_lead(cfg, "val", a.boot))
    t = time.perf_counter()
    embed_for_config(cfg)
    seconds["embed"] = round(time.perf_counter() - t, 1)
    _log(f"embedded ({seconds['embed']} s); seeds {a.seeds}")
    t = time.perf_counter()
    if a.parallel_seeds:
        train_seeds_parallel(cfg, a.seeds, out, a.methods)
        seconds["seeds_parallel"] = round(time.perf_counter() - t, 1)
    if a.parallel_seeds and a.no_baselines:
        res = xbt_only(cfg, out, a.seeds, a.world_seed, a.boot or stats.DEFAULT_BOOT, command, t, tuple(a.methods))
    else:
        res = compare.run(cfg, a.seeds, a.methods, out, n_boot=a.boot or stats.DEFAULT_BOOT,
                          world_seed=a.world_seed, command=command)
    seconds["seeds"] = round(time.perf_counter() - t, 1)
    selfr = {s: self_recalls(cfg, out, a.seeds[0], s) for s in compare.SPLITS}
    seconds["total"] = round(time.perf_counter() - t0, 1)
    result = {"command": command, "world": {k: getattr(a, k) for k in ("world_seed", "n_train", "n_text", "n_eval",
                                                                        "n_val", "epochs", "old_epochs", "batch_size")},
              "base_models": base, "self_recalls": selfr, "seconds": seconds, "set": a.set,
              "summary": compare._jsonable(res["summary"]), "meta": res["meta"]}
    md = [f"# Toy BLIP proof\n\n`{command}`\n", "Base models (same model for query and gallery):\n"]
    for split, r in selfr.items():
        md.append(f"- {split}: " + "; ".join(f"{case} " + ", ".join(f"{k} {v:.3f}" for k, v in rr.items())
                                             for case, rr in r.items()))
    md += ["", res["markdown"], f"Seconds: {seconds}"]
    (out / "toy_blip_compare.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "toy_blip_compare.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if a.on_off:
        from xbt_dist.eval.evaluate import run_eval
        t = time.perf_counter()
        ev = run_eval(compare.method_config(compare.seed_config(cfg, a.seeds[0], out), "xbt"))
        result["on_off"] = ev["compat"].get("on_off")
        result["seconds"]["on_off_eval"] = round(time.perf_counter() - t, 1)
        (out / "toy_blip_compare.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        with open(out / "toy_blip_compare.md", "a") as f:
            f.write(f"\nAdapters off == untouched BLIP (`xbt eval`, seed {a.seeds[0]}): {result['on_off']}\n")
        print("on-off:", result["on_off"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
