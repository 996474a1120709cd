"""XBT's adapters on the hf_blip backend: LoRA (peft), soft prompts, LayerNorm deltas, on-off exact.

`AdaptedBLIP(BlipDualEncoder, AdapterConfig)` has the interface of `AdaptedCLIP` (models.adapters):
only added parameters train, and `adapters_disabled()` gives the untouched BLIP bit for bit.

- LoRA via peft's plain `lora.Linear` (BLIP's attention projections are ordinary nn.Linear, so
  disabled LoRA returns `base_layer(x)` unchanged). Target modules, by tower:
    image attn: vision_model.encoder.layers.N.self_attn.{qkv, projection}
    image mlp:  vision_model.encoder.layers.N.mlp.{fc1, fc2}
    text attn:  text_encoder.encoder.layer.N.attention.self.{query, key, value}, .attention.output.dense
    text mlp:   text_encoder.encoder.layer.N.{intermediate.dense, output.dense}
- Visual prompts (VPT-shallow): after the [CLS] token, after the position embeddings (which cover
  only the original tokens); pooling is BLIP's [CLS] state, so prompts need not be dropped.
- Text soft prompts (CoOp): learnable embeddings right after [CLS], fed through `inputs_embeds` (the
  text embeddings add positions and LayerNorm); same context length, trailing tokens dropped and
  [SEP] kept at the last position if it would fall off; prompt slots are attended (mask 1).
- LayerNorm deltas: every nn.LayerNorm of the selected towers (the CLIP path's LayerNormDelta).
Model code for one device (no Ray, no DeepSpeed), like models.adapters.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from xbt_dist.config import AdapterConfig
from xbt_dist.models.adapters import LayerNormDelta, layer_adapters_disabled
from xbt_dist.models.hf_blip import BlipDualEncoder

_LORA_PATTERNS = {
    ("image", "attn"): r"vision_model\.encoder\.layers\.\d+\.self_attn\.(qkv|projection)",
    ("image", "mlp"): r"vision_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)",
    ("text", "attn"): r"text_encoder\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
    ("text", "mlp"): r"text_encoder\.encoder\.layer\.\d+\.(intermediate\.dense|output\.dense)",
}


def lora_target_regex(cfg: AdapterConfig) -> str:
    parts = [_LORA_PATTERNS[(t, k)] for t in cfg.towers for k in cfg.lora_targets]
    return rf"^({'|'.join(parts)})$"


def _tower_of(name: str) -> str | None:
    return "image" if name.startswith("vision_model.") else "text" if name.startswith("text_encoder.") else None


class AdaptedBLIP(nn.Module):
    """A BlipDualEncoder (modified in place) with XBT's adapters; base weights frozen."""

    def __init__(self, blip: BlipDualEncoder, cfg: AdapterConfig | None = None):
        super().__init__()
        cfg = cfg or AdapterConfig()
        if not isinstance(blip, BlipDualEncoder):
            raise TypeError(f"AdaptedBLIP takes a BlipDualEncoder (models.hf_blip), got {type(blip).__name__}")
        self.cfg, self.blip, self.adapters_enabled = cfg, blip, True
        self.visual_prompts = self.text_prompts = None
        if cfg.full_tune:
            blip.requires_grad_(True)
            self._adapter_names: frozenset[str] = frozenset()
            return
        blip.requires_grad_(False)
        if cfg.lora_rank > 0 and cfg.lora_targets:
            inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                               lora_dropout=cfg.lora_dropout,
                                               target_modules=lora_target_regex(cfg), bias="none"), blip)
        if cfg.tune_layernorm:
            lns = [n for n, m in blip.named_modules() if isinstance(m, nn.LayerNorm) and _tower_of(n) in cfg.towers]
            for name in lns:
                parent, _, child = name.rpartition(".")
                owner = blip.get_submodule(parent)
                setattr(owner, child, LayerNormDelta(getattr(owner, child)))
        if cfg.visual_prompts:
            width = blip.config.vision_config.hidden_size
            self.visual_prompts = nn.Parameter(width ** -0.5 * torch.randn(cfg.visual_prompts, width))
        if cfg.text_prompts:
            if cfg.text_prompts >= blip.context_length - 2:
                raise ValueError(f"AdapterConfig.text_prompts={cfg.text_prompts} leaves no room in the context "
                                 f"length {blip.context_length} ([CLS] and [SEP] need two slots)")
            width = blip.config.text_config.hidden_size
            # CoOp's N(0, 0.02) init: BERT's initializer_range, the scale of BLIP's word embeddings.
            self.text_prompts = nn.Parameter(0.02 * torch.randn(cfg.text_prompts, width))
        for n, p in self.named_parameters():
            if "lora_" in n or n.endswith(("_delta", "_prompts")):
                p.requires_grad_(True)
        self._adapter_names = frozenset(n for n, p in self.named_parameters() if p.requires_grad)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Inside, encode_* are bit-identical to the untouched BLIP encoder (the paper's on-off)."""
        if self.cfg.full_tune:
            raise RuntimeError("adapters_disabled() is meaningless with full_tune=True: the base weights "
                               "themselves are trained; keep an untouched copy of the model instead")
        prev = self.adapters_enabled
        try:
            self.adapters_enabled = False
            with layer_adapters_disabled(self.blip):
                yield
        finally:
            self.adapters_enabled = prev

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                normalize: bool = True):
        """(image_features, text_features); either input may be None. The entry point under ZeRO-3."""
        return (self.encode_image(images, normalize) if images is not None else None,
                self.encode_text(tokens, normalize) if tokens is not None else None)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.visual_prompts is None or not self.adapters_enabled:
            return self.blip.encode_image(images, normalize=normalize)
        x = self.blip.image_tokens(images)
        p = self.visual_prompts.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.blip.image_head(torch.cat([x[:, :1], p, x[:, 1:]], dim=1), normalize)

    def shift_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids with `text_prompts` pad slots after [CLS], attention mask with those slots on); same length."""
        n_p, blip = self.cfg.text_prompts, self.blip
        n, length = tokens.shape
        if length != blip.context_length:
            raise ValueError(f"tokens have length {length}, model context length is {blip.context_length}; "
                             f"fix: tokenize with the model's tokenizer at its full context length")
        last = blip.attention_mask(tokens).sum(dim=1, keepdim=True) - 1     # [SEP]: the last real token
        sep = tokens.gather(1, last)
        pad = torch.full((n, n_p), blip.pad_token_id, dtype=tokens.dtype, device=tokens.device)
        shifted = torch.cat([tokens[:, :1], pad, tokens[:, 1:length - n_p]], dim=1)
        shifted = shifted.scatter(1, (last + n_p).clamp(max=length - 1), sep)
        mask = blip.attention_mask(shifted)
        mask[:, 1:1 + n_p] = 1
        return shifted, mask

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.text_prompts is None or not self.adapters_enabled:
            return self.blip.encode_text(tokens, normalize=normalize)
        shifted, mask = self.shift_tokens(tokens)
        words = self.blip.text_encoder.embeddings.word_embeddings(shifted)
        p = self.text_prompts.to(words.dtype).expand(words.shape[0], -1, -1)
        x = torch.cat([words[:, :1], p, words[:, 1 + p.shape[1]:]], dim=1)
        return self.blip.text_head(None, normalize, inputs_embeds=x, mask=mask)

    # ---- parameters and state (same contract as AdaptedCLIP) ------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the added tensors (LoRA, prompts, LN deltas); with full_tune, the whole encoder state."""
        if self.cfg.full_tune:
            return {f"blip.{k}": v for k, v in self.blip.state_dict().items()}
        return {n: p.detach() for n, p in self.named_parameters() if n in self._adapter_names}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Strict load: keys and shapes must match this model's adapters exactly."""
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
        if missing or unexpected or shapes:
            raise ValueError(
                f"adapter state dict does not match this BLIP model and AdapterConfig ({self.cfg}): missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}. Fix: load it into the "
                f"architecture, backend and AdapterConfig it was trained with.")
        if self.cfg.full_tune:
            self.blip.load_state_dict({k[len("blip."):]: v for k, v in sd.items()}, strict=True)
            return
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)
