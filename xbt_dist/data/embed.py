"""Precompute embedding shard sets (`image_old`, `text_old`, `text_new`, ...) from shard sets.

`embed_shards` is the single-process core: for each input shard `X.tar` it encodes the requested
fields, L2-normalises them and atomically writes shard `X` (npy layout, see embeddings.py). Shards
already written with all requested fields are skipped, so an interrupted run just reruns; the
distributed runner (distributed/embed_job.py) calls it on small groups of shards from a task queue and
writes the manifest once the whole set is there. Which models a set is being made with is recorded
(`embedding_models.json`, identities with weight digests) before its first shard is written; a rerun
into the same directory with another model is refused rather than mixing two embedding spaces.

Throughput: a shard is read through a DataLoader (`decode_workers` processes). Each decode worker
takes every `decode_workers`-th batch of the shard's raw samples (batches are cut over raw sample
positions, so who decodes what is fixed before decoding) and returns it decoded, preprocessed
(PIL -> tensor per model) and tokenised; the DataLoader's round robin hands the batches back in
shard order, so output rows keep the input's key order. Each decode worker walks the tar's bytes
(cheap next to JPEG decoding on local disk; on object storage it means `decode_workers` reads of
a shard, so stage shards locally or keep shards small). The main process only runs the forward:
under bf16 autocast on CUDA (fp32 weights, fp32 output), plain fp32 on CPU.

Encoders are looked up per field: `encoders["image_old"]` (a plain callable over a list of PIL
images / captions -> (n, d) array, handy in tests) wins over `encoders["old"]`, a role encoder:
an `Encoder`, a ClipBundle-like object (`.model`, `.preprocess`, `.tokenizer`) or a `ModelRef`
(loaded with `xbt_dist.models.encoders.load_encoder`, any backend).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xbt_dist.data.embeddings import (KEYS_SUFFIX, check_field,
                                      write_embedding_manifest, write_embedding_shard)
from xbt_dist.data.shards import (decode_caption, decode_image, iter_raw_samples, list_shards,
                                  shard_name)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32); a no-op elsewhere (fp32 on CPU)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Encoder:
    """One model role (old/new) for embedding: wraps a ClipBundle-like object.

    `bundle` needs `.model` (open_clip CLIP: `encode_image`, `encode_text`), `.preprocess`
    (PIL -> tensor) and `.tokenizer` (list[str] -> LongTensor). Outputs are float32 numpy arrays,
    not normalised (the writer normalises). `prepare_*` run in decode workers, `encode_*_batch`
    in the main process.
    """

    def __init__(self, bundle: Any, device: str | torch.device | None = None):
        for attr in ("model", "preprocess", "tokenizer"):
            if not hasattr(bundle, attr):
                raise TypeError(f"Encoder needs a ClipBundle-like object with .{attr}; got "
                                f"{type(bundle).__name__} (use xbt_dist.models.encoders.load_encoder(ref))")
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.model.to(self.device)
        self.ref = getattr(bundle, "ref", None)

    @classmethod
    def from_ref(cls, ref, device: str = "cpu") -> "Encoder":
        from xbt_dist.models.encoders import load_encoder  # models package is owned elsewhere; import lazily
        return cls(load_encoder(ref, device=device), device=device)

    def prepare_images(self, images: list) -> torch.Tensor:
        return torch.stack([self.bundle.preprocess(im) for im in images])

    def prepare_texts(self, texts: list[str]) -> torch.Tensor:
        return self.bundle.tokenizer(texts)

    @torch.inference_mode()
    def encode_image_batch(self, x: torch.Tensor) -> np.ndarray:
        with autocast_for(self.device):
            out = self.model.encode_image(x.to(self.device, non_blocking=True))
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def encode_token_batch(self, tokens: torch.Tensor) -> np.ndarray:
        with autocast_for(self.device):
            out = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return out.float().cpu().numpy()

    def encode_images(self, images: list) -> np.ndarray:
        return self.encode_image_batch(self.prepare_images(images))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encode_token_batch(self.prepare_texts(texts))


def _as_encoder(value: Any, device: str | None) -> Any:
    if isinstance(value, Encoder):
        return value
    if hasattr(value, "model") and hasattr(value, "tokenizer"):
        return Encoder(value, device=device)
    if type(value).__name__ == "ModelRef":
        return Encoder.from_ref(value, device=device or "cpu")
    return value


class FieldEncoder:
    """How one field is made: `prepare` (decode worker: list of PIL/captions -> model input, or
    None to pass them as they are) keyed by `input` (fields sharing a model share the input) and
    `encode` (main process: model input -> (n, d) array)."""

    def __init__(self, modality: str, input: str, prepare: Callable | None, encode: Callable):
        self.modality, self.input, self.prepare, self.encode = modality, input, prepare, encode


def resolve_field_encoders(encoders: dict[str, Any], fields: Sequence[str], device: str | None = None
                           ) -> dict[str, FieldEncoder]:
    cache: dict[str, Any] = {}
    out = {}
    for field in fields:
        modality, role = check_field(field)
        if field in encoders and callable(encoders[field]) and not hasattr(encoders[field], "model"):
            out[field] = FieldEncoder(modality, f"{modality}:raw", None, encoders[field])
            continue
        key = field if field in encoders else role
        if key not in encoders:
            raise KeyError(f"no encoder for field {field!r}: pass encoders={{'{role}': "
                           f"Encoder(load_encoder(ref))}} or encoders={{'{field}': callable}} "
                           f"(got keys {sorted(encoders)})")
        if key not in cache:
            cache[key] = _as_encoder(encoders[key], device)
        enc = cache[key]
        if not isinstance(enc, Encoder):
            raise TypeError(f"encoder {key!r} must be an Encoder, a ClipBundle, a ModelRef, or "
                            f"(keyed by field name) a callable; got {type(enc).__name__}")
        if modality == "image":
            out[field] = FieldEncoder(modality, f"image:{key}", enc.prepare_images, enc.encode_image_batch)
        else:
            out[field] = FieldEncoder(modality, f"text:{key}", enc.prepare_texts, enc.encode_token_batch)
    return out


def _describe(value: Any) -> Any:
    ref = getattr(value, "ref", None) if not type(value).__name__ == "ModelRef" else value
    if ref is not None and hasattr(ref, "arch"):
        # arch, pretrained tag or file, and the file's sha256: the identity `xbt serve` and
        # `xbt index build` compare before they query these vectors with a trained run
        from xbt_dist.index.identity import model_identity
        return model_identity(ref)
    return getattr(value, "__name__", type(value).__name__)


MODELS_RECORD = "embedding_models.json"


def describe_encoders(encoders: dict[str, Any]) -> dict[str, Any]:
    """{role or field: identity (a callable: its name)}: what the record and the manifest hold."""
    return {k: _describe(v) for k, v in encoders.items()}


def _recorded_models(out_dir: Path) -> dict:
    """The models an embedding set was begun with: its record, else its finished manifest's."""
    import json

    from xbt_dist.artifacts import MANIFEST
    for path, get in ((out_dir / MODELS_RECORD, lambda m: m),
                      (out_dir / MANIFEST, lambda m: m.get("inputs", {}).get("models", {}))):
        if path.is_file():
            return get(json.loads(path.read_text())) or {}
    return {}


