"""Stage 2 (XBT): tune adapters of the new model jointly with phi against old embeddings.

Targets (`train.target_source`; docs/architecture.md, "Target sources"):
  precomputed  actual old embeddings `v_old`, `w_old` joined by key from embedding shards; the OLD
               MODEL IS NEVER LOADED (the default, and the paper's point: cheaper than Base)
  old_model    the frozen old model runs on each batch (paper's Base)
  synthetic    phi0 (frozen stage-1 phi) on the untouched new model, when no old embeddings exist
Output: `<out_dir>/train/adapters.pt` (adapters + phi + temperature, no base weights) and a
manifest with the compute report (trainable params, wall time, peak memory, samples seen).
"""

from __future__ import annotations

import copy
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from xbt_dist import storage
from xbt_dist.artifacts import write_manifest
from xbt_dist.config import RunConfig, to_dict
from xbt_dist.data.shards import shard_sizes
from xbt_dist.data.stream import SampleStream
from xbt_dist.losses import xbt_loss
from xbt_dist.models.clip import ClipBundle, split_device_normalize
from xbt_dist.models.encoders import adapt, image_size_of, load_encoder
from xbt_dist.models.phi import Phi
from xbt_dist.train.context import WorkerContext
from xbt_dist.train.loop import LoopPlan, run_loop
from xbt_dist.train.model import XBTModel, resolve_method
from xbt_dist.train.precision import forward_autocast, fp32_unit, resolve_precision
from xbt_dist.train.progress import mean_rate, peak_rss_mb
from xbt_dist.train.stage1 import PHI_FILE, load_phi
from xbt_dist.train.tracking import open_trackers

ADAPTERS_FILE = "adapters.pt"


def build_model(cfg: RunConfig, new: ClipBundle, d_old: int) -> XBTModel:
    """The trainable module of a (method-resolved) config, phi initialised per `phi_init`."""
    if cfg.train.phi_init == "stage1":
        phi = load_phi(storage.join(cfg.stage_dir("phi"), PHI_FILE))
        if (phi.d_new, phi.d_old) != (new.embed_dim, d_old):
            raise ValueError(f"stage-1 phi maps {phi.d_new}->{phi.d_old} but the models need "
                             f"{new.embed_dim}->{d_old}: it was trained for other models; rerun stage 1")
    else:
        phi = Phi(new.embed_dim, d_old, cfg.phi.hidden, cfg.phi.depth)
    phi0 = copy.deepcopy(phi) if cfg.train.target_source == "synthetic" else None
    if phi0 is not None and cfg.train.phi_init != "stage1":
        raise ValueError("target_source=synthetic needs the stage-1 phi: set train.phi_init=stage1")
    adapted = adapt(new.model, cfg.adapters)   # AdaptedCLIP or AdaptedBLIP, by backend
    return XBTModel(adapted, phi, cfg.loss.temperature, cfg.loss.learn_temperature, phi0=phi0)


def load_xbt(cfg: RunConfig, new: ClipBundle, d_old: int, path: str | Path | None = None) -> XBTModel:
    """Rebuild the trained XBT model from its base model reference + `adapters.pt`."""
    cfg = resolve_method(cfg)
    path = str(path or storage.join(cfg.stage_dir("train"), ADAPTERS_FILE))
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: run `xbt train` first")
    cfg = copy.deepcopy(cfg)
    cfg.train.phi_init, cfg.train.target_source = "random", "precomputed"  # weights come from the file
    model = build_model(cfg, new, d_old)
    model.load_trainable_state_dict(storage.load_torch(path))
    return model.eval()


def _old_inputs(old: ClipBundle, new: ClipBundle):
    """Map the new model's image batch to the old model's input size (same CLIP normalisation:
    open_clip's OpenAI statistics are BLIP's too; either backend may be old or new)."""
    size = image_size_of(old)

    def convert(images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False)
        return images
    return convert


