"""The hf_blip backend: BLIP's ITC path behind the encoder interface, AdaptedBLIP's adapters and on-off.

Tiny random BLIP retrieval models are saved locally with save_pretrained (tests/hf_tiny.py); nothing
is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from hf_tiny import save_tiny_blip  # noqa: E402

from xbt_dist.config import AdapterConfig, ConfigError, ModelRef  # noqa: E402
from xbt_dist.models.adapters_blip import AdaptedBLIP, lora_target_regex  # noqa: E402
from xbt_dist.models.encoders import adapt, image_size_of, load_encoder  # noqa: E402
from xbt_dist.models.hf_blip import BlipDualEncoder  # noqa: E402


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def bundle(blip_dir):
    return load_encoder(ModelRef("tiny-blip", pretrained=str(blip_dir), backend="hf_blip"))


@pytest.fixture()
def data(bundle):
    g = torch.Generator().manual_seed(1)
    # the 2nd caption fills the 35-token context, so prompts push its [SEP] off the end
    tok = bundle.tokenizer(["a red cube on the left", "two blue balls " * 12, "x"])
    return torch.randn(3, 3, 32, 32, generator=g), tok


def _randomise(m):
    """Every adapter non-zero, as after training (peft zero-inits lora_B; LN deltas start at 0)."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)


def test_bundle_matches_blip_itc_forward(blip_dir, bundle, data):
    """The embeddings are BLIP's own ITC features: BlipForImageTextRetrieval(use_itm_head=False)."""
    from transformers import BlipForImageTextRetrieval
    ref_model = BlipForImageTextRetrieval.from_pretrained(str(blip_dir)).eval()
    img, tok = data
    assert isinstance(bundle.model, BlipDualEncoder)
    assert (bundle.embed_dim, bundle.context_length, image_size_of(bundle)) == (16, 35, (32, 32))
    assert tok.shape == (3, 35) and tok[:, 0].eq(2).all()          # [CLS] first, padded with 0
    with torch.no_grad():
        v = bundle.model.encode_image(img, normalize=True)
        w = bundle.model.encode_text(tok, normalize=True)
        sim = ref_model(input_ids=tok, attention_mask=(tok != 0).long(), pixel_values=img,
                        use_itm_head=False).itm_score
    torch.testing.assert_close(v @ w.T, sim, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in bundle.model.parameters())
    # ITM-only weights are gone: no cross-attention, no ITM head
    names = [n for n, _ in bundle.model.named_parameters()]
    assert not any("crossattention" in n or "itm_head" in n for n in names)


def test_preprocess_is_the_processor_resize_and_splits_for_the_device(bundle):
    from PIL import Image

    from xbt_dist.models.clip import split_device_normalize
    im = Image.new("L", (50, 40), 128)                  # grey, non-square: RGB-converted and resized
    assert bundle.preprocess(im).shape == (3, 32, 32)
    host, norm = split_device_normalize(bundle.preprocess_train)
    assert norm(host(im)[None]).shape == (1, 3, 32, 32)


def test_missing_dir_arch_mismatch_and_bad_backend_are_named(tmp_path, blip_dir):
    with pytest.raises(FileNotFoundError, match="save_pretrained directory.*downloads nothing"):
        load_encoder(ModelRef("blip-itm-base-coco", pretrained=str(tmp_path / "nope"), backend="hf_blip"))
    with pytest.raises(ValueError, match="different architecture.*vision_config.hidden_size: 768 vs 32"):
        load_encoder(ModelRef("blip-itm-base-coco", pretrained=str(blip_dir), backend="hf_blip"))
    with pytest.raises(ValueError, match="neither a shipped name.*blip-itm-base-coco"):
        load_encoder(ModelRef("blip-huge", backend="hf_blip"))
    bundle = load_encoder(ModelRef("tiny-blip", pretrained=str(blip_dir), backend="hf_blip"))
    with pytest.raises(ValueError, match=r"32x32 images, got \(16, 16\)"):   # no silent position slicing
        bundle.model.encode_image(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="context_length=100 exceeds the text encoder's 64 positions"):
        load_encoder(ModelRef("tiny-blip", pretrained=str(blip_dir), backend="hf_blip", context_length=100))
    with pytest.raises(ConfigError, match="model.backend='hf_clipp'.*open_clip, hf_blip"):
        ModelRef("x", backend="hf_clipp")
    with pytest.raises(ConfigError, match="model.context_length"):
        ModelRef("ViT-B-32", context_length=20)


