"""`xbt eval`: embed the eval sets with every view and write the compatibility report.

Views (see compat.py): `old` (old model), `new` (untouched new), `phi` (stage-1 phi on the
untouched new model), `xbt` (trained phi on the adapted new model) and `new_adapters_off` (the
adapted model with its adapters switched off, which must equal `new` bit for bit). The compute
table is read from the stage manifests, so it reports what the training actually measured.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xbt_dist.artifacts import read_manifest
from xbt_dist.config import RunConfig
from xbt_dist.data.shards import (decode_image, decode_meta, iter_image_text, iter_raw_samples,
                                  list_shards)
from xbt_dist.eval.compat import compatibility_report, zero_shot_report
from xbt_dist.eval.report import write_report
from xbt_dist.models.clip import ClipBundle, load_clip
from xbt_dist.train.model import resolve_method
from xbt_dist.train.stage1 import PHI_FILE, load_phi
from xbt_dist.train.stage2 import ADAPTERS_FILE, load_xbt


def load_eval_set(spec: str) -> tuple[list, list[str], torch.Tensor, list[str]]:
    """(images, captions, caption_to_image, keys) of a multi-caption eval shard set."""
    images, captions, c2i, keys = [], [], [], []
    for key, image, caption, meta in iter_image_text(spec):
        caps = meta.get("captions") or [caption]
        images.append(image)
        keys.append(key)
        captions.extend(caps)
        c2i.extend([len(images) - 1] * len(caps))
    if not images:
        raise ValueError(f"eval set {spec} holds no readable image-text sample")
    return images, captions, torch.tensor(c2i), keys


def load_zeroshot_set(spec: str) -> tuple[list, torch.Tensor, list[str], list[str]]:
    """(images, labels, class names, templates) of a zero-shot shard set with classes.json."""
    d = Path(spec)
    meta_path = d / "classes.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: a zero-shot set needs classes.json "
                                "with 'classes' and 'templates' (see `xbt prep zeroshot`)")
    meta = json.loads(meta_path.read_text())
    images, labels = [], []
    for shard in list_shards(spec):
        for sample in iter_raw_samples(shard):
            image = decode_image(sample)
            label = sample.get("cls") or str(decode_meta(sample).get("cls", "")).encode()
            if image is None or not label.strip():
                continue  # unreadable or unlabelled: not scorable (validate reports these)
            images.append(image)
            labels.append(int(label))
    return images, torch.tensor(labels), meta["classes"], meta.get("templates") or ["a photo of a {}."]


class _Embedder:
    """Batched image/text encoding with one model's preprocessing and tokenizer."""

    def __init__(self, bundle: ClipBundle, batch_size: int, device):
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


def _compute_rows(cfg: RunConfig) -> list[dict]:
    rows = []
    for stage, label in (("phi", "stage 1: phi (text only)"), ("train", f"stage 2: {cfg.train.method}")):
        try:
            r = read_manifest(cfg.stage_dir(stage)).get("result", {})
        except FileNotFoundError:
            continue
        rows.append({"method": label, "trainable_params": r.get("trainable_params"),
                     "wall_time_s": r.get("wall_s"),
                     "peak_memory_bytes": (r["peak_rss_mb"] * 2**20) if r.get("peak_rss_mb") else None,
                     "samples_seen": r.get("samples"), "samples_per_s": r.get("samples_per_s")})
    return rows


