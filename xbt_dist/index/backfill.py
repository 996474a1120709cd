"""`xbt backfill plan`: what each partial-backfill budget buys, in recall and in GPU-hours.

A budget b re-embeds the fraction b of the gallery with the new model. The mixed gallery is then
searched with BOTH query encoders of the upgraded system: items still holding old embeddings are
scored with the XBT query (phi(adapted new) lives in the old space), re-embedded items with the
untouched new model's query (new space), and the two score lists are merged into one ranking. At
b = 0 this is xbt/old, at b = 1 new/new.

Merging (`MERGES`). The two spaces put cosines on different scales: a new model whose embeddings
share a common direction scores every item higher, so under a raw-cosine merge re-embedded
non-matches crowd out old-space positives and a partial backfill can do worse than none.
- `raw`: raw cosines, as they come;
- `zscore` (default): each query's scores in each space are standardised by that query's mean and
  std over a fixed reference sample of the gallery in that space (REFERENCE_ITEMS items, seeded).
  Per query and space this is an increasing affine map, so b = 0 and b = 1 rank exactly as
  xbt/old and new/new; in production the reference sample is a few thousand items re-embedded
  up front (seconds of GPU) and costs one small matrix product per query.

Ordering policies (which items to re-embed first):
- `random`: a seeded permutation (the baseline of the backfilling literature),
- `old_disagreement`: items whose stored old image and old text embeddings agree least
  (lowest cos(v_old, w_old)) first: where the old model did not even match an item to its own
  caption, its old embedding is least reliable. It needs only what the gallery already stores,
  so ranking a billion items costs one dot product each and no new-model pass.
The curve's area (AUC over budget in [0, 1], trapezoids) summarises each policy.

Cost: items x (1 / measured new-model embedding throughput), where throughput is timed here on a
sample of gallery images and captions with the configured device (`xbt embed` runs the same
encoders), scaled to `--gallery-items` (default: this gallery's size).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from xbt_dist.artifacts import atomic_write_text
from xbt_dist.config import RunConfig
from xbt_dist.index.build import index_dir, load_gallery

POLICIES = ("random", "old_disagreement")
MERGES = ("zscore", "raw")
REFERENCE_ITEMS = 2048


def order_items(policy: str, old: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """Gallery rows in the order a policy re-embeds them."""
    n = len(old["image"])
    if policy == "random":
        return np.random.default_rng(seed).permutation(n)
    if policy == "old_disagreement":
        agreement = np.sum(_norm(old["image"]) * _norm(old["text"]), axis=1)
        return np.argsort(agreement, kind="stable")
    raise ValueError(f"unknown backfill policy {policy!r}: expected one of {POLICIES}")


def _norm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def reference_rows(n: int, seed: int = 0, size: int = REFERENCE_ITEMS) -> np.ndarray:
    """The gallery rows whose scores calibrate the `zscore` merge (all rows of a small gallery)."""
    return np.arange(n) if n <= size else np.sort(np.random.default_rng([seed, 7]).choice(n, size, replace=False))


def _standardise(s: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Scores s (queries x items) as z-scores against each query's reference scores ref.

    In float64: an increasing affine map there keeps every distinct float32 score distinct, so
    an all-old or all-new gallery ranks exactly as before (ties count against the query)."""
    s, ref = s.astype(np.float64), ref.astype(np.float64)
    return (s - ref.mean(axis=1, keepdims=True)) / np.maximum(ref.std(axis=1, keepdims=True), 1e-6)


