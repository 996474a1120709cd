"""Parameter report (paper's Table 6) on meta-device architectures: no allocation, no downloads."""

import json

from xbt_dist.config import ModelRef
from xbt_dist.models.adapters import AdapterConfig
from xbt_dist.models.params import format_report, parameter_report


def test_b32_to_l14_matches_paper():
    r = parameter_report(ModelRef("ViT-B-32"), ModelRef("ViT-L-14"), AdapterConfig())
    assert r["phi"] == 6_820_352 and r["phi_shape"] == [768, 2048, 2048, 512]
    assert r["new_model"] == 427_616_513
    assert r["full_tune"] == r["new_model"] + r["phi"]
    assert abs(r["full_tune"] / 1e6 - 434.45) < 0.02          # paper: 434.45M
    assert r["phi"] < r["lora_only"] < r["xbt"] < 0.03 * r["full_tune"]
    assert r["xbt"] == r["lora"] + r["prompts"] + r["layernorm"] + r["phi"]
    assert "434.44M" in format_report(r)


def test_tiny_counts_follow_config(tmp_path):
    cfg = {"embed_dim": 24,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "xbt-params-tiny.json").write_text(json.dumps(cfg))
    ref = ModelRef("xbt-params-tiny", config_dir=str(tmp_path))
    r = parameter_report(ref, ref, AdapterConfig(lora_rank=2, tune_layernorm=False), phi_hidden=8, phi_depth=2)
    # per attention block: in_proj A [2, 32] + B [96, 2] and out_proj A [2, 32] + B [32, 2]; 2+2 blocks
    assert r["lora"] == 4 * (2 * 32 + 96 * 2 + 2 * 32 + 32 * 2)
    assert r["prompts"] == 4 * 32 + 4 * 32 and r["layernorm"] == 0
    assert r["phi"] == (24 * 8 + 8) + (8 * 24 + 24)
