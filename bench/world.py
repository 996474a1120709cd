"""Bench inputs: the toy world's shards and models, plus random embedding shard sets.

Throughput does not depend on trained weights, so the benches reuse the toy world's shards
(`runs/toy-seed0`, built by `xbt toy-world`) and its model architectures, loading the trained
checkpoints when they exist and random weights otherwise (the `weights` field says which). When
no toy world is there (a fresh checkout, or the seconds-long test) `small_world` writes a
synthetic one of the same format under the bench's output directory.

Precomputed targets (`image_old`, `text_old`) and stage-1 text embeddings (`text_new`,
`text_old`) are written as random unit vectors in fp16 with the real embedding-shard writer:
what the loader reads and joins costs the same whatever the numbers are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xbt_dist.config import ModelRef
from xbt_dist.data.embeddings import write_embedding_manifest, write_embedding_shard
from xbt_dist.data.shards import iter_raw_samples, list_shards, shard_name, write_sizes

DEFAULT_TOY = Path(__file__).resolve().parent.parent / "runs" / "toy-seed0"

# Same shapes as the toy world's base CLIPs (xbt_dist/toy/base_clip.py), for the synthetic world.
TOY_ARCHS = {
    "toy-old": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64,
                                                "head_width": 32, "patch_size": 8},
                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                             "layers": 2}},
    "toy-new": {"embed_dim": 96, "vision_cfg": {"image_size": 64, "layers": 3, "width": 128,
                                                "head_width": 32, "patch_size": 8},
                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 3,
                             "layers": 3}},
}


def toy_world(root: str | Path = DEFAULT_TOY) -> dict | None:
    """The toy world at `root` if its shards and model configs exist, else None."""
    root = Path(root)
    models = root / "models"
    if not all((root / d / "sizes.json").is_file() for d in ("train", "text")):
        return None
    if not all((models / f"{a}.json").is_file() for a in TOY_ARCHS):
        return None
    trained = (models / "manifest.json").is_file()
    ckpt = {r: models / f"{r}.pt" for r in ("old", "new")}
    trained = trained and all(p.is_file() for p in ckpt.values())
    return {"train": str(root / "train"), "text": str(root / "text"), "models_dir": str(models),
            "old": ModelRef("toy-old", str(ckpt["old"]) if trained else None, str(models)),
            "new": ModelRef("toy-new", str(ckpt["new"]) if trained else None, str(models)),
            "weights": "trained" if trained else "random", "source": str(root)}


def small_world(out: str | Path, n_shards: int = 2, per_shard: int = 256, n_text: int = 2048) -> dict:
    """A synthetic world in the toy world's formats (64x64 JPEGs, toy archs, random weights)."""
    from xbt_testing.synthetic import write_image_text_shards, write_text_shards

    out = Path(out)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name, spec in TOY_ARCHS.items():
        (models / f"{name}.json").write_text(json.dumps(spec))
    if not (out / "train" / "sizes.json").is_file():
        write_image_text_shards(out / "train", n_shards=n_shards, per_shard=per_shard,
                                image_size=64, sizes=True)
    if not (out / "text" / "sizes.json").is_file():
        per = max(1, n_text // 2)
        paths = write_text_shards(out / "text", n_shards=2, per_shard=per)
        write_sizes(out / "text", {Path(p).name: per for p in paths})
    return {"train": str(out / "train"), "text": str(out / "text"), "models_dir": str(models),
            "old": ModelRef("toy-old", None, str(models)), "new": ModelRef("toy-new", None, str(models)),
            "weights": "random", "source": "synthetic"}


def get_world(out: str | Path, toy_root: str | Path | None = DEFAULT_TOY) -> dict:
    """The toy world when present (reused, never rebuilt), else a synthetic one under `out`."""
    world = toy_world(toy_root) if toy_root else None
    return world or small_world(Path(out) / "world")


def shard_keys(shard: str) -> list[str]:
    return [s["__key__"] for s in iter_raw_samples(shard)]


def random_targets(train_dir: str, out_dir: str | Path, d_old: int, seed: int = 0) -> str:
    """Embedding shard set with random `image_old`/`text_old` rows keyed like `train_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        return str(out_dir)
    rng = np.random.default_rng(seed)
    for shard in list_shards(train_dir):
        keys = shard_keys(shard)
        name = shard_name(shard)
        write_embedding_shard(out_dir, name, keys, {
            "image_old": rng.standard_normal((len(keys), d_old), dtype=np.float32),
            "text_old": rng.standard_normal((len(keys), d_old), dtype=np.float32)})
    write_embedding_manifest(out_dir, source=train_dir, models={"old": "random"})
    return str(out_dir)


def random_text_embeddings(out_dir: str | Path, n: int, d_new: int, d_old: int,
                           per_shard: int = 4096, seed: int = 0) -> str:
    """Stage-1 embedding shard set of `n` random (text_new, text_old) pairs."""
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        return str(out_dir)
    rng = np.random.default_rng(seed)
    for s, start in enumerate(range(0, n, per_shard)):
        m = min(per_shard, n - start)
        name = f"emb-{s:06d}"
        keys = [f"{s:06d}{i:06d}" for i in range(m)]
        write_embedding_shard(out_dir, name, keys, {
            "text_new": rng.standard_normal((m, d_new), dtype=np.float32),
            "text_old": rng.standard_normal((m, d_old), dtype=np.float32)})
    write_embedding_manifest(out_dir, source="random", models={"old": "random", "new": "random"})
    return str(out_dir)
