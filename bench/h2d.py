"""Stage-2 loader, before and after the uint8 host-to-device path, same run.

    nice -n 10 python -m bench.h2d --out bench/results [--repeats 3] [--samples 512]

Before: the DataLoader worker runs the new model's whole train transform (random resized crop,
ToTensor, Normalize) and ships fp32 image batches. After: the worker stops at the crop and ships
uint8 (`split_device_normalize`); `DeviceNormalize` runs in the consuming process (the training
device; here the CPU, so its cost is inside the "after" rate, as it would not be on a GPU).
Rows per image size (the toy world's 64 px, and 224 px, the paper's ViT-B/32 / ViT-L/14 input):
image bytes per batch, and loader samples/s with DataLoader num_workers 1 (the toy recipe) and 0,
tokenizer and precomputed-targets join included, as stage 2 runs it. Variants are interleaved
per repeat so load drift on the shared machine hits both alike; medians with min-max.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import median_of, row, setup_torch, write_result
from bench.world import get_world, random_targets
from xbt_dist.data.stream import SampleStream
from xbt_dist.models.clip import load_clip, split_device_normalize


def _transform(bundle, size: int):
    """The bundle's train transform, or the same open_clip train transform at `size` pixels."""
    if size == bundle.model.visual.image_size[0]:
        return bundle.preprocess_train
    import open_clip

    pp = bundle.model.visual.preprocess_cfg
    return open_clip.image_transform(size, is_train=True, mean=pp["mean"], std=pp["std"])


def _rate(stream: SampleStream, normalize, limit: int) -> tuple[float, int]:
    """(samples/s after the first batch, image bytes per batch) of one pass up to `limit` samples."""
    it = iter(stream)
    first = next(it)
    nbytes = first["images"].nbytes
    n, t = 0, time.perf_counter()
    for b in it:
        if normalize is not None:  # the device-side step, on the consumer as in training
            b["images"] = normalize(b["images"])
        n += len(b["keys"])
        if n >= limit:
            break
    return n / (time.perf_counter() - t), nbytes


def bench_h2d(out: str | Path, repeats: int = 3, samples: int = 512, batch: int = 64,
              sizes=(64, 224), workers=(1, 0), toy_root=None) -> dict:
    out = Path(out)
    world = get_world(out, **({"toy_root": toy_root} if toy_root is not None else {}))
    new = load_clip(world["new"])
    targets = random_targets(world["train"], out / "data" / "targets-toy", 64)
    variants = {}
    for size in sizes:
        full = _transform(new, size)
        host, normalize = split_device_normalize(full)
        for nw in workers:
            for label, tf, norm in (("before: fp32 from the worker", full, None),
                                    ("after: uint8 + DeviceNormalize", host, normalize)):
                variants[(size, nw, label)] = (tf, norm)
    rates = {k: [] for k in variants}
    nbytes = {}
    for _ in range(repeats):
        for key, (tf, norm) in variants.items():
            stream = SampleStream(world["train"], batch_size=batch, transform=tf, tokenizer=new.tokenizer,
                                  targets=targets, num_workers=key[1], shuffle_buffer=1000, drop_last=True)
            r, nbytes[key] = _rate(stream, norm, samples)
            rates[key].append(r)
    rows = []
    for (size, nw, label), vals in rates.items():
        m = median_of(vals)
        case = f"{size}px, batch {batch}, workers={nw}: {label}"
        rows.append(row("h2d", case, "image bytes / batch", nbytes[(size, nw, label)], "bytes"))
        rows.append(row("h2d", case, "samples/s", m["median"], "samples/s", min=m["min"], max=m["max"], n=m["n"]))
    for size in sizes:
        for nw in workers:
            b, a = (median_of(rates[(size, nw, lab)])["median"] for lab in
                    ("before: fp32 from the worker", "after: uint8 + DeviceNormalize"))
            rows.append(row("h2d", f"{size}px, workers={nw}", "after / before samples/s", a / b, "x"))
    return {"name": "h2d", "rows": rows,
            "config": {"samples": samples, "batch": batch, "repeats": repeats, "sizes": list(sizes),
                       "workers": list(workers), "world": {k: str(v) for k, v in world.items()}},
            "notes": ["samples/s: medians over interleaved repeats, first batch of each pass excluded "
                      "(worker start-up, shuffle-buffer fill); tokenizer and targets join included.",
                      "the 'after' rate includes DeviceNormalize on this CPU (the consumer); on a GPU it "
                      "runs on the device instead and the host does none of it.",
                      f"images: {world['source']} shards (64 px JPEGs); 224 px is the crop/resize output "
                      "size, so decode cost is the toy world's, resize and copy costs are the paper's."]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.h2d", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--toy-root", default=None)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    setup_torch(a.threads)
    res = bench_h2d(a.out, repeats=a.repeats, samples=a.samples, batch=a.batch,
                    **({"toy_root": a.toy_root} if a.toy_root else {}))
    res["command"] = "python -m bench.h2d " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    write_result(a.out, res)
    print((Path(a.out) / "h2d.md").read_text())


if __name__ == "__main__":
    main()
