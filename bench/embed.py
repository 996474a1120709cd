"""`xbt embed` throughput: the embed core at a `--before` commit vs now, on the same CPUs, same run.

    nice -n 10 python -m bench.embed --out bench/results --before 34cf607 --repeats 3

"Before" is `xbt_dist/data/embed.py` at the `--before` commit, loaded from git into this
process (it uses only the shard reader and the embedding writer, which kept their API): decode,
preprocess and an fp32 forward on one thread of control, `torch.get_num_threads()` threads.
"After" is the current `embed_shards` as one task of the Ray job runs it with `num_cpus=C`:
`decode_workers=C-1` DataLoader processes and `C-(C-1)` = 1 forward thread (and, on a GPU, bf16
autocast). Both get C = `--cpus` CPUs (2 on the dev machine), alternating within each repeat.

Cases (the toy world's shards and model architectures, random weights unless trained ones exist):
  * images: `image_old` of the image-text shards (64x64 JPEGs, toy-old ViT);
  * texts: `text_old` + `text_new` of the text shards (two toy text towers).
Plus `decode+preprocess of 384x384 JPEGs`: what one CPU core prepares per second for a
224-pixel ViT (resize, crop, normalise), the number that sizes the decode workers a GPU needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import median_of, row, setup_torch, write_result
from bench.world import get_world


def load_before(commit: str):
    """The embed module as it was at `commit` (git show), importable next to today's package."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{commit}:xbt_dist/data/embed.py"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "embed_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("embed_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rate(fn, src: str, out: Path, samples: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = fn(out)
    dt = time.perf_counter() - t
    assert res["samples"] == samples, res
    return samples / dt


def decode_rate(n: int = 200, size: int = 384) -> float:
    """Images/s one core decodes and preprocesses for a 224-px ViT (open_clip's eval transform)."""
    import open_clip
    from PIL import Image

    from xbt_dist.data.shards import decode_image
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(n):
        arr = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        im = Image.fromarray(arr).resize((size, size), Image.BICUBIC)  # smooth: photo-like JPEG size
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    tf = open_clip.image_transform(224, is_train=False)
    torch.set_num_threads(1)
    t = time.perf_counter()
    for b in blobs:
        tf(decode_image({"jpg": b}))
    return n / (time.perf_counter() - t)


def tower_flops(arch: str) -> dict:
    """FLOPs of one image and one caption through `arch`'s towers (random init, counted by torch)."""
    import open_clip

    from bench.flops import count_flops
    # train mode under no_grad: in eval mode nn.MultiheadAttention takes its fused fast path,
    # which FlopCounterMode does not see (it then misses the q/k/v/out projections, 1/3 of a ViT)
    model = open_clip.create_model(arch, pretrained=None).train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.no_grad():
        img = count_flops(lambda: model.encode_image(torch.zeros(1, 3, size, size)))
        txt = count_flops(lambda: model.encode_text(torch.zeros(1, model.context_length, dtype=torch.long)))
    return {"image": img, "text": txt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--before", default="34cf607")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--toy-root", default=None)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "xbt-bench-embed"),
                   help="where a synthetic world is written when no toy world exists")
    p.add_argument("--flops-models", nargs="*", default=["ViT-B-32", "ViT-L-14"],
                   help="open_clip archs whose per-image / per-caption FLOPs are counted (projection)")
    a = p.parse_args(argv)
    out = Path(a.out)
    world = get_world(Path(a.work), **({"toy_root": a.toy_root} if a.toy_root else {}))
    before = load_before(a.before)
    from xbt_dist.data.embed import embed_shards
    from xbt_dist.data.shards import shard_sizes
    from xbt_dist.models.clip import load_clip

    # ClipBundles: each version wraps them in its own Encoder class
    enc = {r: load_clip(world[r]) for r in ("old", "new")}
    cases = {"images": (world["train"], ["image_old"]), "texts": (world["text"], ["text_old", "text_new"])}
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    decode = max(0, a.cpus - 1)
    results: dict[str, dict[str, list[float]]] = {c: {"before": [], "after": []} for c in cases}
    try:
        for _ in range(a.repeats):
            for case, (src, fields) in cases.items():
                n = sum(shard_sizes(src).values())
                setup_torch(a.cpus)
                results[case]["before"].append(rate(lambda o: before.embed_shards(
                    src, o, enc, fields, batch_size=a.batch, progress=None), src, work / "b", n))
                setup_torch(max(1, a.cpus - decode))
                results[case]["after"].append(rate(lambda o: embed_shards(
                    src, o, enc, fields, batch_size=a.batch, progress=None, decode_workers=decode),
                    src, work / "a", n))
                print(case, {k: round(v[-1]) for k, v in results[case].items()}, file=sys.stderr, flush=True)
        dec = median_of([decode_rate() for _ in range(a.repeats)])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for case, res in results.items():
        unit = "images/s" if case == "images" else "texts/s (both towers)"
        for k, label in (("before", f"before ({a.before}): in-process decode, {a.cpus} forward threads"),
                         ("after", f"after: {decode} decode worker(s) + {a.cpus - decode} forward thread")):
            m = median_of(res[k])
            rows.append(row("embed", case, label, m["median"], unit, min=m["min"], max=m["max"], n=m["n"]))
        rows.append(row("embed", case, "speed-up after/before",
                        median_of(res["after"])["median"] / median_of(res["before"])["median"], "x"))
    rows.append(row("embed", "decode+preprocess 384x384 JPEG -> 224 (one core)", "images/s per core",
                    dec["median"], "images/s", min=dec["min"], max=dec["max"], n=dec["n"]))
    for arch in a.flops_models:
        f = tower_flops(arch)
        rows.append(row("embed", f"{arch} image tower", "FLOPs per image (counted)", float(f["image"]), "FLOP"))
        rows.append(row("embed", f"{arch} text tower", "FLOPs per caption (counted)", float(f["text"]), "FLOP"))
    result = {"name": "embed", "rows": rows, "details": {"values": results},
              "config": {"cpus": a.cpus, "batch": a.batch, "repeats": a.repeats, "before": a.before,
                         "world": {k: str(v) for k, v in world.items()}},
              "command": "python -m bench.embed " + " ".join(argv or sys.argv[1:]),
              "notes": ["each value is one whole pass over the case's shards, written to a fresh dir; "
                        "median over repeats, before/after alternating.",
                        f"model weights: {world['weights']} (throughput does not depend on them)."]}
    write_result(out, result)
    print(json.dumps({f"{r['case']} | {r['metric']}": r["value"] for r in rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
