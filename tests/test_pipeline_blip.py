"""A BLIP new model (hf_blip backend) against an open_clip old gallery, through the CLI:
`xbt embed` -> `xbt pretrain-phi` -> `xbt train` -> `xbt eval` (old and new of different backends)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from hf_tiny import save_tiny_blip  # noqa: E402
from test_pipeline import _printed  # noqa: E402

from xbt_dist.config import ModelRef, dump_config  # noqa: E402


def test_blip_new_against_open_clip_old_end_to_end(tiny_cfg, tmp_path, capsys):
    from xbt_dist.cli import main
    from xbt_dist.data.embeddings import EmbeddingShardSet
    cfg = tiny_cfg
    blip = save_tiny_blip(tmp_path / "tiny-blip")
    cfg.new = ModelRef("tiny-blip", pretrained=str(blip), backend="hf_blip", context_length=24)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(cfg))

    assert main(["embed", "--config", str(cfg_path), "--batch-size", "16"]) == 0
    _printed(capsys.readouterr().out)
    emb = EmbeddingShardSet(cfg.stage1.embeddings)
    assert emb.dims["text_new"] == 16 and emb.dims["text_old"] == 16      # BLIP ITC 16-d, open_clip old 16-d
    assert main(["pretrain-phi", "--config", str(cfg_path)]) == 0
    phi = _printed(capsys.readouterr().out)[-1]
    assert phi["steps"] >= 1 and np.isfinite(phi["final_loss"])

    assert main(["train", "--config", str(cfg_path)]) == 0
    train = _printed(capsys.readouterr().out)[-1]
    assert train["steps"] == 3 and train["samples"] == 24 and np.isfinite(train["final_loss"])
    assert train["old_model_loaded"] is False
    sd = torch.load(train["adapters_path"], weights_only=False)
    keys = list(sd["adapters"])
    # LoRA on both BLIP towers' attention, both prompt sets, LN deltas: and no base weight
    assert any("vision_model" in k and "qkv.lora_A" in k for k in keys)
    assert any("text_encoder" in k and "query.lora_A" in k for k in keys)
    assert {"visual_prompts", "text_prompts"} <= set(keys)
    assert all("lora_" in k or k.endswith(("_delta", "_prompts")) for k in keys)

    assert main(["eval", "--config", str(cfg_path)]) == 0
    ev = _printed(capsys.readouterr().out)[-1]
    result = json.loads(Path(ev["report"]["eval_json"]).read_text())
    compat = result["compat"]
    assert {"old/old", "new/old", "xbt/old", "new/new", "xbt/xbt"} <= set(compat["cases"])
    assert compat["on_off"]["equal"] is True       # adapters off == untouched BLIP, in every eval


def test_blip_old_run_online_for_an_open_clip_new(tiny_cfg, tmp_path, capsys):
    """The paper's Base (old model online) with a BLIP old: its tokenizer and input size are its own."""
    from xbt_dist.cli import main
    cfg = tiny_cfg
    cfg.old = ModelRef("tiny-blip", pretrained=str(save_tiny_blip(tmp_path / "tiny-blip")), backend="hf_blip")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(cfg))
    assert main(["train", "--config", str(cfg_path), "--set", "train.method=base"]) == 0
    train = _printed(capsys.readouterr().out)[-1]
    assert train["old_model_loaded"] is True and train["steps"] == 3 and np.isfinite(train["final_loss"])


def test_query_encoder_serves_a_blip_new_model(tiny_cfg, tmp_path):
    """The index / serving encoders load a BLIP new model next to an open_clip old one."""
    from PIL import Image

    from xbt_dist.index.encoders import QueryEncoder
    cfg = tiny_cfg
    cfg.new = ModelRef("tiny-blip", pretrained=str(save_tiny_blip(tmp_path / "tiny-blip")), backend="hf_blip")
    enc = QueryEncoder(cfg, views=("old", "new"))
    texts = enc.texts("new", ["a red cube", "two blue balls"])
    images = enc.images("new", [Image.new("RGB", (40, 30), (200, 0, 0))])
    assert texts.shape == (2, 16) and images.shape == (1, 16)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    assert enc.texts("old", ["a red cube"]).shape == (1, 16)
