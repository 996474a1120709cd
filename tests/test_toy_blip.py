"""Toy BLIP base models (xbt_dist.toy.base_blip): ITC training from scratch, saved so the hf_blip
backend loads exactly the trained towers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from xbt_dist.models.encoders import load_encoder  # noqa: E402
from xbt_dist.toy.base_blip import model_ref, train_blip  # noqa: E402


@pytest.mark.slow     # ~110 s on the shared 2-core machine (80 small steps)
def test_train_blip_saves_the_trained_model_and_learns(tmp_path):
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    caps = []
    for i in range(8):        # one flat colour per image: an easy ITC task
        c = i % 4
        images[i, c % 3] = 255 if c < 3 else 0
        if c == 3:
            images[i, :2] = 255
        images[i] = (images[i].int() + torch.from_numpy(rng.integers(0, 20, (3, 16, 16)))).clamp(0, 255).to(torch.uint8)
        caps.append([f"a {colours[c]} square", f"the colour {colours[c]}"])
    s = train_blip("old", tmp_path / "toy-blip-old", (images, caps), image_size=16, context_length=12,
                   epochs=80, batch_size=8, lr=2e-3, log_every=1000)
    assert s["steps"] == 80 and np.isfinite(s["final_loss"])
    b = load_encoder(model_ref(tmp_path / "toy-blip-old", context_length=12))
    assert b.model.config.text_config.vocab_size == len(b.tokenizer.tokenizer)
    # The loaded model is the trained one: its ITC loss on the training pairs is far below that of
    # the same architecture freshly initialised with the training seed (what an unsaved model would be).
    from transformers import BlipForImageTextRetrieval

    from xbt_dist.models.hf_blip import BlipDualEncoder
    from xbt_dist.toy.base_blip import blip_config
    from xbt_dist.toy.base_clip import clip_loss, normalize_images
    torch.manual_seed(0)
    vocab = b.model.config.text_config.vocab_size
    fresh = BlipDualEncoder(BlipForImageTextRetrieval(blip_config("old", vocab, 16, 12)), 0, 12).eval()
    tokens = b.tokenizer([c[0] for c in caps])

    def loss(m):
        with torch.no_grad():
            return clip_loss(m.encode_image(normalize_images(images), normalize=True),
                             m.encode_text(tokens, normalize=True), torch.tensor(10.0)).item()
    trained, untrained = loss(b.model), loss(fresh)
    assert trained < untrained - 0.5, (trained, untrained)


def _left_right_squares():
    """8 images: a 4-colour square on the left or the right half, each with its one caption."""
    rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
    images, caps = torch.zeros(8, 3, 16, 16, dtype=torch.uint8), []
    for i in range(8):
        colour, side = list(rgb)[i % 4], ("left", "right")[i // 4]
        cols = slice(0, 8) if side == "left" else slice(8, 16)
        for ch in range(3):
            images[i, ch, 4:12, cols] = rgb[colour][ch]
        caps.append([f"a {colour} square on the {side}"])
    return images, caps


@pytest.mark.parametrize("role", ["old", "new"])
def test_toy_blip_text_cls_states_differ_at_init(role, tmp_path):
    """BLIP's ITC pools the text [CLS] state. With transformers' 0.02 init the toy-width post-LN text
    tower gives every caption the same [CLS] (mean pairwise cosine 1.000) and ITC training collapses;
    the toy init (TOY_INIT_RANGE) must give distinct captions distinct features from the start."""
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    from xbt_dist.models.hf_blip import BlipDualEncoder, HFTokenizer
    from xbt_dist.toy.base_blip import blip_config, write_vocab
    caps = [[f"a {s} {c} {sh} on the {p}"] for s in ("small", "large") for c in ("red", "blue", "green")
            for sh in ("square", "circle") for p in ("left", "right")]
    tok = BertTokenizer(str(write_vocab(tmp_path / "vocab.txt", caps)), do_lower_case=True)
    torch.manual_seed(0)
    model = BlipDualEncoder(BlipForImageTextRetrieval(blip_config(role, len(tok), 16, 12)), 0, 12).eval()
    with torch.no_grad():
        f = model.encode_text(HFTokenizer(tok, 12, "t")([c[0] for c in caps]), normalize=True)
    off_diag = (f @ f.t())[~torch.eye(len(caps), dtype=torch.bool)]
    assert off_diag.mean().item() < 0.9, off_diag.mean().item()


def test_toy_blip_itc_loss_drops_within_a_few_steps(tmp_path):
    """12 full-batch ITC steps on 8 pairs take the loss well below ln 8 = 2.079 (1.45 measured);
    with the 0.02 init both towers collapse to a constant first and the loss is still ln 8 (2.079)."""
    images, caps = _left_right_squares()
    s = train_blip("old", tmp_path / "m", (images, caps), image_size=16, context_length=12, epochs=12,
                   batch_size=8, threads=1, log_every=1000)
    assert s["final_loss"] < 1.75, s


def _finished_model(models, role, meta):
    """A finished toy BLIP as train_toy_blips leaves it, as far as reuse reads it (its train.json)."""
    d = models / f"toy-blip-{role}"
    d.mkdir(parents=True)
    (d / "train.json").write_text(json.dumps(meta))
    return d


def test_finished_toy_blips_are_reused_only_when_trained_as_asked(tmp_path):
    """A run directory's base models are reused when split and recipe match; otherwise the call fails
    and names the difference, rather than mixing a model trained otherwise with what is derived from it."""
    from xbt_dist.artifacts import config_digest, write_manifest
    from xbt_dist.toy.base_blip import train_config, train_toy_blips
    train = write_manifest(tmp_path / "train", "image-text-shards", config={"split": "train", "n": 512},
                           counts={"samples": 512})
    world = {"train": str(tmp_path / "train")}
    want = train_config("old", train["config_digest"], 20, 128, 0, 32)
    _finished_model(tmp_path / "m", "old", {"steps": 80, "config": want, "config_digest": config_digest(want)})
    s = train_toy_blips(world, tmp_path / "m", epochs=20, roles=("old",))
    assert s["old"]["skipped"] and s["old"]["steps"] == 80
    with pytest.raises(ValueError, match=r"epochs: 20 there, 6 asked.*another output directory"):
        train_toy_blips(world, tmp_path / "m", epochs=6, roles=("old",))
    # Another world (a different train split) is refused the same way.
    write_manifest(tmp_path / "train", "image-text-shards", config={"split": "train", "n": 768}, counts={"samples": 768})
    with pytest.raises(ValueError, match="train_data_digest"):
        train_toy_blips(world, tmp_path / "m", epochs=20, roles=("old",))
    # A model from before train.json held its config: its step count is checked (512 // 128 x epochs).
    _finished_model(tmp_path / "legacy", "new", {"steps": 80})
    write_manifest(tmp_path / "train", "image-text-shards", config={"split": "train", "n": 512}, counts={"samples": 512})
    assert train_toy_blips(world, tmp_path / "legacy", epochs=20, roles=("new",))["new"]["skipped"]
    with pytest.raises(ValueError, match="steps: 80 there, 24 asked"):
        train_toy_blips(world, tmp_path / "legacy", epochs=6, roles=("new",))


def test_base_from_copies_finished_models_and_leaves_the_source_alone(tmp_path):
    from bench.toy_blip_compare import copy_base_models
    src = tmp_path / "earlier" / "models"
    for role in ("old", "new"):
        (_finished_model(src, role, {"steps": 80}) / "model.safetensors").write_bytes(b"w" * 10)
    copy_base_models(src, tmp_path / "now" / "models")
    for role in ("old", "new"):
        d = tmp_path / "now" / "models" / f"toy-blip-{role}"
        assert not d.is_symlink() and (d / "model.safetensors").read_bytes() == b"w" * 10
        (d / "model.safetensors").write_bytes(b"retrained")
    assert (src / "toy-blip-old" / "model.safetensors").read_bytes() == b"w" * 10
    (src / "toy-blip-new" / "train.json").unlink()
    with pytest.raises(ValueError, match="no finished toy BLIP"):
        copy_base_models(src, tmp_path / "third" / "models")


def test_blip_harness_scores_each_trained_method_against_the_old_gallery(tmp_path):
    """`bench.toy_blip_compare --methods xbt base`: each method's query view is scored against the OLD
    gallery from the views its seed worker cached, and XBT is compared with it pairwise."""
    from bench.toy_blip_compare import xbt_only
    from xbt_dist.config import RunConfig
    n, d = 40, 8
    g = torch.Generator().manual_seed(0)
    old = {"image": torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)}
    old["text"] = old["image"].clone()                         # caption i describes image i
    noise = lambda s: torch.nn.functional.normalize(torch.randn(n, d, generator=g) * s, dim=1)   # noqa: E731
    for seed in (0, 1):
        for method, view in (("xbt", {k: v for k, v in old.items()}), ("base", {k: noise(1.0) for k in old})):
            run = tmp_path / f"seed{seed}" / "methods" / method
            run.mkdir(parents=True)
            views = {"old": old, "new": {k: noise(1.0) for k in old}, "phi": {k: noise(1.0) for k in old}, "xbt": view}
            for split in ("val", "test"):
                torch.save({"views": views, "c2i": torch.arange(n)}, run / f"views_{split}.pt")
    res = xbt_only(RunConfig(), tmp_path, [0, 1], 0, 200, "cmd", 0.0, ("xbt", "base"))
    for split in ("val", "test"):
        s = res["summary"][split]
        assert s["xbt"]["recalls"]["t2i R@1"] == [1.0, 1.0]            # XBT's view is the old gallery's own
        assert max(s["base"]["recalls"]["t2i R@1"]) < 0.5              # Base's is noise
        assert s["base"]["xbt_minus"]["t2i R@1"]["lo"] > 0
    assert "Base (paper)" in res["markdown"] and res["meta"]["methods"] == ["xbt", "base"]


def test_bases_only_scores_old_and_new_on_the_validation_gallery(tiny_cfg, tmp_path):
    """`bench.toy_blip_compare --bases-only`: each base model retrieves from its own gallery, and NEW's
    lead is new/new - old/old on the same queries, with an interval around it."""
    import argparse

    from hf_tiny import save_tiny_blip

    from bench.toy_blip_compare import base_lead, write_bases
    from xbt_dist.config import ModelRef
    cfg = tiny_cfg
    cfg.eval.val_shards = cfg.eval.eval_shards
    ref = lambda d: ModelRef(d.name, pretrained=str(d), backend="hf_blip", context_length=24)   # noqa: E731
    cfg.old = cfg.new = ref(save_tiny_blip(tmp_path / "blip-a", seed=0))
    same = base_lead(cfg, "val", n_boot=200)
    assert same["old/old"] == same["new/new"]
    assert all(g["gain"] == 0 and g["lo"] == g["hi"] == 0 for g in same["new_lead"].values())
    cfg.new = ref(save_tiny_blip(tmp_path / "blip-b", seed=1))
    res = base_lead(cfg, "val", n_boot=200)
    assert res["old/old"] == same["old/old"] and res["new/new"] != res["old/old"]
    for k, g in res["new_lead"].items():
        assert g["gain"] == pytest.approx(res["new/new"][k] - res["old/old"][k], abs=1e-3)
        assert g["lo"] <= g["gain"] <= g["hi"]
    a = argparse.Namespace(world_seed=0, n_train=8, n_val=12, epochs=1, old_epochs=None, batch_size=4)
    write_bases(tmp_path, "cmd", a, {"old": {"final_loss": 1.0}, "new": {"final_loss": 0.5}}, res)
    assert json.loads((tmp_path / "bases.json").read_text())["new_lead"]["t2i R@5"]["gain"] == res["new_lead"]["t2i R@5"]["gain"]
    assert "NEW's lead" in (tmp_path / "bases.md").read_text()