def record_models(out_dir, models: dict[str, Any]) -> None:
    """Check `models` ({role or field: identity}) against those `out_dir`'s shards were made with, then
    record them. Shards already there are skipped on a rerun; had another model made them, the set
    would silently mix two embedding spaces, so a different model is an error naming the fix."""
    import json

    from xbt_dist.artifacts import atomic_write_text
    from xbt_dist.index.identity import describe, same_model
    out_dir = Path(out_dir)
    recorded = _recorded_models(out_dir)
    clash = [f"'{k}': {describe(recorded[k])} there, {describe(v)} now" for k, v in models.items()
             if isinstance(v, dict) and isinstance(recorded.get(k), dict) and not same_model(recorded[k], v)]
    if clash:
        raise ValueError(f"{out_dir} holds embeddings made by other models ({'; '.join(clash)}); adding to it would "
                         f"mix two embedding spaces in one set. Embed into another directory, or delete {out_dir} "
                         "to embed it again with these models")
    merged = {**recorded, **models}
    if merged != recorded or not (out_dir / MODELS_RECORD).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / MODELS_RECORD, json.dumps(merged, indent=2) + "\n")


def _shard_done(out_dir, name: str, fields: Sequence[str]) -> bool:
    out_dir = Path(out_dir)
    if (out_dir / f"{name}{KEYS_SUFFIX}").is_file():  # npy layout: keys are written last
        return all((out_dir / f"{name}.{f}.npy").is_file() for f in fields)
    path = out_dir / f"{name}.npz"
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return all(f in z.files for f in fields)
    except Exception:  # unreadable -> recompute (the atomic write makes this rare)
        return False


class ShardBatches(IterableDataset):
    """Decoded, model-ready batches of one shard; worker w of n takes raw batches w, w+n, ...

    Yields {"keys", "inputs": {input name: tensor or list}, "skipped": Counter, "raw": int}.
    """

    def __init__(self, shard: str, fes: dict[str, FieldEncoder], batch_size: int):
        self.shard, self.batch_size = shard, batch_size
        self.prepare = {fe.input: (fe.modality, fe.prepare) for fe in fes.values()}
        self.need_image = any(fe.modality == "image" for fe in fes.values())
        self.need_text = any(fe.modality == "text" for fe in fes.values())

    def _raw_batches(self, stats: Counter) -> Iterator[list[dict]]:
        batch: list[dict] = []
        for s in iter_raw_samples(self.shard, stats):
            batch.append(s)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        yield batch  # possibly empty: carries the shard's truncation count

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        stats: Counter = Counter()
        for j, raw in enumerate(self._raw_batches(stats)):
            if j % n != w:
                continue
            skipped, keys, images, texts = Counter(), [], [], []
            for s in raw:
                caption = decode_caption(s) if self.need_text else None
                if self.need_text and caption is None:
                    skipped["missing_caption"] += 1
                    continue
                if self.need_image:
                    image = decode_image(s)
                    if image is None:
                        skipped["bad_image"] += 1
                        continue
                    images.append(image)
                if self.need_text:
                    texts.append(caption)
                keys.append(s["__key__"])
            inputs = {}
            for name, (modality, prepare) in self.prepare.items():
                xs = images if modality == "image" else texts
                inputs[name] = xs if prepare is None or not keys else prepare(xs)
            # the tar's damage is known only once it is read to the end: the last batch reports it
            skipped.update(stats)
            stats.clear()
            yield {"keys": keys, "inputs": inputs, "skipped": skipped, "raw": len(raw)}


