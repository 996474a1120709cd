"""The global data cursor of the sample stream: which shards each slot reads, and where it is.

A slot is one (rank, DataLoader worker) pair; there are `world_size * num_workers` of them. Each
epoch the shards are permuted per (seed, epoch) and dealt out WHOLE, round-robin, to the slots:
position p of the epoch's order goes to slot `p % n_slots`, slot `rank + world_size * worker`
(so ranks get shards in turn first, the most even split across ranks). Any shard count works;
slots differ by at most one shard, which a fixed step count absorbs. No slot reads a shard
another slot owns, so each shard is opened once per epoch cluster-wide.

A slot's position is a plain array, cheap to snapshot with every batch:
  * units: what it has left to read, in order, one row `(shard, offset, index, count, visit)`:
    read `count` samples (-1: to the end of the tar) of shard `shard` (an index into the
    stream's shard list) starting at byte `offset`, which is sample number `index` of the shard
    (offset -1: a compressed tar, which cannot seek, so the reader skips `index` samples). The
    first row is the shard being read, advanced past every sample taken from it. `visit`
    numbers repeated draws of a shard (resampled mode) so their augmentations differ.
  * buffer: the shuffle buffer as references `(shard, offset, index, visit)`, never the bytes;
  * rng: the shuffle generator's state (numpy PCG64, a few integers); `done` once drained.

`relayout` turns the saved slots of ANY old layout into the slots of a new one: every buffered
reference becomes a one-sample unit and every unfinished unit keeps its offset; both are dealt
round-robin to the new slots. Nothing consumed is read again and nothing unconsumed is lost.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np

UNIT_COLS = 5   # shard, offset, index, count, visit
REF_COLS = 4    # shard, offset, index, visit


def epoch_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order (indices): the same permutation on every rank and worker."""
    order = list(range(n_shards))
    if shuffle:
        random.Random(f"{seed}-{epoch}-shards").shuffle(order)
    return order


def slot_id(rank: int, worker: int, world_size: int) -> int:
    return rank + world_size * worker


def slot_shards(order: Sequence[int], rank: int, world_size: int, worker: int, num_workers: int
                ) -> list[int]:
    """The whole shards slot (rank, worker) reads this epoch, in order."""
    return list(order[slot_id(rank, worker, world_size)::world_size * num_workers])


def units_of(shards: Sequence[int]) -> np.ndarray:
    """Units reading each shard whole, from its first byte."""
    u = np.zeros((len(shards), UNIT_COLS), np.int64)
    u[:, 0], u[:, 3] = shards, -1
    return u


def new_rng_state(*seed: int) -> dict:
    return np.random.default_rng([abs(int(s)) for s in seed]).bit_generator.state


def fresh_slot(n_shards: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
               worker: int, num_workers: int) -> dict[str, Any]:
    """The position of slot (rank, worker) at the start of `epoch`."""
    order = epoch_order(n_shards, seed, epoch, shuffle)
    return {"units": units_of(slot_shards(order, rank, world_size, worker, num_workers)),
            "buffer": np.zeros((0, REF_COLS), np.int64),
            "rng": new_rng_state(seed, epoch, rank, worker), "done": False}


def relayout(slots: Sequence[dict], *, rank: int, world_size: int, num_workers: int, seed: int,
             epoch: int) -> list[dict]:
    """This rank's new slots (one per DataLoader worker) from all old slots of one epoch.

    Buffered references come first (they were read before the saved position of their shard,
    so they must not wait for it), then the unfinished units, each dealt round-robin over the
    new slots in the old slot order. New slots start with an empty buffer and a generator seeded
    from the new layout and the amount of work left, so a second relayout draws anew.
    """
    refs = [r for s in slots for r in np.asarray(s["buffer"]).reshape(-1, REF_COLS)]
    units = [u for s in slots for u in np.asarray(s["units"]).reshape(-1, UNIT_COLS)]
    work = [np.array([r[0], r[1], r[2], 1, r[3]], np.int64) for r in refs] + list(units)
    n_slots = world_size * num_workers
    out = []
    for worker in range(num_workers):
        mine = work[slot_id(rank, worker, world_size)::n_slots]
        out.append({"units": np.array(mine, np.int64).reshape(-1, UNIT_COLS),
                    "buffer": np.zeros((0, REF_COLS), np.int64),
                    "rng": new_rng_state(seed, epoch, world_size, num_workers, rank, worker, len(work)),
                    "done": not mine})
    return out


