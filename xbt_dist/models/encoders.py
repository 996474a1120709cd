"""One dual-encoder interface over the model backends (docs/architecture.md, "Encoder backends").

Every stage, `xbt embed`, eval, the index and the serving path get their models here:
`load_encoder(ModelRef)` returns a `ClipBundle` (model + val/train image transforms + tokenizer +
embedding dim + context length) whatever the backend, and `adapt(model, AdapterConfig)` wraps a
bundle's model with XBT's adapters (LoRA, soft prompts, LayerNorm deltas, on-off exact).

The contract a backend's model meets (what the rest of the project calls):
- `encode_image(images, normalize=False)`, `encode_text(tokens, normalize=False)`: float (n, embed_dim);
  `tokens` is the tokenizer's LongTensor (n, context_length), padding included.
- the bundle's `preprocess` / `preprocess_train` end in ToTensor, Normalize (so normalisation can
  move to the device, models.clip.split_device_normalize).
- `image_size` (int or pair) on the model or its `.visual`: the input size, for feeding an old
  model of another backend from the new model's batch.
The adapted model (`AdaptedCLIP`, `AdaptedBLIP`) adds `adapters_disabled()`, `trainable_parameters()`,
`adapter_state_dict()` / `load_adapter_state_dict()`.

Backends: `open_clip` (models.clip, the default) and `hf_blip` (models.hf_blip,
transformers BlipForImageTextRetrieval's ITC path). Old and new may use different backends.
"""

from __future__ import annotations

import torch
from torch import nn

from xbt_dist.config import AdapterConfig, ModelRef
from xbt_dist.models.clip import ClipBundle, load_clip

# The bundle is backend-neutral; the CLIP name stays for the code and tests that use it.
EncoderBundle = ClipBundle


def load_encoder(ref: ModelRef, device: str | torch.device = "cpu", requires_grad: bool = False,
                 load_weights: bool = True) -> ClipBundle:
    """Load the dual encoder named by `ref` with its backend (see `load_clip` for the arguments)."""
    if ref.backend == "open_clip":
        return load_clip(ref, device, requires_grad=requires_grad, load_weights=load_weights)
    if ref.backend == "hf_blip":
        from xbt_dist.models.hf_blip import load_blip
        return load_blip(ref, device, requires_grad=requires_grad, load_weights=load_weights)
    raise ValueError(f"model.backend={ref.backend!r} is unknown; use open_clip or hf_blip")


def adapt(model: nn.Module, cfg: AdapterConfig | None = None) -> nn.Module:
    """XBT's adapters on a backend's model (modified in place): AdaptedCLIP or AdaptedBLIP."""
    from xbt_dist.models.hf_blip import BlipDualEncoder
    if isinstance(model, BlipDualEncoder):
        from xbt_dist.models.adapters_blip import AdaptedBLIP
        return AdaptedBLIP(model, cfg)
    from xbt_dist.models.adapters import AdaptedCLIP
    return AdaptedCLIP(model, cfg)


def image_size_of(bundle: ClipBundle) -> tuple[int, int]:
    """(height, width) of the images the bundle's model takes."""
    m = bundle.model
    size = getattr(m, "image_size", None) or m.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)