def _as_is(batch: dict) -> dict:
    return batch


def embed_one_shard(shard: str, fns: dict[str, FieldEncoder | Callable], fields: Sequence[str],
                    batch_size: int, stats: Counter, decode_workers: int = 0,
                    pin_memory: bool = False) -> tuple[list[str], dict[str, np.ndarray]]:
    """Encode all good samples of one shard; returns (keys, {field: (n, d) float32})."""
    fes = {f: fn if isinstance(fn, FieldEncoder) else
           FieldEncoder(f.split("_", 1)[0], f"{f.split('_', 1)[0]}:raw", None, fn) for f, fn in fns.items()}
    fes = {f: fes[f] for f in fields}
    loader = DataLoader(ShardBatches(shard, fes, batch_size), batch_size=None, num_workers=decode_workers,
                        collate_fn=_as_is, pin_memory=pin_memory)
    keys: list[str] = []
    parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    n_raw = 0
    for b in loader:
        stats.update(b["skipped"])
        n_raw += b["raw"]
        if not b["keys"]:
            continue
        for f, fe in fes.items():
            arr = np.asarray(fe.encode(b["inputs"][fe.input]), dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != len(b["keys"]):
                raise ValueError(f"encoder for {f} returned shape {arr.shape} for {len(b['keys'])} "
                                 "inputs; expected (n, d)")
            parts[f].append(arr)
        keys.extend(b["keys"])
    if n_raw and not keys and any(fe.modality == "image" for fe in fes.values()):
        raise ValueError(f"shard {shard}: none of its {n_raw} samples has a decodable image but "
                         f"fields {list(fields)} need images; is this a text-only shard set?")
    arrays = {f: (np.concatenate(parts[f]) if parts[f] else np.zeros((0, 0), np.float32))
              for f in fields}
    return keys, arrays


def embed_shards(src, out_dir, encoders: dict[str, Any], fields: Sequence[str],
                 batch_size: int = 64, shards: Sequence[str] | None = None,
                 device: str | None = None, progress: Callable[[str], None] | None = print,
                 manifest: bool = True, decode_workers: int = 0,
                 before_shard: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embed `fields` for each shard of `src` into `out_dir` (one output shard per `X.tar`), resumably.

    `shards`: subset of `list_shards(src)` (paths or names) for this process, default all.
    `decode_workers`: DataLoader processes decoding/preprocessing (0: in this process).
    `before_shard(name)`: called before a shard is computed (the Ray job's fault-injection hook).
    Returns counts: shards written / already done, samples embedded, skipped samples by reason.
    Writes the manifest when every shard of `src` is present in `out_dir`.
    """
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
    fes = None  # encoders are built lazily: a fully-done rerun never loads a model
    # Identities hash checkpoint files: only when a shard or the manifest is written, once.
    models = functools.cache(lambda: describe_encoders(encoders))
    stats: Counter = Counter()
    done_before = written = samples = 0
    t0 = time.time()
    for i, shard in enumerate(todo):
        name = shard_name(shard)
        if _shard_done(out_dir, name, fields):
            done_before += 1
            continue
        if before_shard is not None:
            before_shard(name)
        if fes is None:
            record_models(out_dir, models())   # before the first shard: a rerun can tell who made them
            fes = resolve_field_encoders(encoders, fields, device)
        keys, arrays = embed_one_shard(shard, fes, fields, batch_size, stats, decode_workers,
                                       pin_memory=device is not None and torch.device(device).type == "cuda")
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
        record_models(out_dir, models())     # a set finished by other models is refused here too
        write_embedding_manifest(out_dir, source=str(src), models=models(),
                                 config={"fields": fields, "batch_size": batch_size})
    return {"written": written, "already_done": done_before, "samples": samples,
            "skipped": dict(stats), "complete": complete}


def load_embeddings(out_dir):
    """The finished embedding set at `out_dir` (errors if the manifest is missing)."""
    from xbt_dist.data.embeddings import EmbeddingShardSet

    return EmbeddingShardSet(out_dir, require_complete=True)
