"""Bench: streamed `xbt eval` against the in-RAM path it replaced, and ranking at 100k images.

    python -m bench.eval_stream --out bench/results                      # ~15 min on 2 busy cores
    python -m bench.eval_stream --out /tmp/b --e2e-images 2000 --old-images 500 --rank-images 5000

Three measurements, each in a fresh subprocess (so peak RSS is that run's own high-water mark):

1. `e2e` (both paths, small set): a synthetic `--old-images` x 5-caption JPEG eval set, tiny
   random open_clip models (old, new, a random phi, random adapters): every view embedded and
   all six cases ranked, by the in-RAM path (`views_in_ram`: the code `xbt eval` ran before, all
   decoded images in a list, fp32 views) and by the streamed path (`Towers.stream`). Both must give
   the same recalls; wall time and peak RSS side by side.
2. `stream` (streamed path, `--e2e-images`, default 100k): the embedding pass alone, its peak RSS
   and images/s; the in-RAM path at that size is extrapolated from (1), as stated in the output.
3. `rank` (embeddings only, `--rank-images`, default 100k x 5 captions, old 512-d / new 768-d as
   B/32 -> L/14): float16 views as the streamed eval keeps them, the six cases ranked with the
   chunked ranking for a sample of `--rank-queries` queries per direction against the FULL gallery
   (the cost is linear in the number of queries, so the full time is extrapolated); peak RSS is
   measured with the full gallery and all views in memory.

The projection to 1M is written next to the numbers (`projection` in the JSON): time of (2) and
(3) scaled as measured (linear for embedding, queries x gallery for ranking), memory from bytes
per row. `views_in_ram`, `zero_shot_in_ram` and `write_eval_world` are also used by
tests/test_eval_stream.py as the reference the streamed path must reproduce.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import peak_rss_mb, row, setup_torch, write_result

CAPTIONS = 5

# Tiny random encoders: the bench measures the pipeline (decode, batching, storage, ranking),
# not open_clip's forward, so the towers are one-layer ViTs (16 patches) and one-layer text
# transformers over 16 tokens (the captions here are 12-14 tokens).
TINY = {
    "old": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32,
                                            "patch_size": 16, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 1}},
    "new": {"embed_dim": 96, "vision_cfg": {"image_size": 64, "layers": 1, "width": 48,
                                            "patch_size": 16, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2,
                         "layers": 1}},
}


# ---------------------------------------------------------------------------- the in-RAM path
# What `xbt eval` did before streaming (xbt_dist/eval/evaluate.py before the evalstream branch):
# every decoded image held in a list, fp32 views, phi applied to the whole `new` view at once.


def load_eval_set(spec: str):
    """(images, captions, caption_to_image) with every decoded image in RAM."""
    from xbt_dist.data.shards import iter_image_text
    images, captions, c2i = [], [], []
    for _key, image, caption, meta in iter_image_text(spec):
        caps = meta.get("captions") or [caption]
        images.append(image)
        captions.extend(caps)
        c2i.extend([len(images) - 1] * len(caps))
    return images, captions, torch.tensor(c2i)


class _Embedder:
    def __init__(self, bundle, batch_size: int, device):
        self.b, self.bs, self.device = bundle, batch_size, device

    @torch.no_grad()
    def images(self, images, encode) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.bs):
            x = torch.stack([self.b.preprocess(im) for im in images[i:i + self.bs]]).to(self.device)
            out.append(F.normalize(encode(x).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts, encode) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.bs):
            t = self.b.tokenizer(texts[i:i + self.bs]).to(self.device)
            out.append(F.normalize(encode(t).float(), dim=-1).cpu())
        return torch.cat(out)


@torch.no_grad()
def views_in_ram(towers, spec: str, batch_size: int, device="cpu"):
    """(views incl. new_adapters_off, caption_to_image) exactly as the old `run_eval` built them."""
    images, captions, c2i = load_eval_set(spec)
    E_old, E_new = _Embedder(towers.old, batch_size, device), _Embedder(towers.new, batch_size, device)
    m_old, m_new = towers.old.model, towers.new.model
    views = {"old": {"image": E_old.images(images, m_old.encode_image),
                     "text": E_old.texts(captions, m_old.encode_text)},
             "new": {"image": E_new.images(images, m_new.encode_image),
                     "text": E_new.texts(captions, m_new.encode_text)}}
    if towers.phi is not None:
        views["phi"] = {k: F.normalize(towers.phi(v), dim=-1) for k, v in views["new"].items()}
    xbt = towers.xbt
    if xbt is not None:
        ad_img = functools.partial(xbt.new.encode_image, normalize=False)
        ad_txt = functools.partial(xbt.new.encode_text, normalize=False)
        views["xbt"] = {"image": F.normalize(xbt.phi(E_new.images(images, ad_img).to(device)), dim=-1).cpu(),
                        "text": F.normalize(xbt.phi(E_new.texts(captions, ad_txt).to(device)), dim=-1).cpu()}
        if towers.on_off is not None:
            with xbt.new.adapters_disabled():
                views["new_adapters_off"] = {"image": E_new.images(images, ad_img),
                                             "text": E_new.texts(captions, ad_txt)}
    return views, c2i


@torch.no_grad()
def zero_shot_in_ram(towers, spec: str, batch_size: int, device="cpu") -> dict:
    """The old `_zero_shot`: decoded zero-shot images in RAM, fp32 views."""
    from xbt_dist.data.shards import decode_image, decode_meta, iter_raw_samples, list_shards
    from xbt_dist.eval.compat import zero_shot_report
    meta = json.loads((Path(spec) / "classes.json").read_text())
    classes, templates = meta["classes"], meta.get("templates") or ["a photo of a {}."]
    images, labels = [], []
    for shard in list_shards(spec):
        for sample in iter_raw_samples(shard):
            image = decode_image(sample)
            label = sample.get("cls") or str(decode_meta(sample).get("cls", "")).encode()
            if image is None or not label.strip():
                continue
            images.append(image)
            labels.append(int(label))
    prompts = [t.format(c) for c in classes for t in templates]
    E_old, E_new = _Embedder(towers.old, batch_size, device), _Embedder(towers.new, batch_size, device)

    def per_class(x):
        return x.view(len(classes), len(templates), -1)

    old_m, new_m = towers.old.model, towers.new.model
    z = {"old": {"image": E_old.images(images, old_m.encode_image),
                 "classes": per_class(E_old.texts(prompts, old_m.encode_text))}}
    new_img = E_new.images(images, new_m.encode_image)
    z["new"] = {"image": new_img, "classes": per_class(E_new.texts(prompts, new_m.encode_text))}
    if towers.phi is not None:
        z["phi"] = {"image": F.normalize(towers.phi(new_img), dim=-1), "classes": z["old"]["classes"]}
    if towers.xbt is not None:
        xbt = towers.xbt
        img = F.normalize(xbt.phi(E_new.images(images, functools.partial(xbt.new.encode_image, normalize=False))), dim=-1)
        txt = F.normalize(xbt.phi(E_new.texts(prompts, functools.partial(xbt.new.encode_text, normalize=False))), dim=-1)
        z["xbt"] = {"image": img, "classes": per_class(txt)}
    return zero_shot_report(z, torch.tensor(labels))


# ---------------------------------------------------------------------------- synthetic world


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random-colour gradient: decodes like a photo of that size, compresses small."""
    from PIL import Image
    a, b = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    arr = (a + (b - a) * t).repeat(size, axis=1) + rng.integers(-8, 8, size=(size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_eval_shards(out: Path, n_images: int, captions: int = CAPTIONS, image_size: int = 160,
                      per_shard: int = 1000, seed: int = 0) -> str:
    """A multi-caption eval shard set (`json["captions"]`), the layout `xbt prep` writes."""
    import webdataset as wds
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red", "green", "blue", "small", "large", "round", "square", "dog", "cat", "car"]
    for s in range(0, n_images, per_shard):
        with wds.TarWriter(str(out / f"eval-{s // per_shard:05d}.tar")) as w:
            for i in range(s, min(s + per_shard, n_images)):
                caps = [f"a {' '.join(rng.choice(words, 3))} object number {i} view {k}"
                        for k in range(captions)]
                w.write({"__key__": f"{i:08d}", "jpg": _jpeg(rng, image_size), "txt": caps[0],
                         "json": {"captions": caps}})
    return str(out)


def write_tiny_models(root: Path, arch: dict = TINY) -> dict:
    """Random-init open_clip models saved as checkpoints (loaded by the real `load_clip` path)."""
    import open_clip
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (role, spec) in enumerate(arch.items()):
        name = f"bench-eval-{role}"
        (root / f"{name}.json").write_text(json.dumps(spec))
        open_clip.add_model_config(str(root / f"{name}.json"))
        torch.manual_seed(i)
        ckpt = root / f"{role}.pt"
        torch.save({"state_dict": open_clip.create_model(name).state_dict()}, ckpt)
        out[role] = (name, str(ckpt))
    return out


def write_eval_world(root: Path, eval_shards: str, models: dict, seed: int = 0,
                     phi_hidden: int = 128, extra: list[str] | None = None):
    """A RunConfig whose run dir holds a random stage-1 phi and random (non-zero) adapters.

    Untrained, but every view (`phi`, `xbt`, adapters off) then exists and differs from `new`,
    which is what an eval pipeline bench or an equivalence test needs.
    """
    from xbt_dist.config import ModelRef, load_config
    from xbt_dist.models.clip import load_clip
    from xbt_dist.models.phi import Phi
    from xbt_dist.pipeline import CONFIG_DIR
    from xbt_dist.train.model import resolve_method
    from xbt_dist.train.stage1 import PHI_FILE, save_phi
    from xbt_dist.train.stage2 import ADAPTERS_FILE, build_model

    cfg = load_config(CONFIG_DIR / "toy.yaml", [f"phi.hidden={phi_hidden}", *(extra or [])])
    cfg.out_dir = str(root / "run")
    models_dir = str(Path(models["old"][1]).parent)
    cfg.old = ModelRef(models["old"][0], models["old"][1], models_dir)
    cfg.new = ModelRef(models["new"][0], models["new"][1], models_dir)
    cfg.eval.eval_shards = eval_shards
    old, new = load_clip(cfg.old), load_clip(cfg.new)
    torch.manual_seed(seed)
    phi = Phi(new.embed_dim, old.embed_dim, cfg.phi.hidden, cfg.phi.depth)
    Path(cfg.stage_dir("phi")).mkdir(parents=True, exist_ok=True)
    save_phi(Path(cfg.stage_dir("phi")) / PHI_FILE, phi, cfg, new.embed_dim, old.embed_dim)
    c = copy.deepcopy(resolve_method(cfg))
    c.train.phi_init, c.train.target_source = "random", "precomputed"
    model = build_model(c, dataclasses.replace(new, model=copy.deepcopy(new.model)), old.embed_dim)
    state = model.trainable_state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in state["adapters"].items():   # LoRA B starts at zero: make the adapters do something
        if v.is_floating_point():
            state["adapters"][k] = v + 0.05 * torch.randn(v.shape, generator=g)
    Path(cfg.stage_dir("train")).mkdir(parents=True, exist_ok=True)
    torch.save(state, Path(cfg.stage_dir("train")) / ADAPTERS_FILE)
    return cfg


# ---------------------------------------------------------------------------- measurements


def _recalls(compat: dict) -> dict:
    return {name: {d: {k: c[d][k] for k in ("R@1", "R@5", "R@10")} for d in ("t2i", "i2t")}
            for name, c in compat["cases"].items()}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the DataLoader workers)."""
    import resource
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))


def measure_e2e(cfg_path: str, path: str, rank: bool, workers: int, batch: int,
                dtype: str = "float16") -> dict:
    """One run of one path in this (fresh) process: embed every view, optionally rank."""
    from xbt_dist.config import load_config
    from xbt_dist.eval.compat import compatibility_report
    from xbt_dist.eval.evaluate import load_towers
    cfg = load_config(cfg_path, [f"eval.num_workers={workers}", f"eval.batch_size={batch}",
                                 "eval.progress_every=100", f"eval.embed_dtype={dtype}"])
    towers = load_towers(cfg)
    rss0 = peak_rss_mb()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if path == "ram":
        views, c2i = views_in_ram(towers, cfg.eval.eval_shards, batch)
        on_off = None
    else:
        streamed = towers.stream(cfg.eval.eval_shards, cfg.eval, "retrieval", "eval set")
        views, c2i, on_off = streamed.views, streamed.caption_to_image, towers.on_off.result()
    t_embed = time.perf_counter() - t0
    out = {"path": path, "dtype": dtype if path == "stream" else "float32",
           "n_images": int(len(views["old"]["image"])), "n_captions": int(len(c2i)),
           "embed_s": t_embed, "embed_cpu_s": _cpu_s() - cpu0, "rss_after_models_mb": rss0,
           "view_bytes": sum(x.numel() * x.element_size() for v in views.values() for x in v.values())}
    if rank:
        t1 = time.perf_counter()
        compat = compatibility_report(views, c2i, on_off=on_off)
        out["rank_s"] = time.perf_counter() - t1
        out["recalls"] = _recalls(compat)
        out["on_off"] = compat["on_off"]
    out["peak_rss_mb"] = peak_rss_mb()
    import resource
    out["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def _max_recall_diff(a: dict, b: dict) -> float:
    return max(abs(a[c][d][k] - b[c][d][k]) for c in a for d in a[c] for k in a[c][d])


def measure_rank(n_images: int, captions: int, queries: int, d_old: int, d_new: int,
                 seed: int = 0) -> dict:
    """Float16 views of a synthetic n_images x captions set; six cases on a query sample."""
    from xbt_dist.eval.compat import CASES, align_dim
    from xbt_dist.eval.metrics import positive_ranks
    g = torch.Generator().manual_seed(seed)
    n_txt = n_images * captions
    c2i = torch.arange(n_images).repeat_interleave(captions)
    views = {}
    for name, d in (("old", d_old), ("new", d_new), ("phi", d_old), ("xbt", d_old)):
        # Built in blocks so the fp32 intermediates never exceed one block.
        img = torch.empty(n_images, d, dtype=torch.float16)
        txt = torch.empty(n_txt, d, dtype=torch.float16)
        for s in range(0, n_images, 10_000):
            e = min(s + 10_000, n_images)
            x = F.normalize(torch.randn(e - s, d, generator=g), dim=-1)
            img[s:e] = x.half()
            t = x.repeat_interleave(captions, 0) + 0.7 * torch.randn((e - s) * captions, d, generator=g) / d ** 0.5
            txt[s * captions:e * captions] = F.normalize(t, dim=-1).half()
        views[name] = {"image": img, "text": txt}
    rss_views = peak_rss_mb()
    q_txt = min(queries, n_txt)
    q_img = min(queries, n_images)
    timing = {}
    t_all = time.perf_counter()
    for qv, gv in CASES:
        d_g = views[gv]["image"].shape[1]
        qi, qt = align_dim(views[qv]["image"][:q_img], d_g), align_dim(views[qv]["text"][:q_txt], d_g)
        t0 = time.perf_counter()
        positive_ranks(qt, views[gv]["image"], c2i[:q_txt], torch.arange(n_images))
        t1 = time.perf_counter()
        positive_ranks(qi, views[gv]["text"], torch.arange(q_img), c2i)
        t2 = time.perf_counter()
        timing[f"{qv}/{gv}"] = {"t2i_s_per_query": (t1 - t0) / q_txt,
                                "i2t_s_per_query": (t2 - t1) / q_img}
    full_s = sum(v["t2i_s_per_query"] * n_txt + v["i2t_s_per_query"] * n_images
                 for v in timing.values())
    return {"n_images": n_images, "n_captions": n_txt, "queries_sampled": [q_txt, q_img],
            "d_old": d_old, "d_new": d_new, "sample_wall_s": time.perf_counter() - t_all,
            "full_rank_s_extrapolated": full_s, "per_case": timing,
            "view_bytes": sum(x.numel() * x.element_size() for v in views.values() for x in v.values()),
            "rss_with_views_mb": rss_views, "peak_rss_mb": peak_rss_mb()}


def _sub(args: list[str], threads: int) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "bench.eval_stream", "_one", args[0], "--threads", str(threads),
           *args[1:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def bench_eval_stream(out: Path, work: Path, e2e_images: int, old_images: int, rank_images: int,
                      rank_queries: int, workers: int, batch: int, threads: int,
                      image_size: int, rank_dims=(512, 768)) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    models = write_tiny_models(work / "models")
    rows, notes = [], []
    small = write_eval_shards(work / f"eval-{old_images}", old_images, image_size=image_size)
    cfg_small = work / "small.yaml"
    from xbt_dist.config import dump_config
    cfg_small.write_text(dump_config(write_eval_world(work / "small", small, models)))
    # 1. both paths, same small set, ranked: equal recalls, time and memory side by side
    common = ["--workers", str(workers), "--batch", str(batch), "--rank"]
    ram = _sub(["e2e", "--cfg", str(cfg_small), "--path", "ram", *common], threads)
    stream = _sub(["e2e", "--cfg", str(cfg_small), "--path", "stream", *common], threads)
    stream32 = _sub(["e2e", "--cfg", str(cfg_small), "--path", "stream", "--dtype", "float32",
                     *common], threads)
    case = f"{old_images} images x {CAPTIONS} captions, {image_size}px"
    for r, label in ((ram, "in-RAM (before)"), (stream, "streamed fp16 (after)"),
                     (stream32, "streamed fp32 (after)")):
        rows += [row("eval_stream", case, f"embed wall, {label}", r["embed_s"], "s"),
                 row("eval_stream", case, f"embed CPU (process + workers), {label}",
                     r["embed_cpu_s"], "s"),
                 row("eval_stream", case, f"rank wall (6 cases, CPU), {label}", r["rank_s"], "s"),
                 row("eval_stream", case, f"peak RSS, {label}", r["peak_rss_mb"], "MB"),
                 row("eval_stream", case, f"kept embeddings, {label}", r["view_bytes"] / 2**20, "MB")]
    for r, label in ((stream32, "fp32"), (stream, "fp16")):
        diff = _max_recall_diff(ram["recalls"], r["recalls"])
        rows.append(row("eval_stream", case, f"max |recall diff| vs in-RAM, streamed {label}",
                        diff, "abs"))
        notes.append(f"streamed {label} vs in-RAM recalls (6 cases x 2 directions x R@1/5/10): "
                     f"max abs difference {diff:g}")
    # 2. the streamed embedding pass at full size
    big = write_eval_shards(work / f"eval-{e2e_images}", e2e_images, image_size=image_size)
    cfg_big = work / "big.yaml"
    cfg_big.write_text(dump_config(write_eval_world(work / "big", big, models)))
    sb = _sub(["e2e", "--cfg", str(cfg_big), "--path", "stream", "--workers", str(workers),
               "--batch", str(batch)], threads)
    case_b = f"{e2e_images} images x {CAPTIONS} captions, {image_size}px"
    per_img_ram_mb = (ram["peak_rss_mb"] - ram["rss_after_models_mb"]) / old_images
    rows += [row("eval_stream", case_b, "embed wall, streamed", sb["embed_s"], "s"),
             row("eval_stream", case_b, "embed CPU (process + workers), streamed",
                 sb["embed_cpu_s"], "s"),
             row("eval_stream", case_b, "images/s, streamed (4 image + 4 text towers, 5 captions each)",
                 e2e_images / sb["embed_s"], "images/s"),
             row("eval_stream", case_b, "peak RSS, streamed (main process)", sb["peak_rss_mb"], "MB"),
             row("eval_stream", case_b, "peak RSS, one decode worker", sb["worker_peak_rss_mb"], "MB"),
             row("eval_stream", case_b, "peak RSS, in-RAM (extrapolated from the small set)",
                 ram["rss_after_models_mb"] + per_img_ram_mb * e2e_images, "MB")]
    notes.append(f"in-RAM at {e2e_images} is extrapolated linearly from {old_images} images "
                 f"({per_img_ram_mb * 1024:.0f} KB per image above the loaded models), not run")
    # 3. ranking only, full-size fp16 views, B/32 -> L/14 widths
    rk = _sub(["rank", "--images", str(rank_images), "--queries", str(rank_queries),
               "--rank-dims", *map(str, rank_dims)], threads)
    case_r = f"{rank_images} images x {CAPTIONS} captions, d {rank_dims[0]}/{rank_dims[1]}, fp16 views"
    rows += [row("eval_stream", case_r, "rank wall, 6 cases, CPU (extrapolated from sample)",
                 rk["full_rank_s_extrapolated"], "s"),
             row("eval_stream", case_r, "peak RSS while ranking", rk["peak_rss_mb"], "MB"),
             row("eval_stream", case_r, "kept embeddings (4 views, fp16)", rk["view_bytes"] / 2**20, "MB")]
    notes.append(f"ranking: {rk['queries_sampled']} (caption, image) queries per direction ranked "
                 f"against the full gallery; full time = per-query time x all queries")
    proj = _projection(sb, e2e_images, rk, rank_images)
    return {"name": "eval_stream", "rows": rows, "notes": notes, "projection": proj,
            "runs": {"e2e_ram": ram, "e2e_stream": stream, "e2e_stream_fp32": stream32,
                     "stream_big": sb, "rank": rk},
            "config": {"e2e_images": e2e_images, "old_images": old_images,
                       "rank_images": rank_images, "rank_queries": rank_queries,
                       "rank_dims": list(rank_dims),
                       "workers": workers, "batch": batch, "threads": threads,
                       "image_size": image_size, "captions": CAPTIONS, "tiny_models": TINY}}


def _projection(sb: dict, n_e2e: int, rk: dict, n_rank: int, n: int = 1_000_000,
                d_old: int = 512, d_new: int = 768) -> dict:
    """A 1M-image x 5-caption eval at B/32 -> L/14 widths, from the measured rates and sizes.

    Memory is arithmetic on bytes per row (4 kept views: old, new, phi, xbt; image + captions).
    CPU times scale what was measured here (embedding: linear in images, with the tiny models;
    ranking: queries x gallery, at the measured dims). GPU ranking is given as fp32 FLOPs and
    device memory, not as a time: no GPU was measured.
    """
    from xbt_dist.eval.metrics import GPU_SCORE_BUDGET
    rows = n * (1 + CAPTIONS)
    per_row = 3 * d_old + d_new                                   # dims over the 4 kept views
    flops = sum(2 * 2 * n * n * CAPTIONS * (d_new if c == "new/new" else d_old)
                for c in rk["per_case"])                           # 2 directions x 2 FLOP/MAC
    return {"n_images": n, "captions": CAPTIONS, "dims": [d_old, d_new],
            "embed_cpu_s_tiny_models": sb["embed_cpu_s"] * n / n_e2e,
            "rank_cpu_wall_s_at_measured_dims": rk["full_rank_s_extrapolated"] * (n / n_rank) ** 2,
            "kept_embeddings_gb_fp32": rows * per_row * 4 / 1e9,
            "kept_embeddings_gb_fp16": rows * per_row * 2 / 1e9,
            "reorder_transient_gb_fp32": n * CAPTIONS * d_new * 4 / 1e9,
            # the largest gallery (5M captions, new/new) as normalised fp32 on the device, plus
            # one score chunk (scores, masked copy, bool mask)
            "rank_device_memory_gb": (n * CAPTIONS * d_new * 4 + GPU_SCORE_BUDGET * 9) / 1e9,
            "rank_fp32_flops": flops,
            "in_ram_path_decoded_images_gb_at_224px": n * 224 * 224 * 3 / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=("all", "_one"))
    p.add_argument("kind", nargs="?", choices=("e2e", "rank"))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--work", default="/tmp/xbt-bench-eval", help="scratch dir for shards/models")
    p.add_argument("--e2e-images", type=int, default=100_000)
    p.add_argument("--old-images", type=int, default=10_000)
    p.add_argument("--rank-images", type=int, default=100_000)
    p.add_argument("--rank-queries", type=int, default=2000)
    p.add_argument("--rank-dims", type=int, nargs=2, default=[512, 768], metavar=("D_OLD", "D_NEW"),
                   help="embedding dims of the ranking part (default B/32 -> L/14)")
    p.add_argument("--images", type=int)
    p.add_argument("--queries", type=int)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cfg")
    p.add_argument("--path", choices=("ram", "stream"))
    p.add_argument("--rank", action="store_true")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    a = p.parse_args(argv)
    setup_torch(a.threads)
    if a.what == "_one":
        if a.kind == "e2e":
            res = measure_e2e(a.cfg, a.path, a.rank, a.workers, a.batch, a.dtype)
        else:
            res = measure_rank(a.images, CAPTIONS, a.queries, *a.rank_dims)
        print(json.dumps(res, default=str))
        return 0
    res = bench_eval_stream(Path(a.out), Path(a.work), a.e2e_images, a.old_images, a.rank_images,
                            a.rank_queries, a.workers, a.batch, a.threads, a.image_size,
                            tuple(a.rank_dims))
    res["command"] = "python -m bench.eval_stream " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result(Path(a.out), res)
    print(json.dumps({"rows": res["rows"], "projection": res["projection"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
