"""Training sample stream: whole shards per slot, shuffled, with a global cursor that resumes anywhere.

`SampleStream` is what a training loop iterates: one pass = one epoch of batches (dicts with
`keys`, `captions`, `images`, `tokens`, and embedding targets such as `v_old`/`w_old` joined by key
from an embedding shard set). It drives a torch DataLoader (persistent workers) over
`ShardBatchDataset`, an IterableDataset that each DataLoader worker runs on its own shards.

Split (cursor.py): each epoch the shards are permuted per (seed, epoch) and dealt out whole to
the `world_size x num_workers` (rank, DataLoader worker) slots, for any shard count: each shard is
opened by one slot per epoch, each sample is read once cluster-wide. Slots may differ by one
shard (a fixed step count absorbs that; ranks also differ when shard sizes do, so a DDP loop
stops all ranks at the same step, e.g. `max_steps`, or uses `resampled=True`).

Order: shard order per (seed, epoch), then a shuffle buffer per slot whose generator is part of
the cursor. Batches reach the loop in a fixed turn over the DataLoader workers (the DataLoader's
own round-robin, made explicit so that a resumed stream can start at any worker's turn).
`resampled=True` draws shards with replacement forever (LAION style), per slot.

Data cursor (the contract with the run-state layer, train/checkpoint.py): every batch carries its
producer's position after it (units left, shuffle buffer as (shard, byte offset) references, the
generator state); the stream keeps the position of the last batch the loop CONSUMED per worker.
`state_dict()` is this rank's part; `load_state_dict(parts)` takes every rank's part, in old rank
order, written with any world size and worker count. Same layout: each slot restores its buffer
(re-read by seeking), generator and offsets, so the continuation is bit-identical. Other layout:
the remaining references and shard tails are dealt out to the new slots (cursor.relayout), so the
rest of the epoch reads every unconsumed sample once and never a consumed one. Resume seeks to
byte offsets; nothing is replayed. (If ranks were in different epochs at the checkpoint, a
relayout continues the oldest one and the faster ranks' head start in the next is read again.)

Augmentation: the image transform runs under torch and Python RNGs seeded from (seed, epoch,
shard, sample index), so it does not depend on which worker reads a sample, or when.

Bad and missing data (reader.py) are skipped and counted by reason in `SampleStream.skipped`,
with the files in `bad_files`. A sample is good by the one rule `data.shards.check_sample` (the
rule `xbt prep validate` applies), so training skips exactly the samples validation reports.
Past `max_bad_fraction` of an epoch's samples (estimated: a lost shard counts its size from
sizes.json) the stream raises `DataBudgetExceeded` naming the files.
Stage 1's precomputed text embeddings have their own stream (text_stream.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter, deque
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xbt_dist.data.cursor import SlotCursor, fresh_slot, from_named, relayout, to_named
from xbt_dist.data.embeddings import EmbeddingShardSet
from xbt_dist.data.reader import SHARD_REASONS, UnitReader
from xbt_dist.data.shards import SIZES, _maybe_open, check_sample, list_shards, shard_name

log = logging.getLogger(__name__)

MODES = ("image_text", "text")
# paper names for the embedding targets of stage 2 (v = image, w = text)
STAGE2_TARGETS = {"v_old": "image_old", "w_old": "text_old"}
MAX_BAD_FILES = 1000  # files kept by name in bad_files (counts by reason are always complete)


class DataBudgetExceeded(RuntimeError):
    """More bad or missing data than `data.max_bad_fraction` allows. That is a systematic problem
    (a wrong path, an embedding set of other shards, lost storage) that no restart fixes, so the
    Ray runner does not restart the job for it (distributed/ray_runner.py)."""


def sample_seed(seed: int, epoch: int, shard: str, index: int, visit: int = 0) -> int:
    """The augmentation seed of one sample: a function of what it is, not of who reads it."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{shard}/{index}/{visit}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2 ** 63 - 1)


def _sizes_json(src) -> dict[str, int]:
    """`sizes.json` of a shard directory (or of a glob's / brace pattern's directory), or {}:
    never a scan of the tars."""
    if isinstance(src, (list, tuple)):
        return {}
    src = str(src)
    if any(c in src.rsplit("/", 1)[-1] for c in "*?[{"):
        src = src.rsplit("/", 1)[0]
    path = src.rstrip("/") + "/" + SIZES
    try:
        with _maybe_open(path) as f:
            return {str(k): int(v) for k, v in json.load(f).items()} if f is not None else {}
    except (OSError, ValueError):
        return {}


