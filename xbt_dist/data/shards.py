"""Webdataset shard sets: listing, sizes, and plain sample iterators.

A shard set is a directory of webdataset tars (sorted names = canonical order), a glob, or
webdataset brace notation (`data/a-{000..009}.tar`); paths may be local or fsspec URLs
(`s3://...`, `gs://...`, `file://...`). Samples follow webdataset's convention: tar members
`<key>.<ext>` grouped into dicts `{"__key__": key, "__url__": shard, ext: bytes, ...}`.

Reading is done with our own streaming tar reader (`tarstream.py`; `tarfile` read the toy shards
5.7x slower) rather than `wds.WebDataset` because we need exact control over what happens on a
truncated tar (keep the samples read so far, count the damage, move on) and over the sample
position (for checkpointable streams, see stream.py).
Key splitting reuses webdataset's `base_plus_ext`, so sample dicts are identical to webdataset's.
"""

from __future__ import annotations

import glob as _glob
import io
import json
import logging
import os
import tarfile
import zlib
from collections import Counter
from typing import Any, Iterator

import fsspec
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from xbt_dist.data.tarstream import open_tar_members

log = logging.getLogger(__name__)

SIZES = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardError(ValueError):
    """A shard set spec that names nothing, or a shard that does not exist."""


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _strip_file(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def list_shards(spec: str | os.PathLike | list, suffix: str = ".tar", missing_ok: bool = False
                ) -> list[str]:
    """Resolve a shard set spec to an ordered list of shard paths/URLs.

    `spec` is a directory (all `*<suffix>` inside, sorted), a glob (`/d/*.tar`), brace notation
    (`/d/a-{000..009}.tar`, expanded in order and each shard checked to exist), or a list of those.
    Raises ShardError naming the path and what to do when nothing matches or a shard is missing.
    `missing_ok`: brace notation is expanded without the existence checks (one request per shard
    on object storage); the training stream skips and counts the shards that are missing.
    """
    if isinstance(spec, (list, tuple)):
        out = [s for item in spec for s in list_shards(item, suffix, missing_ok)]
        if not out:
            raise ShardError("empty shard list: pass at least one shard, directory or glob")
        return out
    spec = _strip_file(os.fspath(spec))
    if _is_url(spec):
        fs, _, _ = fsspec.get_fs_token_paths(spec.replace("{", "").replace("}", ""))
        protocol = spec.split("://", 1)[0]

        def exists(p): return fs.exists(p)
        def isdir(p): return fs.isdir(p)
        def globber(p): return sorted(f"{protocol}://{x}" if "://" not in x else x for x in fs.glob(p))
    else:
        exists, isdir = os.path.exists, os.path.isdir
        def globber(p): return sorted(_glob.glob(p))

    if "{" in spec and ".." in spec:
        shards = list(braceexpand(spec))
        missing = [] if missing_ok else [s for s in shards if not exists(s)]
        if missing:
            raise ShardError(
                f"{len(missing)} of {len(shards)} shards of {spec!r} do not exist, first: {missing[0]}; "
                "fix the brace range or (re)create the missing shards")
        return shards
    if any(c in spec for c in "*?["):
        shards = globber(spec)
        if not shards:
            raise ShardError(f"no shard matches the glob {spec!r}; check the path and pattern")
        return shards
    if isdir(spec):
        shards = globber(os.path.join(spec, f"*{suffix}") if not _is_url(spec)
                         else spec.rstrip("/") + f"/*{suffix}")
        if not shards:
            raise ShardError(
                f"directory {spec!r} holds no *{suffix} shards; point at a shard set directory "
                "(e.g. the output of img2dataset or `xbt toy-world`)")
        return shards
    if exists(spec):
        return [spec]
    raise ShardError(f"shard set {spec!r} does not exist; pass a directory, a glob or a "
                     "brace pattern like 'dir/a-{000..009}.tar'")


def shard_name(shard: str) -> str:
    """File name without directory and suffix: '/d/a-001.tar' -> 'a-001'."""
    base = shard.rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def shard_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """Sample count per shard file name, from `sizes.json` when present, else by reading the tars."""
    directory = _strip_file(os.fspath(directory))
    sizes_path = directory.rstrip("/") + "/" + SIZES
    with _maybe_open(sizes_path) as f:
        if f is not None:
            return {str(k): int(v) for k, v in json.load(f).items()}
    sizes = {}
    for shard in list_shards(directory):
        sizes[shard.rsplit("/", 1)[-1]] = sum(1 for _ in iter_raw_samples(shard))
    return sizes


class _maybe_open:
    """Context manager yielding an open text file or None when the path does not exist."""

    def __init__(self, path: str):
        self.path, self.f = path, None

    def __enter__(self):
        try:
            self.f = fsspec.open(self.path, "rt").open()
        except FileNotFoundError:
            self.f = None
        return self.f

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()


def write_sizes(directory: str | os.PathLike, sizes: dict[str, int]) -> None:
    """Write `sizes.json` (shard file name -> sample count) next to the shards."""
    from xbt_dist.artifacts import atomic_write_text
    atomic_write_text(os.path.join(os.fspath(directory), SIZES), json.dumps(sizes, indent=1) + "\n")


def group_samples(members: Iterator[tuple[int, str, bytes]], shard: str, keep_partial: bool = True
                  ) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    """Group tar members `(offset, name, data)` into samples: `(start, next_start, sample)`.

    `start` is the byte offset of the sample's first member (-1 in compressed tars) and
    `next_start` that of the following sample (None after the last one): a reader that stops
    after this sample resumes by seeking there. A sample is complete when the next key appears,
    so the next sample's first member has been read already when this one is yielded.
    Members without an extension (or hidden `._` files) are ignored. When reading fails,
    `keep_partial` yields the sample being assembled (with `next_start` None) before the error
    propagates, as webdataset does; decoding rejects it if it lost members.
    """
    current: dict[str, Any] | None = None
    start = -1
    try:
        for offset, name, data in members:
            key, ext = base_plus_ext(name)
            if key is None or name.rsplit("/", 1)[-1].startswith("._"):
                continue
            if current is not None and current["__key__"] != key:
                yield start, offset, current
                current = None
            if current is None:
                current, start = {"__key__": key, "__url__": shard}, offset
            current[ext.lower()] = data
    except Exception:  # not GeneratorExit: a consumer closing us early is no read error
        if keep_partial and current is not None:
            yield start, None, current
        raise
    if current is not None:
        yield start, None, current


def iter_raw_samples(shard: str, stats: Counter | None = None) -> Iterator[dict[str, Any]]:
    """Yield webdataset-style sample dicts (`__key__`, `__url__`, ext -> bytes) from one tar.

    A truncated or corrupt tar ends the shard early: samples read before the damage are kept
    (like webdataset, the last one is kept too; if it lost members, decoding rejects it),
    `stats["truncated_shard"]` is incremented and a warning names the shard. Members without an extension (or hidden `._` files) are ignored.
    """
    current: dict[str, Any] | None = None
    try:
        with fsspec.open(_strip_file(shard), "rb") as f:
            for _, _, current in group_samples(open_tar_members(f), shard):
                yield current
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise ShardError(f"shard {shard} does not exist; relist the shard set") from e
        if stats is not None:
            stats["truncated_shard"] += 1
        log.warning("truncated or corrupt shard %s after key %s (%s: %s); rest of shard skipped",
                    shard, current["__key__"] if current else None, type(e).__name__, e)


def decode_caption(sample: dict) -> str | None:
    """The caption (`txt`, utf-8, stripped), or None when missing/empty/undecodable."""
    raw = sample.get("txt")
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def decode_image(sample: dict):
    """The first image member (jpg/jpeg/png/webp) as an RGB PIL image, or None when missing/bad.

    `convert("RGB")` forces a full decode, so truncated image bytes fail here, not in a worker's
    transform later.
    """
    from PIL import Image
    for ext in IMAGE_EXTS:
        if ext in sample:
            try:
                with Image.open(io.BytesIO(sample[ext])) as im:
                    return im.convert("RGB")
            except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...)
                return None
    return None


