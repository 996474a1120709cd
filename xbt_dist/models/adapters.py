"""Adapters that make the NEW model backward compatible: LoRA (peft), soft prompts, LayerNorm deltas.

`AdaptedCLIP(clip_model, AdapterConfig)` changes an open_clip CLIP in place so that only added
parameters train (paper, stage 2), and so that switching them off restores the untouched model
bit for bit (`adapters_disabled()`; the paper's on-off property):

- LoRA via peft on attention q, k, v, out (and optionally the MLP c_fc/c_proj) of the selected towers.
  open_clip's attention is `nn.MultiheadAttention`: q/k/v live in one packed `in_proj_weight` and
  `out_proj.weight` is read directly by `F.multi_head_attention_forward`, so LoRA wrapped around
  `out_proj` as a module is silently bypassed. peft's own `lora.MultiheadAttention` handles both by
  merging the delta into the weights before each forward and subtracting it afterwards, which
  (a) replaces the nn.Parameter objects on every forward (breaks ZeRO-3 partitioned params and any
  hook keyed on them) and (b) leaves the base weights off by float rounding ((W + d) - d != W), so
  "disabled" is no longer the untouched model. `LoraMultiheadAttention` below keeps peft's layer
  (its lora_A/lora_B, scaling, config, state-dict names) but runs attention functionally with
  `W + delta` and never touches the registered parameters; it is plugged in through peft's custom
  module mapping (`LoraConfig._register_custom_module`). peft's plain `lora.Linear` does the MLP.
- Text soft prompts (CoOp): learnable token embeddings right after the start token; the context
  length is kept (trailing positions dropped, EOT kept), features pooled at the shifted EOT.
- Visual prompts (VPT-shallow): learnable tokens after the class token, added after the position
  embeddings (which cover only the original tokens) and before ln_pre/transformer.
- LayerNorm tuning as zero-initialised deltas on weight/bias, so the base LN weights stay untouched.

Model code for one device: under DeepSpeed ZeRO-3 call the module (`forward`) through the engine,
so that the engine's external-parameter discovery gathers weights read outside their module's forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNormFp32, VisionTransformer, text_global_pool
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import MultiheadAttention as PeftLoraMultiheadAttention
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# The config lives with the other configs (config.py is a leaf: it imports no model code);
# `from xbt_dist.models.adapters import AdapterConfig` keeps working.
from xbt_dist.config import AdapterConfig  # noqa: F401

_TOWER_PREFIX = {"image": r"visual\.transformer", "text": r"transformer"}


class LoraMultiheadAttention(PeftLoraMultiheadAttention):
    """peft's LoRA layer for nn.MultiheadAttention with a functional forward.

    Same parameters as peft (packed in_proj LoRA: A [r, d], B [3d, r], rows of B are q, k, v; out_proj
    LoRA in a peft lora.Linear), but the forward computes `W + delta` as temporaries and calls
    `F.multi_head_attention_forward`, so registered parameters are never replaced and, with adapters
    disabled, the call is exactly the base module's forward.
    """

    def _restore_weights(self):
        # peft re-registers the base weights here because its merge/unmerge forward unregisters them.
        # Ours never does; re-registering would replace ZeRO-3-managed Parameter objects.
        pass

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return base(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                        attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        out_lora = base.out_proj                       # peft lora.Linear wrapping the real out_proj
        w_in, w_out = base.in_proj_weight, out_lora.get_base_layer().weight
        for a in active:
            w_in = w_in + self.get_delta_weight(a).to(w_in.dtype)
            w_out = w_out + out_lora.get_delta_weight(a).to(w_out.dtype)
        batched = query.dim() == 3
        if base.batch_first and batched:               # F.multi_head_attention_forward is sequence-first
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, base.embed_dim, base.num_heads, w_in, base.in_proj_bias, base.bias_k, base.bias_v,
            base.add_zero_attn, base.dropout, w_out, out_lora.get_base_layer().bias, training=base.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if base.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights


class LayerNormDelta(nn.Module):
    """Trainable zero-initialised deltas on a frozen LayerNorm's weight and bias.

    Deltas instead of unfreezing the LN keep the base weights bit-exact for `adapters_disabled()`.
    """

    def __init__(self, base: nn.LayerNorm):
        super().__init__()
        self.base = base
        self.weight_delta = nn.Parameter(torch.zeros_like(base.weight))
        self.bias_delta = nn.Parameter(torch.zeros_like(base.bias))
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        b = self.base
        orig = x.dtype
        if isinstance(b, LayerNormFp32):   # open_clip's fp32 LN computes in fp32 for fp16/bf16 inputs
            x = x.to(torch.float32)
        x = F.layer_norm(x, b.normalized_shape, b.weight + self.weight_delta, b.bias + self.bias_delta, b.eps)
        return x.to(orig)


def _tower_of(name: str) -> str:
    return "image" if name.startswith("visual.") else "text"


def _lora_regex(cfg: AdapterConfig) -> str:
    towers = "|".join(_TOWER_PREFIX[t] for t in cfg.towers)
    parts = (["attn"] if "attn" in cfg.lora_targets else []) + \
            ([r"mlp\.c_fc", r"mlp\.c_proj"] if "mlp" in cfg.lora_targets else [])
    return rf"^({towers})\.resblocks\.\d+\.({'|'.join(parts)})$"


@contextlib.contextmanager
def layer_adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Switch off every LoRA layer (peft) and LayerNorm delta inside `model`; restore on exit.

    Shared by the adapted CLIP and BLIP encoders. Flips peft's flag directly: peft's
    enable_adapters(False) also sets requires_grad=False on the LoRA weights, which would change
    what an optimizer / ZeRO engine sees as trainable."""
    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, LayerNormDelta))]
    saved = [(m, m._disable_adapters if isinstance(m, BaseTunerLayer) else m.enabled) for m in layers]
    try:
        for m in layers:
            if isinstance(m, BaseTunerLayer):
                m._disable_adapters = True
            else:
                m.enabled = False
        yield
    finally:
        for m, state in saved:
            if isinstance(m, BaseTunerLayer):
                m._disable_adapters = state
            else:
                m.enabled = state


