"""One I/O layer for run outputs: a local path, NFS, or any fsspec URL (s3://, gs://, memory://).

Every checkpoint file, final artifact (`phi.pt`, `adapters.pt`), manifest and eval report is
written and read through these functions, so `out_dir: s3://bucket/run` works end to end instead
of `pathlib` making a local folder named `s3:`.

Atomicity, per file: a local or NFS write goes to a temp name in the same directory and is
renamed over the target (readers see the old file or the new one, never half of one); an object
store publishes an object only when its single PUT completes, which is the same guarantee. A
directory is never renamed (object stores cannot), so a checkpoint is made "whole" by the
`latest` pointer written after all its files (see `xbt_dist.train.checkpoint`).
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import torch


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL with a protocol other than file:// (the local filesystem)."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for local paths and URLs alike (no os.sep games with `s3://`)."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def _fs(url: str | os.PathLike):
    return fsspec.core.url_to_fs(str(url))


def makedirs(url: str | os.PathLike) -> None:
    """Create a directory (and parents); object stores have no directories: nothing to do."""
    fs, path = _fs(url)
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)


def exists(url: str | os.PathLike) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically (temp + rename locally, one PUT on an object store)."""
    fs, path = _fs(url)
    if is_remote(url):
        fs.pipe_file(path, data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # pid + random suffix: two ranks on one node (or two nodes on NFS) never share a temp name
    tmp = f"{path}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the rename must not publish a file whose bytes are still in cache
    os.replace(tmp, path)


def read_bytes(url: str | os.PathLike) -> bytes:
    fs, path = _fs(url)
    return fs.cat_file(path)


def write_text(url: str | os.PathLike, text: str) -> None:
    write_bytes(url, text.encode())


def read_text(url: str | os.PathLike) -> str:
    return read_bytes(url).decode()


def save_torch(obj: Any, url: str | os.PathLike) -> int:
    """torch.save to a local path or URL, atomically; returns the bytes written.

    Serialised in memory first: checkpoints hold trainable tensors only (tens of MB), and one
    buffer gives the one-PUT publish on object stores.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    write_bytes(url, data)
    return len(data)


def load_torch(url: str | os.PathLike) -> Any:
    """torch.load from a local path or URL (read straight from storage: no download cache)."""
    return torch.load(io.BytesIO(read_bytes(url)), map_location="cpu", weights_only=False)


def listdir(url: str | os.PathLike) -> list[str]:
    """Base names of the entries of a directory (an empty list when it does not exist)."""
    fs, path = _fs(url)
    try:
        return sorted(p.rstrip("/").split("/")[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def remove(url: str | os.PathLike, recursive: bool = False) -> None:
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
