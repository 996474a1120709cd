"""load_clip / register_model_configs / Phi."""

import pytest
import torch

from xbt_dist.config import ModelRef
from xbt_dist.models import Phi, load_clip
from xbt_dist.models.phi import phi_num_params

import json

TINY = {"embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
# Same shapes except widths: a checkpoint of this one must not load into TINY.
TINY_WIDE = {"embed_dim": 24,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def write_configs(d):
    for name, cfg in (("xbt-test-tiny", TINY), ("xbt-test-tiny-wide", TINY_WIDE)):
        (d / f"{name}.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory):
    return write_configs(tmp_path_factory.mktemp("cfgs"))


def test_load_tiny_bundle(cfg_dir):
    b = load_clip(ModelRef("xbt-test-tiny", config_dir=cfg_dir))
    assert not b.model.training and b.embed_dim == 24 and b.context_length == 16
    assert not any(p.requires_grad for p in b.model.parameters())
    tok = b.tokenizer(["a red cube"])
    assert tok.shape == (1, 16)
    assert b.model.encode_text(tok).shape == (1, 24)


def test_local_checkpoint_roundtrip(cfg_dir, tmp_path):
    b = load_clip(ModelRef("xbt-test-tiny", config_dir=cfg_dir))
    path = tmp_path / "tiny.pt"
    torch.save(b.model.state_dict(), path)
    b2 = load_clip(ModelRef("xbt-test-tiny", pretrained=str(path), config_dir=cfg_dir))
    img, tok = torch.randn(2, 3, 32, 32), b.tokenizer(["a", "b c"])
    with torch.no_grad():
        assert torch.equal(b.model.encode_image(img), b2.model.encode_image(img))
        assert torch.equal(b.model.encode_text(tok), b2.model.encode_text(tok))


def test_checkpoint_of_other_arch(cfg_dir, tmp_path):
    wide = load_clip(ModelRef("xbt-test-tiny-wide", config_dir=cfg_dir))
    path = tmp_path / "wide.pt"
    torch.save(wide.model.state_dict(), path)
    with pytest.raises(ValueError, match="different architecture than 'xbt-test-tiny'"):
        load_clip(ModelRef("xbt-test-tiny", pretrained=str(path), config_dir=cfg_dir))


def test_clear_errors(cfg_dir, tmp_path):
    with pytest.raises(ValueError, match="Close names: .*xbt-test-tiny"):
        load_clip(ModelRef("xbt-test-tinny", config_dir=cfg_dir))
    with pytest.raises(ValueError, match="ViT-B-32"):
        load_clip(ModelRef("ViT-B-23"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip(ModelRef("xbt-test-tiny", pretrained=str(tmp_path / "nope.pt"), config_dir=cfg_dir))
    with pytest.raises(ValueError, match="known tags"):
        load_clip(ModelRef("xbt-test-tiny", pretrained="openai", config_dir=cfg_dir))
    with pytest.raises(FileNotFoundError, match="config"):
        load_clip(ModelRef("xbt-test-tiny", config_dir=str(tmp_path / "missing")))


def test_phi_shape_and_count():
    phi = Phi(768, 512)
    assert sum(p.numel() for p in phi.parameters()) == 6_820_352 == phi_num_params(768, 512)
    assert [m.out_features for m in phi.net if isinstance(m, torch.nn.Linear)] == [2048, 2048, 512]
    one = Phi(8, 4, depth=1)
    assert len(one.net) == 1 and isinstance(one.net[0], torch.nn.Linear)
    y = Phi(8, 4, hidden=16, depth=2)(torch.randn(3, 8))
    assert y.shape == (3, 4) and not torch.allclose(y.norm(dim=-1), torch.ones(3))   # not normalised
    with pytest.raises(ValueError, match="depth"):
        Phi(8, 4, depth=0)
