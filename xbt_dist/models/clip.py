"""Loading open_clip models by reference (architecture + pretrained tag or local checkpoint).

`load_clip(ModelRef)` is the one way the project builds a CLIP model: it registers extra JSON
architecture configs, creates the model with its val/train transforms and tokenizer, and turns
open_clip's low-level failures (KeyError on an unknown name, a state-dict size mismatch, a network
error) into errors that say what is wrong and how to fix it.
"""

from __future__ import annotations

import contextlib
import logging

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
from torch import nn

from xbt_dist.config import ModelRef

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


@dataclass
class ClipBundle:
    """An open_clip model plus everything needed to feed it."""
    model: nn.Module                    # open_clip CLIP, eval mode
    preprocess: Callable                # val transform: PIL image -> tensor
    preprocess_train: Callable          # train transform (augmentation as configured by open_clip)
    tokenizer: Callable                 # list[str] -> LongTensor [n, context_length]
    embed_dim: int                      # dimension of the (projected) image/text embeddings
    context_length: int                 # text context length of the model and tokenizer
    ref: ModelRef                       # what was loaded


def register_model_configs(path_or_dir: str | os.PathLike) -> None:
    """Register one open_clip JSON architecture config, or every `*.json` in a directory."""
    path = Path(path_or_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"model config path {str(path)!r} does not exist; pass a JSON open_clip model config or a "
            f"directory of them (model.config_dir)")
    if path.is_file() and path.suffix != ".json":
        raise ValueError(f"model config {str(path)!r} is not a .json open_clip model config")
    open_clip.add_model_config(path)


def _is_checkpoint_path(pretrained: str) -> bool:
    # A tag is a bare identifier ("openai", "laion2b_s34b_b79k"); anything path-like is a local file.
    return (os.sep in pretrained or "/" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
            or os.path.exists(pretrained))


def _check_arch(arch: str) -> None:
    names = open_clip.list_models()
    if arch in names or arch.startswith(("hf-hub:", "local-dir:")):
        return
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"unknown open_clip architecture {arch!r}.{hint} Fix: use a name from open_clip.list_models(), or "
        f"put a JSON config named {arch}.json into a directory and set model.config_dir to it.")


def _check_tag(arch: str, tag: str) -> None:
    if open_clip.get_pretrained_cfg(arch, tag):
        return
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ValueError(
        f"pretrained={tag!r} is neither an existing checkpoint file nor an open_clip pretrained tag of "
        f"{arch!r} (known tags: {', '.join(tags) or 'none'}). Fix: pass a local checkpoint path or a known tag.")


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()
    root = logging.getLogger()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def needs_quick_gelu(ref: ModelRef) -> bool:
    """Must `ref`'s towers use QuickGELU? `ref.quick_gelu` if set, else the pretrained tag's flag.

    open_clip's registry marks the weights trained with QuickGELU (`quick_gelu: True` in the tag's
    config: every `openai` tag, and some others), but `create_model("ViT-B-32", "openai")` builds the
    architecture's GELU anyway and only logs a warning, so the OpenAI weights run with the wrong
    activation. A local checkpoint path says nothing about its activation: False unless set.
    """
    if ref.quick_gelu is not None:
        return bool(ref.quick_gelu)
    if ref.pretrained is None or _is_checkpoint_path(ref.pretrained):
        return False
    return bool(open_clip.get_pretrained_cfg(ref.arch, ref.pretrained).get("quick_gelu", False))


