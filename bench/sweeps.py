"""Sweeps for the paper's open questions on the toy world, with plots.

    python -m bench.sweeps --sweep corpus --sizes 2000 5000 10000 20000 60000 --seeds 0 1 2
    python -m bench.sweeps --sweep pairs --sizes 2000 4000 8000 12000 --seeds 0 1 2
    python -m bench.sweeps --sweep phi_width --sizes 64 128 256 512 1024 --seeds 0 1 2

- `corpus`: stage-1 text corpus size (distinct captions; the first N rows of the corpus embeddings)
  vs phi/old and xbt/old. Samples seen are held at the default's (epochs scaled by 60k/N), so the
  sweep varies what phi sees, not how long it trains.
- `pairs`: training pairs of stage 2 (the first N/per_shard shards) vs compatibility and zero-shot
  (the paper's Table 7 analogue); samples seen held fixed the same way.
- `phi_width`: phi's hidden width (the capacity between the 96-d new and the 64-d old space).

Every point runs stage 1 (and stage 2 when it depends on the point) and evaluates on the validation
AND the test gallery; rows are mean ± std over training seeds. A point whose size is the default's
(all captions, all pairs, the config's phi width) is the default run itself: every sweep reads it
from `<out>/default/seed<k>`, so it trains once. Points already on disk are read, not rerun, so
seeds can run as separate processes on one `--out` (`--threads 1` each) and a last process
with all seeds writes the tables. Writes `<out>/<sweep>.json`,
`<out>/<sweep>.md` and `<out>/<sweep>.png` (val and test Recall@5 panels, a zero-shot top-1 panel).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import THREADS, setup_torch
from xbt_dist.config import RunConfig
from xbt_dist.eval import stats
from xbt_dist.eval.report import md_table

SWEEPS = ("corpus", "pairs", "phi_width")
METRICS = (("phi/old", "t2i", "R@5"), ("phi/old", "i2t", "R@5"), ("xbt/old", "t2i", "R@5"),
           ("xbt/old", "i2t", "R@5"), ("old/old", "t2i", "R@5"), ("old/old", "i2t", "R@5"))


def _log(msg: str) -> None:
    print(f"[sweeps] {msg}", file=sys.stderr, flush=True)


def subset_embeddings(src: str, dst: Path, n: int) -> str:
    """The first `n` rows (in shard order) of an embedding shard set, as a shard set of its own."""
    from xbt_dist.data.embed import load_embeddings
    from xbt_dist.data.embeddings import write_embedding_manifest, write_embedding_shard
    if (dst / "manifest.json").is_file():
        return str(dst)
    emb = load_embeddings(src)
    rows = sum(emb.counts().values())
    if n > rows:
        raise ValueError(f"corpus size {n} > the {rows} rows of {src}: build a larger toy world "
                         "(ToyWorldConfig.n_text) or drop that size")
    fields = [f for f in emb.fields if f.startswith("text")]
    keys = emb.keys()[:n]
    # written aside and renamed into place: seeds running as parallel processes share the subset
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    write_embedding_shard(tmp, "shard-000000", keys, {f: np.asarray(emb.load(f))[:n] for f in fields},
                          normalize=False)
    write_embedding_manifest(tmp, source=f"{src} (first {n} rows)", models={}, config={"fields": fields, "n": n})
    try:
        os.rename(tmp, dst)
    except OSError:
        if not (dst / "manifest.json").is_file():
            raise
        shutil.rmtree(tmp)       # another process made the same subset first
    return str(dst)


def subset_shards(train_dir: str, n: int) -> str:
    """A brace pattern naming the first shards of `train_dir` that hold `n` samples (whole shards)."""
    sizes = json.loads((Path(train_dir) / "sizes.json").read_text())
    names, total = [], 0
    for name, count in sizes.items():
        if total >= n:
            break
        names.append(name)
        total += count
    if total < n:
        raise ValueError(f"{n} training pairs > the {total} in {train_dir}: build a larger toy world")
    if total != n:
        raise ValueError(f"{n} training pairs is not a whole number of shards of {train_dir} "
                         f"({list(sizes.values())[:3]}...): pick a multiple of the shard size")
    stem = names[0].rsplit("-", 1)[0]
    first, last = (nm.rsplit("-", 1)[1].split(".")[0] for nm in (names[0], names[-1]))
    # brace notation even for one shard: the stage reads sizes from a directory or by listing a pattern
    return f"{train_dir}/{stem}-{{{first}..{last}}}.tar"


def point_config(base: RunConfig, sweep: str, size: int, seed: int, out: Path, full: dict) -> RunConfig:
    """The run config of one (sweep, size, seed) point; `full` = the default corpus/pair counts."""
    cfg = copy.deepcopy(base)
    cfg.train.seed = seed
    cfg.out_dir = str(out / sweep / f"n{size}" / f"seed{seed}")
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose from {SWEEPS}")
    if size == {"corpus": full["corpus"], "pairs": full["pairs"], "phi_width": base.phi.hidden}[sweep]:
        cfg.out_dir = str(out / "default" / f"seed{seed}")     # the same run in every sweep: train it once
    elif sweep == "corpus":
        cfg.stage1.embeddings = subset_embeddings(base.stage1.embeddings, out / sweep / f"emb{size}", size)
        cfg.stage1.epochs = base.stage1.epochs * full["corpus"] / size
    elif sweep == "pairs":
        cfg.train.train_shards = subset_shards(base.train.train_shards, size)
        cfg.train.epochs = base.train.epochs * full["pairs"] / size
    else:
        cfg.phi.hidden = size
    return cfg


def run_point(cfg: RunConfig, splits=("val", "test")) -> dict:
    from xbt_dist.eval.evaluate import run_eval
    from xbt_dist.pipeline import run_stage
    from xbt_dist.train.stage1 import PHI_FILE, run_stage1
    from xbt_dist.train.stage2 import ADAPTERS_FILE, run_stage2
    out = {"trained": []}
    if not (Path(cfg.stage_dir("phi")) / PHI_FILE).is_file():
        run_stage(run_stage1, cfg)
        out["trained"].append("phi")
    if not (Path(cfg.stage_dir("train")) / ADAPTERS_FILE).is_file():
        run_stage(run_stage2, cfg)
        out["trained"].append("train")
    for split in splits:
        path = Path(cfg.stage_dir("eval" if split == "test" else "eval_val")) / "eval.json"
        res = json.loads(path.read_text()) if path.is_file() else run_eval(cfg, split=split)
        zs = (res.get("zero_shot") or {}).get("cases", res.get("zero_shot") or {})
        out[split] = {"cases": res["compat"]["cases"], "zero_shot": zs}
    return out


def _value(point: dict, split: str, case: str, direction: str, metric: str):
    c = point[split]["cases"].get(case)
    return None if c is None else c[direction].get(metric)


ZERO_SHOT = ("xbt/old", "xbt/xbt", "old/old")   # top-1 columns (the paper's Table 7 reads zero-shot)


def _zs(point: dict, split: str, case: str):
    c = point[split]["zero_shot"].get(case)
    return None if not c else c.get("top1")


def table(results: dict, sweep: str, split: str) -> str:
    header = (["size"] + [f"{c} {d} {m}" for c, d, m in METRICS]
              + [f"zero-shot {c} top-1" for c in ZERO_SHOT])
    rows = []
    for size, per_seed in sorted(results.items(), key=lambda kv: int(kv[0])):
        rows.append([str(size)] + [stats.fmt_mean_std([_value(p, split, *m) for p in per_seed]) for m in METRICS]
                    + [stats.fmt_mean_std([_zs(p, split, c) for p in per_seed]) for c in ZERO_SHOT])
    return md_table(header, rows)


def plot(results: dict, sweep: str, path: Path) -> None:
    """Recall@5 per gallery (val, test) and zero-shot top-1 (the paper's Table 7 reads zero-shot), each
    point mean +- std over seeds; the legends sit below the panels so no curve hides behind one."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    sizes = sorted(int(s) for s in results)
    xlabel = {"corpus": "stage-1 captions", "pairs": "stage-2 training pairs", "phi_width": "phi hidden width"}[sweep]

    def curve(ax, values, label, dashed):
        ms = [stats.mean_std(v) for v in values]
        ax.errorbar(sizes, [x["mean"] for x in ms], yerr=[x["std"] for x in ms], marker="o", capsize=3,
                    label=label, linestyle="--" if dashed else "-")

    for ax, split in zip(axes[:2], ("val", "test")):
        for m in METRICS:
            curve(ax, [[_value(p, split, *m) for p in results[str(s)]] for s in sizes], " ".join(m), m[0] == "old/old")
        ax.set_title(f"{split} gallery: Recall@5")
    axes[1].sharey(axes[0])
    for case in ZERO_SHOT:
        curve(axes[2], [[_zs(p, "test", case) for p in results[str(s)]] for s in sizes], case, case == "old/old")
    axes[2].set_title("zero-shot classification: top-1")
    for ax in axes:
        ax.set_xscale("log")
        # the swept sizes as plain tick labels (log-scale minor labels overlap at these spans)
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Recall@5")
    axes[0].legend(fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(0, -0.18))
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run(base: RunConfig, sweep: str, sizes: list[int], seeds: list[int], out: Path, full: dict,
        command: str = "") -> dict:
    t0 = time.perf_counter()
    results: dict[str, list] = {}
    for size in sizes:
        for seed in seeds:
            _log(f"{sweep} n={size} seed={seed}")
            results.setdefault(str(size), []).append(run_point(point_config(base, sweep, size, seed, out, full)))
    md = "\n\n".join(f"### {sweep}: {'validation' if s == 'val' else 'test'} gallery\n\n" + table(results, sweep, s)
                     for s in ("val", "test"))
    points = [p for per_seed in results.values() for p in per_seed]
    fresh = sum(bool(p["trained"]) for p in points)
    # a sweep assembled from points trained by earlier processes says so: its wall is not their cost
    md += (f"\n\nSeeds {seeds}; {fresh} of {len(points)} points trained by this process, the rest read from "
           f"{out}; wall {time.perf_counter() - t0:.0f} s; command: `{command}`\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{sweep}.md").write_text(md)
    (out / f"{sweep}.json").write_text(json.dumps({"sweep": sweep, "sizes": sizes, "seeds": seeds,
                                                   "full": full, "results": results}, indent=1, default=str))
    plot(results, sweep, out / f"{sweep}.png")
    return {"results": results, "markdown": md}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", choices=SWEEPS, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--out", default="runs/sweeps")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch intra-op threads (default: %(default)s, the benches' pinned count); 1 when "
                         "seeds run as parallel processes")
    args = ap.parse_args(argv)
    setup_torch(args.threads)
    from xbt_dist.pipeline import embed_for_config, toy_run_config
    from xbt_dist.toy import ToyWorldConfig, build_toy_world
    out = Path(args.out)
    wc = ToyWorldConfig(seed=args.world_seed)
    world = build_toy_world(out / "toy", wc)
    base = toy_run_config(world, out, overrides=args.set)
    embed_for_config(base)
    res = run(base, args.sweep, args.sizes, args.seeds, out, {"corpus": wc.n_text, "pairs": wc.n_train},
              command="python -m bench.sweeps " + " ".join(sys.argv[1:] if argv is None else argv))
    print(res["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
