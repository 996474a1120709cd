"""Tiny synthetic shard sets for tests and smoke runs (no downloads).

Samples match img2dataset's webdataset output (`__key__`, `jpg`, `txt`, `json`), written with
webdataset's own `TarWriter` so that the format under test is the real one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import webdataset as wds

from xbt_dist.data.shards import write_sizes


def jpeg_bytes(rng: np.random.Generator, size: int = 16) -> bytes:
    """A small random-colour JPEG (flat colour + noise so it compresses fast)."""
    from PIL import Image
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.integers(-20, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def sample_key(shard: int, i: int) -> str:
    return f"{shard:03d}{i:05d}"


def write_image_text_shards(directory: str | os.PathLike, n_shards: int = 3, per_shard: int = 8,
                            image_size: int = 16, seed: int = 0, prefix: str = "shard",
                            sizes: bool = False) -> list[str]:
    """Write `n_shards` tars of `per_shard` samples each (`jpg`, `txt`, `json`); returns paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, counts = [], {}
    for s in range(n_shards):
        path = directory / f"{prefix}-{s:03d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_shard):
                key = sample_key(s, i)
                w.write({"__key__": key, "jpg": jpeg_bytes(rng, image_size),
                         "txt": f"a photo of thing {key}", "json": {"shard": s, "i": i}})
        paths.append(str(path))
        counts[path.name] = per_shard
    if sizes:
        write_sizes(directory, counts)
    return paths


def write_text_shards(directory: str | os.PathLike, n_shards: int = 2, per_shard: int = 8,
                      prefix: str = "text") -> list[str]:
    """Write text-only shards (`__key__` + `txt`), the stage-1 corpus format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = directory / f"{prefix}-{s:03d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_shard):
                key = sample_key(s, i)
                w.write({"__key__": key, "txt": f"caption number {key}"})
        paths.append(str(path))
    return paths


def write_bad_shard(path: str | os.PathLike) -> str:
    """One shard of 4 samples for robustness tests: `bad0` good, `bad1` corrupt jpg bytes,
    `bad2` without caption, `bad3` good."""
    path = Path(path)
    jpg = jpeg_bytes(np.random.default_rng(0))
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "bad0", "jpg": jpg, "txt": "ok"})
        w.write({"__key__": "bad1", "jpg": b"\xff\xd8not a jpeg", "txt": "corrupt image"})
        w.write({"__key__": "bad2", "jpg": jpg})
        w.write({"__key__": "bad3", "jpg": jpg, "txt": "ok too"})
    return str(path)
