"""Stage-1 stream: memory-mapped (w_new, w_old) rows, block-shuffled, with a global data cursor.

The stage-1 corpus is 67M caption embeddings (about 170 GB in float16) in an embedding shard set
(`embeddings.py`). This stream never loads a shard and never builds a key string:

Epoch order (layout-free). Every shard is cut into blocks of `block_rows` contiguous rows; the
blocks are permuted per (seed, epoch), and consecutive groups of `mix` blocks form a unit. Within
a unit each block's rows are permuted, cut into runs of RUN rows, and the runs of all its blocks
are permuted (per (seed, epoch, unit)). Concatenating the units gives the epoch's ONE global
sequence of N rows, the same for every world size and DataLoader worker count. A unit is read
as `mix` memory-mapped windows (one contiguous slice per block, mapped per unit, so the process
keeps only the unit in use resident), copied run by run into the batch buffers.

Split (any counts). A slot is one (rank, DataLoader worker); its work is a list of intervals of
global positions. A fresh epoch cuts [0, N) into equal contiguous parts, slot s = rank *
num_workers + worker; with drop_last every slot gets exactly N // slots positions (so every rank
makes the same number of batches and no rank waits in the all-gather for another's epoch), else
the first N % slots slots get one more. A unit cut between two slots is read by each for its own
rows only, so no row is read twice.

Cursor (the data-cursor contract). Each batch carries its producer's slot and how many positions
of its intervals it has consumed; `state_dict()` is this rank's not-yet-consumed intervals per
worker plus which worker yields next. `load_state_dict(all_ranks_states)` with the same layout
gives each slot its own remainder (bit-identical continuation: the DataLoader's round robin is
rotated to start at the saved next worker); with another layout the union of every remainder is
cut again over the new slots, so each unconsumed row is read exactly once and no consumed one.

Batches are `{"w_new": fp16 tensor, "w_old": fp16 tensor}` (names from `fields`): half the bytes
to move; the consumer converts on its device (`.to(device).float()`).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xbt_dist.data.embeddings import EmbeddingShardSet, FieldFile

STAGE1_FIELDS = {"w_new": "text_new", "w_old": "text_old"}
RUN = 64  # rows copied per run: a batch of 512 holds 8 runs, each from one of the unit's blocks
Intervals = list[tuple[int, int]]  # sorted, disjoint [lo, hi) ranges of global positions


# ---- interval arithmetic on global positions ----------------------------------------------------

def total(iv: Intervals) -> int:
    return sum(hi - lo for lo, hi in iv)


def drop_front(iv: Intervals, n: int) -> Intervals:
    """`iv` without its first `n` positions (what a slot has left after consuming n)."""
    out = []
    for lo, hi in iv:
        take = min(n, hi - lo)
        n -= take
        if lo + take < hi:
            out.append((lo + take, hi))
    return out


def merge(parts: Sequence[Intervals]) -> Intervals:
    """Union of interval lists (they are disjoint by construction), sorted and coalesced."""
    out: Intervals = []
    for lo, hi in sorted(x for p in parts for x in p if x[1] > x[0]):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def cut(iv: Intervals, parts: int, equal: bool) -> list[Intervals]:
    """Cut `iv` into `parts` consecutive pieces of (nearly) equal size.

    equal=True: every piece gets exactly total // parts positions and the last total % parts are
    left out (drop_last: equal batch counts on every rank); else the first pieces get one more.
    """
    n = total(iv)
    base, extra = divmod(n, parts)
    sizes = [base + (0 if equal or i >= extra else 1) for i in range(parts)]
    out, rest = [], list(iv)
    for size in sizes:
        piece: Intervals = []
        while size and rest:
            lo, hi = rest[0]
            take = min(size, hi - lo)
            piece.append((lo, lo + take))
            size -= take
            rest[0] = (lo + take, hi)
            if rest[0][0] == hi:
                rest.pop(0)
        out.append(piece)
    return out


# ---- the epoch's global order ---------------------------------------------------------------------

class EpochOrder:
    """The global row sequence of one epoch: units of `mix` permuted blocks, rows permuted per unit."""

    def __init__(self, counts: Sequence[int], block_rows: int, mix: int, seed: int, epoch: int,
                 shuffle: bool):
        blocks = [(s, lo, min(lo + block_rows, n)) for s, n in enumerate(counts)
                  for lo in range(0, n, block_rows)]
        order = (np.random.default_rng([seed, epoch]).permutation(len(blocks)) if shuffle
                 else np.arange(len(blocks)))
        self.units = [[blocks[i] for i in order[u:u + mix]] for u in range(0, len(blocks), mix)]
        sizes = [sum(hi - lo for _, lo, hi in unit) for unit in self.units]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle

    @property
    def n(self) -> int:
        return self.starts[-1]

    def shuffle_of(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """Unit u's row order: runs of RUN rows, each run from one block, the runs shuffled.

        Returns (run_block, run_first, run_pos, perms): run k holds rows
        perms[run_block[k]][run_first[k]:...] of its block and covers unit positions
        [run_pos[k], run_pos[k + 1]). Each block's rows are permuted whole, then cut into runs,
        and the runs of all blocks are permuted: a batch mixes rows from every block of the
        unit. Copying run by run keeps the reads inside one block (a few MB: cache- and
        TLB-friendly) and the writes contiguous; a per-row permutation of the whole unit ran at
        half the speed (0.6M vs 1.3M rows/s, 768/512-d, on one core; runs of 32 rows: 1.1-1.2M).
        """
        sizes = [hi - lo for _, lo, hi in self.units[u]]
        rng = np.random.default_rng([self.seed, self.epoch, 1 + u]) if self.shuffle else None
        perms = [rng.permutation(n) if rng is not None else np.arange(n) for n in sizes]
        block = np.concatenate([np.full(-(-n // RUN), i) for i, n in enumerate(sizes)])
        first = np.concatenate([np.arange(0, n, RUN) for n in sizes])
        if rng is not None:
            order = rng.permutation(len(block))
            block, first = block[order], first[order]
        lens = np.minimum(RUN, np.asarray(sizes)[block] - first)
        return block, first, np.concatenate([[0], np.cumsum(lens)]), perms

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(unit, a, b): positions [lo, hi) as slices [a, b) of units' permuted rows."""
        u = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            start, end = self.starts[u], self.starts[u + 1]
            b = min(hi, end)
            yield u, lo - start, b - start
            lo, u = b, u + 1


