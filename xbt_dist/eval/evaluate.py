"""`xbt eval`: embed the eval sets with every view and write the compatibility report.

Views (see compat.py): `old` (old model), `new` (untouched new), `phi` (stage-1 phi on the
untouched new model), `xbt` (trained phi on the adapted new model) and `new_adapters_off` (the
adapted model with its adapters switched off, which must equal `new` bit for bit). The compute
table is read from the stage manifests, so it reports what the training actually measured.

The eval sets stream (stream.py): decode workers feed batches, each batch goes once through every
tower that a view needs (old image/text, new image/text, the adapted new model with adapters on
and off), phi heads run on the fp32 batch embeddings, and only the embeddings are kept
(`eval.embed_dtype`: float32 by default, float16 to halve the memory). The
adapters-off embeddings are compared with `new` batch by batch (`OnOffCheck`) and never stored.
Ranking then runs chunked on `eval.rank_device` (the GPU when there).
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

from xbt_dist import storage
from xbt_dist.artifacts import read_manifest
from xbt_dist.config import RunConfig
from xbt_dist.eval.compat import OnOffCheck, compatibility_report, zero_shot_report
from xbt_dist.eval.report import write_report
from xbt_dist.eval.stream import StreamedSet, dedup_by_repr, embed_stream
from xbt_dist.models.clip import ClipBundle
from xbt_dist.models.encoders import load_encoder
from xbt_dist.train.model import resolve_method
from xbt_dist.train.stage1 import PHI_FILE, load_phi
from xbt_dist.train.stage2 import ADAPTERS_FILE, load_xbt


PAPER_PROMPT = "a photo of a {}."   # the paper's single zero-shot prompt


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def rank_device(setting: str, model_device) -> str:
    """Where similarity and ranking run: `auto` = the models' GPU, else any GPU, else the CPU."""
    if setting == "auto":
        if torch.device(model_device).type == "cuda":
            return str(model_device)
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"eval.rank_device={setting!r} but no CUDA GPU is visible; "
                         "use 'auto' or 'cpu'")
    return setting


