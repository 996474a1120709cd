"""Embedding shard sets: per input shard `X.tar`, fp16 rows per field and the shard's keys.

Two on-disk layouts, both read by `EmbeddingShardSet` (the set may even mix them):
  * `npy` (written by default): `X.keys.npy` (unicode) plus one `X.<field>.npy`
    per field, float16 `(n, d)`. Plain `.npy` files are memory-mappable, so stage 1 reads large
    contiguous row slices of any shard without loading it (`field_file`), and never touches the
    keys. The keys file is renamed into place LAST: its presence marks a complete shard.
  * `npz` (the first layout): one `X.npz` with `keys` + fields. `np.savez` stores members
    uncompressed, so `field_file` memory-maps an npz member in place too; old sets need no
    conversion (`convert_to_npy` rewrites one anyway, e.g. to drop the zip indirection).

Fields are named `<modality>_<role>` (`image_old`, `text_old`, `text_new`, `image_new`); rows are
L2-normalised before the fp16 cast (fp16 halves storage; normalised rows lose ~1e-3 relative
precision, far below what retrieval can see). Every file is written through a temp file and
`os.replace`, so a crashed writer leaves either a complete shard or none, and a rerun can skip
shards that exist. `manifest.json` (kind "embeddings") records fields, dims, models, source, the
layout and per-shard row counts once a set is complete: a reader of a finished set takes counts
and dims from it and opens no shard at startup.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from xbt_dist.artifacts import MANIFEST, read_manifest, write_manifest

KIND = "embeddings"
LAYOUTS = ("npy", "npz")
KEYS_SUFFIX = ".keys.npy"
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


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:  # a file object stops np.save from appending another ".npy"
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def write_embedding_shard(out_dir: str | os.PathLike, name: str, keys: list[str],
                          fields: dict[str, np.ndarray], normalize: bool = True,
                          layout: str = "npy") -> Path:
    """Atomically write shard `name`: keys + one fp16 `(n, d)` array per field.

    layout "npy": `<name>.<field>.npy` files, then `<name>.keys.npy` last (returned);
    layout "npz": one `<name>.npz` (the first layout, kept for compatibility tests and tools).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(keys)
    key_array = np.asarray(list(keys), dtype=str)
    if len(set(keys)) != n:
        raise ValueError(f"duplicate keys in embedding shard {name}: keys must be unique per set")
    arrays: dict[str, np.ndarray] = {}
    for field, value in fields.items():
        check_field(field)
        value = np.asarray(value, dtype=np.float32)
        if value.ndim != 2 or value.shape[0] != n:
            raise ValueError(f"field {field} of shard {name} has shape {value.shape}, "
                             f"expected ({n}, d) to match {n} keys")
        arrays[field] = (l2_normalize(value) if normalize else value).astype(np.float16)
    if layout == "npz":
        path = out_dir / f"{name}.npz"
        tmp = out_dir / f".{name}.npz.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, keys=key_array, **arrays)
        os.replace(tmp, path)
        return path
    for field, value in arrays.items():
        _atomic_save(out_dir / f"{name}.{field}.npy", value)
    path = out_dir / f"{name}{KEYS_SUFFIX}"
    _atomic_save(path, key_array)  # last: a keys file means every field file is in place
    return path


@dataclass(frozen=True)
class FieldFile:
    """Where one field's rows live on disk: a C-order `(rows, dim)` array at byte `offset`.

    `window(lo, hi)` memory-maps rows [lo, hi) only. Mapping per read (rather than one map of the
    whole file) keeps a reader's resident set at the rows it is using: pages of a long-lived map
    stay in the process's RSS after they are read.
    """
    path: str
    offset: int
    dtype: str
    rows: int
    dim: int

    def window(self, lo: int, hi: int) -> np.ndarray:
        if not 0 <= lo <= hi <= self.rows:
            raise IndexError(f"rows [{lo}, {hi}) out of range for {self.path} ({self.rows} rows)")
        if hi == lo:
            return np.zeros((0, self.dim), self.dtype)
        row_bytes = np.dtype(self.dtype).itemsize * self.dim
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + lo * row_bytes,
                       shape=(hi - lo, self.dim))
        return mm.view(np.ndarray)  # a plain array; the map closes when the last view is gone


def _npy_header(f, path: str, base: int) -> tuple[int, np.dtype, tuple]:
    """(data offset, dtype, shape) of the .npy stream starting at `base` in open file `f`."""
    f.seek(base)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: embedding arrays must be C-order numeric; rewrite the set with "
                         "`xbt embed` (or convert_to_npy)")
    return f.tell(), dtype, shape


