"""`xbt index eval`: the six retrieval cases searched through each built index, next to flat.

Queries are the eval set's captions (all of them, multi-caption) and images, encoded by each query
view; galleries are the indexed gallery views. A query is correct at K when the gallery item with
its own key is among the index's top K (for text->image: the caption's image; for image->text: the
gallery item's caption). Queries whose key is not in the gallery are skipped and counted.

Two kinds of numbers per (case, index type):
- `R@K`: retrieval recall through the index (what users get),
- `ann_recall@k`: the index's own recall, |ANN top-k  and  exact top-k| / k, with exact search
  (an in-memory flat index over the same rows) as truth. Cross-modal queries (text against an
  image gallery) sit far from the gallery rows (the modality gap), which is where quantised
  indexes lose most; this number shows it per case.
The Eqn-1 verdict is checked per index type: R@K(xbt/old) >= R@K(old/old) on the SAME index.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from xbt_dist.artifacts import atomic_write_text, read_manifest
from xbt_dist.config import RunConfig
from xbt_dist.data.shards import iter_image_text
from xbt_dist.index.build import KIND, index_dir
from xbt_dist.index.faiss_index import build_index, load_index, search, to_gpu

CASES = (("old", "old"), ("new", "old"), ("phi", "old"), ("xbt", "old"), ("new", "new"), ("xbt", "xbt"))


def align_dim(x: np.ndarray, d: int) -> np.ndarray:
    """The naive drop-in of compat.align_dim: truncate, or zero-pad, a d'-dim query to d dims."""
    if x.shape[1] >= d:
        return x[:, :d]
    return np.pad(x, ((0, 0), (0, d - x.shape[1])))


def load_queries(spec: str) -> dict:
    """{"images", "image_keys", "captions", "caption_keys"} of a (multi-caption) shard set."""
    images, image_keys, captions, caption_keys = [], [], [], []
    for key, image, caption, meta in iter_image_text(spec):
        images.append(image)
        image_keys.append(key)
        for c in meta.get("captions") or [caption]:
            captions.append(c)
            caption_keys.append(key)
    if not images:
        raise ValueError(f"query set {spec} holds no readable image-text sample")
    return {"images": images, "image_keys": image_keys, "captions": captions,
            "caption_keys": caption_keys}


class GalleryIndexes:
    """The built indexes of one `index.dir`, loaded lazily: `get(view, modality, type)`."""

    def __init__(self, root: str | Path, use_gpu: bool = False):
        self.root = Path(root)
        self.use_gpu = use_gpu  # flat and IVF-PQ searched on GPU 0 (index.use_gpu); HNSW stays on CPU
        self.manifest = read_manifest(self.root)
        if self.manifest.get("kind") != KIND:
            raise ValueError(f"{self.root} is a {self.manifest.get('kind')!r} artifact, not an index "
                             "directory: build one with `xbt index build`")
        self.entries = self.manifest["indexes"]
        self._keys: dict[str, np.ndarray] = {}
        self._cache: dict[str, object] = {}

    @property
    def views(self) -> list[str]:
        return sorted({e["view"] for e in self.entries.values()})

    @property
    def types(self) -> list[str]:
        return sorted({e["type"] for e in self.entries.values()})

    def keys(self, view: str) -> np.ndarray:
        if view not in self._keys:
            self._keys[view] = np.load(self.root / view / "keys.npy")
        return self._keys[view]

    def get(self, view: str, modality: str, kind: str):
        name = f"{view}/{modality}.{kind}"
        if name not in self.entries:
            raise KeyError(f"no index {name} in {self.root} (built: {sorted(self.entries)}); "
                           "add the view/type to index.views/index.types and rerun `xbt index build`")
        if name not in self._cache:
            e = self.entries[name]
            index = load_index(self.root / e["path"], kind, e["params"])
            self._cache[name] = to_gpu(index, kind) if self.use_gpu else index
        return self._cache[name]

    def rows(self, view: str, modality: str) -> np.ndarray:
        """The gallery rows, reconstructed from the exact (flat) index or the embedding set."""
        if f"{view}/{modality}.flat" in self.entries:  # the CPU copy from disk, GPU or not
            e = self.entries[f"{view}/{modality}.flat"]
            idx = load_index(self.root / e["path"], "flat", e["params"])
            return idx.reconstruct_n(0, idx.ntotal)
        from xbt_dist.index.build import load_gallery
        return load_gallery(self.manifest["inputs"]["galleries"][view], view)[1][modality]


