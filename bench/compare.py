"""The comparison users make: XBT, the paper's baselines and the cheap fixes, over seeds, with intervals.

    python -m bench.compare --world-seed 0 --seeds 0 1 2 --out runs/compare --md runs/compare/compare.md
    python -m bench.compare --seeds 0 --methods full_tune --method-set full_tune:train.optim.lr=2e-3 --out runs/ft2e-3

One toy world (`--world-seed`); per training seed s (`train.seed`, which seeds stage 1 and stage 2):
stage-1 phi, then each trained method of `--methods` (xbt; base, lora_only, full_tune = the paper's
baselines; any METHODS name), then the cheap baselines fitted on the training pairs' embeddings
(least-squares and Procrustes maps, residual MLP query adapter, phi-only, and the training-free
old+phi fusion that needs the old encoder at query time), all scored against the OLD gallery of
the validation split and the test split. The fusion weight is chosen on validation only.

Per split and method: recalls (mean ± std over seeds), the paired bootstrap 95% interval of the gain
over old/old at R@1 and R@5 of the seed-averaged per-query hits (t2i resamples images, i2t images),
flip rates (share of queries old/old got right at R@1 that the method's query gets wrong), trainable
parameters, training seconds and the added per-query cost (CPU microseconds per text query over
what the deployed new model costs anyway). Writes `<out>/compare.json`, `<out>/compare.md`.

Finished stages (phi.pt, adapters.pt, cached gallery views) under `--out` are reused by their file's
presence, not by a config digest: give each `--set` variant its own `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import TOY_FULL_TUNE_LR, link_stage1_phi, setup_torch
from xbt_dist.config import RunConfig
from xbt_dist.eval import baselines as B
from xbt_dist.eval import stats
from xbt_dist.eval.evaluate import gallery_shards, load_towers
from xbt_dist.eval.report import md_table
from xbt_dist.models.phi import phi_num_params
from xbt_dist.train.model import resolve_method

TRAINED: dict[str, list[str]] = {          # method -> overrides (same data budget for all)
    "xbt": [],
    "base": ["train.method=base"],
    "lora_only": ["train.method=lora_only"],
    "full_tune": ["train.method=full_tune", f"train.optim.lr={TOY_FULL_TUNE_LR}"],
    "xbt_synthetic": ["train.target_source=synthetic"],   # no stored old embeddings (docs/architecture.md, "Target sources")
}
LABELS = {
    "old/old": "old/old (reference)", "new/old": "naive swap (new query)",
    "lsq": "least-squares map new->old", "procrustes": "Procrustes map new->old",
    "residual": "residual MLP query adapter", "phi": "phi-only (stage 1)",
    "fusion": "old+phi query fusion (training-free; OLD ENCODER AT QUERY TIME)",
    "xbt": "XBT", "base": "Base (paper)", "lora_only": "LoRA-only (paper)", "full_tune": "Full-tune (paper)",
    "xbt_synthetic": "XBT, synthetic targets",
}
SPLITS = ("val", "test")
ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))


def _log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def seed_config(base: RunConfig, seed: int, out: Path) -> RunConfig:
    cfg = copy.deepcopy(base)
    cfg.train.seed = seed
    cfg.out_dir = str(out / f"seed{seed}")
    return cfg


def method_config(cfg: RunConfig, method: str, extra: list[str] = ()) -> RunConfig:
    """The method's own run dir under the seed dir, reading the seed's stage-1 phi. `extra` overrides
    come after the method's own (TRAINED): `--set` reaches every method but cannot change what a method
    pins (Full-tune's lr), `--method-set full_tune:train.optim.lr=4e-4` can."""
    from xbt_dist.config import apply_overrides, from_dict, to_dict
    ov = TRAINED.get(method, [f"train.method={method}"]) + list(extra)
    c = from_dict(RunConfig, apply_overrides(to_dict(cfg), ov))
    c.out_dir = f"{cfg.out_dir}/methods/{method}"
    link_stage1_phi(c.out_dir, cfg.stage_dir("phi"))
    return c


def _manifest_result(stage_dir: str) -> dict:
    from xbt_dist.artifacts import read_manifest
    try:
        return read_manifest(stage_dir).get("result", {})
    except FileNotFoundError:
        return {}


def parse_method_sets(specs: list[str]) -> dict[str, list[str]]:
    """`METHOD:KEY=VALUE` strings -> {method: [KEY=VALUE, ...]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        method, sep, ov = spec.partition(":")
        if not sep or "=" not in ov or not method:
            raise ValueError(f"--method-set {spec!r}: expected METHOD:KEY=VALUE, e.g. full_tune:train.optim.lr=4e-4")
        out.setdefault(method, []).append(ov)
    return out


def ensure_trained(cfg: RunConfig, methods: list[str],
                   method_sets: dict[str, list[str]] | None = None) -> dict[str, RunConfig]:
    from xbt_dist.pipeline import run_stage
    from xbt_dist.train.stage1 import PHI_FILE, run_stage1
    from xbt_dist.train.stage2 import ADAPTERS_FILE, run_stage2
    if not (Path(cfg.stage_dir("phi")) / PHI_FILE).is_file():
        _log(f"stage 1, seed {cfg.train.seed}")
        run_stage(run_stage1, cfg)
    out = {}
    for m in methods:
        c = method_config(cfg, m, (method_sets or {}).get(m, ()))
        if not (Path(c.stage_dir("train")) / ADAPTERS_FILE).is_file():
            _log(f"stage 2 {m}, seed {cfg.train.seed}")
            run_stage(run_stage2, c)
        out[m] = c
    return out


def gallery(cfg: RunConfig, split: str) -> dict:
    """Views (old, new, phi, xbt) of a split's gallery, cached as a .pt next to the method's run."""
    path = Path(cfg.out_dir) / f"views_{split}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    towers = load_towers(resolve_method(cfg))
    towers.on_off = None
    s = towers.stream(gallery_shards(cfg, split), cfg.eval, "retrieval", f"{split} gallery")
    res = {"views": {v: {m: x.float() for m, x in d.items()} for v, d in s.views.items()},
           "c2i": s.caption_to_image}
    torch.save(res, path)
    return res


def train_pairs(cfg: RunConfig, out: Path) -> dict[str, torch.Tensor]:
    """Paired new and old embeddings of the training pairs (the old ones are the stored targets)."""
    from xbt_dist.data.embed import embed_shards, load_embeddings
    new_dir = out / "emb" / "train_new"
    if not (new_dir / "manifest.json").is_file():
        embed_shards(cfg.train.train_shards, str(new_dir), {"old": cfg.old, "new": cfg.new},
                     ["image_new", "text_new"], 256, progress=_log)
    new, old = load_embeddings(str(new_dir)), load_embeddings(cfg.train.targets)
    if new.keys() != old.keys():
        raise ValueError(f"{new_dir} and {cfg.train.targets} hold different keys: re-embed both")
    return {f: torch.from_numpy(np.asarray(s.load(f), dtype=np.float32))
            for s, fs in ((new, ("image_new", "text_new")), (old, ("image_old", "text_old"))) for f in fs}


def _text_cost_us(cfg: RunConfig, texts: list[str]) -> dict[str, float]:
    """CPU microseconds per text query: the old encoder (+ phi: what the fusion adds), phi alone,
    and what the adapted encoder + phi (XBT and the trained baselines) adds over the untouched new one."""
    towers = load_towers(resolve_method(cfg))
    old_tok, new_tok = towers.old.tokenizer(texts), towers.new.tokenizer(texts)
    cost = {"old": B.per_query_us(towers.old.model.encode_text, old_tok)}
    if towers.phi is not None:
        emb = towers.new.model.encode_text(new_tok, normalize=True).detach()
        cost["phi"] = B.per_query_us(towers.phi, emb)
    if towers.xbt is not None:
        cost["xbt_added"] = B.added_us(
            towers.new.model.encode_text,
            lambda t: towers.xbt.phi(towers.xbt.new.encode_text(t, normalize=True)), new_tok)
    return cost


def _sample_texts(cfg: RunConfig, n: int = 256) -> list[str]:
    import webdataset as wds
    shards = sorted(str(p) for p in Path(gallery_shards(cfg, "val")).glob("*.tar"))
    out = []
    for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        out.append(s["txt"].decode())
        if len(out) >= n:
            break
    return out


def _best_alpha(old: dict, phi: dict, c2i) -> float:
    """Fusion weight maximising mean R@5 (both directions) on the validation gallery."""
    def score(a):
        r = stats.per_query_ranks(B.fuse(old, phi, a), old, c2i)
        return float(np.mean([(np.asarray(r[d]) < 5).mean() for d in ("t2i", "i2t")]))
    return float(max(ALPHAS, key=score))


def run_seed(cfg: RunConfig, out: Path, methods: list[str], method_sets: dict[str, list[str]] | None = None) -> dict:
    """Everything for one training seed: {split: {method: ranks}}, costs, params, alpha."""
    seed = cfg.train.seed
    runs = ensure_trained(cfg, methods, method_sets)
    pairs = train_pairs(cfg, out)
    t_new, t_old = torch.cat([pairs["image_new"], pairs["text_new"]]), torch.cat([pairs["image_old"], pairs["text_old"]])
    maps = {"lsq": B.fit_least_squares(t_new, t_old), "procrustes": B.fit_procrustes(t_new, t_old),
            "residual": B.train_residual_adapter(pairs["image_new"], pairs["text_new"], pairs["image_old"],
                                                 pairs["text_old"], seed=seed)}
    first = runs[methods[0]] if methods else cfg
    phi_res = _manifest_result(cfg.stage_dir("phi"))
    texts = _sample_texts(cfg)
    cost = _text_cost_us(first, texts)    # old encoder and phi: the same in every method's run
    d_new, d_old = maps["lsq"].info["W"].shape
    params = {"phi": phi_num_params(d_new, d_old, cfg.phi.hidden, cfg.phi.depth)}
    info = {"old/old": {"params": 0, "train_s": 0.0, "query_us": 0.0},
            "new/old": {"params": 0, "train_s": 0.0, "query_us": 0.0},
            "phi": {"params": params["phi"], "train_s": phi_res.get("wall_s"), "query_us": cost.get("phi")},
            "fusion": {"params": 0, "train_s": 0.0, "query_us": cost["old"] + cost.get("phi", 0.0),
                       "note": "training-free; + the stage-1 phi; runs the old text encoder per query"}}
    for name, m in maps.items():
        sample = pairs["text_new"][:4096]
        info[name] = {"params": m.trainable_params, "train_s": round(m.fit_s, 2),
                      "query_us": B.per_query_us(m, sample)}
    for m, c in runs.items():
        r = _manifest_result(c.stage_dir("train"))
        info[m] = {"params": r.get("trainable_params"), "train_s": r.get("wall_s"),
                   "query_us": _text_cost_us(c, texts)["xbt_added"]}
    ranks, alpha = {}, None
    for split in SPLITS:
        g = gallery(runs[methods[0]] if methods else cfg, split)
        old, c2i = g["views"]["old"], g["c2i"]
        ranks[split] = {"old/old": stats.per_query_ranks(old, old, c2i),
                        "new/old": stats.per_query_ranks(g["views"]["new"], old, c2i),
                        "phi": stats.per_query_ranks(g["views"]["phi"], old, c2i)}
        for name, m in maps.items():
            ranks[split][name] = stats.per_query_ranks(m.apply(g["views"]["new"]), old, c2i)
        if split == "val":
            alpha = _best_alpha(old, g["views"]["phi"], c2i)
        ranks[split]["fusion"] = stats.per_query_ranks(B.fuse(old, g["views"]["phi"], alpha), old, c2i)
        for m, c in runs.items():
            gm = gallery(c, split)
            ranks[split][m] = stats.per_query_ranks(gm["views"]["xbt"], old, c2i)
        ranks[split]["_c2i"] = c2i
    info["fusion"]["alpha"] = alpha
    return {"seed": seed, "ranks": ranks, "info": info,
            "residual": maps["residual"].info if "residual" in maps else {}}


def summarize(per_seed: list[dict], ks=(1, 5, 10), n_boot: int = stats.DEFAULT_BOOT) -> dict:
    """Per split and method: recalls over seeds, gain intervals of the seed-averaged hits, flips."""
    out = {}
    for split in SPLITS:
        c2i = np.asarray(per_seed[0]["ranks"][split]["_c2i"])
        names = [n for n in per_seed[0]["ranks"][split] if n != "_c2i"]
        ref = per_seed[0]["ranks"][split]["old/old"]     # the old model is the same in every seed
        rows = {}
        for name in names:
            rs = [s["ranks"][split][name] for s in per_seed]
            rec = {f"{d} R@{k}": [float((np.asarray(r[d]) < k).mean()) for r in rs]
                   for d in ("t2i", "i2t") for k in ks}
            gains = {}
            for d in ("t2i", "i2t"):
                groups = c2i if d == "t2i" else None
                hr = np.asarray(ref[d])
                for k in (1, 5):
                    gains[f"{d} R@{k}"] = stats.paired_bootstrap(_seed_hits(per_seed, split, name, d, k), hr < k,
                                                                 groups=groups, n_boot=n_boot)
                lost = [stats.flip_rates(np.asarray(r[d]) < 1, hr < 1)["lost"] for r in rs]
                gains[f"{d} lost@1"] = stats.mean_std(lost)
            infos = [s["info"].get(name, {}) for s in per_seed]
            rows[name] = {"recalls": rec, "gain": gains, "seeds": [s["seed"] for s in per_seed],
                          "xbt_minus": _xbt_minus(per_seed, split, name, c2i, n_boot),
                          "params": infos[0].get("params"),
                          "train_s": stats.mean_std([i.get("train_s") or 0.0 for i in infos]),
                          "query_us": stats.mean_std([i.get("query_us") or 0.0 for i in infos]),
                          **({"alpha": [i.get("alpha") for i in infos]} if name == "fusion" else {})}
        out[split] = rows
    return out


def _seed_hits(per_seed: list[dict], split: str, name: str, d: str, k: int) -> np.ndarray:
    """Per query of direction `d`: the share of training seeds whose `name` query hits at K."""
    return np.mean([np.asarray(s["ranks"][split][name][d]) < k for s in per_seed], axis=0)


def _xbt_minus(per_seed: list[dict], split: str, name: str, c2i, n_boot: int) -> dict | None:
    """XBT's seed-averaged hits minus `name`'s on the same queries: a paired interval per direction
    and K, so that "XBT beats method M" is read off one interval instead of two overlapping ones."""
    if "xbt" not in per_seed[0]["ranks"][split] or name in ("xbt", "old/old"):
        return None
    return {f"{d} R@{k}": stats.paired_bootstrap(_seed_hits(per_seed, split, "xbt", d, k),
                                                 _seed_hits(per_seed, split, name, d, k), n_boot=n_boot,
                                                 groups=c2i if d == "t2i" else None)
            for d in ("t2i", "i2t") for k in (1, 5)}


def _iv(g: dict) -> str:
    return f"{g['gain']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"


def markdown(summary: dict, meta: dict) -> str:
    parts = []
    for split in SPLITS:
        header = ["method", "t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10",
                  "gain t2i R@5 [95% CI]", "gain i2t R@5 [95% CI]", "gain t2i R@1", "gain i2t R@1",
                  "lost@1 t2i / i2t", "trainable params", "train s", "added µs/query"]
        rows = []
        for name, r in summary[split].items():
            rec, g = r["recalls"], r["gain"]
            ref = name == "old/old"
            rows.append([LABELS.get(name, name)]
                        + [stats.fmt_mean_std(rec[f"{d} R@{k}"]) for d in ("t2i", "i2t") for k in (1, 5, 10)]
                        + (["-"] * 5 if ref else
                           [_iv(g["t2i R@5"]), _iv(g["i2t R@5"]), _iv(g["t2i R@1"]), _iv(g["i2t R@1"]),
                            f"{g['t2i lost@1']['mean']:.3f} / {g['i2t lost@1']['mean']:.3f}"])
                        + [f"{r['params']:,}" if r["params"] is not None else "-",
                           f"{r['train_s']['mean']:.1f}", f"{r['query_us']['mean']:.1f}"])
        title = "validation gallery (tuning)" if split == "val" else "test gallery (reported)"
        parts.append(f"### {title}\n\n" + md_table(header, rows))
        if "xbt" in summary[split]:
            v = {d: summary[split]["xbt"]["gain"][f"{d} R@5"] for d in ("t2i", "i2t")}
            ok = all(x["lo"] > 0 for x in v.values())
            parts.append(f"XBT verdict on {split} (R@5 gain over old/old, interval lower bound > 0 in both "
                         f"directions): **{'met' if ok else 'not met'}**; t2i {_iv(v['t2i'])}, i2t {_iv(v['i2t'])}")
            pair = [[LABELS.get(n, n)] + [_iv(r["xbt_minus"][c]) for c in ("t2i R@1", "t2i R@5", "i2t R@1", "i2t R@5")]
                    for n, r in summary[split].items() if r.get("xbt_minus")]
            parts.append(f"XBT minus each method on {split} (paired: the same queries, seed-averaged hits; "
                         "95% bootstrap interval; above zero = XBT better)\n\n"
                         + md_table(["method", "t2i R@1", "t2i R@5", "i2t R@1", "i2t R@5"], pair))
    parts.append(f"Seeds {meta['seeds']} (training seeds on world seed {meta['world_seed']}); "
                 f"{meta['n_boot']} bootstrap resamples; fusion alpha (chosen on val): {meta.get('alpha')}; "
                 f"wall {meta['wall_s']:.0f} s; command: `{meta['command']}`"
                 + "".join(f"; {m} also {' '.join(ov)}" for m, ov in (meta.get("method_sets") or {}).items()))
    return "\n\n".join(parts) + "\n"


def _jsonable(summary: dict) -> dict:
    return json.loads(json.dumps(summary, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))


def run(base: RunConfig, seeds: list[int], methods: list[str], out: Path, n_boot: int = stats.DEFAULT_BOOT,
        world_seed: int = 0, command: str = "", method_sets: dict[str, list[str]] | None = None) -> dict:
    t0 = time.perf_counter()
    per_seed = [run_seed(seed_config(base, s, out), out, methods, method_sets) for s in seeds]
    summary = summarize(per_seed, n_boot=n_boot)
    meta = {"seeds": seeds, "world_seed": world_seed, "methods": methods, "n_boot": n_boot,
            "method_sets": method_sets or {},
            "alpha": [p["info"]["fusion"]["alpha"] for p in per_seed], "wall_s": time.perf_counter() - t0,
            "command": command}
    md = markdown(summary, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps({"meta": meta, "summary": _jsonable(summary)}, indent=1))
    return {"summary": summary, "meta": meta, "markdown": md}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="*", default=["xbt"],
                    help=f"trained methods ({', '.join(TRAINED)}, or any train.method)")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--md", help="also write the markdown here")
    ap.add_argument("--boot", type=int, default=stats.DEFAULT_BOOT)
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every method (e.g. train.optim.lr=1e-3)")
    ap.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="an override for one method, after its own (e.g. full_tune:train.optim.lr=4e-4); repeatable")
    args = ap.parse_args(argv)
    try:
        method_sets = parse_method_sets(args.method_set)
    except ValueError as e:
        ap.error(str(e))
    setup_torch()
    from xbt_dist.pipeline import embed_for_config, toy_run_config
    from xbt_dist.toy import ToyWorldConfig, build_toy_world
    out = Path(args.out)
    world = build_toy_world(out / "toy", ToyWorldConfig(seed=args.world_seed))
    base = toy_run_config(world, out, overrides=args.set)
    embed_for_config(base)
    res = run(base, args.seeds, args.methods, out, n_boot=args.boot, world_seed=args.world_seed,
              command="python -m bench.compare " + " ".join(sys.argv[1:] if argv is None else argv),
              method_sets=method_sets)
    if args.md:
        Path(args.md).write_text(res["markdown"])
    print(res["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