def test_lora_goes_on_the_named_attention_projections_of_both_towers(bundle):
    m = AdaptedBLIP(copy.deepcopy(bundle.model), AdapterConfig(text_prompts=0, visual_prompts=0,
                                                                 tune_layernorm=False))
    lora = sorted({n.split(".lora_")[0] for n, _ in m.named_parameters() if "lora_A" in n})
    per_layer = {n.replace("blip.", "").split(".", 4)[-1] for n in lora}
    assert per_layer == {"self_attn.qkv", "self_attn.projection", "attention.self.query", "attention.self.key",
                         "attention.self.value", "attention.output.dense"}
    assert len(lora) == 2 * 2 + 4 * 2                               # 2 layers per tower
    assert lora_target_regex(AdapterConfig(towers=("text",), lora_targets=("mlp",))) == \
        r"^(text_encoder\.encoder\.layer\.\d+\.(intermediate\.dense|output\.dense))$"
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(m.adapter_state_dict()) and all("lora_" in n for n in trainable)


def test_fresh_adapters_are_identity_and_trained_ones_change_both_towers(bundle, data):
    img, tok = data
    untouched = copy.deepcopy(bundle.model)
    m = adapt(copy.deepcopy(bundle.model), AdapterConfig(text_prompts=0, visual_prompts=0))
    assert isinstance(m, AdaptedBLIP)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(img), untouched.encode_image(img, normalize=True))
        torch.testing.assert_close(m.encode_text(tok), untouched.encode_text(tok, normalize=True))
        _randomise(m)
        assert not torch.allclose(m.encode_image(img), untouched.encode_image(img, normalize=True))
        assert not torch.allclose(m.encode_text(tok), untouched.encode_text(tok, normalize=True))


@pytest.mark.parametrize("kw", [{}, {"tune_layernorm": False}, {"lora_targets": ("attn", "mlp")}])
def test_disabled_is_bit_identical_to_untouched_blip(bundle, data, kw):
    """The paper's on-off: adapters (LoRA, prompts, LN deltas) off == the untouched BLIP, bit for bit."""
    img, tok = data
    untouched = copy.deepcopy(bundle.model)
    m = AdaptedBLIP(copy.deepcopy(bundle.model), AdapterConfig(text_prompts=3, visual_prompts=2, **kw))
    _randomise(m)
    with torch.no_grad():
        on_v, on_t = m(img, tok)
        with m.adapters_disabled():
            off_v, off_t = m.encode_image(img, normalize=False), m.encode_text(tok, normalize=False)
        assert torch.equal(off_v, untouched.encode_image(img, normalize=False))
        assert torch.equal(off_t, untouched.encode_text(tok, normalize=False))
        assert not torch.allclose(on_v, torch.nn.functional.normalize(off_v, dim=-1))
        assert not torch.allclose(on_t, torch.nn.functional.normalize(off_t, dim=-1))
        torch.testing.assert_close(m(img, tok)[0], on_v)              # back on after the context
    assert all(p.requires_grad for n, p in m.named_parameters() if "lora_" in n)


def test_text_prompts_keep_cls_first_and_sep_last(bundle, data):
    _, tok = data
    m = AdaptedBLIP(copy.deepcopy(bundle.model), AdapterConfig(text_prompts=3, visual_prompts=0))
    shifted, mask = m.shift_tokens(tok)
    assert shifted.shape == tok.shape and shifted[:, 0].eq(2).all()
    assert mask[:, 1:4].eq(1).all() and shifted[:, 1:4].eq(0).all()    # prompt slots: attended
    sep = 3
    assert shifted[0].tolist().count(sep) == 1 and shifted[1, -1] == sep   # truncated caption keeps [SEP]
    assert torch.equal(shifted[0, 4:4 + 7], tok[0, 1:8])                   # the words follow the prompts
    with pytest.raises(ValueError, match="context length"):
        m.shift_tokens(tok[:, :20])
    with pytest.raises(ValueError, match="leaves no room"):
        AdaptedBLIP(copy.deepcopy(bundle.model), AdapterConfig(text_prompts=33))


def test_adapter_state_roundtrip_and_mismatch(bundle, data):
    img, tok = data
    a = AdaptedBLIP(copy.deepcopy(bundle.model), AdapterConfig(text_prompts=2, visual_prompts=2))
    _randomise(a)
    b = AdaptedBLIP(copy.deepcopy(bundle.model), AdapterConfig(text_prompts=2, visual_prompts=2))
    b.load_adapter_state_dict(a.adapter_state_dict())
    with torch.no_grad():
        assert torch.equal(a.encode_text(tok), b.encode_text(tok))
        assert torch.equal(a.encode_image(img), b.encode_image(img))
    c = AdaptedBLIP(copy.deepcopy(bundle.model), AdapterConfig(text_prompts=4, visual_prompts=2))
    with pytest.raises(ValueError, match="shape mismatch.*text_prompts"):
        c.load_adapter_state_dict(a.adapter_state_dict())
    full = AdaptedBLIP(copy.deepcopy(bundle.model), AdapterConfig(full_tune=True))
    assert full.num_trainable() == sum(p.numel() for p in bundle.model.parameters())
    with pytest.raises(RuntimeError, match="full_tune"):
        with full.adapters_disabled():
            pass
