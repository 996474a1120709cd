"""`xbt index build`: embed the gallery per view (once) and build its FAISS indexes.

Layout of `index.dir` (default `<out_dir>/index`):

    gallery/<view>/            embedding shard set of the gallery: `image_<view>`, `text_<view>`
    <view>/<modality>.<type>.faiss   one index per (view, modality, type)
    <view>/keys.npy            gallery keys, row i of every index of that view
    manifest.json              kind "index": model identities, effective parameters, build time, bytes

The `old` view is the gallery the retrieval system already holds: pass it as `index.old_embeddings`
(an embedding set with `image_old`/`text_old`), or it is embedded here once with the old model.
`new` (the backfilled upper bound, new/new) and `xbt` (xbt/xbt) are embedded from
`index.gallery_shards`. Each gallery set records the identity of what made it (`identity.json`);
a set made by other weights is recomputed, never mixed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from xbt_dist.artifacts import atomic_write_text, read_manifest, write_manifest
from xbt_dist.config import RunConfig
from xbt_dist.data.embeddings import EmbeddingShardSet
from xbt_dist.index.faiss_index import build_index, save_index, to_gpu
from xbt_dist.index.identity import describe, file_sha256, model_identity, same_model

KIND = "index"
MODALITIES = ("image", "text")


def index_dir(cfg: RunConfig) -> Path:
    return Path(cfg.index.dir or cfg.stage_dir("index"))


def gallery_shards(cfg: RunConfig) -> str:
    spec = cfg.index.gallery_shards or cfg.eval.eval_shards
    if not spec:
        raise ValueError("index.gallery_shards is not set (nor eval.eval_shards): point it at the "
                         "image-text shard set whose embeddings the retrieval system holds")
    return spec


def view_identity(cfg: RunConfig, view: str) -> dict:
    """What produces a view's embeddings: the model, plus the adapters file for `xbt`."""
    if view == "old":
        return {"old": model_identity(cfg.old)}
    if view == "new":
        return {"new": model_identity(cfg.new)}
    from xbt_dist.train.stage2 import ADAPTERS_FILE
    adapters = Path(cfg.stage_dir("train")) / ADAPTERS_FILE
    if not adapters.is_file():
        raise FileNotFoundError(f"{adapters} not found: the xbt gallery view needs a trained run "
                                "(`xbt train`), or set index.views=[old, new]")
    return {"new": model_identity(cfg.new), "adapters_sha256": file_sha256(adapters)}