def decode_meta(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {"value": meta}


def _warn_skip(stats: Counter | None, reason: str, sample: dict) -> None:
    if stats is not None:
        stats[reason] += 1
    log.warning("skipping sample %s in shard %s: %s", sample.get("__key__"), sample.get("__url__"), reason)


def iter_image_text(spec, stats: Counter | None = None) -> Iterator[tuple[str, Any, str, dict]]:
    """Yield `(key, PIL.Image RGB, caption, meta)` over a shard set in canonical order.

    Bad samples (undecodable/missing image, missing caption) are skipped, counted in `stats` by
    reason (`bad_image`, `missing_caption`, `truncated_shard`) and logged with shard and key.
    """
    for shard in list_shards(spec):
        for sample in iter_raw_samples(shard, stats):
            caption = decode_caption(sample)
            if caption is None:
                _warn_skip(stats, "missing_caption", sample)
                continue
            image = decode_image(sample)
            if image is None:
                _warn_skip(stats, "bad_image", sample)
                continue
            yield sample["__key__"], image, caption, decode_meta(sample)


def iter_text(spec, stats: Counter | None = None) -> Iterator[tuple[str, str]]:
    """Yield `(key, text)` over a text (or image-text) shard set; samples without text are skipped."""
    for shard in list_shards(spec):
        for sample in iter_raw_samples(shard, stats):
            caption = decode_caption(sample)
            if caption is None:
                _warn_skip(stats, "missing_caption", sample)
                continue
            yield sample["__key__"], caption
