"""Tiny open_clip architecture configs for the models tests (written to a tmp dir, registered by name)."""

import json

TINY = {"embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
# Same shapes except widths: a checkpoint of this one must not load into TINY.
TINY_WIDE = {"embed_dim": 24,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def write_configs(d):
    for name, cfg in (("xbt-test-tiny", TINY), ("xbt-test-tiny-wide", TINY_WIDE)):
        (d / f"{name}.json").write_text(json.dumps(cfg))
    return str(d)