def load_gallery(directory: str | Path, view: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(keys, {modality: rows}) of an embedding set, through its public per-shard API."""
    emb = EmbeddingShardSet(directory)
    fields = [f"{m}_{view}" for m in MODALITIES]
    emb.check_fields(fields)
    keys, parts = [], {m: [] for m in MODALITIES}
    for name, count in emb.counts().items():
        if not count:
            continue
        shard = emb.shard(name)
        keys.extend(shard.keys)
        for m in MODALITIES:
            parts[m].append(np.asarray(shard.fields[f"{m}_{view}"], dtype=np.float32))
    if not keys:
        raise ValueError(f"embedding set {directory} holds no rows: nothing to index")
    return np.asarray(keys), {m: np.concatenate(parts[m]) for m in MODALITIES}


def _check_old_set(directory: Path, cfg: RunConfig) -> dict:
    """The identity of an existing old-gallery set; refuse one made by another old model."""
    want = model_identity(cfg.old)
    try:
        recorded = read_manifest(directory).get("inputs", {}).get("models", {}).get("old")
    except FileNotFoundError:
        recorded = None
    ident_file = directory / "identity.json"
    if ident_file.is_file():
        recorded = json.loads(ident_file.read_text()).get("old", recorded)
    if not recorded or not isinstance(recorded, dict):
        print(f"[index] {directory} does not record which old model made it; assuming "
              f"{describe(want)}", file=sys.stderr)
        return want
    got = {"arch": recorded.get("arch"), "pretrained": recorded.get("pretrained"),
           "sha256": recorded.get("sha256")}
    if not got["sha256"] and got["pretrained"] and Path(str(got["pretrained"])).is_file():
        got["sha256"] = file_sha256(got["pretrained"])
    if not same_model(got, want):
        raise ValueError(f"index.old_embeddings {directory} was made by {describe(got)}, but the "
                         f"run's old model is {describe(want)}: point index.old_embeddings at the "
                         "gallery of this old model, or fix old.* in the recipe")
    return got


def embed_gallery(cfg: RunConfig, encoder=None) -> dict[str, dict]:
    """{view: {"dir", "identity"}} for every configured view, embedding what is missing or stale."""
    from xbt_dist.data.embed import embed_shards
    root = index_dir(cfg) / "gallery"
    out = {}
    for view in cfg.index.views:
        if view == "old" and cfg.index.old_embeddings:
            d = Path(cfg.index.old_embeddings)
            out[view] = {"dir": str(d), "identity": {"old": _check_old_set(d, cfg)}}
            continue
        d = root / view
        ident = view_identity(cfg, view)
        ident_file = d / "identity.json"
        if d.exists() and (not ident_file.is_file() or json.loads(ident_file.read_text()) != ident):
            print(f"[index] gallery/{view} was embedded by other weights: recomputing", file=sys.stderr)
            shutil.rmtree(d)
        fields = [f"{m}_{view}" for m in MODALITIES]
        if view in ("old", "new"):
            encoders = {view: getattr(cfg, view)}
        else:
            if encoder is None:
                from xbt_dist.index.encoders import QueryEncoder
                encoder = QueryEncoder(cfg, views=("xbt",), batch_size=cfg.index.batch_size)
            encoders = {"image_xbt": lambda ims: encoder.images("xbt", ims),
                        "text_xbt": lambda txt: encoder.texts("xbt", txt)}
        embed_shards(gallery_shards(cfg), d, encoders, fields, cfg.index.batch_size,
                     progress=lambda s: print(s, file=sys.stderr))
        atomic_write_text(ident_file, json.dumps(ident, indent=2) + "\n")
        out[view] = {"dir": str(d), "identity": ident}
    return out


def build_indexes(cfg: RunConfig, encoder=None) -> dict:
    """Embed the gallery views and build every (view, modality, type) index; returns the manifest."""
    ic = cfg.index
    root = index_dir(cfg)
    galleries = embed_gallery(cfg, encoder)
    entries = {}
    for view, g in galleries.items():
        keys, rows = load_gallery(g["dir"], view)
        (root / view).mkdir(parents=True, exist_ok=True)
        np.save(root / view / "keys.npy", keys)
        for modality in MODALITIES:
            for kind in ic.types:
                index, info = build_index(rows[modality], kind, ic)
                path = root / view / f"{modality}.{kind}.faiss"
                save_index(index, path)
                if ic.use_gpu:
                    to_gpu(index, kind)  # fails early, at build time, if the GPU build is missing
                entries[f"{view}/{modality}.{kind}"] = {**info, "view": view, "modality": modality,
                                                        "path": str(path.relative_to(root))}
                print(f"[index] {view}/{modality}.{kind}: {info['n']} x {info['d']}, "
                      f"{info['build_s']:.2f} s, {info['bytes'] / 2**20:.2f} MiB", file=sys.stderr)
    old_identity = galleries["old"]["identity"]["old"]
    return write_manifest(root, KIND, config=cfg.index,
                          inputs={"gallery_shards": gallery_shards(cfg),
                                  "galleries": {v: g["dir"] for v, g in galleries.items()},
                                  "run": cfg.out_dir},
                          counts={v: int(e["n"]) for v, e in entries.items()},
                          old_model=old_identity,
                          view_identities={v: g["identity"] for v, g in galleries.items()},
                          indexes=entries)