def npy_field_file(path: str | os.PathLike) -> FieldFile:
    with open(path, "rb") as f:
        offset, dtype, shape = _npy_header(f, str(path), 0)
    return FieldFile(str(path), offset, dtype.str, int(shape[0]), int(shape[1]) if len(shape) > 1 else 1)


def npz_field_file(path: str | os.PathLike, field: str) -> FieldFile:
    """Memory-map an uncompressed npz member in place (np.savez stores members uncompressed)."""
    path = str(path)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{field}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: member {field} is compressed and cannot be memory-mapped; "
                         "convert the set with xbt_dist.data.embeddings.convert_to_npy")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header: name and extra lengths at bytes 26-29
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
            int.from_bytes(local[28:30], "little")
        offset, dtype, shape = _npy_header(f, path, start)
    return FieldFile(path, offset, dtype.str, int(shape[0]), int(shape[1]) if len(shape) > 1 else 1)


class EmbeddingShard:
    """One shard: `keys` (list), `fields` {name: fp16 array}, `index` key -> row.

    npz shards are loaded whole (as before); npy shards memory-map their field files, so a key
    join (`rows`) reads only the rows it asks for.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.name.endswith(KEYS_SUFFIX):
            self.name = self.path.name[: -len(KEYS_SUFFIX)]
            self._keys = np.load(self.path, allow_pickle=False)
            prefix = f"{self.name}."
            self.fields = {p.name[len(prefix): -len(".npy")]: np.load(p, mmap_mode="r")
                           for p in self.path.parent.iterdir()
                           if p.name.startswith(prefix) and p.name.endswith(".npy")
                           and p.name != self.path.name and _FIELD_RE.match(p.name[len(prefix): -4])}
        else:
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

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def __len__(self) -> int:
        return len(self._keys)

    def rows(self, key: str, fields: Iterable[str]) -> dict[str, np.ndarray] | None:
        i = self.index.get(key)
        return None if i is None else {f: np.asarray(self.fields[f][i]) for f in fields}


class EmbeddingShardSet:
    """Reader of an embedding shard set directory (npy, npz or mixed layout).

    `fields`, `dims` and `counts()` come from the manifest when present, else from the shards'
    headers (so partially written sets can be inspected); `load(field)` concatenates all rows in
    canonical (sorted shard name) order, aligned with `keys()`; `shard(name)` opens one shard for
    key joins; `field_file(name, field)` locates a field for memory-mapped slice reads.
    """

    def __init__(self, directory: str | os.PathLike, require_complete: bool = False):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"embedding shard set {self.dir} does not exist; "
                                    "compute it first with `xbt embed`")
        self._layout: dict[str, str] = {}
        for p in self.dir.iterdir():
            if p.name.startswith("."):
                continue
            if p.name.endswith(KEYS_SUFFIX):
                self._layout[p.name[: -len(KEYS_SUFFIX)]] = "npy"
            elif p.name.endswith(".npz"):
                self._layout.setdefault(p.name[: -len(".npz")], "npz")
        self.shard_names = sorted(self._layout)
        if not self.shard_names:
            raise FileNotFoundError(f"embedding shard set {self.dir} holds no shards (.keys.npy or "
                                    ".npz); compute it first with `xbt embed`")
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
                files = self._field_files(name)
                self.dims = {f: ff.dim for f, ff in files.items()}
                if files and next(iter(files.values())).rows:
                    break
        self.fields = sorted(self.dims)

    def __len__(self) -> int:
        return len(self.shard_names)

    def layout(self, name: str) -> str:
        return self._layout[name]

    def has_shard(self, name: str) -> bool:
        return (self.dir / f"{name}{KEYS_SUFFIX}").is_file() or (self.dir / f"{name}.npz").is_file()

    def _path(self, name: str) -> Path:
        npy = self.dir / f"{name}{KEYS_SUFFIX}"
        if npy.is_file():
            return npy
        npz = self.dir / f"{name}.npz"
        if npz.is_file():
            return npz
        raise FileNotFoundError(f"embedding shard {self.dir / name} (.keys.npy or .npz) missing for "
                                f"input shard {name}: the embedding set does not cover this shard "
                                "set; rerun `xbt embed`")

    def shard(self, name: str) -> EmbeddingShard:
        return EmbeddingShard(self._path(name))

    def _field_files(self, name: str) -> dict[str, FieldFile]:
        path = self._path(name)
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                names = [n[:-4] for n in z.namelist() if n.endswith(".npy") and n != "keys.npy"]
            return {f: npz_field_file(path, f) for f in names}
        prefix = f"{name}."
        return {p.name[len(prefix): -4]: npy_field_file(p) for p in self.dir.iterdir()
                if p.name.startswith(prefix) and p.name.endswith(".npy") and p.name != path.name
                and _FIELD_RE.match(p.name[len(prefix): -4])}

    def field_file(self, name: str, field: str) -> FieldFile:
        """Location of `field` of shard `name` for memory-mapped slice reads (both layouts)."""
        path = self._path(name)
        if path.suffix == ".npz":
            try:
                return npz_field_file(path, field)
            except KeyError:
                pass
        else:
            p = self.dir / f"{name}.{field}.npy"
            if p.is_file():
                return npy_field_file(p)
        raise KeyError(f"shard {name} of embedding set {self.dir} lacks field {field!r}; "
                       "rerun `xbt embed` with that field")

    def check_fields(self, fields: Iterable[str]) -> None:
        missing = [f for f in fields if f not in self.dims]
        if missing:
            raise KeyError(f"embedding set {self.dir} lacks fields {missing} (has {self.fields}); "
                           "rerun `xbt embed` with those fields")

    def load(self, field: str) -> np.ndarray:
        """All rows of `field` (fp16), shards concatenated in canonical order."""
        self.check_fields([field])
        parts = []
        for name, n in self.counts().items():
            if n:
                ff = self.field_file(name, field)
                parts.append(np.array(ff.window(0, ff.rows)))
        if not parts:
            return np.zeros((0, self.dims[field]), np.float16)
        return np.concatenate(parts, axis=0)

    def keys(self) -> list[str]:
        out: list[str] = []
        for name in self.shard_names:
            out.extend(self.shard(name).keys)
        return out

    def counts(self) -> dict[str, int]:
        """Rows per shard: from the manifest of a finished set (no shard opened), else headers."""
        per_shard = ((self.manifest or {}).get("counts") or {}).get("per_shard")
        if per_shard is not None and sorted(per_shard) == self.shard_names:
            return {name: int(per_shard[name]) for name in self.shard_names}
        out = {}
        for name in self.shard_names:
            path = self._path(name)
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    out[name] = int(z["keys"].shape[0])
            else:
                out[name] = int(np.load(path, mmap_mode="r").shape[0])
        return out


def write_embedding_manifest(out_dir: str | os.PathLike, source: str, models: dict[str, Any],
                             config: dict | None = None) -> dict:
    """Write the manifest of a finished embedding set (fields/dims/counts read back from disk)."""
    emb = EmbeddingShardSet(out_dir)
    emb.manifest = None  # count from the shards themselves, never from a previous manifest
    counts = emb.counts()
    layouts = sorted({emb.layout(n) for n in emb.shard_names})
    return write_manifest(out_dir, KIND, config=config or {"fields": emb.fields},
                          inputs={"source": str(source), "models": models},
                          counts={"shards": len(counts), "samples": sum(counts.values()),
                                  "per_shard": counts},
                          fields=emb.fields, dims=emb.dims,
                          layout=layouts[0] if len(layouts) == 1 else "mixed")


def convert_to_npy(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> dict:
    """Rewrite an npz (or mixed) set in the npy layout: into `dst`, or in place when None.

    In place, each shard's npy files are complete before its `.npz` is removed, so an interrupted
    conversion leaves a readable set and a rerun finishes it. Rows are copied as stored (already
    normalised fp16). The manifest is rewritten with the new layout.
    """
    emb = EmbeddingShardSet(src)
    dst_dir = Path(dst) if dst is not None else emb.dir
    converted = 0
    for name in emb.shard_names:
        if emb.layout(name) != "npz" and dst is None:
            continue
        shard = emb.shard(name)
        write_embedding_shard(dst_dir, name, shard.keys, dict(shard.fields), normalize=False)
        converted += 1
        if dst is None:
            os.remove(emb.dir / f"{name}.npz")
    old = emb.manifest or {}
    inputs = old.get("inputs") or {}
    write_embedding_manifest(dst_dir, source=inputs.get("source", str(src)),
                             models=inputs.get("models", {}), config=old.get("config"))
    return {"converted": converted, "shards": len(emb.shard_names), "dir": str(dst_dir)}
