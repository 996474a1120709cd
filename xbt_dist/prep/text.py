"""Stage-1 text corpus: captions -> normalised, length-filtered, exactly deduplicated text shards.

Sources (streamed, never loaded whole): parquet files (one caption column, read in record
batches), plain text files (one caption per line) and webdataset tars (their `.txt` members).
Inputs are expanded and sorted, so the same inputs always give the same corpus in the same order;
texts are numbered in that order and cut into shards of `texts_per_shard` (deterministic sharding).

Exact dedup across the whole corpus uses 8-byte blake2b hashes of the normalised text kept in
`HashSet64`: sorted numpy uint64 runs merged like an LSM tree. Memory is 8 bytes per unique text
(8 MB per 1M texts, ~540 MB for a 67M-caption corpus) plus a transient 2x while two runs merge;
a Python `set` of ints would cost ~70 bytes per text (~4.7 GB at 67M). The chance of any 64-bit
collision (a unique text wrongly dropped) is about n^2 / 2^65: ~1e-4 for 67M texts.
"""

from __future__ import annotations

import glob
import hashlib
import os
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from xbt_dist.artifacts import write_manifest
from xbt_dist.data.shards import ShardWriter, iter_raw_samples

TEXT_SUFFIXES = (".parquet", ".txt", ".tar")
# caption column names tried in order when none is given (img2dataset / LAION / generic)
CAPTION_COLUMNS = ("caption", "TEXT", "text", "txt")


@dataclass
class TextCorpusConfig:
    """Settings of `build_text_corpus` (recorded in the manifest)."""

    min_chars: int = 5  # drop texts shorter than this after normalisation
    max_chars: int = 1000  # drop (not truncate) longer texts: usually boilerplate, not captions
    texts_per_shard: int = 100_000  # ~10 MB tars at caption lengths
    caption_col: str | None = None  # parquet column; None = first of CAPTION_COLUMNS present
    dedup: bool = True  # exact dedup of the normalised text across the whole corpus
    batch_size: int = 8192  # texts hashed and deduplicated per numpy batch
    prefix: str = "text"  # shard file prefix

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise ValueError(f"need 0 <= min_chars <= max_chars, got min_chars={self.min_chars}, "
                             f"max_chars={self.max_chars}")
        if self.texts_per_shard < 1 or self.batch_size < 1:
            raise ValueError("texts_per_shard and batch_size must be >= 1")


def normalize_text(text: str) -> str:
    """Unicode NFC and whitespace collapse (tabs/newlines/runs of spaces -> one space, stripped)."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


class HashSet64:
    """Set of uint64 hashes as sorted numpy runs; `add_batch` returns which inputs were new.

    Runs are merged when a newer run is at least as large as the one before it, so there are
    O(log n) runs and each hash is copied O(log n) times; lookups are vectorised searchsorted.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def add_batch(self, hashes: np.ndarray) -> np.ndarray:
        hashes = np.asarray(hashes, dtype=np.uint64)
        new = np.zeros(len(hashes), dtype=bool)
        if len(hashes) == 0:
            return new
        # first occurrence within the batch keeps input order deterministic
        uniq, first = np.unique(hashes, return_index=True)
        seen = np.zeros(len(uniq), dtype=bool)
        for run in self.runs:
            pos = np.searchsorted(run, uniq)
            pos[pos == len(run)] = len(run) - 1
            seen |= run[pos] == uniq
        new[first[~seen]] = True
        fresh = uniq[~seen]  # already sorted
        if len(fresh):
            self.runs.append(fresh)
            while len(self.runs) > 1 and len(self.runs[-1]) >= len(self.runs[-2]):
                b = self.runs.pop()
                a = self.runs.pop()
                merged = np.concatenate([a, b])
                merged.sort(kind="stable")
                self.runs.append(merged)
        return new


