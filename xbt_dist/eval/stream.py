"""Streamed embedding of an eval shard set: decode workers in, embeddings (fp32/fp16) out.

`xbt eval` used to decode every eval image into RAM before embedding (20-90 GB at 100k images,
about 1 TB at 1M). Here a torch DataLoader streams the set instead:

- `EvalShardDataset` gives each DataLoader worker whole shards (shard i -> worker i % workers);
  a worker decodes, applies each model's image transform and tokenizer, and yields ready batches
  that carry every sample's (shard, position) so the canonical order can be restored.
- `embed_stream` pulls the batches, hands each to an `embed_batch` callback (the models: one
  forward per tower per batch, derived views such as phi computed on the fp32 batch) and keeps
  only the embeddings (`eval.embed_dtype`: float32, or float16 for half the memory). Images
  and their captions travel together, so the gallery and the queries are embedded in one pass
  over the shards, whatever number of views.
- At the end rows are put back into canonical order (shard order, then position in the shard,
  bad samples skipped: the order of `iter_image_text`), so results do not depend on how many
  workers decoded or how batches interleaved. Peak host memory is the embeddings plus one
  view's worth while they are reordered, plus `workers x prefetch` decoded batches.

Bad samples are skipped and counted as in `data.shards` (`missing_caption`, `bad_image`,
`missing_label`, `truncated_shard`); the counts come back in `StreamedSet.skipped`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xbt_dist.data.shards import (decode_caption, decode_image, decode_meta, iter_raw_samples,
                                  list_shards)

log = logging.getLogger(__name__)

MODES = ("retrieval", "zeroshot")
# What is kept per embedding row (`eval.embed_dtype`). float32 (the default) gives the in-RAM path's
# embeddings to float rounding (CPU kernels are not batch-invariant to the last bit). float16 halves
# the memory of a 1M-image eval (28 instead of 55 GB at B/32 -> L/14), but its rounding (about 5e-4
# relative per component) reorders items whose scores differ by less than that: on the small toy run
# (near-untrained encoders) it moved some recalls in the third decimal (docs/PERFORMANCE.md), so it
# is an opt-in, not the default.
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def dedup_by_repr(fns: Mapping[str, Callable]) -> tuple[dict[str, Callable], dict[str, str]]:
    """({key: fn} with one entry per distinct fn, {role: key}).

    Two models with the same image transform (same resize, crop and normalisation) are fed one
    decoded tensor, not two. torchvision transforms print every parameter; anything whose repr
    is the default `<... at 0x...>` is never merged.
    """
    unique, alias, seen = {}, {}, {}
    for role, fn in fns.items():
        r = repr(fn)
        key = seen.get(r) if " at 0x" not in r else None
        if key is None:
            key = seen[r] = role
            unique[role] = fn
        alias[role] = key
    return unique, alias


class EvalShardDataset(IterableDataset):
    """Batches of preprocessed eval samples, whole shards per DataLoader worker.

    mode "retrieval": image + captions (`json["captions"]`, else the one caption) per sample;
    mode "zeroshot": image + integer class label (`cls` member or `json["cls"]`).
    Each batch is a dict: `shard`, `pos` (B,) ints; `images` {key: (B, 3, H, W)}; `texts`
    {key: (sum of captions, ctx)} and `n_caps` (B,) (retrieval); `labels` (B,) (zeroshot);
    `skipped` {reason: count} of the samples dropped since the previous batch.
    """

    def __init__(self, shards: list[str], transforms: Mapping[str, Callable],
                 tokenizers: Mapping[str, Callable] | None = None, batch_size: int = 256,
                 mode: str = "retrieval"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
        self.shards, self.transforms = list(shards), dict(transforms)
        self.tokenizers, self.bs, self.mode = dict(tokenizers or {}), batch_size, mode

    def _my_shards(self) -> list[tuple[int, str]]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return [(i, s) for i, s in enumerate(self.shards) if i % n == w]

    def _parse(self, sample: dict, skipped: Counter):
        """(image, captions | label) of one raw sample, or None (counted) when unusable."""
        if self.mode == "retrieval":
            caption = decode_caption(sample)
            if caption is None:
                return self._skip(skipped, "missing_caption", sample)
            image = decode_image(sample)
            if image is None:
                return self._skip(skipped, "bad_image", sample)
            return image, decode_meta(sample).get("captions") or [caption]
        image = decode_image(sample)
        label = sample.get("cls") or str(decode_meta(sample).get("cls", "")).encode()
        if image is None:
            return self._skip(skipped, "bad_image", sample)
        if not label.strip():
            return self._skip(skipped, "missing_label", sample)
        return image, int(label)

    @staticmethod
    def _skip(skipped: Counter, reason: str, sample: dict) -> None:
        skipped[reason] += 1
        log.warning("eval: skipping sample %s in shard %s: %s", sample.get("__key__"),
                    sample.get("__url__"), reason)
        return None

    def _collate(self, rows: list, skipped: Counter) -> dict:
        batch = {"shard": torch.tensor([r[0] for r in rows], dtype=torch.long),
                 "pos": torch.tensor([r[1] for r in rows], dtype=torch.long),
                 "images": {k: torch.stack([t(r[2]) for r in rows]) if rows else None
                            for k, t in self.transforms.items()},
                 "skipped": dict(skipped)}
        if self.mode == "retrieval":
            caps = [c for r in rows for c in r[3]]
            batch["n_caps"] = torch.tensor([len(r[3]) for r in rows], dtype=torch.long)
            batch["texts"] = {k: tok(caps) if caps else None for k, tok in self.tokenizers.items()}
        else:
            batch["labels"] = torch.tensor([r[3] for r in rows], dtype=torch.long)
        skipped.clear()
        return batch

    def __iter__(self) -> Iterator[dict]:
        rows, skipped = [], Counter()
        for shard_idx, shard in self._my_shards():
            for pos, sample in enumerate(iter_raw_samples(shard, skipped)):
                parsed = self._parse(sample, skipped)
                if parsed is None:
                    continue
                rows.append((shard_idx, pos, *parsed))
                if len(rows) == self.bs:
                    yield self._collate(rows, skipped)
                    rows = []
        if rows or skipped:   # the last partial batch; or only the skip counts of this worker
            yield self._collate(rows, skipped)


@dataclass
class StreamedSet:
    """Embeddings of one eval set in canonical order (`embed_dtype`, CPU), and what was skipped."""
    views: dict[str, dict[str, torch.Tensor]]   # {view: {"image": (N, d), "text": (M, d)}}
    n_images: int
    caption_to_image: torch.Tensor | None = None  # (M,) retrieval
    labels: torch.Tensor | None = None            # (N,) zeroshot
    skipped: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


def _stderr(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def embed_stream(spec, embed_batch: Callable[[dict], Mapping[str, Mapping[str, torch.Tensor]]],
                 transforms: Mapping[str, Callable], tokenizers: Mapping[str, Callable] | None = None,
                 *, mode: str = "retrieval", batch_size: int = 256, num_workers: int = 2,
                 progress_every: int = 50, pin_memory: bool = False, name: str = "eval set",
                 store_dtype: str = "float32",
                 log_fn: Callable[[str], None] = _stderr) -> StreamedSet:
    """One streamed pass over the shard set `spec`; `embed_batch(batch)` -> {view: {mod: (n, d)}}.

    `embed_batch` returns fp32 (or any float) embeddings per view for the batch's images
    (`"image"`) and, in retrieval mode, its captions (`"text"`, rows in batch caption order);
    they are kept as `store_dtype`. A progress line goes to `log_fn` every `progress_every`
    batches.
    """
    if num_workers < 0:
        raise ValueError(f"eval.num_workers must be >= 0, got {num_workers}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"eval.embed_dtype must be one of {sorted(STORE_DTYPES)}, "
                         f"got {store_dtype!r}")
    keep = STORE_DTYPES[store_dtype]
    shards = list_shards(spec)
    ds = EvalShardDataset(shards, transforms, tokenizers, batch_size, mode)
    # One worker per shard at most: a worker without shards would only cost a fork.
    workers = min(num_workers, len(shards))
    loader = DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=2 if workers else None)
    t0 = time.perf_counter()
    arrived: list[dict] = []     # per batch: shard, pos, n_caps/labels, {view: {mod: emb}}
    skipped, n_img, n_txt = Counter(), 0, 0
    for i, batch in enumerate(loader, 1):
        skipped.update(batch["skipped"])
        n = len(batch["pos"])
        if n == 0:
            continue
        out = embed_batch(batch)
        emb = {v: {m: x.detach().to("cpu", keep) for m, x in mods.items()}
               for v, mods in out.items()}
        for v, mods in emb.items():
            if mods["image"].shape[0] != n:
                raise RuntimeError(f"embed_batch gave {mods['image'].shape[0]} {v} image rows "
                                   f"for a batch of {n} images")
        arrived.append({"shard": batch["shard"], "pos": batch["pos"], "emb": emb,
                        "n_caps": batch.get("n_caps"), "labels": batch.get("labels")})
        n_img += n
        n_txt += int(batch["n_caps"].sum()) if "n_caps" in batch else 0
        if progress_every and i % progress_every == 0:
            dt = time.perf_counter() - t0
            log_fn(f"{name}: {n_img} images" + (f", {n_txt} captions" if n_txt else "")
                   + f" embedded, {n_img / dt:.0f} images/s, {dt:.0f} s"
                   + (f", skipped {dict(skipped)}" if skipped else ""))
    if n_img == 0:
        raise ValueError(f"{name} {spec} holds no readable sample "
                         f"({'image-text' if mode == 'retrieval' else 'labelled image'}); "
                         f"skipped: {dict(skipped) or 'none'}")
    res = _canonical(arrived, mode)
    res.skipped, res.wall_s = dict(skipped), round(time.perf_counter() - t0, 2)
    log_fn(f"{name}: {res.n_images} images" + (f", {n_txt} captions" if n_txt else "")
           + f" embedded in {res.wall_s:.1f} s ({workers} decode workers)"
           + (f", skipped {res.skipped}" if res.skipped else ""))
    return res


def _canonical(arrived: list[dict], mode: str) -> StreamedSet:
    """Scatter the arrived embedding chunks into canonical order, one view at a time.

    Each chunk is dropped once copied, so the peak is the chunks plus ONE reordered view-modality,
    not two full copies of every view.
    """
    shard = torch.cat([a["shard"] for a in arrived])
    pos = torch.cat([a["pos"] for a in arrived])
    n = len(pos)
    # (shard, position) -> canonical index; positions within a shard are < 2**40.
    order = torch.argsort(shard * (1 << 40) + pos)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)            # rank[r]: canonical index of the r-th arrived image
    out = StreamedSet(views={}, n_images=n)
    if mode == "retrieval":
        n_caps = torch.cat([a["n_caps"] for a in arrived])
        caps_canon = n_caps[order]
        first_cap = torch.cumsum(caps_canon, 0) - caps_canon   # canonical first caption per image
        # Canonical caption index of each arrived caption: its image's first caption + k.
        img_of_cap = torch.repeat_interleave(torch.arange(n), n_caps)
        within = torch.arange(len(img_of_cap)) - torch.repeat_interleave(
            torch.cumsum(n_caps, 0) - n_caps, n_caps)
        text_rank = first_cap[rank[img_of_cap]] + within
        out.caption_to_image = torch.repeat_interleave(torch.arange(n), caps_canon)
    else:
        out.labels = torch.empty(n, dtype=torch.long)
        out.labels[rank] = torch.cat([a["labels"] for a in arrived])
    pairs = [(v, m) for v, mods in arrived[0]["emb"].items() for m in mods]
    for v, m in pairs:
        rows = rank if m == "image" else text_rank
        first = arrived[0]["emb"][v][m]
        dest = torch.empty(len(rows), first.shape[1], dtype=first.dtype)
        start = 0
        for a in arrived:
            chunk = a["emb"][v].pop(m)
            dest[rows[start:start + len(chunk)]] = chunk
            start += len(chunk)
        out.views.setdefault(v, {})[m] = dest
    return out