def to_named(slot: dict, shards: Sequence[str], table: dict[str, int]) -> dict[str, Any]:
    """A slot with shard indices mapped into `table` (name -> index in the saved state's list),
    as plain lists: a checkpoint must not depend on this run's shard listing."""
    def rows(a):
        a = np.asarray(a).copy()
        for i in range(len(a)):
            a[i, 0] = table.setdefault(shards[int(a[i, 0])], len(table))
        return a.tolist()
    return {"units": rows(slot["units"]), "buffer": rows(slot["buffer"]), "rng": slot["rng"],
            "done": bool(slot["done"]), "draws": int(slot.get("draws", 0))}


def from_named(slot: dict, names: Sequence[str], index: dict[str, int]) -> dict[str, Any]:
    """Inverse of `to_named`: saved shard names to indices of this run's list (`index`, which
    gains the names it lacks, e.g. a shard deleted since: reading it then counts it missing)."""
    def rows(a, cols):
        a = np.asarray(a, np.int64).reshape(-1, cols)
        for i in range(len(a)):
            a[i, 0] = index.setdefault(names[int(a[i, 0])], len(index))
        return a
    return {"units": rows(slot["units"], UNIT_COLS), "buffer": rows(slot["buffer"], REF_COLS),
            "rng": slot["rng"], "done": bool(slot["done"]), "draws": int(slot.get("draws", 0))}


class SlotCursor:
    """One slot's cursor in motion: reads its units through `reader` (reader.UnitReader) into the
    shuffle buffer and hands out one sample at a time; `snapshot()` is the position after it."""

    def __init__(self, reader, state: dict, buffer_size: int, resampled: bool,
                 n_listed: int):
        self.reader, self.size, self.resampled, self.n_listed = reader, buffer_size, resampled, n_listed
        self.units = np.asarray(state["units"], np.int64).reshape(-1, UNIT_COLS)
        self.next_unit, self.cur, self.src = 0, None, None
        self.draws = int(state.get("draws", 0))
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self.refs: list[tuple[int, int, int, int]] = []
        self.buf: list[dict] = []
        for ref in np.asarray(state["buffer"], np.int64).reshape(-1, REF_COLS):
            # a saved buffer holds references: re-read each sample by seeking to it
            gen = reader.samples([ref[0], ref[1], ref[2], 1, ref[3]])
            got = next(gen, None)
            gen.close()
            if got is not None:
                self.refs.append(tuple(int(x) for x in ref))
                self.buf.append(got[3])

    def _read(self):
        """The next raw sample of the units (or of a fresh draw when resampled), with its ref."""
        while True:
            if self.src is None:
                if self.next_unit < len(self.units):
                    self.cur = [int(x) for x in self.units[self.next_unit]]
                    self.next_unit += 1
                elif self.resampled and self.n_listed:
                    self.cur = [int(self.rng.integers(self.n_listed)), 0, 0, -1, self.draws]
                    self.draws += 1
                else:
                    return None
                if self.cur[3] == 0:
                    self.cur = None
                    continue
                self.src = self.reader.samples(self.cur)
            item = next(self.src, None)
            if item is None:
                self.src = self.cur = None
                continue
            start, index, nxt, s = item
            ref = (self.cur[0], start, index, self.cur[4])
            if nxt is not None:
                self.cur[1] = nxt
            self.cur[2] = index + 1
            if self.cur[3] > 0:
                self.cur[3] -= 1
            if nxt is None or self.cur[3] == 0:
                self.src.close()
                self.src = self.cur = None
            return ref, s

    def next(self):
        """The next sample out of the shuffle buffer as `(ref, sample)`, or None when drained."""
        while len(self.buf) < max(1, self.size):
            got = self._read()
            if got is None:
                break
            self.refs.append(got[0])
            self.buf.append(got[1])
        if not self.buf:
            return None
        if self.size > 1:
            i, j = int(self.rng.integers(len(self.buf))), len(self.buf) - 1
            self.buf[i], self.buf[j] = self.buf[j], self.buf[i]
            self.refs[i], self.refs[j] = self.refs[j], self.refs[i]
        return self.refs.pop(), self.buf.pop()

    def snapshot(self) -> dict[str, Any]:
        rest = self.units[self.next_unit:]
        units = rest if self.cur is None else np.vstack([np.array([self.cur], np.int64), rest])
        done = not len(units) and not self.buf and not self.resampled
        return {"units": units, "buffer": np.array(self.refs, np.int64).reshape(-1, REF_COLS),
                "rng": self.rng.bit_generator.state, "done": done, "draws": self.draws}
