"""Training sample stream: sharded, shuffled, resumable batches for the training loop.

`SampleStream` is what a training loop iterates: one pass = one epoch of batches (dicts with
`keys`, `captions`, `images`, `tokens`, and embedding targets such as `v_old`/`w_old` joined by key
from an embedding shard set). It drives a torch DataLoader over `ShardBatchDataset`, an
IterableDataset that each DataLoader worker runs on its own slice of the data.

Split policy (exact coverage: within an epoch every sample is seen exactly once cluster-wide):
  * rank level: shards (in the epoch's order) go to rank `i % world_size` when the shard count
    divides by world_size; otherwise every rank reads every shard and keeps the samples whose
    running index `j` satisfies `j % world_size == rank` (sample granularity: exact, costs
    world_size x the reads, so prefer shard counts that divide).
  * worker level: the same rule again within the rank, with the rank's shards/samples and the
    DataLoader's num_workers (from `torch.utils.data.get_worker_info`).
  Ranks may therefore get unequal sample counts when shard sizes differ (or differ by one sample
  at sample granularity); a DDP loop must stop all ranks at the same step (e.g. `max_steps`) or
  use `resampled=True`.

Order: shards are permuted per (seed, epoch), then a shuffle buffer per (seed, epoch, rank, worker).
In `mode="embeddings"` (stage 1) a shard's rows are already in memory, so rows are selected,
fully permuted per shard and batched as numpy index arrays (no per-row Python objects: the
shuffle buffer is not used); the split and the position rule are the same.
`resampled=True` draws shards with replacement forever (LAION style), per slot.

Data position: each worker's pipeline is deterministic, so its state is just "how many raw samples
(after shuffling, before decoding) the training loop has consumed". Batches carry that position;
`SampleStream` records it per worker and a resumed stream makes each worker skip that many, so
nothing repeats or is skipped. Resuming requires the same world_size and num_workers.

Bad samples (undecodable image, missing caption, truncated tar) are skipped and counted by reason in
`SampleStream.skipped`; a key missing from the embedding targets is an error (misaligned sets).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xbt_dist.data.embeddings import EmbeddingShardSet
from xbt_dist.data.shards import (decode_caption, decode_image, iter_raw_samples, list_shards,
                                  shard_name)

log = logging.getLogger(__name__)

MODES = ("image_text", "text", "embeddings")
# paper names for the embedding targets of stage 2 (v = image, w = text)
STAGE2_TARGETS = {"v_old": "image_old", "w_old": "text_old"}
STAGE1_FIELDS = {"text_new": "text_new", "text_old": "text_old"}


class KeyMisalignment(KeyError):
    """A training sample has no row in the embedding targets: the two shard sets do not match."""


def split_plan(n_shards: int, rank: int, world_size: int, worker: int, num_workers: int
               ) -> tuple[slice | None, list[tuple[int, int]]]:
    """Which shards a (rank, worker) slot reads and which sample filters it applies.

    Returns `(shard_slice, filters)`: `shard_slice` selects from the epoch's shard order (None =
    all shards); `filters` is a list of `(modulus, residue)` applied in sequence, each to a running
    index over the samples that passed the previous filter.
    """
    filters: list[tuple[int, int]] = []
    if n_shards % (world_size * num_workers) == 0:
        # slot s = rank + world_size * worker reads shards s, s + n_slots, ...
        return slice(rank + world_size * worker, None, world_size * num_workers), filters
    if n_shards % world_size == 0:
        return slice(rank, None, world_size), [(num_workers, worker)] if num_workers > 1 else []
    if world_size > 1:
        filters.append((world_size, rank))
    if num_workers > 1:
        filters.append((num_workers, worker))
    return None, filters


def _shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Deterministic shuffle buffer (same rng state -> same order), drained shuffled at the end."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for s in samples:
        buf.append(s)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardBatchDataset(IterableDataset):
    """IterableDataset yielding ready batches for one (rank, DataLoader worker) slot.

    Use with `DataLoader(ds, batch_size=None, num_workers=...)`; SampleStream does this for you.
    Each batch also carries `_worker` and `_pos` (raw samples consumed by that worker so far) and
    `_skipped` (skip counts since the previous batch) for position tracking.
    """

    def __init__(self, src, *, batch_size: int, mode: str = "image_text",
                 transform: Callable | None = None, tokenizer: Callable | None = None,
                 targets: str | None = None, fields: dict[str, str] | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 256, resampled: bool = False,
                 drop_last: bool = False, start: Sequence[int] | None = None, emit_tail: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.mode, self.batch_size = mode, batch_size
        self.transform, self.tokenizer = transform, tokenizer
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.shuffle, self.shuffle_buffer, self.resampled = shuffle, shuffle_buffer, resampled
        self.drop_last, self.start, self.emit_tail = drop_last, list(start or []), emit_tail
        self.fields = dict(fields or {})
        if mode == "embeddings":
            self.emb_src = EmbeddingShardSet(src)
            self.shards = list(self.emb_src.shard_names)
            if not self.fields:
                self.fields = dict(STAGE1_FIELDS)
            self.emb_src.check_fields(self.fields.values())
            self.targets = None
        else:
            self.shards = list_shards(src)
            self.targets = EmbeddingShardSet(targets) if targets else None
            if self.targets is not None:
                if not self.fields:
                    self.fields = dict(STAGE2_TARGETS) if mode == "image_text" else \
                        {f: f for f in self.targets.fields if f.startswith("text_")}
                self.targets.check_fields(self.fields.values())
            elif self.fields:
                raise ValueError(f"fields={self.fields} given without targets=<embedding shard set dir>")

    # ---- raw sample stream (before decoding): this is what positions count ----
    def _shard_samples(self, shard: str, stats: Counter) -> Iterator[dict]:
        tgt = self.targets.shard(shard_name(shard)) if self.targets is not None else None
        for s in iter_raw_samples(shard, stats):
            if tgt is not None:
                rows = tgt.rows(s["__key__"], self.fields.values())
                s["_emb"] = None if rows is None else {o: rows[f] for o, f in self.fields.items()}
            yield s

    def _slot_plan(self, worker: int, num_workers: int) -> tuple[list[str], list[tuple[int, int]]]:
        """This slot's shards in the epoch's order and the sample filters it applies (split_plan)."""
        order = list(self.shards)
        if self.shuffle:  # same permutation on every rank/worker so the split stays consistent
            random.Random(f"{self.seed}-{self.epoch}-shards").shuffle(order)
        sel, filters = split_plan(len(order), self.rank, self.world_size, worker, num_workers)
        return (order[sel] if sel is not None else order), filters

    def _raw_stream(self, worker: int, num_workers: int, stats: Counter) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        if self.resampled:
            def shards_forever():
                while True:
                    yield rng.choice(self.shards)
            source = (s for shard in shards_forever() for s in self._shard_samples(shard, stats))
            yield from _shuffle_buffer(source, self.shuffle_buffer if self.shuffle else 0, rng)
            return
        order, filters = self._slot_plan(worker, num_workers)

        def filtered():
            counters = [0] * len(filters)
            for shard in order:
                for s in self._shard_samples(shard, stats):
                    keep = True
                    for k, (mod, res) in enumerate(filters):
                        keep = counters[k] % mod == res
                        counters[k] += 1
                        if not keep:
                            break
                    if keep:
                        yield s
        yield from _shuffle_buffer(filtered(), self.shuffle_buffer if self.shuffle else 0, rng)

    # ---- embeddings mode: numpy index batches, no per-row Python objects ----
    def _row_chunks(self, worker: int, num_workers: int) -> Iterator[tuple[Any, np.ndarray]]:
        """(shard, row indices) in this slot's order: the same shard order and split as the sample
        path, but rows are selected and shuffled as index arrays (a shard is in memory anyway, so a
        full per-shard permutation replaces the shuffle buffer)."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        if self.resampled:
            while True:
                emb = self.emb_src.shard(self.shards[int(rng.integers(len(self.shards)))])
                yield emb, (rng.permutation(len(emb)) if self.shuffle else np.arange(len(emb)))
        order, filters = self._slot_plan(worker, num_workers)
        counters = [0] * len(filters)
        for shard in order:
            emb = self.emb_src.shard(shard)
            rows = np.arange(len(emb))
            for k, (mod, res) in enumerate(filters):  # running index over the previous filter's output
                keep = (counters[k] + np.arange(len(rows))) % mod == res
                counters[k] += len(rows)
                rows = rows[keep]
            if len(rows):
                yield emb, (rng.permutation(rows) if self.shuffle else rows)

    def _iter_embeddings(self, worker: int, num_workers: int, skip: int) -> Iterator[dict]:
        pos, pending, n_pending = 0, [], 0

        def emit(pieces):
            batch: dict[str, Any] = {"keys": [k for emb, rows in pieces for k in emb.keys_at(rows)]}
            for out, f in self.fields.items():  # fp16 on disk, float32 for the loss
                parts = [emb.fields[f][rows] for emb, rows in pieces]
                batch[out] = torch.from_numpy(np.concatenate(parts).astype(np.float32))
            batch.update(_worker=worker, _pos=pos, _skipped={})
            return batch

        for emb, rows in self._row_chunks(worker, num_workers):
            if skip > pos:  # resuming: these were consumed before the checkpoint
                drop = min(skip - pos, len(rows))
                pos, rows = pos + drop, rows[drop:]
            while len(rows):
                take = min(self.batch_size - n_pending, len(rows))
                pending.append((emb, rows[:take]))
                n_pending, pos, rows = n_pending + take, pos + take, rows[take:]
                if n_pending == self.batch_size:
                    yield emit(pending)
                    pending, n_pending = [], 0
        if pending and not self.drop_last:
            yield emit(pending)
        elif self.emit_tail:
            yield {"_worker": worker, "_pos": pos, "_skipped": {}}

    # ---- decoding ----
    def _decode(self, s: dict, stats: Counter) -> dict | None:
        out: dict[str, Any] = {"key": s["__key__"]}
        if self.mode != "embeddings":
            caption = decode_caption(s)
            if caption is None:
                return self._skip(stats, "missing_caption", s)
            out["caption"] = caption
            if self.mode == "image_text":
                image = decode_image(s)
                if image is None:
                    return self._skip(stats, "bad_image", s)
                out["image"] = self.transform(image) if self.transform is not None else image
        if self.fields:
            if s.get("_emb") is None:
                raise KeyMisalignment(
                    f"sample {s['__key__']!r} of shard {s['__url__']} has no row in the embedding "
                    f"targets {self.targets.dir if self.targets else ''}: the embedding set was made "
                    "from a different shard set; recompute it with `xbt embed` on these shards")
            out["emb"] = s["_emb"]
        return out

    @staticmethod
    def _skip(stats: Counter, reason: str, s: dict) -> None:
        stats[reason] += 1
        log.warning("skipping sample %s in shard %s: %s", s["__key__"], s["__url__"], reason)
        return None

    def _collate(self, items: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {"keys": [it["key"] for it in items]}
        if self.mode != "embeddings":
            batch["captions"] = [it["caption"] for it in items]
            if self.tokenizer is not None:
                batch["tokens"] = self.tokenizer(batch["captions"])
        if self.mode == "image_text":
            imgs = [it["image"] for it in items]
            batch["images"] = torch.stack(imgs) if isinstance(imgs[0], torch.Tensor) else imgs
        for out in self.fields:
            # fp16 on disk, float32 for the loss
            batch[out] = torch.from_numpy(np.stack([it["emb"][out] for it in items]).astype(np.float32))
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.start and len(self.start) != num_workers:
            raise ValueError(f"resume state has positions for {len(self.start)} DataLoader workers "
                             f"but this loader has {num_workers}; resume with the same num_workers")
        skip = self.start[worker] if self.start else 0
        if self.mode == "embeddings":
            yield from self._iter_embeddings(worker, num_workers, skip)
            return
        stats: Counter = Counter()
        reported: Counter = Counter()
        pos, items = 0, []

        def emit(items):
            nonlocal reported
            delta = stats - reported
            reported = stats.copy()
            b = self._collate(items) if items else {}
            b.update(_worker=worker, _pos=pos, _skipped=dict(delta))
            return b

        for s in self._raw_stream(worker, num_workers, stats):
            pos += 1
            if pos <= skip:  # resuming: these were consumed before the checkpoint
                continue
            item = self._decode(s, stats)
            if item is None:
                continue
            items.append(item)
            if len(items) == self.batch_size:
                yield emit(items)
                items = []
        if items and not self.drop_last:
            yield emit(items)
        elif self.emit_tail:
            yield emit([])  # empty tail: carries the last skip counts (and final position)


def _as_is(batch: dict) -> dict:
    return batch


class SampleStream:
    """Epoch-wise batch iterator for the training loop, with checkpointable data position.

    Example (stage 2):
        stream = SampleStream("shards/train", batch_size=64, transform=bundle.preprocess_train,
                              tokenizer=bundle.tokenizer, targets="emb/train",
                              rank=rank, world_size=world_size, num_workers=4, seed=0)
        for batch in stream:           # one epoch; batch["images"], ["tokens"], ["v_old"], ["w_old"]
            ...; ckpt["data"] = stream.state_dict()
        stream.load_state_dict(ckpt["data"])   # on restart: continues where it left off
    Stage 1: `SampleStream("emb/text", mode="embeddings", batch_size=..)` -> `text_new`, `text_old`.
    `fields` maps batch names to embedding fields (default v_old/w_old for image_text targets).
    """

    def __init__(self, src, *, batch_size: int, mode: str = "image_text",
                 transform: Callable | None = None, tokenizer: Callable | None = None,
                 targets: str | None = None, fields: dict[str, str] | Sequence[str] | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 256, resampled: bool = False,
                 drop_last: bool = False, pin_memory: bool = False):
        if fields is not None and not isinstance(fields, dict):
            fields = {f: f for f in fields}
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.dataset = ShardBatchDataset(
            src, batch_size=batch_size, mode=mode, transform=transform, tokenizer=tokenizer,
            targets=targets, fields=fields, rank=rank, world_size=world_size, seed=seed,
            shuffle=shuffle, shuffle_buffer=shuffle_buffer, resampled=resampled,
            drop_last=drop_last, emit_tail=True)
        self.epoch = 0
        self._consumed = [0] * max(1, num_workers)
        self.skipped: Counter = Counter()

    @property
    def fields(self) -> dict[str, str]:
        return dict(self.dataset.fields)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (drops any mid-epoch position)."""
        self.epoch = epoch
        self._consumed = [0] * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict]:
        """One epoch of batches. Breaking out and iterating again continues the same epoch."""
        ds = self.dataset
        ds.epoch = self.epoch
        ds.start = list(self._consumed) if any(self._consumed) else []
        # collate_fn: batches are ready-made; DataLoader's default would walk every key and caption
        # string of every batch (10 % of a toy stage-1 step)
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            pin_memory=self.pin_memory, persistent_workers=False)
        for batch in loader:
            w = batch.pop("_worker")
            self._consumed[w] = batch.pop("_pos")
            self.skipped.update(batch.pop("_skipped"))
            if batch:  # empty tails only carry the counters
                yield batch
        # a full pass (never reached in resampled mode): next iteration is the next epoch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        return {"epoch": self.epoch, "consumed": list(self._consumed), "num_workers": self.num_workers,
                "rank": ds.rank, "world_size": ds.world_size, "seed": ds.seed,
                "resampled": ds.resampled, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ds = self.dataset
        for name, mine in (("world_size", ds.world_size), ("num_workers", self.num_workers),
                           ("seed", ds.seed), ("resampled", ds.resampled), ("rank", ds.rank)):
            if state.get(name, mine) != mine:
                raise ValueError(f"data state was saved with {name}={state[name]} but this stream has "
                                 f"{name}={mine}; resume with the same setting (positions are per "
                                 "rank and DataLoader worker)")
        self.epoch = int(state["epoch"])
        self._consumed = [int(c) for c in state["consumed"]]
        self.skipped = Counter(state.get("skipped", {}))
