"""The `hf_blip` backend: transformers BLIP image-text retrieval models as a dual encoder.

`BlipForImageTextRetrieval` scores a pair two ways: ITM (the text encoder cross-attends to the image,
then a 2-way head) and ITC (image and text encoded apart, the [CLS] states projected by `vision_proj`
/ `text_proj` into a shared 256-d space and normalised). Only ITC gives per-item embeddings that a
gallery can index, so `BlipDualEncoder` keeps the ITC path and drops what it never runs (the ITM head
and every text layer's cross-attention). It is called like an open_clip CLIP: `encode_image(pixels,
normalize)`, `encode_text(token_ids, normalize)`; the attention mask is derived from the pad id, so
the rest of the project passes one LongTensor of tokens exactly as for open_clip.

Nothing is downloaded: `ModelRef.pretrained` is a local `save_pretrained` directory (weights, config,
tokenizer, optionally preprocessor_config.json); `pretrained=None` builds random weights from the
architecture (`ModelRef.arch`: a shipped name from hf_configs/, a config.json, or a directory).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xbt_dist.config import ModelRef

HF_CONFIG_DIR = Path(__file__).parent / "hf_configs"
DEFAULT_CONTEXT_LENGTH = 35         # BLIP's retrieval fine-tuning truncates captions to 35 tokens
# BlipImageProcessor's defaults (OpenAI CLIP statistics): used when a directory has no preprocessor_config.json
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def shipped_architectures() -> list[str]:
    return sorted(p.stem for p in HF_CONFIG_DIR.glob("*.json"))


def _config_dict(ref: ModelRef) -> dict:
    """The architecture config of `ref` as a dict: from `arch` (name, file or dir) or the pretrained dir."""
    arch = os.path.expanduser(ref.arch)
    if (HF_CONFIG_DIR / f"{ref.arch}.json").is_file():
        return json.loads((HF_CONFIG_DIR / f"{ref.arch}.json").read_text())
    if os.path.isfile(arch):
        return json.loads(Path(arch).read_text())
    if os.path.isdir(arch) and os.path.isfile(os.path.join(arch, "config.json")):
        return json.loads(Path(arch, "config.json").read_text())
    if ref.pretrained and os.path.isfile(os.path.join(os.path.expanduser(ref.pretrained), "config.json")):
        return json.loads(Path(os.path.expanduser(ref.pretrained), "config.json").read_text())
    raise ValueError(
        f"hf_blip architecture {ref.arch!r} is neither a shipped name ({', '.join(shipped_architectures())}), "
        f"nor a config.json, nor a directory with one, and model.pretrained gives no directory with a config.json. "
        f"Fix: set model.arch to one of those, or model.pretrained to a local save_pretrained directory.")


def blip_config(ref: ModelRef):
    from transformers import BlipConfig
    d = {k: v for k, v in _config_dict(ref).items() if k not in ("architectures", "transformers_version")}
    return BlipConfig(**d)


def _pretrained_dir(ref: ModelRef) -> str:
    path = os.path.expanduser(ref.pretrained)
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.pretrained={ref.pretrained!r} is not a local save_pretrained directory (no config.json "
            f"there). The hf_blip backend downloads nothing. Fix: where there is network, run "
            f"`BlipForImageTextRetrieval.from_pretrained('Salesforce/blip-itm-base-coco').save_pretrained(DIR)` "
            f"and `BlipProcessor.from_pretrained(...).save_pretrained(DIR)`, copy DIR here and set model.pretrained to it.")
    return path


def _check_same_arch(ref: ModelRef, loaded) -> None:
    """With both `arch` and `pretrained` given, the directory must hold that architecture."""
    if ref.arch == ref.pretrained or not ((HF_CONFIG_DIR / f"{ref.arch}.json").is_file()
                                          or os.path.exists(os.path.expanduser(ref.arch))):
        return          # arch is only a label
    want = blip_config(ModelRef(ref.arch, backend="hf_blip"))
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
    diff = [f"{tower}.{k}: {getattr(getattr(want, tower), k)} vs {getattr(getattr(loaded, tower), k)}"
            for tower in ("vision_config", "text_config") for k in keys
            if getattr(getattr(want, tower), k) != getattr(getattr(loaded, tower), k)]
    if diff:
        raise ValueError(f"{ref.pretrained!r} holds a different architecture than model.arch={ref.arch!r} "
                         f"({'; '.join(diff)}). Fix: set model.arch to the directory's architecture.")


class BlipDualEncoder(nn.Module):
    """BLIP's ITC towers with open_clip's calling convention (see module docstring)."""

    def __init__(self, retrieval: nn.Module, pad_token_id: int, context_length: int):
        super().__init__()
        self.vision_model = retrieval.vision_model
        self.text_encoder = retrieval.text_encoder
        self.vision_proj = retrieval.vision_proj
        self.text_proj = retrieval.text_proj
        for layer in self.text_encoder.encoder.layer:   # ITM-only weights: never run by ITC
            if hasattr(layer, "crossattention"):
                del layer.crossattention
        self.config = retrieval.config
        self.pad_token_id = int(pad_token_id)
        self.context_length = int(context_length)
        self.image_size = int(self.config.vision_config.image_size)
        self.output_dim = int(self.config.image_text_hidden_size)

    # The pieces, so adapters can insert soft prompts between them.
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        # BLIP's embeddings slice the position table to the patch count, so a smaller image would run
        # silently with the wrong positions: refuse any size but the trained one (a shape check, no sync).
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"BLIP takes {self.image_size}x{self.image_size} images, got "
                             f"{tuple(images.shape[-2:])}; fix: use the bundle's preprocess (or resize first)")
        return self.vision_model.embeddings(images)

    def image_head(self, hidden: torch.Tensor, normalize: bool) -> torch.Tensor:
        x = self.vision_model.encoder(inputs_embeds=hidden).last_hidden_state
        # post_layernorm over every token then [CLS], exactly the op order of BLIP's ITC forward.
        x = self.vision_proj(self.vision_model.post_layernorm(x)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens != self.pad_token_id).long()

    def text_head(self, tokens: torch.Tensor | None, normalize: bool, inputs_embeds=None, mask=None):
        mask = self.attention_mask(tokens) if mask is None else mask
        x = self.text_encoder(input_ids=tokens, inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        x = self.text_proj(x[:, 0])         # [CLS] state, as BLIP's ITC
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.image_head(self.image_tokens(images), normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if tokens.shape[-1] > self.context_length:
            raise ValueError(f"tokens have length {tokens.shape[-1]} > context length {self.context_length}; "
                             f"fix: tokenize with the model's tokenizer")
        return self.text_head(tokens, normalize)

    def forward(self, images=None, tokens=None, normalize: bool = True):
        return (self.encode_image(images, normalize) if images is not None else None,
                self.encode_text(tokens, normalize) if tokens is not None else None)


class HFTokenizer:
    """list[str] -> LongTensor [n, context_length] (padded, truncated), like open_clip's tokenizers.

    Its repr names the vocabulary directory and length, so evaluation feeds two models with the same
    tokenizer one tensor (eval.stream.dedup_by_repr).
    """

    def __init__(self, tokenizer, context_length: int, source: str):
        self.tokenizer, self.context_length, self.source = tokenizer, int(context_length), source

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tokenizer).__name__}, {self.source!r}, context_length={self.context_length})"


def load_tokenizer(ref: ModelRef) -> HFTokenizer:
    from transformers import AutoTokenizer
    candidates = [p for p in (ref.pretrained, ref.arch) if p and os.path.isdir(os.path.expanduser(p))]
    for path in candidates:
        path = os.path.expanduser(path)
        if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            return HFTokenizer(tok, ref.context_length or DEFAULT_CONTEXT_LENGTH, path)
    raise FileNotFoundError(
        f"no tokenizer for hf_blip model {ref.arch!r}: neither model.pretrained ({ref.pretrained!r}) nor model.arch is "
        f"a directory with tokenizer files (vocab.txt / tokenizer.json). Fix: save the processor or tokenizer "
        f"with save_pretrained into the model directory.")


def image_transforms(ref: ModelRef, image_size: int):
    """(val, train) PIL -> tensor transforms: BlipImageProcessor's resize + normalise; BLIP's train crop."""
    from open_clip.transform import _convert_to_rgb
    from torchvision import transforms as T
    mean, std, size = _MEAN, _STD, (image_size, image_size)
    proc = os.path.join(os.path.expanduser(ref.pretrained), "preprocessor_config.json") if ref.pretrained else ""
    if proc and os.path.isfile(proc):
        p = json.loads(Path(proc).read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        s = p.get("size", {})
        size = (s["height"], s["width"]) if "height" in s else size
    bicubic = T.InterpolationMode.BICUBIC
    val = T.Compose([_convert_to_rgb, T.Resize(size, interpolation=bicubic), T.ToTensor(), T.Normalize(mean, std)])
    # BLIP's retrieval fine-tuning: RandomResizedCrop(scale 0.5-1) + flip (its RandAugment is left out).
    train = T.Compose([_convert_to_rgb, T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    return val, train


def build_blip(ref: ModelRef, load_weights: bool = True, pad_token_id: int | None = None) -> BlipDualEncoder:
    """The dual encoder of `ref`: weights from the pretrained dir, or random init from the architecture."""
    from transformers import BlipForImageTextRetrieval
    if ref.pretrained and load_weights:
        path = _pretrained_dir(ref)
        retrieval = BlipForImageTextRetrieval.from_pretrained(path, local_files_only=True)
        _check_same_arch(ref, retrieval.config)
    else:
        retrieval = BlipForImageTextRetrieval(blip_config(ref))
    pad = retrieval.config.text_config.pad_token_id if pad_token_id is None else pad_token_id
    return BlipDualEncoder(retrieval, 0 if pad is None else pad, ref.context_length or DEFAULT_CONTEXT_LENGTH)


def load_blip(ref: ModelRef, device="cpu", requires_grad: bool = False, load_weights: bool = True):
    """A `ClipBundle` of the BLIP ITC encoder named by `ref` (frozen, eval mode, like load_clip)."""
    from xbt_dist.models.clip import ClipBundle
    if ref.pretrained and load_weights:
        _pretrained_dir(ref)        # a missing directory is named before its tokenizer is looked for
    else:
        _config_dict(ref)           # so is an unknown architecture
    tokenizer = load_tokenizer(ref)
    model = build_blip(ref, load_weights, tokenizer.pad_token_id)
    if tokenizer.tokenizer.vocab_size > model.config.text_config.vocab_size:
        raise ValueError(f"tokenizer of {ref.arch!r} has {tokenizer.tokenizer.vocab_size} tokens but the text "
                         f"encoder embeds {model.config.text_config.vocab_size}: they belong to different models")
    if model.context_length > model.config.text_config.max_position_embeddings:
        raise ValueError(f"model.context_length={model.context_length} exceeds the text encoder's "
                         f"{model.config.text_config.max_position_embeddings} positions; fix: lower it")
    model = model.to(device).eval().requires_grad_(requires_grad)
    val, train = image_transforms(ref, model.image_size)
    return ClipBundle(model=model, preprocess=val, preprocess_train=train, tokenizer=tokenizer,
                      embed_dim=model.output_dim, context_length=model.context_length, ref=ref)
