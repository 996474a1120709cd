"""Model identities: which weights made a set of embeddings, so an index and a run can be matched.

An identity is `{"arch", "pretrained", "sha256"}`; `sha256` is the digest of the local checkpoint
file, or of a `save_pretrained` directory's config and weight files (None for an open_clip
pretrained tag, whose name is the identity). Two identities are the
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


# What decides a save_pretrained directory's outputs: its config and its weights (tokenizer and
# preprocessor files change inputs, not the model, and are not hashed).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def dir_sha256(path: str | os.PathLike) -> str | None:
    """Digest of a model directory: the names and sha256s of its config.json and weight files (None
    when it has neither), so a model retrained into the same directory gets another identity."""
    files = sorted(f for f in Path(path).iterdir()
                   if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def model_identity(ref: Any) -> dict:
    """Identity of a `ModelRef` (or its dict form from a manifest)."""
    if isinstance(ref, dict):
        arch, pretrained = ref.get("arch"), ref.get("pretrained")
    else:
        arch, pretrained = ref.arch, ref.pretrained
    sha = None
    if pretrained and Path(str(pretrained)).is_file():
        sha = file_sha256(pretrained)
    elif pretrained and Path(str(pretrained)).is_dir():
        sha = dir_sha256(pretrained)
    return {"arch": arch, "pretrained": pretrained, "sha256": sha}


def same_model(a: dict, b: dict) -> bool:
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return (a.get("arch"), a.get("pretrained")) == (b.get("arch"), b.get("pretrained"))


def describe(identity: dict) -> str:
    sha = identity.get("sha256")
    return (f"{identity.get('arch')} ({identity.get('pretrained') or 'random init'}"
            + (f", sha256 {sha[:12]}" if sha else "") + ")")
