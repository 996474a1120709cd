"""Embedding shard sets: per input shard `X.tar` one `X.npz` with `keys` + float16 fields.

Fields are named `<modality>_<role>` (`image_old`, `text_old`, `text_new`, `image_new`); rows are
L2-normalised before the fp16 cast (fp16 halves storage; normalised rows lose ~1e-3 relative
precision, far below what retrieval can see). Each `.npz` is written through a temp file and
`os.replace`, so a crashed writer leaves either a complete shard or none, and a rerun can skip
shards that exist. `manifest.json` (kind "embeddings") records fields, dims, models, source and
per-shard counts once a set is complete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from xbt_dist.artifacts import MANIFEST, read_manifest, write_manifest

KIND = "embeddings"
_FIELD_RE = re.compile(r"^(image|text)_[A-Za-z0-9]+$")


def check_field(name: str) -> tuple[str, str]:
    """Split a field name into (modality, role); error names the expected form."""
    if not _FIELD_RE.match(name):
        raise ValueError(f"bad embedding field {name!r}: expected '<image|text>_<role>', "
                         "e.g. 'image_old', 'text_new'")
    modality, role = name.split("_", 1)
    return modality, role


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def write_embedding_shard(out_dir: str | os.PathLike, name: str, keys: list[str],
                          fields: dict[str, np.ndarray], normalize: bool = True) -> Path:
    """Atomically write `<out_dir>/<name>.npz` with `keys` and one fp16 `(n, d)` array per field."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(keys)
    arrays: dict[str, np.ndarray] = {"keys": np.asarray(list(keys), dtype=str)}
    if len(set(keys)) != n:
        raise ValueError(f"duplicate keys in embedding shard {name}: keys must be unique per set")
    for field, value in fields.items():
        check_field(field)
        value = np.asarray(value, dtype=np.float32)
        if value.ndim != 2 or value.shape[0] != n:
            raise ValueError(f"field {field} of shard {name} has shape {value.shape}, "
                             f"expected ({n}, d) to match {n} keys")
        arrays[field] = (l2_normalize(value) if normalize else value).astype(np.float16)
    path = out_dir / f"{name}.npz"
    tmp = out_dir / f".{name}.npz.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object stops np.savez from appending another ".npz"
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


class EmbeddingShard:
    """One loaded `.npz`: `keys` (list), `fields` {name: fp16 array}, `index` key -> row."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name[: -len(".npz")]
        with np.load(self.path, allow_pickle=False) as z:
            self._keys = z["keys"]
            self.fields = {k: z[k] for k in z.files if k != "keys"}
        self._index: dict[str, int] | None = None
        self._key_list: list[str] | None = None

    @property
    def keys(self) -> list[str]:
        if self._key_list is None:
            self._key_list = self._keys.tolist()
        return self._key_list

    def keys_at(self, rows: np.ndarray) -> list[str]:
        """Keys of `rows` (an index array), without building the whole key list."""
        return self._keys[rows].tolist()

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def __len__(self) -> int:
        return len(self._keys)

    def rows(self, key: str, fields: Iterable[str]) -> dict[str, np.ndarray] | None:
        i = self.index.get(key)
        return None if i is None else {f: self.fields[f][i] for f in fields}


class EmbeddingShardSet:
    """Reader of an embedding shard set directory.

    `fields`, `dims` come from the manifest when present, else from the first shard (so partially
    written sets can be inspected); `load(field)` concatenates all rows in canonical (sorted
    shard name) order, aligned with `keys()`; `shard(name)` loads one shard for key joins.
    """

    def __init__(self, directory: str | os.PathLike, require_complete: bool = False):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"embedding shard set {self.dir} does not exist; "
                                    "compute it first with `xbt embed`")
        self.shard_names = sorted(p.name[: -len(".npz")] for p in self.dir.glob("*.npz"))
        if not self.shard_names:
            raise FileNotFoundError(f"embedding shard set {self.dir} holds no .npz shards; "
                                    "compute it first with `xbt embed`")
        self.manifest: dict[str, Any] | None = None
        if (self.dir / MANIFEST).is_file():
            self.manifest = read_manifest(self.dir)
        elif require_complete:
            read_manifest(self.dir)  # raises with the standard "not finished, rerun" message
        if self.manifest and "dims" in self.manifest:
            self.dims = {k: int(v) for k, v in self.manifest["dims"].items()}
        else:  # from the first non-empty shard (a shard whose samples were all bad has d=1)
            self.dims = {}
            for name in self.shard_names:
                with np.load(self.dir / f"{name}.npz", allow_pickle=False) as z:
                    self.dims = {k: int(z[k].shape[1]) for k in z.files if k != "keys"}
                    if z["keys"].shape[0]:
                        break
        self.fields = sorted(self.dims)

    def __len__(self) -> int:
        return len(self.shard_names)

    def has_shard(self, name: str) -> bool:
        return (self.dir / f"{name}.npz").is_file()

    def shard(self, name: str) -> EmbeddingShard:
        path = self.dir / f"{name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"embedding shard {path} missing for input shard {name}: the "
                                    "embedding set does not cover this shard set; rerun `xbt embed`")
        return EmbeddingShard(path)

    def check_fields(self, fields: Iterable[str]) -> None:
        missing = [f for f in fields if f not in self.dims]
        if missing:
            raise KeyError(f"embedding set {self.dir} lacks fields {missing} (has {self.fields}); "
                           "rerun `xbt embed` with those fields")

    def load(self, field: str) -> np.ndarray:
        """All rows of `field` (fp16), shards concatenated in canonical order."""
        self.check_fields([field])
        parts = []
        for name in self.shard_names:
            with np.load(self.dir / f"{name}.npz", allow_pickle=False) as z:
                if z["keys"].shape[0]:
                    parts.append(z[field])
        if not parts:
            return np.zeros((0, self.dims[field]), np.float16)
        return np.concatenate(parts, axis=0)

    def keys(self) -> list[str]:
        out: list[str] = []
        for name in self.shard_names:
            with np.load(self.dir / f"{name}.npz", allow_pickle=False) as z:
                out.extend(str(k) for k in z["keys"])
        return out

    def counts(self) -> dict[str, int]:
        out = {}
        for name in self.shard_names:
            with np.load(self.dir / f"{name}.npz", allow_pickle=False) as z:
                out[name] = int(z["keys"].shape[0])
        return out


def write_embedding_manifest(out_dir: str | os.PathLike, source: str, models: dict[str, Any],
                             config: dict | None = None) -> dict:
    """Write the manifest of a finished embedding set (fields/dims/counts read back from disk)."""
    emb = EmbeddingShardSet(out_dir)
    counts = emb.counts()
    return write_manifest(out_dir, KIND, config=config or {"fields": emb.fields},
                          inputs={"source": str(source), "models": models},
                          counts={"shards": len(counts), "samples": sum(counts.values()),
                                  "per_shard": counts},
                          fields=emb.fields, dims=emb.dims)