def space_scores(q_xbt: np.ndarray, q_new: np.ndarray, g_old: np.ndarray, g_new: np.ndarray,
                 merge: str = "zscore", reference: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(XBT query vs old rows, new query vs new rows) scores, on the scale `merge` puts them.

    They do not depend on the budget or the ordering, so a curve computes them once. `merge` as
    in the module docstring; `reference`: the calibration rows (default `reference_rows`).
    """
    if merge not in MERGES:
        raise ValueError(f"unknown backfill merge {merge!r}: expected one of {MERGES}")
    s_old = _norm(q_xbt) @ _norm(g_old).T
    s_new = _norm(q_new) @ _norm(g_new).T
    if merge == "zscore":
        ref = reference_rows(len(g_old)) if reference is None else reference
        s_old, s_new = _standardise(s_old, s_old[:, ref]), _standardise(s_new, s_new[:, ref])
    return s_old, s_new


def mixed_recall(s_old: np.ndarray, s_new: np.ndarray, positive: np.ndarray, backfilled: np.ndarray,
                 ks) -> dict[str, float]:
    """Recall@K of queries against a gallery whose `backfilled` rows hold new embeddings.

    Exact scores from `space_scores` (the gallery of an eval set is small); ties count against
    the query.
    """
    s = np.where(backfilled[None, :], s_new, s_old)
    pos_score = s[np.arange(len(positive)), positive]
    s[np.arange(len(positive)), positive] = -np.inf
    rank = (s >= pos_score[:, None]).sum(axis=1)
    return {f"R@{k}": float((rank < k).mean()) for k in ks}


def auc(budgets: list[float], values: list[float]) -> float:
    b, v = np.asarray(budgets), np.asarray(values)
    return float(np.sum((b[1:] - b[:-1]) * (v[1:] + v[:-1]) / 2) / max(b[-1] - b[0], 1e-12))


def backfill_curves(queries: dict, old: dict, new: dict, keys: np.ndarray, budgets, ks,
                    policies=POLICIES, seed: int = 0, merge: str = "zscore") -> dict:
    """{policy: {"orders", "t2i": [{budget, R@K}], "i2t": [...], "auc": {...}}} from embeddings.

    `queries` = {"xbt": {"text", "image"}, "new": {"text", "image"}, "caption_keys", "image_keys"}.
    """
    row = {k: i for i, k in enumerate(keys.tolist())}
    reference = reference_rows(len(keys), seed)
    directions = {}
    for d, q_mod, g_mod, qkeys in (("t2i", "text", "image", queries["caption_keys"]),
                                    ("i2t", "image", "text", queries["image_keys"])):
        keep = np.array([k in row for k in qkeys])
        pos = np.array([row[k] for k in np.asarray(qkeys)[keep]])
        scores = space_scores(queries["xbt"][q_mod][keep], queries["new"][q_mod][keep],
                              old[g_mod], new[g_mod], merge, reference)
        directions[d] = (scores, pos)
    out = {}
    for policy in policies:
        order = order_items(policy, old, seed)
        curves = {"t2i": [], "i2t": []}
        for b in budgets:
            mask = np.zeros(len(keys), bool)
            mask[order[: int(round(b * len(keys)))]] = True
            for d, ((s_old, s_new), pos) in directions.items():
                curves[d].append({"budget": float(b), **mixed_recall(s_old, s_new, pos, mask, ks)})
        out[policy] = {**curves, "auc": {f"{d} R@{k}": auc(list(budgets), [p[f"R@{k}"] for p in curves[d]])
                                         for d in curves for k in ks}}
    return out


def measure_embed_throughput(encoder, images: list, captions: list[str], n: int = 128) -> dict:
    """New-model items/s (image + its caption), timed on up to n gallery samples after a warm-up."""
    images = (images * (n // max(len(images), 1) + 1))[:n]
    captions = (captions * (n // max(len(captions), 1) + 1))[:n]
    encoder.images("new", images[:4])
    encoder.texts("new", captions[:4])
    t0 = time.perf_counter()
    encoder.images("new", images)
    encoder.texts("new", captions)
    dt = time.perf_counter() - t0
    return {"items_per_s": n / dt, "sample": n, "seconds": dt}


def plan_backfill(cfg: RunConfig, budgets=None, gallery_items: int | None = None,
                  policies=POLICIES, seed: int = 0, device: str = "cpu", encoder=None,
                  merge: str = "zscore") -> dict:
    """Curves, AUCs and device-hours per budget; writes backfill.json/.md/.png next to the index.

    `policies` holds the curves of `merge`; `by_merge` every merge's (so the report shows what
    calibration buys)."""
    from xbt_dist.index.evaluate import load_queries
    budgets = list(budgets or [i / 10 for i in range(11)])
    ks = cfg.index.ks
    root = index_dir(cfg)
    gal = {v: load_gallery(root / "gallery" / v, v) for v in ("old", "new")}
    if list(gal["old"][0]) != list(gal["new"][0]):
        raise ValueError("the old and new gallery sets hold different keys: rebuild with `xbt index build`")
    keys = gal["old"][0]
    if encoder is None:
        from xbt_dist.index.encoders import QueryEncoder
        encoder = QueryEncoder(cfg, device=device, views=("new", "xbt"), batch_size=cfg.index.batch_size)
    qs = load_queries(cfg.index.query_shards or cfg.eval.eval_shards)
    queries = {v: {"text": encoder.texts(v, qs["captions"]), "image": encoder.images(v, qs["images"])}
               for v in ("xbt", "new")}
    queries.update(caption_keys=qs["caption_keys"], image_keys=qs["image_keys"])
    if merge not in MERGES:
        raise ValueError(f"unknown backfill merge {merge!r}: expected one of {MERGES}")
    by_merge = {m: backfill_curves(queries, gal["old"][1], gal["new"][1], keys, budgets, ks, policies,
                                   seed, m) for m in MERGES}
    curves = by_merge[merge]
    tp = measure_embed_throughput(encoder, qs["images"], qs["captions"])
    items = int(gallery_items or len(keys))
    hours = [{"budget": b, "items": int(round(b * items)),
              "device_hours": b * items / tp["items_per_s"] / 3600} for b in budgets]
    res = {"gallery_items_priced": items, "gallery_items_evaluated": int(len(keys)), "ks": list(ks),
           "budgets": budgets, "policies": curves, "throughput": {**tp, "device": device},
           "cost": hours, "seed": seed,
           "merge": merge, "by_merge": {m: {p: c["auc"] for p, c in v.items()} for m, v in by_merge.items()},
           "reference_items": int(len(reference_rows(len(keys), seed)))}
    out = root.parent / "backfill"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "backfill.json", json.dumps(res, indent=2) + "\n")
    res["plot"] = str(plot_curves(res, out / "backfill.png"))
    atomic_write_text(out / "backfill.md", format_markdown(res))
    print(f"[backfill] {out / 'backfill.md'}", file=sys.stderr)
    return res


def plot_curves(res: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = res["ks"][0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, d in zip(axes, ("t2i", "i2t")):
        for policy, c in res["policies"].items():
            ax.plot([100 * p["budget"] for p in c[d]], [p[f"R@{k}"] for p in c[d]], marker="o",
                    label=f"{policy} (AUC {c['auc'][f'{d} R@{k}']:.3f})")
        ax.set_xlabel("gallery re-embedded with the new model (%)")
        ax.set_ylabel(f"{d} R@{k}")
        ax.set_title(f"{d}: mixed gallery, XBT + new queries")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_markdown(res: dict) -> str:
    ks = res["ks"]
    lines = ["# Partial backfill plan\n",
             f"Gallery evaluated: {res['gallery_items_evaluated']} items; priced for "
             f"{res['gallery_items_priced']:,} items at {res['throughput']['items_per_s']:.1f} items/s "
             f"(new model, image + caption, measured on {res['throughput']['device']}).\n",
             "| budget | items | device-hours | " + " | ".join(
                 f"{p} {d} R@{k}" for p in res["policies"] for d in ("t2i", "i2t") for k in ks[:1]) + " |",
             "|---|---|---|" + "---|" * (2 * len(res["policies"]))]
    for i, c in enumerate(res["cost"]):
        cells = [f"{res['policies'][p][d][i][f'R@{ks[0]}']:.3f}" for p in res["policies"] for d in ("t2i", "i2t")]
        lines.append(f"| {100 * c['budget']:.0f}% | {c['items']:,} | {c['device_hours']:.3g} | " + " | ".join(cells) + " |")
    lines.append("\n| policy | " + " | ".join(f"AUC {k}" for k in next(iter(res["policies"].values()))["auc"]) + " |")
    lines.append("|---|" + "---|" * len(next(iter(res["policies"].values()))["auc"]))
    for p, c in res["policies"].items():
        lines.append(f"| {p} | " + " | ".join(f"{v:.3f}" for v in c["auc"].values()) + " |")
    lines.append(f"\nScores merged by `{res['merge']}` (XBT query vs old rows, new query vs re-embedded "
                 f"rows; `zscore`: each query's scores standardised per space over "
                 f"{res['reference_items']} reference items). AUC by merge:\n")
    lines.append("| merge | policy | " + " | ".join(next(iter(next(iter(res["by_merge"].values())).values()))) + " |")
    lines.append("|---|---|" + "---|" * len(next(iter(next(iter(res["by_merge"].values())).values()))))
    for m, pol in res["by_merge"].items():
        for p, a in pol.items():
            lines.append(f"| {m} | {p} | " + " | ".join(f"{v:.3f}" for v in a.values()) + " |")
    lines.append("\n![backfill curves](backfill.png)\n")
    return "\n".join(lines)
