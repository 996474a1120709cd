"""End to end on tiny real models: embed -> stage 1 -> stage 2 -> eval, through the library and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xbt_dist.config import dump_config
from xbt_dist.pipeline import embed_for_config, run_stage
from xbt_dist.train.stage1 import run_stage1
from xbt_dist.train.stage2 import run_stage2


def test_pipeline_end_to_end(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg
    embed_for_config(cfg, batch_size=16)
    r1 = run_stage(run_stage1, cfg)
    assert r1["steps"] >= 1 and Path(r1["phi_path"]).is_file()
    # precomputed targets: the old model must never be loaded in stage 2
    import xbt_dist.train.stage2 as s2
    loaded = []
    real = s2.load_clip
    monkeypatch.setattr(s2, "load_clip", lambda ref, device: loaded.append(ref.arch) or real(ref, device))
    r2 = run_stage(run_stage2, cfg)
    assert loaded == [cfg.new.arch] and r2["old_model_loaded"] is False
    assert r2["steps"] == 3 and r2["samples"] == 24
    sd = torch.load(r2["adapters_path"], weights_only=False)
    n_saved = sum(v.numel() for part in ("adapters", "phi") for v in sd[part].values())
    n_base = sum(v.numel() for v in torch.load(cfg.new.pretrained, weights_only=False)["state_dict"].values())
    assert n_saved < n_base  # adapters + phi only, never base weights

    from xbt_dist.eval.evaluate import run_eval
    res = run_eval(cfg)
    compat = res["compat"]
    assert set(compat["cases"]) == {"old/old", "new/old", "phi/old", "xbt/old", "new/new", "xbt/xbt"}
    assert compat["on_off"]["equal"] is True  # adapters off == untouched new model, bit for bit
    for f in ("eval_json", "report_md", "recall_bars", "tsne"):
        assert Path(res["paths"][f]).stat().st_size > 0
    assert "old/old" in Path(res["paths"]["report_md"]).read_text()


def test_cli_stages_and_resume(tiny_cfg, tmp_path, capsys):
    from xbt_dist.cli import main
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(tiny_cfg))
    assert main(["embed", "--config", str(cfg_path), "--batch-size", "16"]) == 0
    assert main(["pretrain-phi", "--config", str(cfg_path)]) == 0
    assert main(["train", "--config", str(cfg_path), "--set", "train.checkpoint_every=2"]) == 0
    ckpts = Path(tiny_cfg.stage_dir("train")) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    # resuming a finished run continues from its final checkpoint and does no further step
    assert main(["train", "--config", str(cfg_path), "--resume", "--set", "train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.rindex("{\n  \"stage\": \"train\""):])["steps"] == 5
    assert main(["eval", "--config", str(cfg_path)]) == 0


def test_cli_rejects_unknown_key(tmp_path, capsys):
    from xbt_dist.cli import main
    assert main(["train", "--config", "configs/toy.yaml", "--set", "train.lr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err.replace("train.optim", "optim")