def run_stage2(cfg: RunConfig, ctx: WorkerContext | None = None, resume: bool = False) -> dict:
    ctx = ctx or WorkerContext()
    cfg = resolve_method(cfg)
    tc = cfg.train
    stage_dir = cfg.stage_dir("train")
    local_batch = tc.batch_size // (ctx.world_size * tc.optim.grad_accum)
    if local_batch < 1:
        raise ValueError(f"train.batch_size={tc.batch_size} is smaller than workers x grad_accum")
    if not tc.train_shards:
        raise ValueError("train.train_shards is not set: point it at an image-text shard set")
    t0 = time.perf_counter()
    precision = resolve_precision(cfg.dist.precision, ctx.device)
    new = load_encoder(cfg.new, ctx.device)
    old = None
    targets = None
    if tc.target_source == "precomputed":
        if not tc.targets:
            raise ValueError("train.target_source=precomputed needs train.targets: the embedding "
                             "shard set of the old model (`xbt embed`), or use target_source=old_model")
        from xbt_dist.data.embeddings import EmbeddingShardSet
        targets = EmbeddingShardSet(tc.targets)
        targets.check_fields(["image_old", "text_old"])
        d_old = targets.dims["image_old"]
    elif tc.target_source == "old_model":
        old = load_encoder(cfg.old, ctx.device)
        old.model.requires_grad_(False)
        to_old = _old_inputs(old, new)
        d_old = old.embed_dim
    else:
        d_old = load_phi(storage.join(cfg.stage_dir("phi"), PHI_FILE)).d_old

    torch.manual_seed(cfg.train.seed)  # same init (phi, prompts, LoRA) on every run and rank
    model = build_model(cfg, new, d_old).to(ctx.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Images leave the DataLoader as uint8 (crop/resize in its workers) and are normalised on the
    # device in step_fn: 4x fewer bytes through shared memory and the host-to-device copy. Pinned
    # batches on a GPU make the `non_blocking` copies below asynchronous.
    host_transform, normalize = split_device_normalize(new.preprocess_train)
    stream = SampleStream(tc.train_shards, batch_size=local_batch, transform=host_transform,
                          tokenizer=new.tokenizer, targets=tc.targets if targets else None,
                          rank=ctx.rank, world_size=ctx.world_size, num_workers=tc.num_workers,
                          seed=tc.seed, shuffle_buffer=tc.shuffle_buffer, resampled=tc.resampled,
                          drop_last=True, pin_memory=ctx.device.type == "cuda",
                          max_bad_fraction=cfg.data.max_bad_fraction,
                          read_retries=cfg.data.read_retries)
    sizes = shard_sizes(tc.train_shards)
    n = tc.samples_per_epoch or (sum(sizes.values()) if sizes else 0)
    if not n:
        raise ValueError(f"{tc.train_shards} has no sizes.json and train.samples_per_epoch is 0: "
                         "run `xbt prep validate` on the shards or set train.samples_per_epoch")
    total_steps = tc.max_steps or max(1, int(tc.epochs * n) // tc.batch_size)
    backend = ctx.make_backend(model, tc.optim, total_steps, local_batch)
    weights = cfg.loss.weights()

    def step_fn(batch):
        images = normalize(batch["images"].to(ctx.device, non_blocking=True))  # uint8 -> fp32
        tokens = batch["tokens"].to(ctx.device, non_blocking=True)
        # The forward (towers, phi) under autocast; targets, logits and the loss in fp32.
        with forward_autocast(precision, ctx.device):
            if tc.target_source == "precomputed":
                tgt = {"v_old": batch["v_old"], "w_old": batch["w_old"]}
            elif tc.target_source == "old_model":
                with torch.no_grad():
                    tgt = {"v_old": old.model.encode_image(to_old(images), normalize=True),
                           "w_old": old.model.encode_text(old.tokenizer(batch["captions"]).to(ctx.device),
                                                          normalize=True)}
            else:
                tgt = backend.module(images, tokens, synthetic_targets=True)
            out = backend.module(images, tokens)
        if tc.target_source == "precomputed":  # stored rows (fp16 on disk): normalised on the device
            tgt = {k: F.normalize(v.to(ctx.device, non_blocking=True).float(), dim=-1) for k, v in tgt.items()}
        embeds = {k: fp32_unit(v) for k, v in {"phi_v": out["phi_v"], "phi_w": out["phi_w"], **tgt}.items()}
        return xbt_loss(embeds, weights, out["logit_scale"].float(), ctx.rank, ctx.world_size)

    plan = LoopPlan(name=f"train:{tc.method}", total_steps=total_steps, global_batch=tc.batch_size,
                    stage_dir=stage_dir, checkpoint_every=tc.checkpoint_every,
                    log_every=tc.log_every, resume=resume, tb_dir=f"{stage_dir}/tb",
                    trackers=open_trackers(cfg, "train", stage_dir, ctx.rank, resume))
    state = run_loop(plan, ctx, backend, stream, step_fn)
    wall = time.perf_counter() - t0
    # Each rank skipped its own bad samples and has its own memory peak: report the cluster's.
    per_rank = ctx.gather({"skipped": dict(stream.skipped), "peak_rss_mb": peak_rss_mb()})
    skipped = dict(sum((Counter(r["skipped"]) for r in per_rank), Counter()))
    result = {"stage": "train", "method": tc.method, "target_source": tc.target_source,
              "steps": state.step, "samples": state.samples, "wall_s": wall,
              "trainable_params": trainable,
              "peak_rss_mb": max(r["peak_rss_mb"] for r in per_rank),
              "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in per_rank],
              "peak_gpu_mb": (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
              "samples_per_s": mean_rate(state.history),
              "skipped": skipped, "old_model_loaded": old is not None,
              "final_loss": state.history[-1]["loss"] if state.history else None,
              "adapters_path": f"{stage_dir}/{ADAPTERS_FILE}", "world_size": ctx.world_size,
              "precision": precision}
    if skipped and ctx.is_main:
        print(f"[train] skipped bad samples (all ranks): {skipped}", file=sys.stderr)
    # Collective (a ZeRO-3 all-gather): every rank enters, rank 0 alone writes.
    with backend.gathered():
        if ctx.is_main:
            storage.save_torch(model.trainable_state_dict(), storage.join(stage_dir, ADAPTERS_FILE))
    if ctx.is_main:
        write_manifest(stage_dir, "adapters", config=to_dict(cfg),
                       inputs={"train_shards": tc.train_shards, "targets": tc.targets,
                               "phi": cfg.stage_dir("phi") if tc.phi_init == "stage1" else None},
                       counts={"steps": state.step, "samples": state.samples,
                               "skipped": skipped},
                       result=result, history=state.history)
    ctx.barrier()
    return result
