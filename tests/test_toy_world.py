"""Toy world: deterministic generation, shard formats (real webdataset), tiny base-CLIP training
whose checkpoint loads back through open_clip, resumable build, recall helper."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import open_clip
from xbt_dist.artifacts import read_manifest
from xbt_dist.toy import ToyWorldConfig, build_toy_world, world
from xbt_dist.toy.base_clip import load_trained, recalls


def _samples(split_dir: Path) -> list[dict]:
    shards = sorted(str(p) for p in split_dir.glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        world.write_split(tmp_path / name, "train", 6, seed, image_size=32, per_shard=4)
    a, b, c = (_samples(tmp_path / n) for n in "abc")
    assert [s["txt"] for s in a] == [s["txt"] for s in b]
    assert [s["jpg"] for s in a] == [s["jpg"] for s in b]
    # fixed tar mtime: even the shard files are byte-identical
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()
    assert [s["txt"] for s in a] != [s["txt"] for s in c]
    assert [s["jpg"] for s in a] != [s["jpg"] for s in c]


def test_train_shards_format(tmp_path):
    m = world.write_split(tmp_path / "train", "train", 5, 0, image_size=32, per_shard=2)
    assert m["kind"] == "image-text-shards" and m["counts"] == {"samples": 5, "shards": 3}
    sizes = json.loads((tmp_path / "train/sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    samples = _samples(tmp_path / "train")
    assert len({s["__key__"] for s in samples}) == 5
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (32, 32) and img.mode == "RGB"
        meta = json.loads(s["json"])
        assert s["txt"].decode() == meta["captions"][0]
        assert 1 <= len(meta["objects"]) <= 3


def test_eval_multi_captions_and_text_corpus(tmp_path):
    world.write_split(tmp_path / "eval", "eval", 4, 0, image_size=32, eval_captions=5)
    for s in _samples(tmp_path / "eval"):
        caps = json.loads(s["json"])["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5
        assert s["txt"].decode() == caps[0]
    m = world.write_split(tmp_path / "text", "text", 7, 0)
    assert m["kind"] == "text-shards"
    texts = _samples(tmp_path / "text")
    assert len(texts) == 7
    assert all(set(s) - {"__key__", "__url__", "__local_path__"} == {"txt"} for s in texts)


def test_val_gallery_is_its_own_and_leaves_the_test_gallery_unchanged(tmp_path):
    """The validation gallery (tuning) shares no image, key or scene with the test gallery
    (reporting), has the same multi-caption form, and adding it does not change `eval/`."""
    world.write_split(tmp_path / "eval", "eval", 40, 0, image_size=32)
    before = (tmp_path / "eval/shard-000000.tar").read_bytes()
    m = world.write_split(tmp_path / "val", "val", 40, 0, image_size=32)
    assert m["kind"] == "multi-caption-eval-shards" and m["counts"]["samples"] == 40
    test, val = _samples(tmp_path / "eval"), _samples(tmp_path / "val")
    assert all(s["__key__"].startswith("val") for s in val)
    assert not {s["jpg"] for s in test} & {s["jpg"] for s in val}
    scene = lambda s: json.dumps({k: v for k, v in json.loads(s["json"]).items() if k != "captions"},
                                 sort_keys=True)
    assert not {scene(s) for s in test} & {scene(s) for s in val}
    assert all(len(json.loads(s["json"])["captions"]) == 5 for s in val)
    world.write_split(tmp_path / "eval2", "eval", 40, 0, image_size=32)
    assert (tmp_path / "eval2/shard-000000.tar").read_bytes() == before
    assert ToyWorldConfig(n_eval=16).n_val == 16 and ToyWorldConfig(n_val=8).n_val == 8


def test_zeroshot_classes(tmp_path):
    world.write_split(tmp_path / "zs", "zeroshot", 10, 0, image_size=32)
    classes = json.loads((tmp_path / "zs/classes.json").read_text())
    assert classes["classes"] == world.zeroshot_classes() and len(classes["classes"]) == 88
    assert all("{}" in t for t in classes["templates"])
    for s in _samples(tmp_path / "zs"):
        label = int(s["cls"])
        name = classes["classes"][label]
        meta = json.loads(s["json"])
        assert [f'{o["colour"]} {o["shape"]}' for o in meta["objects"]] == [name]


def test_rerun_of_a_split_is_skipped_and_other_config_rewrites(tmp_path):
    world.write_split(tmp_path / "t", "train", 4, 0, image_size=32, per_shard=2)
    first = read_manifest(tmp_path / "t")
    assert world.write_split(tmp_path / "t", "train", 4, 0, image_size=32, per_shard=2) == first
    world.write_split(tmp_path / "t", "train", 3, 0, image_size=32, per_shard=10)
    assert sorted(p.name for p in (tmp_path / "t").glob("*.tar")) == ["shard-000000.tar"]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_train"):
        ToyWorldConfig(n_train=0)
    with pytest.raises(ValueError, match="image_size"):
        ToyWorldConfig(image_size=30)
    with pytest.raises(ValueError, match="batch_size"):
        ToyWorldConfig(n_train=8, batch_size=16)


def test_recalls_multi_caption():
    img = torch.eye(3)
    # image 0 has two captions, the second closer to image 1; images 1, 2 one caption each
    txt = torch.nn.functional.normalize(torch.stack([img[0], img[1] + 0.5 * img[0], img[1], img[2]]))
    owner = torch.tensor([0, 0, 1, 2])
    r = recalls(img, txt, owner, ks=(1, 2))
    assert r["t2i_R@1"] == 0.75 and r["t2i_R@2"] == 1.0   # the stray caption ranks image 0 second
    assert r["i2t_R@1"] == 1.0      # image 0 is hit through its first caption


def test_recalls_ties_count_against_like_eval():
    """Fails when the toy world's recall treats ties differently from the evaluation's
    (`eval.metrics`): two identical images tie for every caption of either."""
    from xbt_dist.eval.metrics import image_to_text_recall, text_to_image_recall
    img = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    txt = img.clone()
    owner = torch.tensor([0, 1, 2])
    r = recalls(img, txt, owner, ks=(1, 2))
    assert r["t2i_R@1"] == r["i2t_R@1"] == round(1 / 3, 4)  # both of the tied pair miss at K=1
    assert r["t2i_R@2"] == r["i2t_R@2"] == 1.0
    assert r["t2i_R@1"] == round(text_to_image_recall(txt, img, owner, (1,))["R@1"], 4)
    assert r["i2t_R@1"] == round(image_to_text_recall(img, txt, owner, (1,))["R@1"], 4)


def test_tiny_build_trains_loadable_models_and_resumes(tmp_path):
    cfg = ToyWorldConfig(seed=3, image_size=32, n_train=48, n_text=20, n_eval=16, n_zeroshot=8,
                         per_shard=32, old_epochs=1, new_epochs=1, batch_size=16, threads=1)
    out = build_toy_world(tmp_path / "w", cfg)
    models = Path(out["models_dir"])
    assert (models / "toy-old.json").is_file() and (models / "toy-new.json").is_file()
    assert set(out["recalls"]) == {"old/old", "new/new"}
    assert read_manifest(tmp_path / "w")["kind"] == "toy-world"
    assert read_manifest(out["val"])["counts"]["samples"] == 16    # n_val defaults to n_eval

    open_clip.add_model_config(models / "toy-old.json")
    m1 = open_clip.create_model(out["old_arch"], pretrained=out["old_checkpoint"]).eval()
    m2, tok = load_trained(out["old_arch"], out["old_checkpoint"])
    saved = torch.load(out["old_checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in m1.state_dict().items())
    x = torch.from_numpy(np.random.default_rng(0).random((2, 3, 32, 32), np.float32))
    t = tok(["a small red circle", "a large blue star left of a small navy ring"])
    with torch.no_grad():
        assert torch.equal(m1.encode_image(x), m2.encode_image(x))
        assert torch.equal(m1.encode_text(t), m2.encode_text(t))
        assert m1.encode_image(x).shape == (2, 64)
    new = open_clip.create_model(out["new_arch"], pretrained=out["new_checkpoint"])
    assert new.encode_text(t).shape == (2, 96)

    again = build_toy_world(tmp_path / "w", cfg)   # finished: nothing is redone
    assert again["skipped"] and again["old_checkpoint"] == out["old_checkpoint"]
