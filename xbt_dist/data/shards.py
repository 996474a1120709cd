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

This module is the one owner of the shard format: besides reading, it holds the key rule
(`split_member_name`), the good-sample rule (`check_sample`, used by `xbt prep validate` and the
training stream), the one tar writer (`ShardWriter`) and the one `sizes.json` writer.
"""

from __future__ import annotations

import glob as _glob
import io
import json
import logging
import os
import re
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


def write_sizes(directory: str | os.PathLike, sizes: dict[str, int]) -> str:
    """Write `sizes.json` (shard file name -> sample count, in shard order) next to the shards.

    The one sizes writer: prep, validate, the toy world and the synthetic sets all call it."""
    from xbt_dist.artifacts import atomic_write_text
    path = os.path.join(os.fspath(directory), SIZES)
    atomic_write_text(path, json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
    return path


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


# ---------------------------------------------------------------- the one shard format
# Everything below is what prep, `xbt prep validate`, embed and training share so that they cannot
# disagree about a sample: the key rule (`split_member_name`, `check_member_name`), the good-sample
# rule (`check_sample`), the end-of-archive check (`tar_is_complete`) and the one tar writer
# (`ShardWriter`, with `write_sizes` above). Reading is `iter_raw_samples` above.

SAMPLE_KINDS = ("image-text", "text", "eval", "zeroshot")


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """The key rule: tar member name -> `(key, field)`, or `(None, None)` for members a reader ignores.

    webdataset's rule (`base_plus_ext`): the key is the path up to the first dot of the basename
    (`dir/sub/0001.seg.png` -> key `dir/sub/0001`, field `seg.png`); the field is lower-cased, so
    `0001.JPG` is a `jpg` image. Names without a dot and macOS resource forks (`._*`) are ignored.
    """
    if name.rsplit("/", 1)[-1].startswith("._"):
        return None, None
    key, ext = base_plus_ext(name)
    if key is None:
        return None, None
    return key, ext.lower()


def check_member_name(key: str, field: str) -> str:
    """`<key>.<field>` if a reader gets exactly `(key, field)` back from it, else ValueError.

    The writer's side of the key rule: a dot in the key would split one sample into two, a
    leading `._` would hide it, an upper-case field would come back lower-cased."""
    name = f"{key}.{field}"
    if not field or split_member_name(name) != (key, field):
        raise ValueError(
            f"sample key {key!r} with field {field!r} does not survive the tar round trip (read back "
            f"as {split_member_name(name)}): keys may not contain '.' or start with '._', fields must "
            "be lower-case and non-empty; rename the key (e.g. replace '.' with '_')")
    return name


def _image_or_problem(data: bytes, decode: bool):
    """(RGB PIL image or None, problem detail or None) for one image member."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            # convert("RGB") is a full decode, exactly what training's transform gets; without
            # decode only the header is parsed (validate --no-decode)
            return (im.convert("RGB") if decode else None), None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        # drop "<_io.BytesIO object at 0x...>" so reports of the same data compare equal
        return None, re.sub(r" ?<[^>]* at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}")[:200]


class SampleCheck:
    """Verdict of `check_sample`: `problems` as `(reason, detail)` pairs (empty = good), plus the
    decoded `caption` and RGB `image` when the checks produced them (so training decodes once).

    `reason` (the first problem) is the name training counts a skipped sample under:
    `missing_caption`, `bad_image`, `bad_class` or `bad_json`."""

    __slots__ = ("problems", "caption", "image")

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []
        self.caption: str | None = None
        self.image = None

    @property
    def good(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str | None:
        return self.problems[0][0] if self.problems else None

    def __repr__(self) -> str:
        return f"SampleCheck(problems={self.problems}, caption={self.caption!r})"


def check_sample(sample: dict, kind: str = "image-text", *, decode: bool = True,
                 n_classes: int | None = None, all_problems: bool = False) -> SampleCheck:
    """The good-sample rule, for a webdataset sample dict from `iter_raw_samples`.

    `kind` (`image-text`, `text`, `eval`, `zeroshot`; `image_text` also accepted): what the
    sample must hold. Checked in this order, which is also training's skip order:
    1. caption (all kinds but zero-shot, where it is optional): `txt` present, utf-8, not blank
       -> else `missing_caption`;
    2. image (all kinds but text): the first of jpg/jpeg/png/webp present and decodable (a full
       `convert("RGB")` unless `decode=False`) -> else `bad_image`;
    3. zero-shot: `cls` an integer in `[0, n_classes)` -> else `bad_class`;
    4. eval: a `json` member, when present, has a non-empty `captions` list -> else `bad_json`.
    Training stops at the first problem (`all_problems=False`: an image is not decoded for a
    sample that already lacks its caption); validate asks for all of them.
    """
    kind = kind.replace("_", "-")
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {SAMPLE_KINDS}")
    out = SampleCheck()

    def problem(reason: str, detail: str) -> bool:
        out.problems.append((reason, detail))
        return not all_problems  # True = stop here

    if kind != "zeroshot" or "txt" in sample:
        raw = sample.get("txt")
        if raw is None:
            detail = f"no txt field; fields: {sorted(k for k in sample if not k.startswith('_'))}"
        else:
            try:
                out.caption = raw.decode("utf-8").strip() or None
                detail = "empty txt"
            except UnicodeDecodeError as e:
                detail = f"txt is not utf-8: {e}"
        if out.caption is None and problem("missing_caption", detail):
            return out
    if kind != "text":
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            detail = f"no {'/'.join(IMAGE_EXTS)} field; fields: " \
                     f"{sorted(k for k in sample if not k.startswith('_'))}"
        else:
            out.image, detail = _image_or_problem(sample[ext], decode)
        if detail is not None and problem("bad_image", detail):
            return out
    if kind == "zeroshot":
        try:
            c = int(sample["cls"])
            if n_classes is not None and not 0 <= c < n_classes:
                if problem("bad_class", f"cls {c} outside [0, {n_classes})"):
                    return out
        except (KeyError, ValueError) as e:
            if problem("bad_class", f"missing or non-integer cls ({e!r})"):
                return out
    if kind == "eval" and "json" in sample:
        try:
            if not json.loads(sample["json"]).get("captions"):
                problem("missing_caption", "json has no captions")
        except (ValueError, AttributeError) as e:
            problem("bad_json", str(e)[:200])
    return out


def is_good_sample(sample: dict, kind: str = "image-text", decode: bool = True) -> bool:
    """True when `check_sample` finds no problem (the sample counts in sizes.json)."""
    return check_sample(sample, kind, decode=decode).good


def tar_is_complete(shard: str) -> bool:
    """False when an uncompressed tar lacks its end-of-archive blocks (two zero 512-byte blocks).

    A tar cut exactly between two members reads cleanly (nothing is half-read), so only its tail
    tells that members after the cut are missing. Compressed tars report truncation while being
    read, so they count as complete here. A tar cut right after a member whose data ends in 1 KiB
    of zeros would pass: the check is for reports, sample counts never depend on it.
    """
    with fsspec.open(_strip_file(shard), "rb") as f:
        head = f.read(6)
        if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
            return True
        size = f.seek(0, os.SEEK_END)
        if size < 1024:
            return False
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


# ---- the one tar writer

def _encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int, float)):
        return str(value).encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"cannot store a {type(value).__name__} in a shard; use bytes, str, int or dict")


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar files are padded to whole 10 KiB records, like tarfile/GNU tar do