class UnitReader:
    """Copies positions of one unit, in its shuffled order, straight into batch buffers.

    Each block of the unit is one memory-mapped window of contiguous rows per field, opened
    once per unit; only the asked positions are gathered from it (a unit cut between two slots,
    or a resumed remainder, reads just its own rows), so no row is read twice. Rows go run by run
    from a block's window into the caller's buffer: one copy, no intermediate arrays.
    """

    def __init__(self, order: EpochOrder, files: dict[str, list[FieldFile]], u: int):
        self.block, self.first, self.run_pos, self.perms = order.shuffle_of(u)
        self.wins = {name: [ff[s].window(lo, hi) for s, lo, hi in order.units[u]]
                     for name, ff in files.items()}

    def fill(self, a: int, b: int, out: dict[str, np.ndarray], at: int) -> None:
        """Write unit positions [a, b) into out[name][at:at + b - a] for every field."""
        run_pos, block, first, perms = self.run_pos, self.block, self.first, self.perms
        k = int(np.searchsorted(run_pos, a, side="right")) - 1
        p = a
        while p < b:
            end = min(b, int(run_pos[k + 1]))
            i, j = int(block[k]), int(first[k]) + p - int(run_pos[k])
            rows = perms[i][j:j + end - p]
            for name, w in self.wins.items():
                np.take(w[i], rows, axis=0, out=out[name][at + p - a:at + end - a])
            p, k = end, k + 1


# ---- the DataLoader side ------------------------------------------------------------------------

