"""Reading one slot's work units from tars: seek to offsets, retry transient errors, skip and count.

`UnitReader.samples(unit)` yields the raw samples of a cursor unit (see cursor.py) with their
position, seeking straight to the unit's byte offset. What can go wrong is sorted by cause:

  * transient read errors (an OSError from fsspec or the OS that is not "missing" or "denied":
    a reset connection, a timeout, a stale NFS handle) are retried up to `retries` times with
    exponential backoff, reopening the file at the first sample not yet returned;
  * a missing tar, an unreadable one (permission, a directory) or one still failing after the
    retries is skipped and counted (`missing_shard`, `unreadable_shard`, `read_error`);
  * a truncated or corrupt tar keeps the samples read before the damage (`truncated_shard`);
  * with embedding targets: a tar whose embedding file is missing is skipped (`missing_targets`);
    a key the embedding file lacks is left for the decoder to count (`missing_target_key`).

Every shard-level event is recorded with the file in `bad` and an estimate of the samples it
cost in `lost` (from `sizes.json` when known), which the stream's bad-data budget adds up.
"""

from __future__ import annotations

import logging
import tarfile
import time
import zlib
from collections import Counter
from typing import Any, Iterator

import fsspec

from xbt_dist.data.shards import _strip_file, group_samples, shard_name
from xbt_dist.data.tarstream import iter_tar_members, open_tar_members

log = logging.getLogger(__name__)

# Shard-level reasons (a whole tar or its rest is lost); the others are per sample.
SHARD_REASONS = ("missing_shard", "unreadable_shard", "read_error", "truncated_shard", "missing_targets")
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class UnitReader:
    """Reads cursor units of one slot; counts what it skips in `stats`, `bad`, `lost`."""

    def __init__(self, shards: list[str], *, targets=None, fields: dict[str, str] | None = None,
                 sizes: dict[str, int] | None = None, retries: int = 3, backoff_s: float = 0.5):
        self.shards, self.targets, self.fields = shards, targets, dict(fields or {})
        self.sizes = dict(sizes or {})
        self.retries, self.backoff_s = retries, backoff_s
        self.stats: Counter = Counter()   # reason -> events (shards or samples)
        self.bad: Counter = Counter()     # "path (reason)" -> events
        self.lost = 0.0                   # estimated samples lost to shard-level events
        self._targets_cache: dict[str, Any] = {}
        self._read, self._units_done = 0, 0  # for the mean shard size when sizes.json is absent

    def shard_size(self, path: str) -> float:
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if base in self.sizes:
            return float(self.sizes[base])
        if self.sizes:
            return sum(self.sizes.values()) / len(self.sizes)
        return max(1.0, self._read / max(1, self._units_done))

    def count_bad(self, path: str, reason: str, lost: float = 0.0) -> None:
        self.stats[reason] += 1
        self.bad[f"{path} ({reason})"] += 1
        self.lost += lost

    def _targets_of(self, path: str):
        """The embedding shard of `path` (cached), or None when its file is missing."""
        name = shard_name(path)
        if name not in self._targets_cache:
            if len(self._targets_cache) >= 4:
                self._targets_cache.pop(next(iter(self._targets_cache)))
            self._targets_cache[name] = (self.targets.shard(name) if self.targets.has_shard(name)
                                         else None)
        return self._targets_cache[name]

    @staticmethod
    def _members(f, offset: int, index: int):
        """Tar members from the unit's position: seek to `offset`, or from the start when the tar
        is compressed (offset -1; the caller skips `index` samples) or not started (offset 0)."""
        if offset > 0:
            f.seek(offset)
            return iter_tar_members(f, offset), 0
        return open_tar_members(f), (index if offset < 0 else 0)

    def samples(self, unit) -> Iterator[tuple[int, int, int | None, dict[str, Any]]]:
        """`(offset, index, next_offset, sample)` for each sample of `unit`, in tar order.

        `next_offset` is where the following sample starts (None: the tar ended after this one;
        -1: compressed). The caller stops early for units of `count` samples.
        """
        s_idx, offset, index = int(unit[0]), int(unit[1]), int(unit[2])
        path = self.shards[s_idx]
        tgt = None
        if self.targets is not None:
            tgt = self._targets_of(path)
            if tgt is None:
                log.warning("skipping shard %s: no embedding file for it in %s", path, self.targets.dir)
                self.count_bad(path, "missing_targets", self._remaining(path, index, unit))
                return
        failures = 0
        while True:
            skip = 0
            try:
                with fsspec.open(_strip_file(path), "rb") as f:
                    members, skip = self._members(f, offset, index)
                    grouped = group_samples(members, path, keep_partial=True)
                    for start, nxt, s in grouped:
                        if nxt is None:  # the tar's last sample, or one a read error cut short
                            try:
                                next(grouped, None)
                            except Exception as e:
                                e.partial = s  # kept if the tar is truncated, re-read on a retry
                                raise
                        if skip:
                            skip -= 1
                            continue
                        failures = 0
                        yield start, index, nxt, self._join(tgt, s)
                        offset, index = (nxt if nxt is not None else offset), index + 1
                self._units_done += 1
                return
            except _NOT_TRANSIENT as e:
                reason = "missing_shard" if isinstance(e, FileNotFoundError) else "unreadable_shard"
                log.warning("skipping shard %s: %s (%s)", path, reason, e)
                self.count_bad(path, reason, self._remaining(path, index, unit))
                return
            except (tarfile.TarError, EOFError, zlib.error) as e:
                partial = None if skip else getattr(e, "partial", None)
                log.warning("truncated or corrupt shard %s at sample %d (%s: %s); rest skipped",
                            path, index, type(e).__name__, e)
                # counted first: a consumer may stop at the sample below and never come back
                self.count_bad(path, "truncated_shard",
                               self._remaining(path, index + (partial is not None), unit))
                if partial is not None:
                    # like webdataset, keep what was read: a sample that lost members is
                    # rejected by decoding, a complete one before the cut is good
                    yield offset, index, None, self._join(tgt, partial)
                return
            except OSError as e:  # fsspec wraps network failures as OSError subclasses
                failures += 1
                if failures > self.retries:
                    log.warning("skipping the rest of shard %s after %d read errors: %s",
                                path, failures, e)
                    self.count_bad(path, "read_error", self._remaining(path, index, unit))
                    return
                wait = self.backoff_s * 2 ** (failures - 1)
                log.warning("read error in shard %s at sample %d (%s: %s); retry %d/%d in %.2fs",
                            path, index, type(e).__name__, e, failures, self.retries, wait)
                time.sleep(wait)

    def _join(self, tgt, s: dict) -> dict:
        """Attach the sample's embedding rows (None when its key is missing from them)."""
        if tgt is not None:
            rows = tgt.rows(s["__key__"], self.fields.values())
            s["_emb"] = None if rows is None else {o: rows[f] for o, f in self.fields.items()}
        self._read += 1
        return s

    def _remaining(self, path: str, index: int, unit) -> float:
        """Samples a unit loses when its shard fails at sample `index`."""
        count = int(unit[3])
        rest = max(0.0, self.shard_size(path) - index)
        return float(min(count, rest)) if count >= 0 else rest

