"""Tiny random Hugging Face BLIP retrieval models saved locally for tests (nothing is downloaded).

`save_tiny_blip(dir)` writes what `Salesforce/blip-itm-*-coco` directories hold (config.json,
weights, tokenizer, preprocessor_config.json) at toy sizes: a BlipConfig with 2-layer 32-wide
towers and a BertTokenizer over a vocab of letters and word pieces, so any caption tokenizes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(path: Path) -> Path:
    chars = list(string.ascii_lowercase + string.digits) + list(",.-'")
    vocab = SPECIAL + ["a", "the", "photo", "of"] + chars + [f"##{c}" for c in chars]
    vocab = list(dict.fromkeys(vocab))
    path.write_text("\n".join(vocab) + "\n")
    return path


def tiny_blip_config(vocab_size: int, vision_width: int = 32, text_width: int = 32, image_size: int = 32,
                     layers: int = 2, embed_dim: int = 16):
    from transformers import BlipConfig
    return BlipConfig(
        vision_config=dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8,
                           initializer_range=0.02),   # BlipVisionConfig defaults to 1e-10 (weights ~0)
        text_config=dict(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=2 * text_width,
                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64,
                         encoder_hidden_size=vision_width, pad_token_id=0, bos_token_id=2, sep_token_id=3),
        image_text_hidden_size=embed_dim)


def save_tiny_blip(out: str | Path, seed: int = 0, **sizes) -> Path:
    """A random tiny BlipForImageTextRetrieval + tokenizer + preprocessor config in `out`."""
    from transformers import BertTokenizer, BlipForImageTextRetrieval
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab.txt")
    tok = BertTokenizer(str(vocab), do_lower_case=True)
    torch.manual_seed(seed)
    cfg = tiny_blip_config(len(tok), **sizes)
    BlipForImageTextRetrieval(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    size = cfg.vision_config.image_size
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "size": {"height": size, "width": size},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return out