class _SlotDataset(IterableDataset):
    """Batches of one rank's slots; DataLoader worker i plays slot (i + shift) % num_workers."""

    def __init__(self, src: str, fields: dict[str, str], counts: list[int], block_rows: int,
                 mix: int, seed: int, shuffle: bool, batch_size: int, drop_last: bool):
        self.src, self.fields, self.counts = src, fields, counts
        self.block_rows, self.mix, self.seed, self.shuffle = block_rows, mix, seed, shuffle
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch, self.plan, self.shift = 0, [[]], 0
        self._files: dict[str, list[FieldFile]] | None = None

    def files(self) -> dict[str, list[FieldFile]]:
        if self._files is None:  # headers only; opened per process (workers too), once
            emb = EmbeddingShardSet(self.src)
            self._files = {f: [emb.field_file(name, f) for name in emb.shard_names]
                           for f in self.fields.values()}
        return self._files

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_id, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != len(self.plan):
            raise RuntimeError(f"stream planned {len(self.plan)} slots for this rank but the "
                               f"DataLoader runs {nw} workers")
        worker = (loader_id + self.shift) % nw
        order = EpochOrder(self.counts, self.block_rows, self.mix, self.seed, self.epoch, self.shuffle)
        files = {out: self.files()[f] for out, f in self.fields.items()}
        # from the largest shard: a shard whose samples were all bad is written with d=1
        dims = {out: (max(ff, key=lambda f: f.rows).dim, max(ff, key=lambda f: f.rows).dtype)
                for out, ff in files.items()}
        B = self.batch_size

        def new_buffer() -> dict[str, np.ndarray]:
            return {out: np.empty((B, d), dt) for out, (d, dt) in dims.items()}

        def emit(buf: dict[str, np.ndarray], n: int, pos: int) -> dict:
            batch = {out: torch.from_numpy(x[:n]) for out, x in buf.items()}
            batch.update(_worker=worker, _pos=pos)
            return batch

        pos, filled, buf = 0, 0, new_buffer()
        for lo, hi in self.plan[worker]:
            for u, a, b in order.pieces(lo, hi):
                reader = UnitReader(order, files, u)
                while a < b:
                    take = min(B - filled, b - a)
                    reader.fill(a, a + take, buf, filled)
                    a, filled, pos = a + take, filled + take, pos + take
                    if filled == B:
                        yield emit(buf, B, pos)
                        filled, buf = 0, new_buffer()
        if filled and not self.drop_last:
            yield emit(buf, filled, pos)


def _as_is(batch: dict) -> dict:
    return batch


