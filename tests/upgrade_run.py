"""Test helper: one trained tiny XBT run (embed -> stage 1 -> stage 2) that index/serve tests share."""

from __future__ import annotations

from pathlib import Path

TINY_OVERRIDES = [
    "phi.hidden=32", "stage1.batch_size=32", "stage1.epochs=1", "train.batch_size=8",
    "train.max_steps=3", "train.log_every=1", "train.num_workers=0", "eval.tsne_points=10",
    "adapters.text_prompts=2", "adapters.visual_prompts=2", "index.batch_size=16"]


def train_tiny_run(tiny: dict, out: Path, extra: list[str] | None = None):
    """A RunConfig over the tiny world with a finished phi and adapters below `out`."""
    from xbt_dist.pipeline import embed_for_config, run_stage, toy_run_config
    from xbt_dist.train.stage1 import run_stage1
    from xbt_dist.train.stage2 import run_stage2
    cfg = toy_run_config(tiny, Path(out), overrides=TINY_OVERRIDES + list(extra or []))
    embed_for_config(cfg, batch_size=16)
    run_stage(run_stage1, cfg)
    run_stage(run_stage2, cfg)
    return cfg


def other_old_checkpoint(tiny: dict, out: Path) -> str:
    """A checkpoint of the tiny old architecture with other weights (another old model)."""
    import open_clip
    import torch
    torch.manual_seed(123)
    model = open_clip.create_model(tiny["old_arch"])
    path = Path(out) / "other_old.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)
