"""Small shard I/O helpers shared by the prep stages: a deterministic webdataset tar writer,
`sizes.json` read/write, and listing the `*.tar` files of a shard set.

We write the tar bytes ourselves instead of using `webdataset.TarWriter` or `tarfile`: member
headers are fixed (mtime 0, mode 644, no user names), so re-running a prep step on the same input
gives byte-identical shards (cheap to verify with a checksum); and building a USTAR header from a
precomputed template is ~10x cheaper than `tarfile.TarInfo.tobuf` (which deep-copies and
re-encodes every field), the largest cost of the text corpus at 67M one-line members. The headers
are byte-identical to what `tarfile` writes (tested). The result is an ordinary webdataset tar:
members `<key>.<field>`, grouped by key, in order.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any, Mapping

from xbt_dist.artifacts import atomic_write_text

SIZES = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def list_tars(directory: str | os.PathLike) -> list[Path]:
    """Sorted `*.tar` files of a shard-set directory (sorted order is the canonical order)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"shard set {d} is not a directory; pass the folder holding the *.tar files")
    return sorted(p for p in d.iterdir() if p.suffix == ".tar" and p.is_file())


def write_sizes(directory: str | os.PathLike, sizes: Mapping[str, int]) -> Path:
    """Write `sizes.json` ({shard file name: sample count}) atomically, keys in shard order."""
    path = Path(directory) / SIZES
    atomic_write_text(path, json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
    return path


def read_sizes(directory: str | os.PathLike) -> dict[str, int]:
    path = Path(directory) / SIZES
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `xbt prep validate {directory}` to write it")
    return json.loads(path.read_text())


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


def _template() -> tuple[bytes, int]:
    info = tarfile.TarInfo("x")
    info.mode, info.mtime, info.size = 0o644, 0, 0
    hdr = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    hdr[0:100] = bytes(100)
    hdr[124:136] = bytes(12)
    hdr[148:156] = b" " * 8  # checksum is computed with its own field as spaces
    return bytes(hdr), sum(hdr)


_HEADER, _HEADER_SUM = _template()


def ustar_header(name: str, size: int) -> bytes:
    """USTAR header of a regular file (mode 644, mtime 0, uid/gid 0): same bytes as tarfile's."""
    name_b = name.encode("utf-8")
    if len(name_b) > 100 or size >= 8 ** 11:
        # long names need the prefix field / huge sizes need base-256: let tarfile handle them
        info = tarfile.TarInfo(name)
        info.mode, info.mtime, info.size = 0o644, 0, size
        return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")
    size_b = b"%011o\0" % size
    chk = _HEADER_SUM + sum(name_b) + sum(size_b)
    return b"".join((name_b, bytes(100 - len(name_b)), _HEADER[100:124], size_b, _HEADER[136:148],
                     b"%06o\0 " % chk, _HEADER[156:]))


class TarShardWriter:
    """Writes samples (dicts with `__key__` plus fields) into `<prefix>-NNNNNN.tar` shards of at
    most `samples_per_shard` samples each.

    Each shard is written to a hidden temp name and renamed when complete, so a crash never leaves
    a truncated shard with a final name. `close()` writes `sizes.json` and returns the sizes.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", samples_per_shard: int = 10000):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.sizes: dict[str, int] = {}
        self._tar = None  # open file object of the shard being written
        self._tmp: Path | None = None
        self._name = ""
        self._count = 0
        self._shard = 0

    def _open(self) -> None:
        self._name = f"{self.prefix}-{self._shard:06d}.tar"
        self._tmp = self.out_dir / f".{self._name}.tmp"
        self._tar = open(self._tmp, "wb")
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        # end-of-archive: two zero blocks, then zero padding to a whole record
        end = self._bytes + 2 * _BLOCK
        self._tar.write(bytes(2 * _BLOCK + (-end) % _RECORD))
        self._tar.close()
        os.replace(self._tmp, self.out_dir / self._name)
        self.sizes[self._name] = self._count
        self._tar = None
        self._shard += 1

    def write(self, sample: Mapping[str, Any]) -> None:
        key = sample["__key__"]
        if "." in key or "/" in key:
            # webdataset splits member names at the first dot of the basename: a dot in the key
            # would silently split one sample into two.
            raise ValueError(f"sample key {key!r} contains '.' or '/'; keys must be plain names")
        if self._tar is None:
            self._open()
        for field, value in sample.items():
            if field == "__key__" or value is None:
                continue
            data = _encode(value)
            pad = (-len(data)) % _BLOCK
            self._tar.write(ustar_header(f"{key}.{field}", len(data)))
            self._tar.write(data)
            if pad:
                self._tar.write(bytes(pad))
            self._bytes += _BLOCK + len(data) + pad
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish_shard()

    def close(self) -> dict[str, int]:
        self._finish_shard()
        write_sizes(self.out_dir, self.sizes)
        return dict(self.sizes)

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            # leave no temp file behind; completed shards stay (they are whole)
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