class ShardBatchDataset(IterableDataset):
    """IterableDataset yielding ready batches for one (rank, DataLoader worker) slot.

    Use with `DataLoader(ds, batch_size=None, num_workers=...)`; SampleStream does this for you.
    Each batch also carries `_worker`, `_cursor` (the slot's position after it), `_final` (the
    slot's last, empty batch) and the skip counts since the previous batch (`_skipped`, `_bad`,
    `_lost`). `start` (one cursor per worker, None = fresh) applies to a worker's first pass
    only; a persistent worker's later passes are the following epochs from their start.
    """

    def __init__(self, src, *, batch_size: int, mode: str = "image_text",
                 transform: Callable | None = None, tokenizer: Callable | None = None,
                 targets: str | None = None, fields: dict[str, str] | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 256, resampled: bool = False,
                 drop_last: bool = False, start: Sequence | None = None,
                 read_retries: int = 3, retry_backoff_s: float = 0.5):
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
        self.drop_last, self.start = drop_last, list(start or [])
        self.read_retries, self.retry_backoff_s = read_retries, retry_backoff_s
        self.fields = dict(fields or {})
        self._passes = 0
        self.sizes: dict[str, int] = {}
        self.shards = list_shards(src, missing_ok=True)
        self.sizes = _sizes_json(src)
        self.targets = EmbeddingShardSet(targets) if targets else None
        if self.targets is not None:
            if not self.fields:
                self.fields = dict(STAGE2_TARGETS) if mode == "image_text" else \
                    {f: f for f in self.targets.fields if f.startswith("text_")}
            self.targets.check_fields(self.fields.values())
        elif self.fields:
            raise ValueError(f"fields={self.fields} given without targets=<embedding shard set dir>")
        # Fresh epochs deal out the listed shards only; names a checkpoint adds to `shards`
        # (e.g. a shard deleted since) are read where the cursor says, and counted missing.
        self.n_listed = len(self.shards)

    def fresh_slot(self, epoch: int, worker: int, num_workers: int) -> dict[str, Any]:
        return fresh_slot(self.n_listed, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                          rank=self.rank, world_size=self.world_size, worker=worker,
                          num_workers=num_workers)

    # ---- whole shards, shuffle buffer, cursor ----
    def _iter_samples(self, worker: int, num_workers: int, epoch: int, start: dict | None
                      ) -> Iterator[dict]:
        reader = UnitReader(self.shards, targets=self.targets, fields=self.fields, sizes=self.sizes,
                            retries=self.read_retries, backoff_s=self.retry_backoff_s)
        if start is None:
            start = self.fresh_slot(epoch, worker, num_workers)
        slot = SlotCursor(reader, start, self.shuffle_buffer if self.shuffle else 0, self.resampled,
                          self.n_listed)
        reported, reported_bad, reported_lost = Counter(), Counter(), 0.0

        def emit(items: list[dict], final: bool = False) -> dict:
            nonlocal reported, reported_bad, reported_lost
            skipped, bad = reader.stats - reported, reader.bad - reported_bad
            reported, reported_bad = reader.stats.copy(), reader.bad.copy()
            lost, reported_lost = reader.lost - reported_lost, reader.lost
            b = self._collate(items) if items else {}
            b.update(_worker=worker, _cursor=slot.snapshot(), _final=final, _skipped=dict(skipped),
                     _bad=dict(bad), _lost=lost)
            return b

        items: list[dict] = []
        while (got := slot.next()) is not None:
            item = self._decode(got[1], got[0], epoch, reader)
            if item is None:
                continue
            items.append(item)
            if len(items) == self.batch_size:
                yield emit(items)
                items = []
        if items and not self.drop_last:
            yield emit(items)
        yield emit([], final=True)  # the slot's end: last skip counts, drained cursor

    # ---- decoding ----
    def _decode(self, s: dict, ref: tuple, epoch: int, reader: UnitReader) -> dict | None:
        # The one good-sample rule (validate's): the caption first, then the image (decoded once,
        # by the check; a sample without its caption is not decoded at all).
        verdict = check_sample(s, self.mode)
        if not verdict.good:
            return self._skip(reader, verdict.reason, s, verdict.problems[0][1])
        out: dict[str, Any] = {"key": s["__key__"], "caption": verdict.caption}
        if self.mode == "image_text":
            image = verdict.image
            out["image"] = self._augment(image, ref, epoch) if self.transform is not None else image
        if self.fields:
            if s.get("_emb") is None:
                return self._skip(reader, "missing_target_key", s)
            out["emb"] = s["_emb"]
        return out

    def _augment(self, image, ref: tuple, epoch: int):
        """The transform under RNGs seeded from the sample itself (see `sample_seed`).

        `default_generator.manual_seed`, not `torch.manual_seed` (which also seeds every
        accelerator: 0.8 ms a sample). In-process (num_workers=0) the global states are the
        training loop's, so they are put back; a DataLoader worker's are its own.
        """
        seed = sample_seed(self.seed, epoch, shard_name(self.shards[ref[0]]), ref[2], ref[3])
        if get_worker_info() is not None:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return self.transform(image)
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.transform(image)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)

    @staticmethod
    def _skip(reader: UnitReader, reason: str, s: dict, detail: str = "") -> None:
        reader.count_bad(s["__url__"], reason)
        log.warning("skipping sample %s in shard %s: %s%s", s["__key__"], s["__url__"], reason,
                    f" ({detail})" if detail else "")
        return None

    def _collate(self, items: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {"keys": [it["key"] for it in items],
                                 "captions": [it["caption"] for it in items]}
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
        # A persistent worker runs one pass per epoch: the start cursor is for its first pass.
        passes, self._passes = self._passes, self._passes + 1
        start = self.start[worker] if passes == 0 and self.start else None
        yield from self._iter_samples(worker, num_workers, self.epoch + passes, start)


def _as_is(batch: dict) -> dict:
    return batch


class SampleStream:
    """Epoch-wise batch iterator for the training loop, with a checkpointable global data cursor.

    Example (stage 2):
        stream = SampleStream("shards/train", batch_size=64, transform=bundle.preprocess_train,
                              tokenizer=bundle.tokenizer, targets="emb/train",
                              rank=rank, world_size=world_size, num_workers=4, seed=0)
        for batch in stream:           # one epoch; batch["images"], ["tokens"], ["v_old"], ["w_old"]
            ...; ckpt["data"] = stream.state_dict()
        stream.load_state_dict(all_ranks_data)  # on restart, any layout: continues where it left off
    Stage 1 over text shards: `mode="text"` (captions and tokens; precomputed text embeddings
    stream through data/text_stream.py instead).
    `fields` maps batch names to embedding fields (default v_old/w_old for image_text targets).
    `max_bad_fraction` (1 = no limit) bounds skipped samples per epoch; `epoch_samples` (default:
    sizes.json) makes it a fraction of the whole epoch rather than of what was read so far.
    """

    def __init__(self, src, *, batch_size: int, mode: str = "image_text",
                 transform: Callable | None = None, tokenizer: Callable | None = None,
                 targets: str | None = None, fields: dict[str, str] | Sequence[str] | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 256, resampled: bool = False,
                 drop_last: bool = False, pin_memory: bool = False, max_bad_fraction: float = 1.0,
                 epoch_samples: int | None = None, read_retries: int = 3, retry_backoff_s: float = 0.5):
        if fields is not None and not isinstance(fields, dict):
            fields = {f: f for f in fields}
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={max_bad_fraction} must be in [0, 1]")
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.max_bad_fraction = max_bad_fraction
        self.dataset = ShardBatchDataset(
            src, batch_size=batch_size, mode=mode, transform=transform, tokenizer=tokenizer,
            targets=targets, fields=fields, rank=rank, world_size=world_size, seed=seed,
            shuffle=shuffle, shuffle_buffer=shuffle_buffer, resampled=resampled,
            drop_last=drop_last, read_retries=read_retries,
            retry_backoff_s=retry_backoff_s)
        sizes = self.dataset.sizes
        self.epoch_samples = epoch_samples if epoch_samples is not None else sum(sizes.values())
        self.skipped: Counter = Counter()
        self.bad_files: Counter = Counter()
        self._loader: DataLoader | None = None
        self._loader_next_epoch: int | None = None  # the epoch a persistent loader serves next
        self.set_epoch(0)

    @property
    def fields(self) -> dict[str, str]:
        return dict(self.dataset.fields)

    @property
    def _n_workers(self) -> int:
        return max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (drops any mid-epoch position)."""
        self.epoch = epoch
        n = self._n_workers
        self._slots: list[dict | None] = [None] * n  # cursor after the last consumed batch; None: fresh
        self._next_worker, self._finished = 0, [False] * n
        self._budget = {"good": 0.0, "bad": 0.0}     # this epoch's samples, for max_bad_fraction

    def __iter__(self) -> Iterator[dict]:
        """One epoch of batches. Breaking out and iterating again continues the same epoch."""
        ds = self.dataset
        fresh = all(s is None for s in self._slots) and self._next_worker == 0 and not any(self._finished)
        if not (self.num_workers and fresh and self._loader is not None
                and self._loader_next_epoch == self.epoch):
            self.close()
            ds.epoch, ds._passes, ds.start = self.epoch, 0, (None if fresh else list(self._slots))
            # collate_fn: batches are ready-made; DataLoader's default would walk every key and
            # caption string of every batch. Persistent workers keep their processes, imports and
            # open state across epochs; each new pass is the next epoch (ShardBatchDataset.__iter__).
            # generator: the DataLoader draws its workers' base seed from it at every new iterator;
            # from the global torch RNG (the default) a resumed run would draw once more than an
            # uninterrupted one and shift the training loop's random stream.
            self._loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                      collate_fn=_as_is, pin_memory=self.pin_memory,
                                      persistent_workers=self.num_workers > 0,
                                      generator=torch.Generator().manual_seed(ds.seed))
        self._loader_next_epoch = None
        it = iter(self._loader)
        for w, batch in self._in_turn(it):
            self._slots[w] = batch.pop("_cursor")
            batch.pop("_final"), batch.pop("_worker")
            self._account(batch.pop("_skipped"), batch.pop("_bad"), batch.pop("_lost"),
                          len(batch.get("keys", ())))
            if batch:  # final tails only carry the counters and the drained cursor
                yield batch
        for _ in it:  # only the workers' end signals are left; lets the loader start a new pass
            pass
        # a full pass (never reached in resampled mode): next iteration is the next epoch
        self._loader_next_epoch = self.epoch + 1
        self.set_epoch(self.epoch + 1)

    def _in_turn(self, it: Iterator[dict]) -> Iterator[tuple[int, dict]]:
        """Batches in the DataLoader's own order (workers in turn, a worker leaving after its final
        batch), but starting at the saved worker's turn: a fresh DataLoader always starts at
        worker 0, so a resumed one would otherwise reorder the batches."""
        n = self._n_workers
        waiting: list[deque] = [deque() for _ in range(n)]
        while not all(self._finished):
            w = self._next_worker
            if self._finished[w]:
                self._next_worker = (w + 1) % n
                continue
            while not waiting[w]:
                b = next(it, None)
                if b is None:
                    raise RuntimeError(f"DataLoader worker {w} ended without its final batch")
                if not self._finished[b["_worker"]]:  # a drained slot's re-sent tail: already counted
                    waiting[b["_worker"]].append(b)
            b = waiting[w].popleft()
            self._finished[w] = bool(b["_final"])
            self._next_worker = (w + 1) % n
            yield w, b

    def close(self) -> None:
        """Stop the DataLoader's worker processes (a new pass starts new ones)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    # ---- bad-data budget ----
    def _account(self, skipped: dict, bad: dict, lost: float, good: int) -> None:
        self.skipped.update(skipped)
        for k, v in bad.items():
            if k in self.bad_files or len(self.bad_files) < MAX_BAD_FILES:
                self.bad_files[k] += v
        self._budget["good"] += good
        self._budget["bad"] += lost + sum(v for r, v in skipped.items() if r not in SHARD_REASONS)
        self._check_budget()

    def bad_fraction(self) -> float:
        """This epoch's bad samples over max(samples seen, this rank's share of the epoch)."""
        good, bad = self._budget["good"], self._budget["bad"]
        expected = self.epoch_samples / self.dataset.world_size if self.epoch_samples else 0.0
        total = max(good + bad, expected)
        return bad / total if total else 0.0

    def _check_budget(self) -> None:
        m = self.max_bad_fraction
        if m >= 1 or not self._budget["bad"]:
            return
        seen = self._budget["good"] + self._budget["bad"]
        if not self.epoch_samples and seen * m < 1:
            return  # without sizes.json: too few samples read to judge a fraction yet
        frac = self.bad_fraction()
        if frac <= m:
            return
        files = [f for f, _ in self.bad_files.most_common(10)]
        more = len(self.bad_files) - len(files)
        raise DataBudgetExceeded(
            f"rank {self.dataset.rank}: {frac:.1%} of epoch {self.epoch}'s samples are bad or missing "
            f"(> data.max_bad_fraction={m}); by reason: {dict(self.skipped)}; files: "
            f"{', '.join(files)}{f' and {more} more' if more > 0 else ''}. Fix or remove these shards "
            "(`xbt prep validate`), recompute the embedding set (`xbt embed`) if targets are missing, "
            "or raise data.max_bad_fraction")

    # ---- checkpointable cursor ----
    def _layout(self) -> dict[str, Any]:
        ds = self.dataset
        return {"rank": ds.rank, "world_size": ds.world_size, "num_workers": self.num_workers,
                "seed": ds.seed, "shuffle": ds.shuffle, "shuffle_buffer": ds.shuffle_buffer,
                "resampled": ds.resampled, "batch_size": ds.batch_size, "drop_last": ds.drop_last}

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the global data cursor (small: shard names, offsets, generator)."""
        ds = self.dataset
        table: dict[str, int] = {}
        slots = [to_named(s if s is not None else ds.fresh_slot(self.epoch, w, self._n_workers),
                          ds.shards, table) for w, s in enumerate(self._slots)]
        return {"version": 2, "mode": ds.mode, "epoch": self.epoch, "layout": self._layout(),
                "shards": list(table), "slots": slots, "next_worker": self._next_worker,
                "finished": list(self._finished), "skipped": dict(self.skipped),
                "bad_files": dict(self.bad_files), "budget": dict(self._budget)}

    def load_state_dict(self, states: list[dict] | dict) -> None:
        """Resume from every rank's saved part (a list in old rank order, any old layout).

        A single dict is taken as this rank's own part and needs the same layout."""
        ds = self.dataset
        own = isinstance(states, dict)
        parts = [states] if own else list(states)
        if not parts or any(p.get("version") != 2 for p in parts):
            raise ValueError("data state is not a sample-stream cursor (version 2): it was written "
                             "by another stream mode or an older xbt_dist; start the stage afresh")
        self.close()
        self._loader_next_epoch = None
        index = {p: i for i, p in enumerate(ds.shards)}
        same = (not own and len(parts) == ds.world_size and
                all(p["layout"] == {**self._layout(), "rank": r} for r, p in enumerate(parts)))
        if own:
            if parts[0]["layout"] != self._layout():
                raise ValueError(f"data state was saved with layout {parts[0]['layout']} but this "
                                 f"stream has {self._layout()}; pass every rank's part "
                                 "(a list) to resume on another layout")
            same, parts = True, [parts[0]] * ds.world_size
        if same:
            mine = parts[ds.rank]
            self.set_epoch(int(mine["epoch"]))
            self._slots = [from_named(s, mine["shards"], index) for s in mine["slots"]]
            self._next_worker, self._finished = int(mine["next_worker"]), list(mine["finished"])
            self.skipped, self.bad_files = Counter(mine["skipped"]), Counter(mine["bad_files"])
            self._budget = dict(mine["budget"])
        else:
            epoch = min(int(p["epoch"]) for p in parts)
            ahead = [r for r, p in enumerate(parts) if int(p["epoch"]) != epoch]
            if ahead:
                log.warning("data cursor: ranks %s had started epoch %d; its part they read will be "
                            "read again", ahead, epoch + 1)
            old = [from_named(s, p["shards"], index) for p in parts if int(p["epoch"]) == epoch
                   for s in p["slots"]]
            self.set_epoch(epoch)
            self._slots = relayout(old, rank=ds.rank, world_size=ds.world_size,
                                   num_workers=self._n_workers, seed=ds.seed, epoch=epoch)
            # counts: the sums land on rank 0, so cluster totals stay right; budgets are shared out
            first = ds.rank == 0
            self.skipped = sum((Counter(p["skipped"]) for p in parts), Counter()) if first else Counter()
            self.bad_files = sum((Counter(p["bad_files"]) for p in parts), Counter()) if first else Counter()
            self._budget = {k: sum(p["budget"][k] for p in parts) / ds.world_size
                            for k in ("good", "bad")}
        ds.shards = sorted(index, key=index.__getitem__)
