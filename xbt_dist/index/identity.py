"""Model identities: which weights made a set of embeddings, so an index and a run can be matched.

An identity is `{"arch", "pretrained", "sha256"}`; `sha256` is the digest of the local checkpoint
file (None for an open_clip pretrained tag, whose name is the identity). Two identities are the
same model when their digests agree, or, when either lacks a digest, when arch and pretrained agree.
A gallery embedded by one old model and queried through phi trained against another gives silently
wrong results (the spaces differ), which is why `xbt serve` refuses such a pairing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, cached per (path, size, mtime): a 1.7 GB L/14 file hashes in ~3 s once."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def model_identity(ref: Any) -> dict:
    """Identity of a `ModelRef` (or its dict form from a manifest)."""
    if isinstance(ref, dict):
        arch, pretrained = ref.get("arch"), ref.get("pretrained")
    else:
        arch, pretrained = ref.arch, ref.pretrained
    sha = None
    if pretrained and Path(str(pretrained)).is_file():
        sha = file_sha256(pretrained)
    return {"arch": arch, "pretrained": pretrained, "sha256": sha}


def same_model(a: dict, b: dict) -> bool:
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return (a.get("arch"), a.get("pretrained")) == (b.get("arch"), b.get("pretrained"))


def describe(identity: dict) -> str:
    sha = identity.get("sha256")
    return (f"{identity.get('arch')} ({identity.get('pretrained') or 'random init'}"
            + (f", sha256 {sha[:12]}" if sha else "") + ")")
