"""Data loading alone: SampleStream samples/s vs raw tar read speed, and headroom over training.

    python -m bench data --out bench/results

Rows, on the stage-2 training shards (the toy world's, or a synthetic set of the same format):
  * raw tar read: `iter_raw_samples` (tar members to bytes, no decoding): the storage/tar ceiling;
  * SampleStream, decode + preprocess (new model's train transform) + tokenize, no targets;
  * the same with the precomputed-targets join (`image_old`, `text_old` rows by key);
  * each at DataLoader num_workers 0 (all in the training process) and 1 (the toy recipe);
  * the stage-1 embedding stream (`mode="embeddings"`), what stage 1 reads at 512 rows a batch.
Headroom = loader samples/s / the training samples/s of the same configuration (taken from the
stage-2 bench's JSON in the same output directory when present, else measured here with a short
`run_stage2`). Target: >= 3x.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import median_of, row
from bench.world import get_world, random_targets, random_text_embeddings
from xbt_dist.data.shards import iter_raw_samples, list_shards
from xbt_dist.data.stream import SampleStream
from xbt_dist.models.clip import load_clip


def raw_read_rate(train_dir: str, limit: int) -> float:
    n, nbytes, t = 0, 0, time.perf_counter()
    for shard in list_shards(train_dir):
        for s in iter_raw_samples(shard):
            n += 1
            nbytes += sum(len(v) for k, v in s.items() if not k.startswith("__"))
            if n >= limit:
                return n / (time.perf_counter() - t)
    return n / (time.perf_counter() - t)


def stream_rate(stream: SampleStream, limit: int) -> float:
    """Samples/s over `limit` samples, after the first batch (worker start-up, buffer fill)."""
    it = iter(stream)
    first = next(it)
    n, t = 0, time.perf_counter()
    for b in it:
        n += len(b["keys"])
        if n >= limit:
            break
    del first
    return n / (time.perf_counter() - t)


def _training_rate(out: Path) -> dict:
    """Training samples/s of toy/xbt from the stage-2 bench in the same output dir, if there."""
    f = out / "stage2.json"
    if f.is_file():
        for r in json.loads(f.read_text())["rows"]:
            if r["case"] == "toy/xbt" and r["metric"] == "samples/s (run_stage2)":
                return {"samples_per_s": r["value"], "source": str(f)}
    return {"samples_per_s": None, "source": None}


def bench_data(out: str | Path, repeats: int = 3, samples: int = 1024, batch: int = 64,
               toy_root=None) -> dict:
    out = Path(out)
    world = get_world(out, **({"toy_root": toy_root} if toy_root is not None else {}))
    new = load_clip(world["new"])
    targets = random_targets(world["train"], out / "data" / "targets-toy", 64)
    s1 = random_text_embeddings(out / "data" / "s1-loader", 8192, 768, 512)
    measures = {
        "raw tar read (no decode)": lambda: raw_read_rate(world["train"], samples),
    }
    for nw in (0, 1):
        for join in (False, True):
            name = f"SampleStream decode+preprocess+tokenize{' +targets join' if join else ''}, workers={nw}"
            measures[name] = (lambda nw=nw, join=join: stream_rate(SampleStream(
                world["train"], batch_size=batch, transform=new.preprocess_train,
                tokenizer=new.tokenizer, targets=targets if join else None, num_workers=nw,
                shuffle_buffer=1000, drop_last=True), samples))
    measures["stage-1 embedding stream (batch 512), workers=0"] = lambda: stream_rate(SampleStream(
        s1, mode="embeddings", batch_size=512, fields={"w_new": "text_new", "w_old": "text_old"},
        shuffle_buffer=4096, drop_last=True), 6144)
    results = {name: [] for name in measures}
    for _ in range(repeats):  # interleave so load drift hits every variant alike
        for name, fn in measures.items():
            results[name].append(fn())
    rows = []
    for name, vals in results.items():
        m = median_of(vals)
        rows.append(row("data", name, "samples/s", m["median"], "samples/s",
                        min=m["min"], max=m["max"], n=m["n"]))
    train = _training_rate(out)
    loader = median_of(results["SampleStream decode+preprocess+tokenize +targets join, workers=1"])["median"]
    if train["samples_per_s"]:
        rows.append(row("data", "toy/xbt training config (targets join, workers=1)",
                        "loader / training samples/s", loader / train["samples_per_s"], "x (target >= 3)"))
    return {"name": "data", "rows": rows, "details": {"values": results, "training": train},
            "config": {"samples": samples, "batch": batch, "repeats": repeats,
                       "world": {k: str(v) for k, v in world.items()}},
            "notes": ["samples/s are medians over interleaved repeats; the first batch of each stream "
                      "(worker start, shuffle-buffer fill) is excluded.",
                      "training rate for the headroom row: " + (train["source"] or "stage2 bench not run")]}
