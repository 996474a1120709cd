"""The toy world's base models: OLD and NEW open_clip architectures (JSON configs), their
from-scratch training on `train/`, and a multi-caption retrieval recall helper.

The models are trained here, in one CPU process, because no pretrained weights can be downloaded;
the XBT pipeline then treats the checkpoints exactly like any open_clip model:
`open_clip.add_model_config(models/toy-old.json)` + `create_model("toy-old", pretrained=models/old.pt)`.

Training data is decoded once into memory (12k 64x64 images are ~150 MB as uint8): reading the
tars every epoch would cost more than the tiny models' forward pass. Each train sample carries
several paraphrases (`json["captions"]`); each epoch draws one of them per image, which is cheap
caption augmentation (image flips would break "left of" captions, so there is no image augmentation).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

OLD_ARCH = "toy-old"
NEW_ARCH = "toy-new"


def arch_configs(image_size: int = 64, context_length: int = 32) -> dict[str, dict]:
    """open_clip architecture configs of the OLD (64-d) and NEW (96-d) toy CLIPs."""
    def cfg(embed_dim, width, layers, text_width, text_layers):
        return {"embed_dim": embed_dim,
                "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                               "head_width": 32, "patch_size": 8},
                "text_cfg": {"context_length": context_length, "vocab_size": 49408,
                             "width": text_width, "heads": text_width // 32,
                             "layers": text_layers}}
    # NEW's text tower is kept at width 96: the vision tower already makes NEW ~5x OLD's cost
    # per sample, and training time on 2 CPU cores is the toy world's budget.
    return {OLD_ARCH: cfg(64, 64, 2, 64, 2), NEW_ARCH: cfg(96, 128, 3, 96, 3)}


def write_arch_configs(models_dir: str | Path, image_size: int = 64,
                       context_length: int = 32) -> dict[str, Path]:
    """Write `<models_dir>/toy-old.json`, `toy-new.json` and register them with open_clip."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, cfg in arch_configs(image_size, context_length).items():
        path = models_dir / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        open_clip.add_model_config(path)
        paths[name] = path
    return paths


# ---------------------------------------------------------------- data

