"""Stage 1: text-only pretraining of phi (new text embedding space -> old).

phi is trained so that phi(w_new(t)) matches w_old(t) under a symmetric InfoNCE over the global
batch. Inputs come either from precomputed embedding shards (`stage1.source=embeddings`: fields
`text_new`, `text_old` written by `xbt embed`; cheapest, no encoder in the loop) or from raw text
shards with both frozen text encoders run on the fly (`stage1.source=text`).
Output: `<out_dir>/phi/phi.pt` plus a manifest; checkpoints under `<out_dir>/phi/checkpoints`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xbt_dist import storage
from xbt_dist.artifacts import write_manifest
from xbt_dist.config import RunConfig, stage1_setting, to_dict
from xbt_dist.data.embeddings import EmbeddingShardSet
from xbt_dist.data.shards import list_shards, shard_sizes
from xbt_dist.data.stream import SampleStream
from xbt_dist.data.text_stream import TextEmbeddingStream
from xbt_dist.losses import info_nce
from xbt_dist.models.encoders import load_encoder
from xbt_dist.models.phi import Phi
from xbt_dist.train.context import WorkerContext
from xbt_dist.train.loop import LoopPlan, run_loop
from xbt_dist.train.precision import forward_autocast, fp32_unit, resolve_precision
from xbt_dist.train.progress import mean_rate, peak_rss_mb
from xbt_dist.train.tracking import open_trackers

PHI_FILE = "phi.pt"


class PhiModule(nn.Module):
    """phi plus a learnable temperature: the whole trainable state of stage 1."""

    def __init__(self, phi: Phi, temperature: float):
        super().__init__()
        self.phi = phi
        self.log_logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))

    def forward(self, w_new: torch.Tensor):
        return F.normalize(self.phi(w_new), dim=-1), self.log_logit_scale.exp().clamp(max=100.0)


def save_phi(path: str | Path, phi: Phi, cfg: RunConfig, d_new: int, d_old: int) -> None:
    """Write phi to a local path or fsspec URL (atomically, see `xbt_dist.storage`)."""
    storage.save_torch({"phi": phi.state_dict(), "d_new": d_new, "d_old": d_old,
                "hidden": cfg.phi.hidden, "depth": cfg.phi.depth,
                "old": to_dict(cfg)["old"], "new": to_dict(cfg)["new"]}, str(path))


def load_phi(path: str | Path) -> Phi:
    """Load a stage-1 phi checkpoint written by `save_phi`."""
    if not storage.exists(path):
        raise FileNotFoundError(f"phi checkpoint {path} not found: run `xbt pretrain-phi` first "
                                "(or set train.phi_init=random)")
    blob = storage.load_torch(path)
    if not isinstance(blob, dict) or "phi" not in blob:
        raise ValueError(f"{path} is not a phi checkpoint written by `xbt pretrain-phi`")
    phi = Phi(blob["d_new"], blob["d_old"], blob["hidden"], blob["depth"])
    phi.load_state_dict(blob["phi"])
    return phi


def _count(src: str, embeddings: bool) -> int:
    if embeddings:
        return sum(EmbeddingShardSet(src).counts().values())
    sizes = shard_sizes(src)
    return sum(sizes.values()) if sizes else len(list_shards(src))


def run_stage1(cfg: RunConfig, ctx: WorkerContext | None = None, resume: bool = False) -> dict:
    ctx = ctx or WorkerContext()
    s1 = cfg.stage1
    warn = ctx.rank == 0  # the stage1.* <- train.* fallback note, once per run
    seed = stage1_setting(cfg, "seed", warn)
    stage_dir = cfg.stage_dir("phi")
    local_batch = s1.batch_size // (ctx.world_size * s1.optim.grad_accum)
    if local_batch < 1:
        raise ValueError(f"stage1.batch_size={s1.batch_size} is smaller than workers x grad_accum")
    t0 = time.perf_counter()
    precision = resolve_precision(cfg.dist.precision, ctx.device)
    loaders = s1.num_workers if s1.num_workers is not None else int(s1.source == "text")
    if s1.source == "embeddings":
        if not s1.embeddings:
            raise ValueError("stage1.source=embeddings needs stage1.embeddings (run `xbt embed` on the text corpus)")
        emb = EmbeddingShardSet(s1.embeddings)
        emb.check_fields(["text_new", "text_old"])
        d_new, d_old = emb.dims["text_new"], emb.dims["text_old"]
        # memory-mapped, block-shuffled fp16 rows with a global cursor (data/text_stream.py)
        stream = TextEmbeddingStream(s1.embeddings, batch_size=local_batch,
                                     fields={"w_new": "text_new", "w_old": "text_old"},
                                     rank=ctx.rank, world_size=ctx.world_size, seed=seed,
                                     drop_last=True, num_workers=loaders,
                                     pin_memory=ctx.device.type == "cuda")
        encode = None
    else:
        if not s1.text_shards:
            raise ValueError("stage1.source=text needs stage1.text_shards (a text shard set)")
        old, new = load_encoder(cfg.old, ctx.device), load_encoder(cfg.new, ctx.device)
        d_new, d_old = new.embed_dim, old.embed_dim
        stream = SampleStream(s1.text_shards, mode="text", batch_size=local_batch,
                              rank=ctx.rank, world_size=ctx.world_size, seed=seed,
                              shuffle_buffer=4096, drop_last=True, num_workers=loaders,
                              pin_memory=ctx.device.type == "cuda",
                              max_bad_fraction=cfg.data.max_bad_fraction,
                              read_retries=cfg.data.read_retries)

        @torch.no_grad()
        def encode(captions):  # both frozen text towers, each with its own tokenizer
            w_new = new.model.encode_text(new.tokenizer(captions).to(ctx.device), normalize=True)
            w_old = old.model.encode_text(old.tokenizer(captions).to(ctx.device), normalize=True)
            return w_new, w_old

    torch.manual_seed(seed)  # same init (phi, prompts, LoRA) on every run and rank
    n = _count(s1.embeddings if encode is None else s1.text_shards, encode is None)
    total_steps = max(1, int(s1.epochs * n) // s1.batch_size)
    module = PhiModule(Phi(d_new, d_old, cfg.phi.hidden, cfg.phi.depth), s1.temperature).to(ctx.device)
    backend = ctx.make_backend(module, s1.optim, total_steps, local_batch)

    def step_fn(batch):
        # Embedding rows may arrive in any float dtype (fp16 on disk): converted on the device.
        with forward_autocast(precision, ctx.device):
            if encode is None:
                w_new, w_old = (F.normalize(batch[k].to(ctx.device, non_blocking=True).float(), dim=-1)
                                for k in ("w_new", "w_old"))
            else:
                w_new, w_old = encode(batch["captions"])
            phi_w, scale = backend.module(w_new)
        # logits and loss in fp32, outside autocast (xbt_dist.train.precision)
        loss = info_nce(fp32_unit(phi_w), fp32_unit(w_old), scale.float(), ctx.rank, ctx.world_size)
        return loss, {"text_to_old_text": loss.detach()}

    plan = LoopPlan(name="phi", total_steps=total_steps, global_batch=s1.batch_size, stage_dir=stage_dir,
                    checkpoint_every=stage1_setting(cfg, "checkpoint_every", warn),
                    log_every=stage1_setting(cfg, "log_every", warn),
                    resume=resume, tb_dir=f"{stage_dir}/tb",
                    trackers=open_trackers(cfg, "phi", stage_dir, ctx.rank, resume))
    state = run_loop(plan, ctx, backend, stream, step_fn)
    peaks = ctx.gather(peak_rss_mb())  # every rank's own high-water mark
    result = {"stage": "phi", "steps": state.step, "samples": state.samples,
              "wall_s": time.perf_counter() - t0, "d_new": d_new, "d_old": d_old,
              "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
              "final_loss": state.history[-1]["loss"] if state.history else None,
              "samples_per_s": mean_rate(state.history),
              "peak_rss_mb": max(peaks), "peak_rss_mb_per_rank": peaks,
              "phi_path": f"{stage_dir}/{PHI_FILE}", "precision": precision}
    # Collective (a ZeRO-3 all-gather): every rank enters, rank 0 alone writes.
    with backend.gathered():
        if ctx.is_main:
            save_phi(storage.join(stage_dir, PHI_FILE), module.phi, cfg, d_new, d_old)
    if ctx.is_main:
        write_manifest(stage_dir, "phi", config=to_dict(cfg),
                       inputs={"source": s1.source, "data": s1.embeddings or s1.text_shards},
                       counts={"steps": state.step, "samples": state.samples}, result=result,
                       history=state.history)
    ctx.barrier()
    return result