def load_clip(ref: ModelRef, device: str | torch.device = "cpu", requires_grad: bool = False,
              load_weights: bool = True) -> ClipBundle:
    """Create the open_clip model named by `ref` (random init when ref.pretrained is None).

    The model is frozen unless `requires_grad=True`: a bundle is for inference, and torch picks
    different (last-bit) matmul kernels for weights that require grad, so only a frozen untouched model
    matches `AdaptedCLIP.adapters_disabled()` bit for bit.
    `load_weights=False` builds the architecture `ref`'s weights need (QuickGELU included) with random
    init, reading and downloading nothing: for parameter counts and offline tests.
    """
    if ref.config_dir:
        register_model_configs(ref.config_dir)
    _check_arch(ref.arch)
    pretrained = ref.pretrained
    checkpoint = None
    if pretrained is not None:
        if _is_checkpoint_path(pretrained):
            checkpoint = os.path.expanduser(pretrained)
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(
                    f"checkpoint file {checkpoint!r} for {ref.arch!r} does not exist. Fix: check model.pretrained "
                    f"(a local state-dict file), or set it to an open_clip tag or to null for random init.")
        else:
            _check_tag(ref.arch, pretrained)

    quick_gelu = needs_quick_gelu(ref)
    if not load_weights:
        pretrained = checkpoint = None
    try:
        # Load the checkpoint ourselves (below) so a mismatch surfaces here with both names in the error.
        # open_clip would then log "No pretrained weights loaded ... initialized randomly", which is
        # untrue once the checkpoint is loaded: silence that one record.
        with _quiet_random_init_warning(checkpoint is not None):
            model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
                ref.arch, pretrained=None if checkpoint else pretrained, device="cpu",
                force_quick_gelu=quick_gelu)
    except (OSError, RuntimeError, ConnectionError) as e:
        if pretrained is None or checkpoint:
            raise
        raise RuntimeError(
            f"pretrained tag {pretrained!r} of {ref.arch!r} needs a download, which failed ({type(e).__name__}: "
            f"{e}). This machine is probably offline. Fix: download the weights where there is network and set "
            f"model.pretrained to the local file path (or pre-fill the HF/open_clip cache).") from e
    if checkpoint:
        try:
            open_clip.load_checkpoint(model, checkpoint, strict=True)
        except (RuntimeError, KeyError) as e:
            # load_state_dict reports size mismatches and missing/unexpected keys as RuntimeError.
            raise ValueError(
                f"checkpoint {checkpoint!r} was saved from a different architecture than {ref.arch!r} "
                f"({str(e).splitlines()[0]} ...). Fix: set model.arch to the architecture the checkpoint was "
                f"trained with.\n{e}") from e
    model = model.to(device).eval().requires_grad_(requires_grad)
    tokenizer = open_clip.get_tokenizer(ref.arch)
    return ClipBundle(model=model, preprocess=preprocess, preprocess_train=preprocess_train,
                      tokenizer=tokenizer, embed_dim=embed_dim_of(model),
                      context_length=int(model.context_length), ref=ref)


def embed_dim_of(model: nn.Module) -> int:
    """Dimension of the model's image/text embeddings (the CLIP joint space)."""
    visual = model.visual
    if getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if proj is not None:
        return int(proj.shape[1])
    raise ValueError(f"cannot tell the embedding dimension of {type(model).__name__}")


class DeviceNormalize:
    """uint8 image batch -> the float input the model expects: ToTensor + Normalize, on any device.

    Same operations in the same order as torchvision's `ToTensor` (x / 255 in fp32) and
    `Normalize` ((x - mean) / std), so the result equals the host-side transform up to fp rounding
    of the elementwise kernels. Batches travel host -> device as uint8: a quarter of the bytes of
    fp32 through DataLoader shared memory, pinned buffers and the PCIe copy.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._cache: dict = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize expects a uint8 image batch, got {images.dtype}")
        key = images.device
        if key not in self._cache:  # per-device constants, made once (not a sync point afterwards)
            self._cache[key] = tuple(torch.tensor(v, dtype=torch.float32, device=key).view(-1, 1, 1)
                                     for v in (self.mean, self.std))
        mean, std = self._cache[key]
        return images.to(torch.float32).div(255).sub_(mean).div_(std)


def split_device_normalize(transform: Callable) -> tuple[Callable, DeviceNormalize]:
    """Split an open_clip image transform into its host part (PIL -> uint8 CHW tensor) and the
    `DeviceNormalize` that finishes it on the training device.

    The host part keeps every PIL step (random resized crop, RGB conversion, any colour
    augmentation) and replaces `ToTensor` + `Normalize` with `PILToTensor` (uint8, no scaling).
    Raises ValueError for a transform that does not end in ToTensor, Normalize (e.g. a timm one).
    """
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        raise ValueError(f"cannot move normalisation to the device: the image transform {transform!r} "
                         "does not end in ToTensor(), Normalize(...)")
    norm = steps[-1]
    if norm.inplace:
        raise ValueError("an in-place Normalize cannot be split off")
    return T.Compose(steps[:-2] + [T.PILToTensor()]), DeviceNormalize(norm.mean, norm.std)
