"""Artifact directories: every output (shards, embeddings, checkpoints, reports) carries a
`manifest.json` saying what made it, from which inputs, with which config, and how many items.

Manifests make runs reproducible and let the demo skip steps whose config digest is unchanged.
They are read and written through `xbt_dist.storage`, so a directory may be an fsspec URL.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from xbt_dist import __version__, storage

MANIFEST = "manifest.json"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_digest(obj: Any) -> str:
    """Stable 12-hex-digit digest of a config (dataclass, dict, list...)."""
    blob = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write through a temp file and rename (one PUT on object stores): never half a file."""
    storage.write_text(path, text)


def write_manifest(directory: str | os.PathLike, kind: str, config: Any = None,
                   inputs: Any = None, counts: Any = None, **extra: Any) -> dict:
    manifest = {
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "xbt_dist_version": __version__,
        "config": _jsonable(config or {}),
        "config_digest": config_digest(config or {}),
        "inputs": _jsonable(inputs or {}),
        "counts": _jsonable(counts or {}),
        **_jsonable(extra),
    }
    atomic_write_text(storage.join(directory, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a finished xbt_dist artifact "
            "(the step that makes it did not run or did not finish; rerun it)")
    return json.loads(storage.read_text(path))


def is_complete(directory: str | os.PathLike, kind: str, digest: str | None = None) -> bool:
    """True when `directory` holds a finished artifact of `kind` (and config digest, if given)."""
    try:
        m = read_manifest(directory)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return m.get("kind") == kind and (digest is None or m.get("config_digest") == digest)
