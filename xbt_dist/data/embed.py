"""Precompute embedding shard sets (`image_old`, `text_old`, `text_new`, ...) from shard sets.

`embed_shards` is the single-process core: for each input shard `X.tar` it encodes the requested
fields, L2-normalises them and atomically writes `X.npz` (see embeddings.py). Shards already
written with all requested fields are skipped, so an interrupted run just reruns; a distributed
runner calls it on disjoint `shards=` subsets (e.g. `all_shards[rank::world_size]`) and the last
call that sees the full set complete writes the manifest.

Encoders are looked up per field: `encoders["image_old"]` (a plain callable over a list of PIL
images / captions -> (n, d) array, handy in tests) wins over `encoders["old"]`, a role encoder:
an `Encoder`, a ClipBundle-like object (`.model`, `.preprocess`, `.tokenizer`) or a `ModelRef`
(loaded with `xbt_dist.models.clip.load_clip`).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from xbt_dist.data.embeddings import (EmbeddingShardSet, check_field, write_embedding_manifest,
                                      write_embedding_shard)
from xbt_dist.data.shards import (decode_caption, decode_image, iter_raw_samples, list_shards,
                                  shard_name)


class Encoder:
    """One model role (old/new) for embedding: wraps a ClipBundle-like object.

    `bundle` needs `.model` (open_clip CLIP: `encode_image`, `encode_text`), `.preprocess`
    (PIL -> tensor) and `.tokenizer` (list[str] -> LongTensor). Outputs are float32 numpy arrays,
    not normalised (the writer normalises).
    """

    def __init__(self, bundle: Any, device: str | torch.device | None = None):
        for attr in ("model", "preprocess", "tokenizer"):
            if not hasattr(bundle, attr):
                raise TypeError(f"Encoder needs a ClipBundle-like object with .{attr}; got "
                                f"{type(bundle).__name__} (use xbt_dist.models.clip.load_clip(ref))")
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.model.to(self.device)
        self.ref = getattr(bundle, "ref", None)

    @classmethod
    def from_ref(cls, ref, device: str = "cpu") -> "Encoder":
        from xbt_dist.models.clip import load_clip  # models package is owned elsewhere; import lazily
        return cls(load_clip(ref, device=device), device=device)

    @torch.inference_mode()
    def encode_images(self, images: list) -> np.ndarray:
        x = torch.stack([self.bundle.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(x).float().cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.bundle.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens).float().cpu().numpy()


def _as_encoder(value: Any, device: str | None) -> Any:
    if isinstance(value, Encoder):
        return value
    if hasattr(value, "model") and hasattr(value, "tokenizer"):
        return Encoder(value, device=device)
    if type(value).__name__ == "ModelRef":
        return Encoder.from_ref(value, device=device or "cpu")
    return value


def resolve_encoders(encoders: dict[str, Any], fields: Sequence[str], device: str | None = None
                     ) -> dict[str, Callable[[list], np.ndarray]]:
    """Map each field to a function over a list of inputs (PIL images or captions)."""
    cache: dict[str, Any] = {}
    out = {}
    for field in fields:
        modality, role = check_field(field)
        if field in encoders and callable(encoders[field]) and not hasattr(encoders[field], "model"):
            out[field] = encoders[field]
            continue
        key = field if field in encoders else role
        if key not in encoders:
            raise KeyError(f"no encoder for field {field!r}: pass encoders={{'{role}': "
                           f"Encoder(load_clip(ref))}} or encoders={{'{field}': callable}} "
                           f"(got keys {sorted(encoders)})")
        if key not in cache:
            cache[key] = _as_encoder(encoders[key], device)
        enc = cache[key]
        if not isinstance(enc, Encoder):
            raise TypeError(f"encoder {key!r} must be an Encoder, a ClipBundle, a ModelRef, or "
                            f"(keyed by field name) a callable; got {type(enc).__name__}")
        out[field] = enc.encode_images if modality == "image" else enc.encode_texts
    return out


def _describe(value: Any) -> Any:
    ref = getattr(value, "ref", None) if not type(value).__name__ == "ModelRef" else value
    if ref is not None and hasattr(ref, "arch"):
        return {"arch": ref.arch, "pretrained": getattr(ref, "pretrained", None)}
    return getattr(value, "__name__", type(value).__name__)


def _shard_done(out_dir, name: str, fields: Sequence[str]) -> bool:
    path = out_dir / f"{name}.npz"
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return all(f in z.files for f in fields)
    except Exception:  # unreadable -> recompute (the atomic write makes this rare)
        return False


def embed_one_shard(shard: str, fns: dict[str, Callable], fields: Sequence[str], batch_size: int,
                    stats: Counter) -> tuple[list[str], dict[str, np.ndarray]]:
    """Encode all good samples of one shard; returns (keys, {field: (n, d) float32})."""
    need_image = any(f.startswith("image_") for f in fields)
    need_text = any(f.startswith("text_") for f in fields)
    keys: list[str] = []
    parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    images: list = []
    texts: list[str] = []

    def flush():
        for f in fields:
            inputs = images if f.startswith("image_") else texts
            arr = np.asarray(fns[f](inputs), dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != len(inputs):
                raise ValueError(f"encoder for {f} returned shape {arr.shape} for {len(inputs)} inputs; "
                                 "expected (n, d)")
            parts[f].append(arr)
        images.clear()
        texts.clear()

    n_raw = 0
    for s in iter_raw_samples(shard, stats):
        n_raw += 1
        caption = decode_caption(s) if need_text else None
        if need_text and caption is None:
            stats["missing_caption"] += 1
            continue
        if need_image:
            image = decode_image(s)
            if image is None:
                stats["bad_image"] += 1
                continue
            images.append(image)
        if need_text:
            texts.append(caption)
        keys.append(s["__key__"])
        if len(keys) % batch_size == 0:
            flush()
    if images or texts:
        flush()
    if n_raw and not keys and need_image:
        raise ValueError(f"shard {shard}: none of its {n_raw} samples has a decodable image but "
                         f"fields {list(fields)} need images; is this a text-only shard set?")
    arrays = {f: (np.concatenate(parts[f]) if parts[f] else np.zeros((0, 0), np.float32))
              for f in fields}
    return keys, arrays


def embed_shards(src, out_dir, encoders: dict[str, Any], fields: Sequence[str],
                 batch_size: int = 64, shards: Sequence[str] | None = None,
                 device: str | None = None, progress: Callable[[str], None] | None = print,
                 manifest: bool = True) -> dict[str, Any]:
    """Embed `fields` for each shard of `src` into `out_dir` (one `X.npz` per `X.tar`), resumably.

    `shards`: subset of `list_shards(src)` (paths or names) for this process, default all.
    Returns counts: shards written / already done, samples embedded, skipped samples by reason.
    Writes the manifest when every shard of `src` is present in `out_dir`.
    """
    from pathlib import Path
    fields = list(fields)
    if not fields:
        raise ValueError("fields is empty: request e.g. ['image_old', 'text_old']")
    for f in fields:
        check_field(f)
    all_shards = list_shards(src)
    if shards is None:
        todo = all_shards
    else:
        wanted = {shard_name(s) for s in shards}
        todo = [s for s in all_shards if shard_name(s) in wanted]
        unknown = wanted - {shard_name(s) for s in todo}
        if unknown:
            raise ValueError(f"shards {sorted(unknown)} are not in shard set {src}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fns = None  # encoders are built lazily: a fully-done rerun never loads a model
    stats: Counter = Counter()
    done_before = written = samples = 0
    t0 = time.time()
    for i, shard in enumerate(todo):
        name = shard_name(shard)
        if _shard_done(out_dir, name, fields):
            done_before += 1
            continue
        if fns is None:
            fns = resolve_encoders(encoders, fields, device)
        keys, arrays = embed_one_shard(shard, fns, fields, batch_size, stats)
        if not keys:  # all samples bad: an empty shard keeps the set complete (d unknown -> 1)
            arrays = {f: np.zeros((0, 1), np.float32) for f in fields}
        write_embedding_shard(out_dir, name, keys, arrays)
        written += 1
        samples += len(keys)
        if progress is not None:
            dt = max(time.time() - t0, 1e-9)
            left = len(todo) - (i + 1)
            eta = _dt.timedelta(seconds=int(dt / written * left))
            progress(f"[embed] shards {i + 1}/{len(todo)} ({done_before} already done) | "
                     f"{samples} samples, {samples / dt:.1f} samples/s | ETA {eta} | "
                     f"skipped {dict(stats) or 0} | {name}")
    complete = all(_shard_done(out_dir, shard_name(s), fields) for s in all_shards)
    if manifest and complete:
        write_embedding_manifest(out_dir, source=str(src),
                                 models={k: _describe(v) for k, v in encoders.items()},
                                 config={"fields": fields, "batch_size": batch_size})
    return {"written": written, "already_done": done_before, "samples": samples,
            "skipped": dict(stats), "complete": complete}


def load_embeddings(out_dir) -> EmbeddingShardSet:
    """The finished embedding set at `out_dir` (errors if the manifest is missing)."""
    return EmbeddingShardSet(out_dir, require_complete=True)
