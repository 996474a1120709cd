"""The toy world: the project's embedded default dataset + base models (demo and benchmark).

`build_toy_world(out_dir, ToyWorldConfig())` writes, under `out_dir`:

    train/      image-caption shards (jpg, txt, json with all paraphrases)    manifest.json, sizes.json
    text/       caption-only shards, the stage-1 corpus (txt)                  manifest.json, sizes.json
    eval/       held-out TEST gallery, json["captions"] = all captions, txt = first  manifest.json, sizes.json
    val/        held-out VALIDATION gallery, same form, its own scenes: tuned defaults are picked here
    zeroshot/   single-object images with cls + classes.json                   manifest.json, sizes.json
    models/     toy-old.json, toy-new.json (open_clip configs), old.pt, new.pt,
                old.train.json, new.train.json (training summary + recalls), manifest.json
    manifest.json   kind "toy-world": config, per-part seconds, recalls, paths

Every part is skipped on rerun when its config digest is unchanged, so an interrupted build resumes
where it stopped and a finished one returns at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from xbt_dist.artifacts import atomic_write_text, config_digest, is_complete, read_manifest, write_manifest
from xbt_dist.toy import base_clip, world

__all__ = ["ToyWorldConfig", "build_toy_world", "generate_world", "train_base_models"]


@dataclass
class ToyWorldConfig:
    """Everything that defines a toy world; the defaults are the demo/benchmark world."""
    seed: int = 0                  # world and training seed: same seed -> same shards and models
    image_size: int = 64           # image side in pixels (the toy CLIPs use patch 8, so a multiple of 8)
    n_train: int = 12_000          # image-caption training pairs (train/)
    n_text: int = 60_000           # caption-only corpus for stage-1 phi pretraining (text/)
    n_eval: int = 1_000            # held-out test gallery images (eval/): what docs/RESULTS.md reports
    n_val: int | None = None       # held-out validation gallery images (val/), where defaults are
                                   # tuned; None: as many as the test gallery (n_eval)
    n_zeroshot: int = 1_000        # labelled single-object images (zeroshot/)
    eval_captions: int = 5         # paraphrases per eval (and train) image, 1..5
    per_shard: int = 2_000         # samples per image shard
    text_per_shard: int = 10_000   # samples per text shard
    context_length: int = 32       # text context of both toy CLIPs (longest caption is ~30 tokens)
    train_models: bool = True      # False: only generate the data
    old_epochs: int = 4            # OLD base-CLIP epochs over train/ (4 vs 8: keeps OLD clearly below NEW)
    new_epochs: int = 4            # NEW base-CLIP epochs (NEW costs ~4x OLD per sample)
    batch_size: int = 128          # contrastive batch size of base-CLIP training
    lr: float = 1e-3               # AdamW peak learning rate (linear warmup, cosine decay)
    weight_decay: float = 0.1      # AdamW weight decay on matrices
    threads: int = 2               # torch CPU threads for training
    evaluate: bool = True          # compute old/old and new/new recalls on eval/ into the manifest

    def __post_init__(self):
        if self.n_val is None:
            self.n_val = self.n_eval
        for name in ("n_train", "n_text", "n_eval", "n_val", "n_zeroshot", "per_shard", "text_per_shard",
                     "old_epochs", "new_epochs", "batch_size", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ToyWorldConfig.{name} must be a positive int, got {v!r}")
        if self.image_size < 16 or self.image_size % 8:
            raise ValueError(f"ToyWorldConfig.image_size must be a multiple of 8 and >= 16 "
                             f"(patch size 8), got {self.image_size!r}")
        if not 1 <= self.eval_captions <= 5:
            raise ValueError(f"ToyWorldConfig.eval_captions must be in 1..5 (there are 5 "
                             f"paraphrase templates), got {self.eval_captions!r}")
        if not 8 <= self.context_length <= 77:
            raise ValueError(f"ToyWorldConfig.context_length must be in 8..77, got {self.context_length!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"ToyWorldConfig.lr must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"ToyWorldConfig.weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if self.train_models and self.batch_size > self.n_train:
            raise ValueError(f"ToyWorldConfig.batch_size {self.batch_size} > n_train {self.n_train}: "
                             "lower batch_size or raise n_train")


def generate_world(out_dir: str | Path, cfg: ToyWorldConfig) -> dict[str, float]:
    """Write the four shard sets (skipping finished ones); returns seconds per split."""
    out_dir = Path(out_dir)
    plan = [("train", cfg.n_train, cfg.per_shard), ("text", cfg.n_text, cfg.text_per_shard),
            ("eval", cfg.n_eval, cfg.per_shard), ("val", cfg.n_val, cfg.per_shard),
            ("zeroshot", cfg.n_zeroshot, cfg.per_shard)]
    seconds = {}
    for split, n, per_shard in plan:
        t0 = time.time()
        world.write_split(out_dir / split, split, n, cfg.seed, cfg.image_size, per_shard,
                          cfg.eval_captions)
        seconds[split] = round(time.time() - t0, 1)
        print(f"[toy] {split}: {n} samples in {seconds[split]}s -> {out_dir / split}", flush=True)
    return seconds


def _model_train_config(cfg: ToyWorldConfig, role: str, train_digest: str) -> dict:
    arch = base_clip.OLD_ARCH if role == "old" else base_clip.NEW_ARCH
    return {"arch": arch,
            "arch_config": base_clip.arch_configs(cfg.image_size, cfg.context_length)[arch],
            "train_data_digest": train_digest, "seed": cfg.seed,
            "epochs": cfg.old_epochs if role == "old" else cfg.new_epochs,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay}


def train_base_models(out_dir: str | Path, cfg: ToyWorldConfig) -> dict:
    """Train OLD then NEW on `<out_dir>/train` (skipping finished ones); returns per-role summaries."""
    out_dir = Path(out_dir)
    models_dir = out_dir / "models"
    base_clip.write_arch_configs(models_dir, cfg.image_size, cfg.context_length)
    train_digest = read_manifest(out_dir / "train")["config_digest"]
    data = None   # decoded lazily, once, shared by both models
    summaries = {}
    for role in ("old", "new"):
        tcfg = _model_train_config(cfg, role, train_digest)
        digest = config_digest(tcfg)
        ckpt, meta_path = models_dir / f"{role}.pt", models_dir / f"{role}.train.json"
        if ckpt.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("config_digest") == digest and (meta.get("recalls") or not cfg.evaluate):
                summaries[role] = {**meta, "skipped": True}
                print(f"[toy] {role} model up to date: {ckpt}", flush=True)
                continue
        if data is None:
            data = base_clip.load_split(out_dir / "train")
        summary = base_clip.train_clip(tcfg["arch"], out_dir / "train", ckpt, epochs=tcfg["epochs"],
                                       batch_size=cfg.batch_size, lr=cfg.lr,
                                       weight_decay=cfg.weight_decay, seed=cfg.seed,
                                       threads=cfg.threads, data=data)
        summary["config_digest"] = digest
        if cfg.evaluate:
            t0 = time.time()
            summary["recalls"] = base_clip.eval_recalls(tcfg["arch"], ckpt, out_dir / "eval")
            summary["eval_seconds"] = round(time.time() - t0, 1)
            print(f"[toy] {role}/{role} recalls on eval/: {summary['recalls']}", flush=True)
        atomic_write_text(meta_path, json.dumps(summary, indent=2) + "\n")
        summaries[role] = summary
    write_manifest(models_dir, "toy-base-clips",
                   config={r: _model_train_config(cfg, r, train_digest) for r in ("old", "new")},
                   inputs={"train": str(out_dir / "train")},
                   counts={r: s.get("samples") for r, s in summaries.items()},
                   models={r: {"arch": s["arch"], "checkpoint": s["checkpoint"]}
                           for r, s in summaries.items()})
    return summaries


def build_toy_world(out_dir: str | Path, cfg: ToyWorldConfig | None = None) -> dict:
    """Generate the world and train both base CLIPs under `out_dir`; resumable, idempotent.

    Returns paths and names: `root`, `train`, `text`, `eval` (test gallery), `val`, `zeroshot`, `models_dir` (open_clip
    JSON configs, pass to `open_clip.add_model_config` / `ModelRef.config_dir`), `old_arch`,
    `old_checkpoint`, `new_arch`, `new_checkpoint`, plus `seconds` per part and `recalls`."""
    cfg = cfg or ToyWorldConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = config_digest(cfg)
    t_start = time.time()
    seconds = generate_world(out_dir, cfg)
    result = {"root": str(out_dir), **{s: str(out_dir / s) for s in world.SPLIT_KINDS},
              "models_dir": str(out_dir / "models"),
              "old_arch": base_clip.OLD_ARCH, "old_checkpoint": str(out_dir / "models" / "old.pt"),
              "new_arch": base_clip.NEW_ARCH, "new_checkpoint": str(out_dir / "models" / "new.pt")}
    recalls = {}
    if cfg.train_models:
        if is_complete(out_dir, "toy-world", digest):
            prev = read_manifest(out_dir)
            return {**result, "seconds": prev.get("seconds", {}), "recalls": prev.get("recalls", {}),
                    "skipped": True}
        summaries = train_base_models(out_dir, cfg)
        for role, s in summaries.items():
            seconds[f"{role}_model"] = 0.0 if s.get("skipped") else s["seconds"]
            if "recalls" in s:
                recalls[f"{role}/{role}"] = s["recalls"]
    seconds["total"] = round(time.time() - t_start, 1)
    write_manifest(out_dir, "toy-world", config=asdict(cfg),
                   inputs={"generator": "xbt_dist.toy"},
                   counts={"train": cfg.n_train, "text": cfg.n_text, "eval": cfg.n_eval,
                           "val": cfg.n_val, "zeroshot": cfg.n_zeroshot},
                   seconds=seconds, recalls=recalls,
                   paths={k: v for k, v in result.items()})
    return {**result, "seconds": seconds, "recalls": recalls}