def run_eval(cfg: RunConfig, device: str = "cpu", out_dir: str | None = None) -> dict:
    ec = cfg.eval
    if not ec.eval_shards:
        raise ValueError("eval.eval_shards is not set: point it at a multi-caption eval shard set")
    t0 = time.perf_counter()
    cfg = resolve_method(cfg)
    old, new = load_clip(cfg.old, device), load_clip(cfg.new, device)
    images, captions, c2i, _ = load_eval_set(ec.eval_shards)
    E_old, E_new = _Embedder(old, ec.batch_size, device), _Embedder(new, ec.batch_size, device)
    m_old, m_new = old.model, new.model
    views = {"old": {"image": E_old.images(images, m_old.encode_image),
                     "text": E_old.texts(captions, m_old.encode_text)},
             "new": {"image": E_new.images(images, m_new.encode_image),
                     "text": E_new.texts(captions, m_new.encode_text)}}
    heads = {}
    phi_path = Path(cfg.stage_dir("phi")) / PHI_FILE
    if phi_path.is_file():
        phi0 = load_phi(phi_path).eval()
        heads["phi"] = phi0
        views["phi"] = {k: F.normalize(phi0(v), dim=-1).detach() for k, v in views["new"].items()}
    xbt = None
    if (Path(cfg.stage_dir("train")) / ADAPTERS_FILE).is_file():
        # Adapters are injected in place: give them their own copy so `new` stays untouched.
        xbt_base = dataclasses.replace(new, model=copy.deepcopy(new.model))
        xbt = load_xbt(cfg, xbt_base, old.embed_dim).to(device)
        # Unnormalised encoders: _Embedder normalises once, exactly as for the untouched model.
        ad_img = functools.partial(xbt.new.encode_image, normalize=False)
        ad_txt = functools.partial(xbt.new.encode_text, normalize=False)
        with torch.no_grad():
            views["xbt"] = {"image": F.normalize(xbt.phi(E_new.images(images, ad_img).to(device)), dim=-1).cpu(),
                            "text": F.normalize(xbt.phi(E_new.texts(captions, ad_txt).to(device)), dim=-1).cpu()}
            if not cfg.adapters.full_tune:  # full-tune has no adapters to switch off
                with xbt.new.adapters_disabled():
                        views["new_adapters_off"] = {"image": E_new.images(images, ad_img),
                                                 "text": E_new.texts(captions, ad_txt)}
    compat = compatibility_report(views, c2i, ks=ec.ks, verdict_ks=ec.criterion_ks)
    zero_shot = None
    if ec.zeroshot_shards:
        zero_shot = _zero_shot(ec.zeroshot_shards, old, new, E_old, E_new, heads, xbt, device)
    out = Path(out_dir or cfg.stage_dir("eval"))
    meta = {"name": cfg.name, "method": cfg.train.method, "target_source": cfg.train.target_source,
            "seed": cfg.train.seed, "old": cfg.old.arch, "new": cfg.new.arch,
            "eval_s": round(time.perf_counter() - t0, 1)}
    paths = write_report(out, compat, zero_shot, _compute_rows(cfg),
                         views={k: v for k, v in views.items() if k != "new_adapters_off"},
                         caption_to_image=c2i, title=f"XBT evaluation: {cfg.name}", meta=meta,
                         tsne_pairs=ec.tsne_points, seed=cfg.train.seed)
    print(f"[eval] report: {paths['report_md']}", file=sys.stderr)
    return {"compat": compat, "zero_shot": zero_shot, "paths": {k: str(v) for k, v in paths.items() if v}}


@torch.no_grad()
def _zero_shot(spec, old, new, E_old, E_new, heads, xbt, device) -> dict:
    partial = functools.partial
    images, labels, classes, templates = load_zeroshot_set(spec)
    prompts = [t.format(c) for c in classes for t in templates]

    def per_class(x):  # (C*T, d) -> (C, T, d): the metric ensembles the templates
        return x.view(len(classes), len(templates), -1)

    zviews = {"old": {"image": E_old.images(images, old.model.encode_image),
                      "classes": per_class(E_old.texts(prompts, old.model.encode_text))}}
    new_img = E_new.images(images, new.model.encode_image)
    zviews["new"] = {"image": new_img, "classes": per_class(E_new.texts(prompts, new.model.encode_text))}
    if "phi" in heads:
        zviews["phi"] = {"image": F.normalize(heads["phi"](new_img), dim=-1),
                         "classes": zviews["old"]["classes"]}
    if xbt is not None:
        img = F.normalize(xbt.phi(E_new.images(images, partial(xbt.new.encode_image, normalize=False)).to(device)), dim=-1).cpu()
        txt = F.normalize(xbt.phi(E_new.texts(prompts, partial(xbt.new.encode_text, normalize=False)).to(device)), dim=-1).cpu()
        zviews["xbt"] = {"image": img, "classes": per_class(txt)}
    return zero_shot_report(zviews, labels)