def _header_template() -> tuple[bytes, int]:
    info = tarfile.TarInfo("x")
    info.mode, info.mtime, info.size = 0o644, 0, 0
    hdr = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    hdr[0:100] = bytes(100)
    hdr[124:136] = bytes(12)
    hdr[148:156] = b" " * 8  # checksum is computed with its own field as spaces
    return bytes(hdr), sum(hdr)


_HEADER, _HEADER_SUM = _header_template()


def ustar_header(name: str, size: int) -> bytes:
    """USTAR header of a regular file (mode 644, mtime 0, uid/gid 0): the same bytes as tarfile's
    (PAX + USTAR for names USTAR cannot hold).

    Built from a precomputed template: `tarfile.TarInfo.tobuf` deep-copies and re-encodes every
    field, ~10x slower, which was the largest cost of a 67M-caption text corpus."""
    name_b = name.encode("utf-8")
    if len(name_b) > 100 or size >= 8 ** 11:
        # long names need the prefix field / huge sizes need base-256: let tarfile handle them;
        # a name USTAR cannot split (> 100 bytes without a '/' at the right place) gets a PAX
        # `path` record first (one more 512-byte-multiple header, which every reader handles)
        info = tarfile.TarInfo(name)
        info.mode, info.mtime, info.size = 0o644, 0, size
        try:
            return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")
        except ValueError:
            return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8")
    size_b = b"%011o\0" % size
    chk = _HEADER_SUM + sum(name_b) + sum(size_b)
    return b"".join((name_b, bytes(100 - len(name_b)), _HEADER[100:124], size_b, _HEADER[136:148],
                     b"%06o\0 " % chk, _HEADER[156:]))


class ShardWriter:
    """Writes samples (dicts with `__key__` plus fields) into `<prefix>-NNNNNN.tar` shards of at
    most `samples_per_shard` samples each; `close()` writes `sizes.json` and returns the sizes.

    Deterministic bytes (mtime 0, mode 644, no user names): the same input gives byte-identical
    shards, cheap to verify with a checksum. Each shard is written to a hidden temp name and renamed
    when complete, so a crash never leaves a truncated shard under a final name. Every member name
    goes through `check_member_name`, so what is written is what `iter_raw_samples` reads back.
    Values: bytes as they are, str utf-8, int/float as text, dict/list as JSON; None is skipped.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", samples_per_shard: int = 10000):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.sizes: dict[str, int] = {}
        self._tar = None  # open file object of the shard being written
        self._tmp = ""
        self._name = ""
        self._count = 0
        self._bytes = 0
        self._shard = 0

    def _open(self) -> None:
        self._name = f"{self.prefix}-{self._shard:06d}.tar"
        self._tmp = os.path.join(self.out_dir, f".{self._name}.tmp")
        self._tar = open(self._tmp, "wb")
        self._count = self._bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        # end-of-archive: two zero blocks, then zero padding to a whole record
        end = self._bytes + 2 * _BLOCK
        self._tar.write(bytes(2 * _BLOCK + (-end) % _RECORD))
        self._tar.close()
        os.replace(self._tmp, os.path.join(self.out_dir, self._name))
        self.sizes[self._name] = self._count
        self._tar = None
        self._shard += 1

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        members = [(check_member_name(key, field), _encode(value)) for field, value in sample.items()
                   if field != "__key__" and value is not None]  # all checked before any byte is written
        if self._tar is None:
            self._open()
        for name, data in members:
            pad = (-len(data)) % _BLOCK
            header = ustar_header(name, len(data))
            self._tar.write(header)
            self._tar.write(data)
            if pad:
                self._tar.write(bytes(pad))
            self._bytes += len(header) + len(data) + pad
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish_shard()

    def close(self) -> dict[str, int]:
        self._finish_shard()
        write_sizes(self.out_dir, self.sizes)
        return dict(self.sizes)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            # leave no temp file behind; completed shards stay (they are whole)
            self._tar.close()
            os.unlink(self._tmp)
            self._tar = None