@dataclasses.dataclass
class Towers:
    """The loaded encoders of one evaluation; `embed(batch)` gives every view of a batch.

    `phi` is the stage-1 head on the untouched new model, `xbt` the trained model (adapted new
    encoder + its phi); either may be None. `on_off` accumulates the adapters-off check.
    """
    old: ClipBundle
    new: ClipBundle
    device: str | torch.device = "cpu"
    phi: torch.nn.Module | None = None
    xbt: torch.nn.Module | None = None
    on_off: OnOffCheck | None = None
    text_batch: int = 256   # captions per text forward (a batch of B images carries ~5B captions)

    def transforms(self):
        return dedup_by_repr({"old": self.old.preprocess, "new": self.new.preprocess})

    def tokenizers(self):
        return dedup_by_repr({"old": self.old.tokenizer, "new": self.new.tokenizer})

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)

    @torch.no_grad()
    def encode(self, x_old, x_new, encode: str) -> dict[str, torch.Tensor]:
        """{view: normalised fp32 (n, d)} of one modality (`encode` = encode_image/encode_text)."""
        out = {"old": self._norm(getattr(self.old.model, encode)(x_old)),
               "new": self._norm(getattr(self.new.model, encode)(x_new))}
        if self.phi is not None:
            out["phi"] = self._norm(self.phi(out["new"]))
        if self.xbt is not None:
            # Unnormalised encoder, normalised once here exactly as for the untouched model.
            adapted = functools.partial(getattr(self.xbt.new, encode), normalize=False)
            out["xbt"] = self._norm(self.xbt.phi(self._norm(adapted(x_new))))
            if self.on_off is not None:
                with self.xbt.new.adapters_disabled():
                    out["new_adapters_off"] = self._norm(adapted(x_new))
        return out

    def embed(self, batch: dict, alias_img: dict, alias_txt: dict | None) -> dict:
        """{view: {"image", "text"?}} for one streamed batch (text only in retrieval batches)."""
        dev = self.device
        img = {k: v.to(dev, non_blocking=True) for k, v in batch["images"].items()}
        per_mod = {"image": self.encode(img[alias_img["old"]], img[alias_img["new"]],
                                        "encode_image")}
        if alias_txt is not None:
            txt = {k: v.to(dev, non_blocking=True) for k, v in batch["texts"].items()}
            t_old, t_new = txt[alias_txt["old"]], txt[alias_txt["new"]]
            # In slices of text_batch rows: activation memory as for an image batch, not 5x.
            parts = [self.encode(t_old[i:i + self.text_batch], t_new[i:i + self.text_batch],
                                 "encode_text") for i in range(0, len(t_old), self.text_batch)]
            per_mod["text"] = {v: torch.cat([p[v] for p in parts]) for v in parts[0]}
        views: dict[str, dict] = {}
        for mod, by_view in per_mod.items():
            for view, x in by_view.items():
                views.setdefault(view, {})[mod] = x
        off = views.pop("new_adapters_off", None)
        if off is not None:
            self.on_off.update(views["new"], off)
        return views

    @torch.no_grad()
    def class_texts(self, prompts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
        """{view: (C*T, d)} prompt embeddings, in batches (a few thousand prompts at most)."""
        chunks = []
        for i in range(0, len(prompts), batch_size):
            part = prompts[i:i + batch_size]
            chunks.append(self.encode(self.old.tokenizer(part).to(self.device),
                                      self.new.tokenizer(part).to(self.device), "encode_text"))
        return {v: torch.cat([c[v] for c in chunks]).cpu() for v in chunks[0]
                if v != "new_adapters_off"}

    def stream(self, spec: str, ec, mode: str, name: str) -> StreamedSet:
        t_unique, t_alias = self.transforms()
        k_unique, k_alias = self.tokenizers() if mode == "retrieval" else ({}, None)
        self.text_batch = ec.batch_size
        return embed_stream(
            spec, lambda b: self.embed(b, t_alias, k_alias), t_unique, k_unique, mode=mode,
            batch_size=ec.batch_size, num_workers=ec.num_workers,
            progress_every=ec.progress_every, name=name, log_fn=_log,
            store_dtype=ec.embed_dtype,
            pin_memory=torch.device(self.device).type == "cuda")


def load_towers(cfg: RunConfig, device: str | torch.device = "cpu") -> Towers:
    """old, new, and (when their files exist) the stage-1 phi and the trained XBT model."""
    old, new = load_encoder(cfg.old, device), load_encoder(cfg.new, device)
    towers = Towers(old, new, device)
    # through the storage layer: out_dir may be an object-store URL (s3://...)
    phi_path = storage.join(cfg.stage_dir("phi"), PHI_FILE)
    if storage.exists(phi_path):
        towers.phi = load_phi(phi_path).eval().to(device)
    if storage.exists(storage.join(cfg.stage_dir("train"), ADAPTERS_FILE)):
        # Adapters are injected in place: give them their own copy so `new` stays untouched.
        xbt_base = dataclasses.replace(new, model=copy.deepcopy(new.model))
        towers.xbt = load_xbt(cfg, xbt_base, old.embed_dim).to(device)
        if not cfg.adapters.full_tune:  # full-tune has no adapters to switch off
            towers.on_off = OnOffCheck()
    return towers


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


def gallery_shards(cfg: RunConfig, split: str = "test") -> str:
    """The eval shard set of `split`: `test` = eval.eval_shards, `val` = eval.val_shards."""
    if split not in ("test", "val"):
        raise ValueError(f"eval split {split!r}: use 'test' (eval.eval_shards) or 'val' (eval.val_shards)")
    spec = cfg.eval.eval_shards if split == "test" else cfg.eval.val_shards
    if not spec:
        key = "eval.eval_shards" if split == "test" else "eval.val_shards"
        raise ValueError(f"{key} is not set: point it at a multi-caption eval shard set "
                         "(the toy world writes eval/ = test and val/ = validation)")
    return spec


def run_eval(cfg: RunConfig, device: str = "cpu", out_dir: str | None = None, split: str = "test") -> dict:
    """Evaluate on the test gallery (default) or, with split="val", on the validation gallery
    (report under <out_dir>/eval_val): tune on val, report test."""
    ec = cfg.eval
    spec = gallery_shards(cfg, split)
    t0 = time.perf_counter()
    cfg = resolve_method(cfg)
    towers = load_towers(cfg, device)
    on_dev = rank_device(ec.rank_device, device)
    gallery = towers.stream(spec, ec, "retrieval", f"{split} gallery")
    c2i = gallery.caption_to_image
    compat = compatibility_report(gallery.views, c2i, ks=ec.ks, verdict_ks=ec.criterion_ks,
                                  chunk_size=ec.chunk_size, device=on_dev,
                                  on_off=towers.on_off.result() if towers.on_off else None,
                                  log=_log)
    if towers.on_off is not None:   # streamed, never stored: list its dim as the report did
        compat["dims"]["new_adapters_off"] = compat["dims"]["new"]
    if gallery.skipped:
        compat["eval_set"]["skipped"] = gallery.skipped
    zero_shot = None
    if ec.zeroshot_shards:
        zero_shot = _zero_shot(ec.zeroshot_shards, towers, ec, on_dev)
    out = str(out_dir or cfg.stage_dir("eval" if split == "test" else "eval_val"))  # a str: URLs too
    meta = {"name": cfg.name, "method": cfg.train.method, "target_source": cfg.train.target_source,
            "split": split,
            "seed": cfg.train.seed, "old": cfg.old.arch, "new": cfg.new.arch,
            "eval_s": round(time.perf_counter() - t0, 1)}
    paths = write_report(out, compat, zero_shot, _compute_rows(cfg), views=gallery.views,
                         caption_to_image=c2i, title=f"XBT evaluation: {cfg.name}", meta=meta,
                         tsne_pairs=ec.tsne_points, seed=cfg.train.seed)
    _log(f"report: {paths['report_md']}")
    return {"compat": compat, "zero_shot": zero_shot, "paths": {k: str(v) for k, v in paths.items() if v}}


def _zero_shot(spec: str, towers: Towers, ec, on_dev) -> dict:
    meta_path = Path(spec) / "classes.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: a zero-shot set needs classes.json "
                                "with 'classes' and 'templates' (see `xbt prep zeroshot`)")
    meta = json.loads(meta_path.read_text())
    classes, templates = meta["classes"], meta.get("templates") or [PAPER_PROMPT]
    if ec.zeroshot_prompts == "single":
        templates = [PAPER_PROMPT]
    prompts = [t.format(c) for c in classes for t in templates]
    # Class prompts first: the streamed pass below then only needs the image towers.
    on_off, towers.on_off = towers.on_off, None           # the check is on the retrieval set
    try:
        texts = {v: x.view(len(classes), len(templates), -1)   # the metric ensembles templates
                 for v, x in towers.class_texts(prompts, ec.batch_size).items()}
        images = towers.stream(spec, ec, "zeroshot", "zero-shot set")
    finally:
        towers.on_off = on_off
    # phi/old classifies phi(new images) with the OLD class texts (the old system's classifier).
    class_view = {"old": "old", "new": "new", "phi": "old", "xbt": "xbt"}
    zviews = {v: {"image": images.views[v]["image"], "classes": texts[class_view[v]]}
              for v in images.views}
    return zero_shot_report(zviews, images.labels, chunk_size=ec.chunk_size, device=on_dev)
