"""Numeric precision of a training step: which dtype the forward runs in, and what stays fp32.

`dist.precision` (fp32 | bf16 | fp16; default bf16 on a GPU, fp32 on CPU) is resolved per worker
against its device by `resolve_precision`, and the stages wrap each forward in `forward_autocast`.
The policy, and why:
- Parameters stay fp32, trainable and frozen alike. The optimiser (plain AdamW or a DeepSpeed
  ZeRO 0-3 engine, whose own bf16/fp16 modes stay OFF) therefore updates fp32 weights: these ARE
  the master weights, on every ZeRO stage including 0, where DeepSpeed's bf16 mode would run AdamW
  on bf16 weights with no fp32 copy. Gradients and their all-reduce are fp32 too, which
  costs little: only adapters and phi (~8M parameters in the paper setting) have gradients.
- `torch.autocast` runs matmuls/convolutions/attention of the forward in bf16 (the towers' cost)
  and keeps autocast's fp32 ops (softmax, layer norm, losses) in fp32. Inputs may be any float
  dtype (fp32 images, fp16 embedding rows): autocast casts at each op, so no "mat1 and mat2 must
  have the same dtype".
- Embeddings leave the forward as fp32 (`fp32_unit`), and the logits, InfoNCE and logit scale
  are computed outside autocast, in fp32: a bf16 logit has 8 mantissa bits, i.e. +-0.4 at a logit
  of 100 (CLIP's max scale), which is the size of the margins the contrastive loss learns from.
- Frozen towers are NOT stored in bf16. It would save 2 bytes per frozen parameter (0.86 GB for
  ViT-L/14, ~1 % of an 80 GB GPU), but training would then see other base weights than evaluation
  and serving, which rebuild the fp32 model from its reference; and peft's merged LoRA forward and
  `LayerNormDelta` would mix dtypes. The cost we accept instead: autocast re-casts frozen weights
  at every op (it caches casts only of leaf tensors that require grad), a weight-sized copy per
  layer per forward, small next to activations at training batch sizes.
- fp16 is refused (ConfigError at load time, see `DistConfig`): its 5 exponent bits need dynamic
  loss scaling, and neither our plain-PyTorch backend nor the ZeRO engines with fp32 parameters
  apply a scaler here (DeepSpeed's fp16 mode would cast every parameter to fp16). bf16 has fp32's
  range and needs none.

On Ray each DeepSpeed engine gets the same autocast through its `torch_autocast` config section
(`build_ds_config`): DeepSpeed switches an autocast entered outside `engine(...)` off inside it.
Model and loss code stay free of precision logic; the stages' `step_fn`s and `build_ds_config`
are the only users of this module.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from xbt_dist.config import FP16_REFUSED, PRECISIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str | None, device: torch.device | str) -> str:
    """The precision a worker on `device` runs: `requested`, or bf16 on CUDA / fp32 elsewhere."""
    device = torch.device(device)
    if requested is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"dist.precision={requested!r} is invalid: expected one of {PRECISIONS}")
    if requested == "fp16":
        raise ValueError(FP16_REFUSED)
    if (requested == "bf16" and device.type == "cuda" and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise ValueError(f"dist.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support "
                         "(pre-Ampere GPU). Fix: set dist.precision=fp32.")
    return requested


def forward_autocast(precision: str, device: torch.device | str) -> ContextManager:
    """Autocast context for the forward of a `precision` step on `device` (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def fp32_unit(x: torch.Tensor) -> torch.Tensor:
    """An L2-normalised embedding in fp32: as is when already fp32, re-normalised in fp32 when an
    autocast forward produced it in 16 bits (its norm is then 1 only to ~3 significant digits)."""
    return x if x.dtype == torch.float32 else torch.nn.functional.normalize(x.float(), dim=-1)