def load_split(split_dir: str | Path, all_captions: bool = True) -> tuple[torch.Tensor, list[list[str]]]:
    """Decode an image-text shard set into (uint8 images [n,3,h,w], captions per image).

    Captions per image are `json["captions"]` when present (and `all_captions`), else `[txt]`."""
    import webdataset as wds

    shards = sorted(str(p) for p in Path(split_dir).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no *.tar shards in {split_dir}: generate the toy world first")
    images, caps = [], []
    for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb8"):
        images.append(torch.from_numpy(np.array(s["jpg"])).permute(2, 0, 1))
        meta = s.get("json") or {}
        caps.append(list(meta["captions"]) if all_captions and "captions" in meta else [s["txt"]])
    return torch.stack(images), caps


def normalize_images(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [n,3,h,w] -> float, normalised like open_clip's val transform (ToTensor + Normalize)."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


# ---------------------------------------------------------------- training

def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (features already L2-normalised)."""
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def contrastive_adamw(model: torch.nn.Module, lr: float, weight_decay: float, extra_no_decay=()) -> torch.optim.AdamW:
    """CLIP's AdamW recipe: weight decay on matrices except embeddings; none on gains, biases,
    embeddings and `extra_no_decay` (e.g. a learned temperature kept outside the model)."""
    named = list(model.named_parameters())
    decay = [p for nm, p in named if p.ndim >= 2 and "embedding" not in nm]
    no_decay = [p for nm, p in named if not (p.ndim >= 2 and "embedding" not in nm)] + list(extra_no_decay)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def train_clip(arch: str, train_dir: str | Path, out_path: str | Path, *, epochs: int = 8,
               batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.1,
               warmup_frac: float = 0.05, seed: int = 0, threads: int = 2,
               log_every: int = 20, data: tuple | None = None) -> dict:
    """Train open_clip `arch` from scratch on an image-text shard set; save `{"state_dict": ...}`.

    `data` = (uint8 images, captions per image) skips decoding the shards again (both models
    train on the same split). Returns a summary: steps, samples, seconds, final loss."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    tokenizer = open_clip.get_tokenizer(arch)
    model.train()
    images_u8, caps = data if data is not None else load_split(train_dir)
    n = images_u8.shape[0]
    if n < batch_size:
        raise ValueError(f"train split has {n} samples < batch_size {batch_size}; lower batch_size")
    # Tokenise every paraphrase once: [n, k, ctx]; k = max paraphrases, short lists repeat.
    k = max(len(c) for c in caps)
    flat = [c[j % len(c)] for c in caps for j in range(k)]
    tokens = tokenizer(flat).view(n, k, -1)

    # No weight decay on gains, biases, embeddings-like scalars (standard CLIP recipe).
    opt = contrastive_adamw(model, lr, weight_decay)
    steps_per_epoch = n // batch_size     # drop the ragged last batch: contrastive batches stay full
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_frac * total))
    gen = torch.Generator().manual_seed(seed)
    t0, step, loss_val = time.time(), 0, float("nan")
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        pick = torch.randint(0, k, (n,), generator=gen)     # which paraphrase this epoch
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, lr, warmup)
            img = normalize_images(images_u8[idx])
            txt = tokens[idx, pick[idx]]
            loss = clip_loss(model.encode_image(img, normalize=True),
                             model.encode_text(txt, normalize=True), model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():   # CLIP clamps the temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            if step % log_every == 0 or step == total:
                loss_val = loss.item()   # .item() is a sync point; only on log steps
                el = time.time() - t0
                sps = step * batch_size / el
                print(f"[{arch}] epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss_val:.4f} "
                      f"{sps:.0f} samples/s ETA {(total - step) * batch_size / sps:.0f}s", flush=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    torch.save({"state_dict": model.state_dict()}, tmp)
    tmp.replace(out_path)    # atomic: a half-written checkpoint never looks finished
    return {"arch": arch, "checkpoint": str(out_path), "steps": total, "samples": total * batch_size,
            "seconds": round(time.time() - t0, 1), "final_loss": round(loss_val, 4),
            "logit_scale": round(model.logit_scale.exp().item(), 2)}


def load_trained(arch: str, checkpoint: str | Path, config_path: str | Path | None = None):
    """(model in eval mode, tokenizer) through open_clip's own loader, as the pipeline loads it."""
    if config_path is not None:
        open_clip.add_model_config(config_path)
    model = open_clip.create_model(arch, pretrained=str(checkpoint))
    return model.eval(), open_clip.get_tokenizer(arch)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def encode_split(model, tokenizer, images_u8: torch.Tensor, caps: list[list[str]],
                 batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings [n,d], caption embeddings [m,d], caption -> image index [m])."""
    model.eval()
    img = torch.cat([model.encode_image(normalize_images(images_u8[i:i + batch_size]), normalize=True)
                     for i in range(0, len(images_u8), batch_size)])
    flat = [c for cs in caps for c in cs]
    owner = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    txt = torch.cat([model.encode_text(tokenizer(flat[i:i + batch_size]), normalize=True)
                     for i in range(0, len(flat), batch_size)])
    return img, txt, owner


def recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, text_owner: torch.Tensor,
            ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Multi-caption Recall@K. t2i: a caption query hits if its image is in the top K images.
    i2t: an image query hits if ANY of its captions is in the top K captions.

    The evaluation's definition (`eval.metrics`: a tie with a wrong item counts against the
    query), so the toy world's old/old and new/new numbers compare with the compatibility report.
    """
    from xbt_dist.eval.metrics import image_to_text_recall, text_to_image_recall
    t2i = text_to_image_recall(text_emb, image_emb, text_owner, ks)
    i2t = image_to_text_recall(image_emb, text_emb, text_owner, ks)
    return {**{f"t2i_R@{k}": round(t2i[f"R@{k}"], 4) for k in ks},
            **{f"i2t_R@{k}": round(i2t[f"R@{k}"], 4) for k in ks}}


def eval_recalls(arch: str, checkpoint: str | Path, eval_dir: str | Path) -> dict[str, float]:
    """Recall@1/5/10 of one trained model on the eval gallery (same model for query and gallery)."""
    model, tok = load_trained(arch, checkpoint)
    images_u8, caps = load_split(eval_dir)
    return recalls(*encode_split(model, tok, images_u8, caps))
