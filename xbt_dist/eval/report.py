"""Evaluation report: `eval.json`, `report.md` and plots (`recall_bars.png`, `tsne.png`).

`write_report` takes the dicts made by `compat.compatibility_report` / `compat.zero_shot_report`
plus a compute table (paper Table 6 form) and, optionally, the embedding views for a t-SNE plot.
Plots use matplotlib's Agg backend (no display on cluster nodes); t-SNE is sklearn's, run only on a
few hundred pairs because it is O(n^2) on 2 shared cores.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from xbt_dist import storage
from xbt_dist.artifacts import atomic_write_text

COMPUTE_COLUMNS = (("method", "method"), ("trainable_params", "trainable params"),
                   ("wall_time_s", "wall time"), ("peak_memory_bytes", "peak memory"),
                   ("samples_seen", "samples seen"))


# ----------------------------------------------------------------------------------------------
# formatting helpers (also used by ablation.py)


def fmt_float(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def fmt_count(n) -> str:
    """6820352 -> '6.82M' (Table 6 style)."""
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def fmt_seconds(s) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    b = float(b)
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:g} B"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(obj):
    """NaN/inf -> None so eval.json is strict JSON (other tools choke on NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ----------------------------------------------------------------------------------------------
# markdown sections


def recall_table(compat: Mapping) -> str:
    ks = compat.get("ks", [1, 5, 10, 50])
    header = ["case", "query / gallery"] + [f"t2i R@{k}" for k in ks] + [f"i2t R@{k}" for k in ks]
    rows = []
    for name, c in compat["cases"].items():
        rows.append([f"`{name}`", c.get("label", "")]
                    + [fmt_float(c["t2i"].get(f"R@{k}")) for k in ks]
                    + [fmt_float(c["i2t"].get(f"R@{k}")) for k in ks])
    return md_table(header, rows)


def verdict_section(compat: Mapping) -> str:
    v = compat["verdict"]
    case = v.get("case", "xbt/old")
    if v["compatible"] is None:
        lines = [f"**Backward compatible: not evaluated** ({v.get('note', '')}; "
                 f"criterion: {v['criterion']})."]
    else:
        lines = [f"**Backward compatible: {'YES' if v['compatible'] else 'NO'}** "
                 f"(criterion: {v['criterion']}).", ""]
        rows = []
        for direction in ("t2i", "i2t"):
            for key, r in v[direction]["per_k"].items():
                rows.append([direction, key, fmt_float(r[case]), fmt_float(r["old/old"]),
                             f"{r['gain']:+.3f}", "pass" if r["pass"] else "FAIL"])
        lines.append(md_table(["direction", "K", case, "old/old", "gain", "result"], rows))
    on_off = compat.get("on_off")
    if on_off is not None:
        lines += ["", f"On-off check (adapters off == untouched new model, exactly): "
                      f"**{'pass' if on_off['equal'] else 'FAIL'}** "
                      f"(max abs diff {on_off['max_abs_diff']:.3g})"
                  + (f"; {on_off['note']}" if on_off.get("note") else "")]
    notes = [f"- `{n}`: {c['note']}" for n, c in compat["cases"].items() if c.get("note")]
    notes += [f"- `{s['case']}` skipped: {s['reason']}" for s in compat.get("skipped", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def zero_shot_table(zero_shot: Mapping) -> str:
    keys = sorted({k for r in zero_shot.values() for k in r if k.startswith("top")},
                  key=lambda k: int(k[3:]))
    rows = [[f"`{name}`", r["image_view"], r["class_view"]] + [fmt_float(r.get(k)) for k in keys]
            + [str(r["n_images"]), str(r["n_classes"])] for name, r in zero_shot.items()]
    return md_table(["case", "images", "class texts"] + [f"top-{k[3:]}" for k in keys]
                    + ["images", "classes"], rows)


def compute_table(compute: Sequence[Mapping]) -> str:
    rows = [[str(r.get("method", "-")), fmt_count(r.get("trainable_params")),
             fmt_seconds(r.get("wall_time_s")), fmt_bytes(r.get("peak_memory_bytes")),
             fmt_count(r.get("samples_seen"))] for r in compute]
    return md_table([c[1] for c in COMPUTE_COLUMNS], rows)


# ----------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # no display on cluster nodes; must precede the pyplot import
    import matplotlib.pyplot as plt
    return plt


def _save_png(fig, path: str | os.PathLike):
    """Write a figure through `xbt_dist.storage` (a local path or an fsspec URL); returns it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    storage.write_bytes(path, buf.getvalue())
    return path if storage.is_remote(path) else Path(path)


def plot_recall_bars(compat: Mapping, path: str | os.PathLike, ks: Sequence[int] = (1, 5)) -> Path:
    """Grouped bars: one group per case, one bar per (direction, K); old/old as dashed lines."""
    plt = _pyplot()
    names = list(compat["cases"])
    series = [(d, k) for d in ("t2i", "i2t") for k in ks]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4))
    x = np.arange(len(names))
    for i, (d, k) in enumerate(series):
        vals = [compat["cases"][n][d].get(f"R@{k}", np.nan) for n in names]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=f"{d} R@{k}")
        if "old/old" in compat["cases"]:     # the bar each case must clear (Eqn 1)
            ax.axhline(compat["cases"]["old/old"][d].get(f"R@{k}", np.nan), ls="--", lw=0.8,
                       alpha=0.6, color=bars.patches[0].get_facecolor())
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1.25)    # headroom for the legend above the bars
    ax.set_ylabel("recall")
    v = compat.get("verdict", {})
    ax.set_title("cross-model retrieval (query view / gallery view)"
                 + (f": compatible={v['compatible']}" if v.get("compatible") is not None
                    else ""))
    ax.legend(fontsize=8, ncol=len(series), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = _save_png(fig, path)
    plt.close(fig)
    return path


def _first_caption_index(caption_to_image, n_images: int) -> np.ndarray:
    c2i = np.asarray(caption_to_image)
    first = np.full(n_images, -1)
    for j in range(len(c2i) - 1, -1, -1):     # reverse, so the earliest caption wins
        first[c2i[j]] = j
    return first


def plot_tsne(views: Mapping, caption_to_image, path: str | os.PathLike, n_pairs: int = 200,
              n_lines: int = 12, seed: int = 0) -> Path:
    """t-SNE of paired embeddings (image i with its first caption), one panel per embedding dim.

    Views are embedded together only when they share a dim: `old`, `phi`, `xbt` all live in the
    old space; the untouched `new` gets its own panel when d_new != d_old (t-SNE distances across
    unrelated spaces would mean nothing). Thin lines join, for a few pairs, the XBT image to the
    OLD text and the XBT text to the OLD image: short lines = new queries land on their old gallery
    partners.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    plt = _pyplot()
    n_images = len(views["old"]["image"])
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n_images, size=min(n_pairs, n_images), replace=False))
    cap = _first_caption_index(caption_to_image, n_images)[pick]
    groups: dict[int, list[str]] = {}
    for name in ("old", "phi", "xbt", "new"):
        if name in views:
            groups.setdefault(int(np.asarray(views[name]["image"]).shape[1]), []).append(name)
    colors = {"old": "tab:blue", "phi": "tab:orange", "xbt": "tab:green", "new": "tab:red"}
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 5.5), squeeze=False)
    for ax, (dim, names) in zip(axes[0], groups.items()):
        blocks, labels = [], []
        for name in names:
            for mod, idx in (("image", pick), ("text", cap)):
                # Pick rows first: converting a whole (fp16) view would copy 1M rows to plot 300.
                x = np.asarray(views[name][mod][idx], dtype=np.float32)
                blocks.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
                labels.append((name, mod))
        data = np.concatenate(blocks)
        perplexity = float(max(2.0, min(30.0, (len(data) - 1) / 3)))
        # One thread: with OpenMP on busy shared cores t-SNE spin-waits and runs ~10x slower
        # (measured: 600 points 31 s with 2 threads vs 3.6 s with 1 on a loaded 2-core box).
        with threadpool_limits(1):
            xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                      metric="cosine", max_iter=500).fit_transform(data)
        n = len(pick)
        pos = {lab: xy[i * n:(i + 1) * n] for i, lab in enumerate(labels)}
        for (name, mod), p in pos.items():
            ax.scatter(p[:, 0], p[:, 1], s=10, alpha=0.6, c=colors[name],
                       marker="o" if mod == "image" else "^", label=f"{name} {mod}")
        if ("xbt", "image") in pos and ("old", "text") in pos:
            for i in range(min(n_lines, n)):
                for a, b in ((("xbt", "image"), ("old", "text")),
                             (("xbt", "text"), ("old", "image"))):
                    ax.plot([pos[a][i, 0], pos[b][i, 0]], [pos[a][i, 1], pos[b][i, 1]],
                            c="gray", lw=0.6, alpha=0.7)
        ax.set_title(f"{dim}-d space: {', '.join(names)} ({n} pairs)")
        ax.legend(fontsize=7, markerscale=1.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = _save_png(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# the report


def write_report(out_dir: str | os.PathLike, compat: Mapping, zero_shot: Mapping | None = None,
                 compute: Sequence[Mapping] | None = None, views: Mapping | None = None,
                 caption_to_image=None, title: str = "XBT evaluation",
                 meta: Mapping | None = None, tsne_pairs: int = 200, seed: int = 0) -> dict:
    """Write eval.json, report.md, recall_bars.png and (when `views` given) tsne.png.

    `compute`: rows of the Table-6 compute table, dicts with keys `method`, `trainable_params`,
    `wall_time_s`, `peak_memory_bytes`, `samples_seen` (missing keys print as '-').
    `meta`: free-form run info (method name, seed, model refs...) stored in eval.json; `ablation`
    reads `meta["method"]` as the row name.
    Returns {"eval_json": path, "report_md": path, "recall_bars": path, "tsne": path | None}.
    """
    out = str(out_dir)  # a str: Path() would turn s3://b/x into a local folder "s3:"
    storage.makedirs(out)
    result = {"meta": dict(meta or {}), "compat": compat, "zero_shot": zero_shot or {},
              "compute": list(compute or [])}
    atomic_write_text(storage.join(out, "eval.json"), json.dumps(_jsonable(result), indent=2) + "\n")

    bars = plot_recall_bars(compat, storage.join(out, "recall_bars.png"))
    tsne = None
    if views is not None:
        if caption_to_image is None:
            raise ValueError("write_report: views given for the t-SNE plot but no caption_to_image")
        tsne = plot_tsne(views, caption_to_image, storage.join(out, "tsne.png"), n_pairs=tsne_pairs, seed=seed)

    es = compat.get("eval_set", {})
    parts = [f"# {title}", ""]
    if meta:
        parts += [", ".join(f"{k}: `{v}`" for k, v in meta.items()), ""]
    parts += [f"Eval set: {es.get('n_images', '?')} images, {es.get('n_captions', '?')} captions; "
              f"embedding dims: " + ", ".join(f"{k}={v}" for k, v in compat.get("dims", {}).items()),
              "", "## Retrieval (query view / gallery view)", "",
              "t2i: text queries vs image gallery; i2t: image queries vs text gallery "
              "(correct when any caption of the image is retrieved).", "",
              recall_table(compat), "", "## Verdict (paper Eqn 1)", "", verdict_section(compat),
              "", f"![recall bars]({os.path.basename(str(bars))})", ""]
    if zero_shot:
        parts += ["## Zero-shot classification (image view / class-text view)", "",
                  zero_shot_table(zero_shot), ""]
    if compute:
        parts += ["## Compute (paper Table 6 form)", "", compute_table(compute), ""]
    if tsne is not None:
        parts += ["## t-SNE of paired embeddings", "", f"![t-SNE]({os.path.basename(str(tsne))})", ""]
    atomic_write_text(storage.join(out, "report.md"), "\n".join(parts))
    local = (lambda p: p) if storage.is_remote(out) else Path
    return {"eval_json": local(storage.join(out, "eval.json")), "report_md": local(storage.join(out, "report.md")),
            "recall_bars": bars, "tsne": tsne}