class TextEmbeddingStream:
    """Epoch-wise stage-1 batches with a resumable global data cursor (see the module docstring).

        stream = TextEmbeddingStream("emb/text", batch_size=512, rank=rank, world_size=ws)
        for batch in stream:   # one epoch: batch["w_new"] (B, d_new), batch["w_old"] (B, d_old), fp16
            ...; part = stream.state_dict()
        stream.load_state_dict([part_of_rank_0, part_of_rank_1, ...])   # any old world size
    """

    def __init__(self, src, *, batch_size: int, fields: dict[str, str] | None = None, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, block_rows: int = 4096, mix: int = 4,
                 pin_memory: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        for name, v, low in (("batch_size", batch_size, 1), ("block_rows", block_rows, 1),
                             ("mix", mix, 1), ("num_workers", num_workers, 0)):
            if v < low:
                raise ValueError(f"{name}={v} must be >= {low}")
        emb = EmbeddingShardSet(src)
        self.fields = dict(fields or STAGE1_FIELDS)
        emb.check_fields(self.fields.values())
        self.dims = {out: emb.dims[f] for out, f in self.fields.items()}
        counts = list(emb.counts().values())  # the manifest's per-shard counts: no shard opened
        self.n_rows = sum(counts)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.drop_last, self.pin_memory = seed, drop_last, pin_memory
        self.dataset = _SlotDataset(str(src), self.fields, counts, block_rows, mix, seed, shuffle,
                                    batch_size, drop_last)
        self.skipped: Counter = Counter()  # nothing is skipped here; the loop logs it for every stream
        self.set_epoch(0)

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def _layout_key(self) -> dict:
        ds = self.dataset
        return {"n_rows": self.n_rows, "seed": self.seed, "block_rows": ds.block_rows, "mix": ds.mix,
                "shuffle": ds.shuffle}

    def _assign(self, remaining: Intervals) -> list[Intervals]:
        nw = max(1, self.num_workers)
        pieces = cut(remaining, self.slots, equal=self.drop_last)
        return pieces[self.rank * nw:(self.rank + 1) * nw]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (drops any mid-epoch position)."""
        self.epoch = epoch
        self.dataset.epoch = epoch
        self.dataset.plan = self._assign([(0, self.n_rows)])
        self.dataset.shift = 0
        self._consumed = [0] * max(1, self.num_workers)
        self._next = 0

    def __iter__(self) -> Iterator[dict]:
        """One epoch of batches. Breaking out and iterating again continues the same epoch."""
        ds = self.dataset
        ds.plan = [drop_front(p, c) for p, c in zip(ds.plan, self._consumed)]
        ds.shift, self._consumed = self._next, [0] * len(ds.plan)
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            pin_memory=self.pin_memory, persistent_workers=False)
        nw = max(1, self.num_workers)
        for batch in loader:
            w = batch.pop("_worker")
            self._consumed[w] = batch.pop("_pos")
            self._next = (w + 1) % nw
            yield batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the global cursor: its unconsumed intervals per worker."""
        plan = [drop_front(p, c) for p, c in zip(self.dataset.plan, self._consumed)]
        return {"kind": "text_embeddings", "epoch": self.epoch, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "remaining": [[list(x) for x in p] for p in plan], "next_worker": self._next,
                **self._layout_key()}

    def load_state_dict(self, states: list[dict] | dict) -> None:
        """Continue from all ranks' saved parts (old rank order, any old world size / workers).

        A single dict is accepted when it is this rank's own part under an unchanged layout.
        """
        single = isinstance(states, dict)
        states = [states] if single else list(states)
        if not states:
            raise ValueError("load_state_dict got no data states")
        for st in states:
            if st.get("kind") != "text_embeddings":
                raise ValueError(f"data state of kind {st.get('kind')!r} is not a stage-1 "
                                 "TextEmbeddingStream cursor; resume with the stream that saved it")
            for k, mine in self._layout_key().items():
                if st.get(k) != mine:
                    raise ValueError(f"data state was saved with {k}={st.get(k)} but this stream has "
                                     f"{k}={mine}: the positions index another epoch order; resume "
                                     "with the same embedding set, seed and block settings")
        epochs = {int(st["epoch"]) for st in states}
        if len(epochs) != 1:
            raise ValueError(f"ranks saved different epochs {sorted(epochs)}; this happens only "
                             "with drop_last=False (uneven batch counts); resume with the same "
                             "world size, or use drop_last=True")
        nw = max(1, self.num_workers)
        saved_ws = states[0]["world_size"]
        same = saved_ws == self.world_size and all(len(st["remaining"]) == nw for st in states)
        if not single and len(states) != saved_ws:
            raise ValueError(f"got {len(states)} data states saved by a world of {saved_ws} ranks; "
                             "pass every rank's part, in rank order")
        if single and not same:
            raise ValueError(f"this data state was saved by rank {states[0]['rank']} of {saved_ws} with "
                             f"{len(states[0]['remaining'])} DataLoader slots; resuming on "
                             f"{self.world_size} ranks x {nw} needs every old rank's part (a list)")
        self.set_epoch(epochs.pop())
        if same:  # unchanged layout: each slot continues its own remainder, bit-identically
            mine = states[0] if single else states[self.rank]
            if mine["rank"] != self.rank:
                raise ValueError(f"data state of rank {mine['rank']} handed to rank {self.rank}")
            self.dataset.plan = [[tuple(x) for x in p] for p in mine["remaining"]]
            self._next = int(mine["next_worker"])
        else:  # another layout: every unconsumed position once, cut over the new slots
            left = merge([[tuple(x) for x in p] for st in states for p in st["remaining"]])
            self.dataset.plan = self._assign(left)