def hash_texts(texts: list[str]) -> np.ndarray:
    """8-byte blake2b of each utf-8 text, as uint64 (little endian)."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts)
    return np.frombuffer(digests, dtype="<u8")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (their text sources, recursively) and globs -> sorted unique file list."""
    out: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise FileNotFoundError(f"no files match {item!r}")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in TEXT_SUFFIXES))
            elif p.is_file():
                if p.suffix not in TEXT_SUFFIXES:
                    raise ValueError(f"{p}: unsupported text source; use .parquet (caption column), "
                                     ".txt (one caption per line) or .tar (webdataset .txt members)")
                out.append(p)
            else:
                raise FileNotFoundError(f"text source {p} does not exist")
    # the same file listed twice would only add duplicates; keep first mention
    return list(dict.fromkeys(out))


def _parquet_texts(path: Path, caption_col: str | None, batch_size: int) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    col = caption_col or next((c for c in CAPTION_COLUMNS if c in names), None)
    if col is None or col not in names:
        raise ValueError(f"{path}: no caption column {caption_col or CAPTION_COLUMNS!r}; columns are "
                         f"{names}; pass --caption-col NAME")
    for batch in pf.iter_batches(batch_size=batch_size, columns=[col]):
        for t in batch.column(0).to_pylist():
            yield t if t is not None else ""


def _txt_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            yield line


def _tar_texts(path: Path) -> Iterator[str]:
    # the shard reader training uses: same key rule; a cut tar keeps the texts before the cut
    for sample in iter_raw_samples(str(path)):
        if "txt" in sample:
            yield sample["txt"].decode("utf-8", errors="replace")


def iter_source(path: Path, cfg: TextCorpusConfig) -> Iterator[str]:
    if path.suffix == ".parquet":
        return _parquet_texts(path, cfg.caption_col, cfg.batch_size)
    if path.suffix == ".tar":
        return _tar_texts(path)
    return _txt_lines(path)


@dataclass
class TextCorpusCounts:
    read: int = 0
    too_short: int = 0  # includes empty / whitespace-only texts
    too_long: int = 0
    duplicates: int = 0
    written: int = 0
    shards: int = 0
    per_source: dict = field(default_factory=dict)


def build_text_corpus(inputs: list[str], out_dir: str | os.PathLike,
                      cfg: TextCorpusConfig | None = None, log_every: int = 1_000_000) -> TextCorpusCounts:
    """Stream all inputs into text shards under `out_dir`; writes sizes.json and manifest.json."""
    cfg = cfg or TextCorpusConfig()
    files = expand_inputs(inputs)
    if not files:
        raise FileNotFoundError(f"no text sources found in {inputs}")
    counts = TextCorpusCounts()
    seen = HashSet64()
    writer = ShardWriter(out_dir, prefix=cfg.prefix, samples_per_shard=cfg.texts_per_shard)
    t0 = time.time()
    next_log = log_every
    batch: list[str] = []

    def flush() -> None:
        keep = seen.add_batch(hash_texts(batch)) if cfg.dedup else np.ones(len(batch), bool)
        counts.duplicates += int(len(batch) - keep.sum())
        for text, k in zip(batch, keep):
            if k:
                writer.write({"__key__": f"{counts.written:010d}", "txt": text})
                counts.written += 1
        batch.clear()

    with writer:
        for path in files:
            n_src = 0
            for raw in iter_source(path, cfg):
                n_src += 1
                text = normalize_text(raw)
                if len(text) < cfg.min_chars:
                    counts.too_short += 1
                elif len(text) > cfg.max_chars:
                    counts.too_long += 1
                else:
                    batch.append(text)
                    if len(batch) >= cfg.batch_size:
                        flush()
            counts.read += n_src
            counts.per_source[str(path)] = n_src
            if counts.read >= next_log:
                rate = counts.read / max(time.time() - t0, 1e-9)
                print(f"[prep text] read {counts.read:,} written {counts.written:,} "
                      f"({rate:,.0f} texts/s, dedup set {seen.nbytes() / 2**20:.0f} MiB)", flush=True)
                next_log = counts.read + log_every
        flush()
    counts.shards = len(writer.sizes)
    totals = {k: v for k, v in asdict(counts).items() if k != "per_source"}
    write_manifest(out_dir, "text_shards", config=cfg,
                   inputs={"sources": [str(p) for p in files]},
                   counts={**totals, "per_shard": writer.sizes},
                   per_source=counts.per_source, seconds=round(time.time() - t0, 2))
    return counts
