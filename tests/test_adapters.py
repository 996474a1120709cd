"""AdaptedCLIP: peft LoRA on q/k/v/out, prompts, LN deltas, on-off bit-identity, adapter state dicts."""

import copy
import json

import pytest
import torch

from xbt_dist.config import ModelRef
from xbt_dist.models.adapters import AdaptedCLIP, AdapterConfig, LoraMultiheadAttention
from xbt_dist.models.clip import load_clip

TINY = {"embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TINY_WIDE = {**TINY, "text_cfg": {**TINY["text_cfg"], "width": 48}}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfgs")
    (d / "xbt-ad-tiny.json").write_text(json.dumps(TINY))
    (d / "xbt-ad-wide.json").write_text(json.dumps(TINY_WIDE))
    torch.manual_seed(0)
    return (load_clip(ModelRef("xbt-ad-tiny", config_dir=str(d))),
            load_clip(ModelRef("xbt-ad-wide", config_dir=str(d))))


@pytest.fixture()
def data(bundles):
    g = torch.Generator().manual_seed(1)
    tok = bundles[0].tokenizer(["a red cube on the left", "two blue balls " * 8])  # 2nd fills the context
    return torch.randn(4, 3, 32, 32, generator=g), tok


def _adapted(bundle, **kw):
    untouched = copy.deepcopy(bundle.model)            # frozen, like load_clip returns it
    return untouched, AdaptedCLIP(copy.deepcopy(bundle.model), AdapterConfig(**kw))


def _randomise_lora(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:            # peft zero-inits B: make every delta non-zero
                p.normal_(0, 0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="lora_targets.*'qkv'"):
        AdapterConfig(lora_targets=("qkv",))
    with pytest.raises(ValueError, match="towers"):
        AdapterConfig(towers=("audio",))
    with pytest.raises(ValueError, match="lora_rank.*-1"):
        AdapterConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="lora_dropout"):
        AdapterConfig(lora_dropout=1.5)


def test_frozen_base_and_fresh_adapters_are_identity(bundles, data):
    untouched, m = _adapted(bundles[0], text_prompts=0, visual_prompts=0)
    assert all(isinstance(blk.attn, LoraMultiheadAttention) for blk in m.clip.transformer.resblocks)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(m.adapter_state_dict())
    assert all("lora_" in n or n.endswith("_delta") for n in trainable)
    img, tok = data
    with torch.no_grad():   # zero-init B and zero LN deltas: same function as the base model
        torch.testing.assert_close(m.encode_image(img), untouched.encode_image(img, normalize=True))
        torch.testing.assert_close(m.encode_text(tok), untouched.encode_text(tok, normalize=True))


def test_each_of_q_k_v_out_lora_is_active(bundles, data):
    """Perturb one LoRA delta at a time (q, k, v rows of the packed in_proj B; out_proj B)."""
    _, m = _adapted(bundles[0], text_prompts=0, visual_prompts=0, tune_layernorm=False)
    img, tok = data
    attn = m.clip.visual.transformer.resblocks[0].attn
    d = attn.get_base_layer().embed_dim
    with torch.no_grad():
        base = m.encode_image(img)
        targets = {"q": (attn.lora_B["default"].weight, slice(0, d)),
                   "k": (attn.lora_B["default"].weight, slice(d, 2 * d)),
                   "v": (attn.lora_B["default"].weight, slice(2 * d, 3 * d)),
                   "out": (attn.get_base_layer().out_proj.lora_B["default"].weight, slice(None))}
        for name, (w, rows) in targets.items():
            w[rows].normal_(0, 1.0)
            changed = m.encode_image(img)
            assert not torch.allclose(changed, base, atol=1e-5), f"LoRA on {name} is bypassed"
            w.zero_()
            assert torch.equal(m.encode_image(img), base)