class AdaptedCLIP(nn.Module):
    """An open_clip CLIP (modified in place) with XBT's adapters; base weights frozen."""

    def __init__(self, clip_model: nn.Module, cfg: AdapterConfig | None = None):
        super().__init__()
        cfg = cfg or AdapterConfig()
        self.cfg = cfg
        if not hasattr(clip_model, "token_embedding") or not isinstance(clip_model.visual, VisionTransformer):
            raise TypeError(
                f"AdaptedCLIP supports open_clip CLIP models with a ViT image tower and the built-in text "
                f"transformer, got {type(clip_model).__name__} with visual={type(clip_model.visual).__name__}; "
                f"fix: use a ViT CLIP config without custom text (hf) tower")
        self.clip = clip_model
        self.adapters_enabled = True
        self.visual_prompts = self.text_prompts = None
        if cfg.full_tune:
            clip_model.requires_grad_(True)
            self._adapter_names: frozenset[str] = frozenset()
            return
        clip_model.requires_grad_(False)
        if cfg.lora_rank > 0 and cfg.lora_targets:
            lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=_lora_regex(cfg), bias="none")
            lcfg._register_custom_module({nn.MultiheadAttention: LoraMultiheadAttention})
            inject_adapter_in_model(lcfg, clip_model)
        if cfg.tune_layernorm:
            lns = [(n, m) for n, m in clip_model.named_modules()
                   if isinstance(m, nn.LayerNorm) and _tower_of(n) in cfg.towers]
            for name, ln in lns:
                parent_name, _, child = name.rpartition(".")
                setattr(clip_model.get_submodule(parent_name) if parent_name else clip_model, child,
                        LayerNormDelta(ln))
        if cfg.visual_prompts:
            width = clip_model.visual.class_embedding.shape[-1]
            # Same init scale as open_clip's class embedding, so prompts start like ordinary tokens.
            self.visual_prompts = nn.Parameter(width ** -0.5 * torch.randn(cfg.visual_prompts, width))
        if cfg.text_prompts:
            emb = clip_model.token_embedding.weight
            if cfg.text_prompts >= clip_model.context_length - 1:
                raise ValueError(f"AdapterConfig.text_prompts={cfg.text_prompts} leaves no room in the context "
                                 f"length {clip_model.context_length}")
            # CoOp initialises context vectors with N(0, 0.02): the scale of open_clip's token embeddings.
            self.text_prompts = nn.Parameter(0.02 * torch.randn(cfg.text_prompts, emb.shape[-1]))
        for n, p in self.named_parameters():
            if "lora_" in n or n.endswith(("_delta", "_prompts")):
                p.requires_grad_(True)
        self._adapter_names = frozenset(n for n, p in self.named_parameters() if p.requires_grad)

    # ---- on/off -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Inside, encode_* are bit-identical to the untouched open_clip model (the paper's on-off)."""
        if self.cfg.full_tune:
            raise RuntimeError("adapters_disabled() is meaningless with full_tune=True: the base weights "
                               "themselves are trained; keep an untouched copy of the model instead")
        prev = self.adapters_enabled
        try:
            self.adapters_enabled = False
            with layer_adapters_disabled(self.clip):
                yield
        finally:
            self.adapters_enabled = prev

    # ---- encoders -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                normalize: bool = True):
        """(image_features, text_features); either input may be None. The entry point under ZeRO-3."""
        img = self.encode_image(images, normalize) if images is not None else None
        txt = self.encode_text(tokens, normalize) if tokens is not None else None
        return img, txt

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.visual_prompts is None or not self.adapters_enabled:
            return self.clip.encode_image(images, normalize=normalize)
        v = self.clip.visual
        # open_clip VisionTransformer._embeds, with prompts inserted before ln_pre (after patch dropout,
        # so dropout never drops a prompt and position embeddings cover only the original tokens).
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        p = self.visual_prompts.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
        x = v.ln_pre(x)
        x = v.transformer(x)
        x = torch.cat([x[:, :1], x[:, 1 + p.shape[1]:]], dim=1)   # drop prompts: pooling sees cls + patches
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def _eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.clip
        if m.text_pool_type == "eos":
            return (tokens == m.text_eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)      # CLIP tokenizer: EOT has the largest id

    def shift_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids with `text_prompts` placeholder (id 0) slots after the start token, same length.

        Trailing positions are dropped; if that would drop the EOT token, it moves to the last position,
        so pooling (argmax / eos on these ids) lands on the shifted EOT.
        """
        n_p = self.cfg.text_prompts
        n, length = tokens.shape
        if length != self.clip.context_length:
            raise ValueError(f"tokens have length {length}, model context length is {self.clip.context_length}; "
                             f"fix: tokenize with the model's tokenizer at its full context length")
        eot = self._eot_index(tokens)
        eot_id = tokens.gather(1, eot[:, None])
        pad = torch.zeros(n, n_p, dtype=tokens.dtype, device=tokens.device)
        shifted = torch.cat([tokens[:, :1], pad, tokens[:, 1:length - n_p]], dim=1)
        return shifted.scatter(1, (eot + n_p).clamp(max=length - 1)[:, None], eot_id)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.text_prompts is None or not self.adapters_enabled:
            return self.clip.encode_text(tokens, normalize=normalize)
        m = self.clip
        # open_clip CLIP.encode_text with the prompt embeddings written into the placeholder slots.
        shifted = self.shift_tokens(tokens)
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(shifted).to(cast)
        p = self.text_prompts.to(cast).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], p, x[:, 1 + p.shape[1]:]], dim=1)
        x = x + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = text_global_pool(x, shifted, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    # ---- parameters and state ------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the added tensors (LoRA, prompts, LN deltas); with full_tune, the whole CLIP state."""
        if self.cfg.full_tune:
            return {f"clip.{k}": v for k, v in self.clip.state_dict().items()}
        return {n: p.detach() for n, p in self.named_parameters() if n in self._adapter_names}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Strict load: keys and shapes must match this model's adapters exactly."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
        if missing or unexpected or shapes:
            def few(keys):
                return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            raise ValueError(
                "adapter state dict does not match this model: it was saved from a different architecture or "
                f"AdapterConfig ({self.cfg}). missing: [{few(missing)}]; unexpected: [{few(unexpected)}]; "
                f"shape mismatch: [{few([f'{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}' for k in shapes])}]."
                " Fix: load it into the architecture and AdapterConfig it was trained with.")
        if self.cfg.full_tune:
            self.clip.load_state_dict({k[len("clip."):]: v for k, v in sd.items()}, strict=True)
            return
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)
