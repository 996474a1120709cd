"""Trainable-parameter report (the paper's Table 6) from randomly initialised architectures.

Models are built on the meta device: shapes only, no memory, no downloads, so ViT-L/14 costs
nothing. Rows (our definitions; the paper does not spell them out):

- `phi`: the projection alone.
- `full_tune`: every weight of the NEW model + phi (paper's Full-tune, 434.45M for B/32 -> L/14).
- `lora_only`: LoRA adapters + phi, no prompts and no LayerNorm tuning (paper's LoRA-only).
- `xbt`: LoRA + soft prompts + LayerNorm deltas (as configured) + phi (paper's XBT).
Components (`lora`, `prompts`, `layernorm`) are listed separately so other combinations can be read off.
"""

from __future__ import annotations

import dataclasses

import open_clip
import torch

from xbt_dist.config import ModelRef
from xbt_dist.models.adapters import AdaptedCLIP, AdapterConfig
from xbt_dist.models.clip import _check_arch, embed_dim_of, register_model_configs
from xbt_dist.models.phi import phi_num_params


def _meta_model(ref: ModelRef):
    if ref.config_dir:
        register_model_configs(ref.config_dir)
    _check_arch(ref.arch)
    with torch.device("meta"):      # parameters get shapes but no storage
        return open_clip.create_model(ref.arch, pretrained=None, device="meta")


def _count(params) -> int:
    return sum(p.numel() for p in params)


def parameter_report(old_ref: ModelRef, new_ref: ModelRef, adapter_cfg: AdapterConfig | None = None,
                     phi_hidden: int = 2048, phi_depth: int = 3) -> dict:
    """Trainable parameter counts for Full-tune, LoRA-only, XBT and phi (see module docstring)."""
    cfg = adapter_cfg or AdapterConfig()
    old = _meta_model(old_ref)
    d_old = embed_dim_of(old)
    del old
    new = _meta_model(new_ref)
    d_new = embed_dim_of(new)
    n_new = _count(new.parameters())
    adapted = AdaptedCLIP(new, dataclasses.replace(cfg, full_tune=False))
    names = adapted.adapter_state_dict().keys()
    params = dict(adapted.named_parameters())
    lora = _count(params[n] for n in names if "lora_" in n)
    prompts = _count(params[n] for n in names if n.endswith("_prompts"))
    layernorm = _count(params[n] for n in names if n.endswith("_delta"))
    phi = phi_num_params(d_new, d_old, phi_hidden, phi_depth)
    return {
        "old": old_ref.arch, "new": new_ref.arch, "d_old": d_old, "d_new": d_new,
        "phi_shape": [d_new] + [phi_hidden] * (phi_depth - 1) + [d_old],
        "new_model": n_new, "phi": phi, "lora": lora, "prompts": prompts, "layernorm": layernorm,
        "full_tune": n_new + phi,
        "lora_only": lora + phi,
        "xbt": lora + prompts + layernorm + phi,
        "adapter_config": dataclasses.asdict(cfg),
    }


def format_report(report: dict) -> str:
    """Markdown table of a `parameter_report` result, in millions like the paper."""
    rows = [("Full-tune", report["full_tune"]), ("LoRA-only", report["lora_only"]), ("XBT", report["xbt"]),
            ("phi", report["phi"])]
    lines = [f"trainable parameters, {report['old']} -> {report['new']}", "",
             "| method | trainable | millions |", "|---|---:|---:|"]
    lines += [f"| {name} | {n:,} | {n / 1e6:.2f}M |" for name, n in rows]
    return "\n".join(lines)