def test_prompts_and_eot(bundles, data):
    _, m = _adapted(bundles[0], text_prompts=3)
    img, tok = data
    shifted = m.shift_tokens(tok)
    eot = tok.argmax(-1)
    assert shifted.shape == tok.shape and shifted[0, 0] == tok[0, 0] and (shifted[:, 1:4] == 0).all()
    assert shifted[0].argmax() == eot[0] + 3                 # short caption: EOT shifted by 3
    assert eot[1] == 15 and shifted[1, 15] == tok[1, 15]     # full caption: EOT kept at the last position
    assert torch.equal(shifted[0, 4:4 + 5], tok[0, 1:6])
    with torch.no_grad():
        a = m.encode_text(tok)
        m.text_prompts.normal_()
        m.visual_prompts.normal_()
        assert not torch.allclose(a, m.encode_text(tok))
        x = m.encode_image(img)
        assert x.shape == (4, 24) and torch.allclose(x.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="context length"):
        m.encode_text(tok[:, :8])


@pytest.mark.parametrize("targets", [("attn",), ("attn", "mlp")])
def test_disabled_is_bit_identical_after_training(bundles, data, targets):
    untouched, m = _adapted(bundles[0], lora_targets=targets)
    img, tok = data
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.5)
    m.train()
    for _ in range(2):
        v, w = m(img[:2], tok)
        loss = -(v @ w.T).diag().sum() + v.sum() * w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    base = [p for n, p in m.clip.state_dict().items() if "lora_" not in n and "_delta" not in n]
    ref = list(untouched.state_dict().values())
    assert len(base) == len(ref) and all(torch.equal(p, q) for p, q in zip(base, ref)), "base weights changed"
    with torch.no_grad():
        assert not torch.allclose(m.encode_image(img), untouched.encode_image(img, normalize=True), atol=1e-4)
        assert not torch.allclose(m.encode_text(tok), untouched.encode_text(tok, normalize=True), atol=1e-4)
    for grad in (False, True):
        with m.adapters_disabled(), torch.set_grad_enabled(grad):
            assert torch.equal(m.encode_image(img), untouched.encode_image(img, normalize=True))
            assert torch.equal(m.encode_text(tok), untouched.encode_text(tok, normalize=True))
            assert torch.equal(m.encode_text(tok, normalize=False), untouched.encode_text(tok))
    assert all(p.requires_grad for p in m.trainable_parameters()) and m.adapters_enabled


def test_adapter_state_dict_roundtrip_and_strictness(bundles, data):
    _, m = _adapted(bundles[0])
    _randomise_lora(m)
    sd = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    n_adapter = sum(v.numel() for v in sd.values())
    assert n_adapter == m.num_trainable() and n_adapter < 0.1 * sum(p.numel() for p in m.parameters())
    assert not any(k.endswith(("in_proj_weight", "c_fc.weight", "base_layer.weight")) for k in sd)
    _, m2 = _adapted(bundles[0])
    m2.load_adapter_state_dict(sd)
    img, tok = data
    with torch.no_grad():
        assert torch.equal(m.encode_image(img), m2.encode_image(img))
        assert torch.equal(m.encode_text(tok), m2.encode_text(tok))
    _, other_cfg = _adapted(bundles[0], lora_rank=4)
    with pytest.raises(ValueError, match="different architecture or AdapterConfig.*shape mismatch"):
        other_cfg.load_adapter_state_dict(sd)
    _, other_arch = _adapted(bundles[1])
    with pytest.raises(ValueError, match="different architecture"):
        other_arch.load_adapter_state_dict(sd)
    _, no_ln = _adapted(bundles[0], tune_layernorm=False)
    with pytest.raises(ValueError, match="unexpected: .*_delta"):
        no_ln.load_adapter_state_dict(sd)


def test_towers_and_full_tune(bundles):
    _, img_only = _adapted(bundles[0], towers=("image",), text_prompts=0)
    names = img_only.adapter_state_dict()
    assert names and all(n.startswith(("clip.visual.", "visual_prompts")) for n in names)
    _, full = _adapted(bundles[0], full_tune=True)
    assert full.num_trainable() == sum(p.numel() for p in full.clip.parameters())
    assert full.visual_prompts is None and not any("lora_" in n for n, _ in full.named_parameters())
    with pytest.raises(RuntimeError, match="full_tune"):
        with full.adapters_disabled():
            pass
