"""The toy world's BLIP-architecture base models (hf_blip backend), trained from scratch by ITC.

The counterpart of `base_clip` for the paper's second family (Table 5): OLD and NEW transformers
`BlipForImageTextRetrieval` models at toy sizes, trained on `train/` with BLIP's image-text
contrastive objective (symmetric InfoNCE on the normalised `vision_proj` / `text_proj` [CLS]
features, learned temperature), and saved with `save_pretrained` next to a BERT tokenizer whose
vocabulary is the toy world's words, so the pipeline loads them exactly as it would load
`Salesforce/blip-itm-*-coco` directories. The text towers are built without cross-attention
(`is_decoder: false`): ITC never runs the ITM branch, and its random weights would only take space.
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from pathlib import Path

import torch

from xbt_dist.artifacts import atomic_write_text, config_digest, read_manifest
from xbt_dist.config import ModelRef
from xbt_dist.toy.base_clip import _lr_at, clip_loss, contrastive_adamw, load_split, normalize_images

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Weight init std of every Linear/Conv/Embedding (BlipConfig.initializer_range, which BLIP's _init_weights
# reads for both towers). transformers' 0.02 is BERT's value for 768-wide layers; in a 64-128-wide tower
# trained from scratch it leaves the post-LN text encoder's attention uniform and its value path ~2% of
# the residual, so the [CLS] state that ITC pools is the same vector for every caption (mean pairwise
# cosine 1.000 at init, measured on the toy captions), and the first steps collapse both towers to a
# constant (ITC loss stuck at ln batch). 0.2 gives distinct [CLS] states at init (mean cosine ~0.6; the
# toy CLIP's EOT features ~0.5): on a 256-pair overfit, ITC loss after 300 steps 0.29 vs 2.14 with 0.02
# (toy CLIP 0.09); 0.1 was worse than 0.2 (3.34 vs 2.32 at 100 steps). docs/RESULTS.md, "BLIP family".
TOY_INIT_RANGE = 0.2


def write_vocab(path: Path, captions: list[list[str]]) -> Path:
    """A BERT vocab: specials, the toy world's words, and letters/digits (+ ## pieces) for anything else."""
    words = sorted({w for caps in captions for c in caps for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", c.lower())})
    chars = list(string.ascii_lowercase + string.digits)
    vocab = list(dict.fromkeys(SPECIAL + words + chars + [f"##{c}" for c in chars]))
    path.write_text("\n".join(vocab) + "\n")
    return path


def blip_config(role: str, vocab_size: int, image_size: int, context_length: int):
    """OLD: 64-wide 2-layer towers, 64-d ITC space; NEW: 128-wide 3-layer vision, 96-wide 3-layer text, 96-d
    (the toy CLIPs' sizes, so the two families cost about the same here)."""
    from transformers import BlipConfig
    vw, vl, tw, tl, d = (64, 2, 64, 2, 64) if role == "old" else (128, 3, 96, 3, 96)
    return BlipConfig(
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vw // 32,
                           image_size=image_size, patch_size=8,
                           initializer_range=0.02),     # BlipVisionConfig defaults to 1e-10: a dead tower from scratch
        text_config=dict(vocab_size=vocab_size, hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl,
                         num_attention_heads=tw // 32, max_position_embeddings=max(64, context_length),
                         encoder_hidden_size=vw, is_decoder=False, pad_token_id=0, bos_token_id=2, sep_token_id=3,
                         initializer_range=TOY_INIT_RANGE),
        image_text_hidden_size=d, initializer_range=TOY_INIT_RANGE)


def train_blip(role: str, out_dir: str | Path, data: tuple, *, image_size: int = 64, context_length: int = 32,
               epochs: int = 4, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.1,
               warmup_frac: float = 0.05, seed: int = 0, threads: int = 2, log_every: int = 20) -> dict:
    """Train a toy BLIP (`role` old/new) by ITC on (uint8 images, captions); save_pretrained into out_dir."""
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    from xbt_dist.models.hf_blip import BlipDualEncoder, HFTokenizer
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images_u8, caps = data
    tok = BertTokenizer(str(write_vocab(out / "vocab.txt", caps)), do_lower_case=True)
    retrieval = BlipForImageTextRetrieval(blip_config(role, len(tok), image_size, context_length))
    model = BlipDualEncoder(retrieval, tok.pad_token_id, context_length).train()
    tokenizer = HFTokenizer(tok, context_length, str(out))
    n, k = images_u8.shape[0], max(len(c) for c in caps)
    tokens = tokenizer([c[j % len(c)] for c in caps for j in range(k)]).view(n, k, -1)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))     # BLIP's temp, learned in log space
    opt = contrastive_adamw(model, lr, weight_decay, extra_no_decay=[log_scale])
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_frac * total))
    gen = torch.Generator().manual_seed(seed)
    t0, step, loss_val = time.time(), 0, float("nan")
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        pick = torch.randint(0, k, (n,), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, lr, warmup)
            loss = clip_loss(model.encode_image(normalize_images(images_u8[idx]), normalize=True),
                             model.encode_text(tokens[idx, pick[idx]], normalize=True), log_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                log_scale.clamp_(0, math.log(100))
            step += 1
            if step % log_every == 0 or step == total:
                loss_val = loss.item()      # a sync point: only on log steps
                print(f"[toy-blip-{role}] epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss_val:.4f} "
                      f"{step * batch_size / (time.time() - t0):.0f} samples/s", flush=True)
    retrieval.save_pretrained(out)          # the dual encoder's towers are the retrieval model's modules
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "size": {"height": image_size, "width": image_size},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return {"role": role, "dir": str(out), "steps": total, "samples": total * batch_size,
            "seconds": round(time.time() - t0, 1), "final_loss": round(loss_val, 4)}


def model_ref(model_dir: str | Path, context_length: int = 32) -> ModelRef:
    return ModelRef(Path(model_dir).name, pretrained=str(model_dir), backend="hf_blip", context_length=context_length)


def train_config(role: str, train_digest: str, epochs: int, batch_size: int, seed: int,
                 context_length: int) -> dict:
    """What a toy BLIP's weights depend on: the role's architecture, the train split (its manifest's
    digest) and the recipe. Its digest, stored in train.json, decides whether a finished model is reused."""
    return {"role": role, "train_data_digest": train_digest, "epochs": epochs,
            "batch_size": batch_size, "seed": seed, "context_length": context_length,
            "init_range": TOY_INIT_RANGE}


def _check_reusable(meta: dict, want: dict, model_dir: Path, n_train: int) -> None:
    """Raise if the finished model in `model_dir` was trained otherwise than `want` asks. Everything
    derived from it in the same run directory (embeddings, phi, stage 2) was made from that model, so a
    silent retrain or a silent reuse would both mix two models: the fix is another directory."""
    if "config_digest" in meta:
        if meta["config_digest"] == config_digest(want):
            return
        have = meta.get("config", {})
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    else:
        # Models trained before train.json recorded its config: their step count still tells the epochs.
        steps = want["epochs"] * (n_train // want["batch_size"])
        if meta.get("steps") == steps:
            return
        diff = {"steps": (meta.get("steps"), steps)}
    what = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
    raise ValueError(f"{model_dir} holds a toy BLIP trained otherwise than asked ({what}); the embeddings and runs "
                     f"beside it were made from that model. Use another output directory, or delete {model_dir} "
                     "and what was derived from it")


def train_toy_blips(world: dict, out_dir: str | Path, epochs: int = 4, batch_size: int = 128, seed: int = 0,
                    context_length: int = 32, roles: tuple[str, ...] = ("old", "new"), threads: int = 2) -> dict:
    """Train OLD then NEW toy BLIPs on the world's train/ split; a finished one is reused when it was
    trained on the same split with the same recipe, and a clear error is raised when it was not."""
    out_dir = Path(out_dir)
    train = read_manifest(world["train"])
    n_train = train["counts"]["samples"]
    data, summaries = None, {}
    for role in roles:
        d = out_dir / f"toy-blip-{role}"
        meta = d / "train.json"
        want = train_config(role, train["config_digest"], epochs, batch_size, seed, context_length)
        if meta.is_file():
            s = json.loads(meta.read_text())
            _check_reusable(s, want, d, n_train)
            summaries[role] = {**s, "skipped": True}
            continue
        if data is None:
            data = load_split(world["train"])
        s = train_blip(role, d, data, image_size=int(data[0].shape[-1]), context_length=context_length,
                       epochs=epochs, batch_size=batch_size, seed=seed, threads=threads)
        s.update(config=want, config_digest=config_digest(want))
        atomic_write_text(meta, json.dumps(s, indent=2) + "\n")
        summaries[role] = s
    return summaries