def ranks_of_positives(rows: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Position of each query's positive row in its result list; a huge rank when absent (a miss
    at every K, also when K exceeds the list, e.g. a gallery smaller than K)."""
    hit = rows == positive[:, None]
    found = hit.any(axis=1)
    return np.where(found, hit.argmax(axis=1), np.iinfo(np.int64).max)


def _recalls(ranks: np.ndarray, ks) -> dict:
    return {f"R@{k}": float((ranks < k).mean()) for k in ks}


def evaluate_indexes(cfg: RunConfig, encoder=None, queries: dict | None = None) -> dict:
    """Six cases x index types; writes index_eval.json/.md into the index dir; returns the result."""
    ic = cfg.index
    root = index_dir(cfg)
    idx = GalleryIndexes(root, use_gpu=ic.use_gpu)
    spec = ic.query_shards or cfg.eval.eval_shards
    if queries is None:
        if not spec:
            raise ValueError("index.query_shards is not set (nor eval.eval_shards): point it at a "
                             "multi-caption eval shard set")
        queries = load_queries(spec)
    if encoder is None:
        from xbt_dist.index.encoders import QueryEncoder
        encoder = QueryEncoder(cfg, views=("old", "new", "phi", "xbt"), batch_size=ic.batch_size)
    k_max = max(ic.ks)
    q_emb = {v: {"text": encoder.texts(v, queries["captions"]), "image": encoder.images(v, queries["images"])}
             for v in encoder.views}
    results, skipped_cases = {}, {}
    hits: dict[tuple, np.ndarray] = {}   # (case, kind, direction) -> per-query hit@1, for flip rates
    for qv, gv in CASES:
        case = f"{qv}/{gv}"
        if qv not in q_emb or gv not in idx.views:
            skipped_cases[case] = (f"no {qv!r} query encoder" if qv not in q_emb
                                   else f"gallery view {gv!r} not indexed")
            continue
        gkeys = idx.keys(gv)
        key_row = {k: i for i, k in enumerate(gkeys.tolist())}
        results[case] = {}
        for direction, q_mod, g_mod, q_keys in (("t2i", "text", "image", queries["caption_keys"]),
                                                ("i2t", "image", "text", queries["image_keys"])):
            q = q_emb[qv][q_mod]
            g_dim = idx.entries[f"{gv}/{g_mod}.{idx.types[0]}"]["d"]
            note = None
            if q.shape[1] != g_dim:  # only new/old: the naive swap into a fixed-width index
                note = f"{qv} queries {'truncated' if q.shape[1] > g_dim else 'zero-padded'} to {g_dim} dims"
                q = align_dim(q, g_dim)
            keep = np.array([k in key_row for k in q_keys], dtype=bool)
            q = q[keep]
            positive = np.array([key_row[k] for k, ok in zip(q_keys, keep) if ok], dtype=np.int64)
            # Exact top-k from an in-memory flat index over the same rows: the truth for ann_recall.
            exact, _ = build_index(idx.rows(gv, g_mod), "flat", ic)
            _, exact_rows = search(exact, q, k_max)
            for kind in idx.types:
                index = idx.get(gv, g_mod, kind)
                t0 = time.perf_counter()
                _, rows = search(index, q, k_max)
                dt = time.perf_counter() - t0
                k = rows.shape[1]
                overlap = [len(set(a[a >= 0]) & set(b)) / k for a, b in zip(rows, exact_rows)]
                ranks = ranks_of_positives(rows, positive)
                hits[(case, kind, direction)] = ranks < 1
                res = {**_recalls(ranks, ic.ks),
                       f"ann_recall@{k}": float(np.mean(overlap)) if overlap else float("nan"),
                       "n_queries": int(len(q)), "skipped_queries": int((~keep).sum()),
                       "queries_per_s": round(len(q) / max(dt, 1e-9), 1)}
                if note:
                    res["note"] = note
                results[case].setdefault(kind, {})[direction] = res
    verdicts = {kind: _verdict(results, kind, cfg.eval.criterion_ks) for kind in idx.types}
    # Negative flips (the backward-compatibility literature's regression measure): queries the old
    # system answered right at rank 1 that the XBT query gets wrong, on the same index.
    flips = {kind: {d: float(np.mean(hits[("old/old", kind, d)] & ~hits[("xbt/old", kind, d)]))
                    for d in ("t2i", "i2t")}
             for kind in idx.types if ("xbt/old", kind, "t2i") in hits and ("old/old", kind, "t2i") in hits}
    out = {"index_dir": str(root), "query_shards": spec, "ks": list(ic.ks),
           "n_queries": {"t2i": len(queries["captions"]), "i2t": len(queries["images"])},
           "cases": results, "skipped_cases": skipped_cases, "verdict": verdicts,
           "negative_flip_rate@1": flips,
           "indexes": {n: {k: e[k] for k in ("type", "n", "d", "params", "build_s", "bytes")}
                       for n, e in idx.entries.items()}}
    atomic_write_text(root / "index_eval.json", json.dumps(out, indent=2) + "\n")
    atomic_write_text(root / "index_eval.md", format_markdown(out))
    print(f"[index] eval: {root / 'index_eval.md'}", file=sys.stderr)
    return out


def _verdict(results: dict, kind: str, ks) -> dict:
    if "xbt/old" not in results or "old/old" not in results:
        return {"compatible": None, "note": "xbt/old or old/old not evaluated"}
    per = {}
    for d in ("t2i", "i2t"):
        x, o = results["xbt/old"][kind][d], results["old/old"][kind][d]
        per[d] = all(x.get(f"R@{k}", 0.0) >= o.get(f"R@{k}", 1.0) for k in ks if f"R@{k}" in x)
    return {"compatible": all(per.values()), **per,
            "criterion": f"R@K(xbt/old) >= R@K(old/old) on the {kind} index, K in {list(ks)}"}


def format_markdown(res: dict) -> str:
    ks = res["ks"]
    ann = None
    lines = ["# Old-gallery index evaluation\n", f"Queries: {res['n_queries']['t2i']} captions, "
             f"{res['n_queries']['i2t']} images from `{res['query_shards']}`.\n",
             "| case | index | " + " | ".join(f"t2i R@{k}" for k in ks) + " | "
             + " | ".join(f"i2t R@{k}" for k in ks) + " | t2i ANN recall | i2t ANN recall | t2i q/s |",
             "|---|---|" + "---|" * (2 * len(ks) + 3)]
    for case, by_kind in res["cases"].items():
        for kind, r in by_kind.items():
            ann = next(k for k in r["t2i"] if k.startswith("ann_recall@"))
            cells = [f"{r[d][f'R@{k}']:.3f}" for d in ("t2i", "i2t") for k in ks]
            lines.append(f"| {case} | {kind} | " + " | ".join(cells)
                         + f" | {r['t2i'][ann]:.3f} | {r['i2t'][ann]:.3f} | {r['t2i']['queries_per_s']:.0f} |")
    if ann:
        lines.append(f"\nANN recall = {ann}: share of the exact top-k the index returns.\n")
    lines.append("\n## Eqn-1 verdict per index\n")
    for kind, v in res["verdict"].items():
        lines.append(f"- {kind}: compatible = {v['compatible']}")
    if res.get("negative_flip_rate@1"):
        lines.append("\nNegative flip rate @1 (old/old right, xbt/old wrong): " + "; ".join(
            f"{k}: t2i {v['t2i']:.3f}, i2t {v['i2t']:.3f}" for k, v in res["negative_flip_rate@1"].items()))
    lines.append("\n## Indexes\n\n| index | n | d | params | build s | MiB |\n|---|---|---|---|---|---|")
    for name, e in res["indexes"].items():
        p = {k: v for k, v in e["params"].items() if k != "notes"}
        lines.append(f"| {name} | {e['n']} | {e['d']} | {p or '-'} | {e['build_s']:.3f} | "
                     f"{e['bytes'] / 2**20:.3f} |")
    if res["skipped_cases"]:
        lines.append("\nSkipped cases: " + ", ".join(f"{c} ({why})" for c, why in res["skipped_cases"].items()))
    return "\n".join(lines) + "\n"
