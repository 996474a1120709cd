"""Embedding shard sets (write/read) and embed_shards with real tiny open_clip models."""

import json
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest

from xbt_dist.data.embed import Encoder, embed_shards
from xbt_dist.data.embeddings import EmbeddingShardSet, write_embedding_shard
from xbt_dist.data.shards import iter_image_text
from xbt_dist.data.stream import SampleStream
from xbt_testing.synthetic import write_bad_shard, write_image_text_shards, write_text_shards

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    """Two tiny random-init CLIPs ('old' with d=16, 'new' with d=24), as ClipBundle-like objects."""
    d = tmp_path_factory.mktemp("cfg")
    bundles = {}
    for role, dim in (("old", 16), ("new", 24)):
        name = f"xbt-data-tiny-{role}"
        (d / f"{name}.json").write_text(json.dumps({**TINY, "embed_dim": dim}))
        open_clip.add_model_config(d / f"{name}.json")
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        bundles[role] = SimpleNamespace(model=model.eval(), preprocess=preprocess,
                                        tokenizer=open_clip.get_tokenizer(name))
    return bundles


def test_embedding_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    a = {"image_old": rng.normal(size=(3, 4)), "text_old": rng.normal(size=(3, 5))}
    b = {"image_old": rng.normal(size=(2, 4)), "text_old": rng.normal(size=(2, 5))}
    write_embedding_shard(tmp_path, "s-001", ["d", "e"], b)
    write_embedding_shard(tmp_path, "s-000", ["a", "b", "c"], a)
    emb = EmbeddingShardSet(tmp_path)
    assert emb.fields == ["image_old", "text_old"] and emb.dims == {"image_old": 4, "text_old": 5}
    assert emb.keys() == ["a", "b", "c", "d", "e"]  # canonical (sorted shard) order
    x = emb.load("image_old")
    assert x.dtype == np.float16 and x.shape == (5, 4)
    ref = np.concatenate([a["image_old"], b["image_old"]])
    np.testing.assert_allclose(x, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=2e-3)
    assert emb.shard("s-001").rows("e", ["text_old"])["text_old"].shape == (5,)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp files
    with pytest.raises(ValueError, match="expected \\(3, d\\)"):
        write_embedding_shard(tmp_path, "bad", ["a", "b", "c"], {"text_old": np.ones((2, 5))})
    with pytest.raises(ValueError, match="<image\\|text>_<role>"):
        write_embedding_shard(tmp_path, "bad", ["a"], {"old_text": np.ones((1, 5))})
    with pytest.raises(FileNotFoundError, match="xbt embed"):
        emb.shard("s-009")


def test_embed_shards_with_tiny_clip_is_resumable(tmp_path, tiny_bundles):
    src = tmp_path / "src"
    write_image_text_shards(src, n_shards=3, per_shard=4)
    write_bad_shard(src / "shard-003.tar")
    out = tmp_path / "emb"
    fields = ["image_old", "text_old", "text_new"]
    encoders = {"old": Encoder(tiny_bundles["old"]), "new": tiny_bundles["new"]}
    lines = []
    r = embed_shards(src, out, encoders, fields, batch_size=3, shards=["shard-000", "shard-003"],
                     progress=lines.append)
    assert r["written"] == 2 and not r["complete"] and not (out / "manifest.json").exists()
    assert r["skipped"] == {"bad_image": 1, "missing_caption": 1}
    assert "shards 1/2" in lines[0] and "samples/s" in lines[0] and "ETA" in lines[0]
    r = embed_shards(src, out, encoders, fields, batch_size=3, progress=None)
    assert r["written"] == 2 and r["already_done"] == 2 and r["complete"]
    # rerun: nothing to do, and no model is even needed
    r = embed_shards(src, out, {}, fields, progress=None)
    assert r["written"] == 0 and r["already_done"] == 4

    emb = EmbeddingShardSet(out, require_complete=True)
    assert emb.dims == {"image_old": 16, "text_new": 24, "text_old": 16}
    assert emb.manifest["counts"]["samples"] == 14 and emb.manifest["kind"] == "embeddings"
    good = list(iter_image_text(src))
    assert emb.keys() == [k for k, *_ in good]  # aligned by key with the input shards
    x = emb.load("text_new").astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    # values equal a direct encoding of the same inputs
    direct = Encoder(tiny_bundles["old"]).encode_images([im for _, im, _, _ in good[:2]])
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(emb.load("image_old")[:2], direct, atol=3e-3)

    # the training stream joins them back by key
    s = SampleStream(src, batch_size=5, transform=tiny_bundles["new"].preprocess,
                     tokenizer=tiny_bundles["new"].tokenizer, targets=out)
    batches = list(s)
    assert sum(len(b["keys"]) for b in batches) == 14 and batches[0]["v_old"].shape[1] == 16
    assert batches[0]["tokens"].shape[1] == 16 and batches[0]["images"].shape[1:] == (3, 16, 16)


def test_embed_text_shards_with_plain_callables(tmp_path):
    write_text_shards(tmp_path / "t", n_shards=2, per_shard=3)
    calls = []

    def text_old(texts):
        calls.append(len(texts))
        return np.stack([[len(t), 1.0, 2.0] for t in texts])

    r = embed_shards(tmp_path / "t", tmp_path / "e", {"text_old": text_old}, ["text_old"],
                     batch_size=2, progress=None)
    assert r["samples"] == 6 and calls == [2, 1, 2, 1]
    assert EmbeddingShardSet(tmp_path / "e").dims == {"text_old": 3}
    with pytest.raises(KeyError, match="no encoder for field 'text_new'"):
        embed_shards(tmp_path / "t", tmp_path / "e2", {"text_old": text_old}, ["text_new"], progress=None)
    with pytest.raises(ValueError, match="text-only shard set"):
        embed_shards(tmp_path / "t", tmp_path / "e3", {"image_old": text_old}, ["image_old"], progress=None)


def test_embed_with_model_ref_via_load_clip(tmp_path):
    """The integrator path: encoders given as ModelRefs, loaded by xbt_dist.models.clip.load_clip."""
    from xbt_dist.config import ModelRef
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "xbt-data-ref.json").write_text(json.dumps(TINY))
    write_image_text_shards(tmp_path / "s", n_shards=1, per_shard=3)
    ref = ModelRef(arch="xbt-data-ref", config_dir=str(tmp_path / "cfg"))
    r = embed_shards(tmp_path / "s", tmp_path / "e", {"old": ref}, ["image_old", "text_old"],
                     progress=None)
    emb = EmbeddingShardSet(tmp_path / "e", require_complete=True)
    assert r["samples"] == 3 and emb.dims == {"image_old": 16, "text_old": 16}
    assert emb.manifest["inputs"]["models"]["old"]["arch"] == "xbt-data-ref"


def test_all_bad_shard_keeps_set_readable(tmp_path):
    write_embedding_shard(tmp_path, "a-000", [], {"text_old": np.zeros((0, 1))})
    write_embedding_shard(tmp_path, "a-001", ["k"], {"text_old": np.ones((1, 5))})
    emb = EmbeddingShardSet(tmp_path)
    assert emb.dims == {"text_old": 5} and emb.load("text_old").shape == (1, 5)


def test_decode_workers_keep_order_values_and_skip_counts(tmp_path, tiny_bundles):
    """DataLoader decode workers (2 processes, each every other raw batch) give the same rows,
    in the input's key order, and the same skip counts as decoding in this process."""
    src = tmp_path / "src"
    write_image_text_shards(src, n_shards=2, per_shard=7)
    write_bad_shard(src / "shard-002.tar")
    encoders = {"old": Encoder(tiny_bundles["old"]), "new": tiny_bundles["new"]}
    fields = ["image_old", "text_new"]
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        runs[workers] = embed_shards(src, out, encoders, fields, batch_size=3, progress=None,
                                     decode_workers=workers)
    assert runs[0]["skipped"] == runs[2]["skipped"] == {"bad_image": 1, "missing_caption": 1}
    a, b = EmbeddingShardSet(tmp_path / "w0"), EmbeddingShardSet(tmp_path / "w2")
    assert a.keys() == b.keys() == [k for k, *_ in iter_image_text(src)]
    for f in fields:
        np.testing.assert_array_equal(a.load(f), b.load(f))
    assert sorted(p.name for p in (tmp_path / "w2").glob("shard-000*")) == [
        "shard-000.image_old.npy", "shard-000.keys.npy", "shard-000.text_new.npy"]


def test_embedding_manifest_carries_the_model_file_digest(tmp_path, tiny):
    """`xbt serve` / `xbt index build` refuse vectors of another old model by this digest: fails
    when the manifest records only arch/tag (two different checkpoints would look the same)."""
    import hashlib

    from xbt_dist.config import ModelRef
    write_image_text_shards(tmp_path / "s", n_shards=1, per_shard=3)
    ref = ModelRef(arch=tiny["old_arch"], pretrained=tiny["old_checkpoint"], config_dir=tiny["models_dir"])
    embed_shards(tmp_path / "s", tmp_path / "e", {"old": ref}, ["image_old", "text_old"], progress=None)
    recorded = EmbeddingShardSet(tmp_path / "e", require_complete=True).manifest["inputs"]["models"]["old"]
    digest = hashlib.sha256(open(tiny["old_checkpoint"], "rb").read()).hexdigest()
    assert recorded["sha256"] == digest and recorded["pretrained"] == tiny["old_checkpoint"]


def test_a_set_begun_by_one_model_refuses_another(tmp_path, tiny):
    """A rerun skips the shards already there; had another model made them, the set would mix two
    embedding spaces. Caught by the weight digest even at the same path (a model retrained in place),
    for a set left half done and for a finished one."""
    import shutil

    import torch

    from xbt_dist.config import ModelRef
    write_image_text_shards(tmp_path / "s", n_shards=2, per_shard=3)
    ckpt = tmp_path / "old.pt"
    shutil.copy(tiny["old_checkpoint"], ckpt)
    ref = ModelRef(arch=tiny["old_arch"], pretrained=str(ckpt), config_dir=tiny["models_dir"])
    fields, out = ["image_old", "text_old"], tmp_path / "e"

    def retrain_in_place():
        sd = torch.load(ckpt, weights_only=False)
        sd = sd.get("state_dict", sd)
        torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}, ckpt)

    embed_shards(tmp_path / "s", out, {"old": ref}, fields, shards=["shard-000"], progress=None)  # interrupted
    retrain_in_place()
    with pytest.raises(ValueError, match=r"'old': .* there, .* now.*another directory"):
        embed_shards(tmp_path / "s", out, {"old": ref}, fields, progress=None)
    shutil.copy(tiny["old_checkpoint"], ckpt)          # the model that began the set: the rerun resumes
    assert embed_shards(tmp_path / "s", out, {"old": ref}, fields, progress=None)["written"] == 1
    assert EmbeddingShardSet(out, require_complete=True).counts() == {"shard-000": 3, "shard-001": 3}
    retrain_in_place()
    with pytest.raises(ValueError, match="mix two embedding spaces"):
        embed_shards(tmp_path / "s", out, {"old": ref}, fields, progress=None)


def test_a_save_pretrained_directory_has_a_weight_digest(tmp_path):
    """Model directories (hf_blip, hf_clip) get a digest of config + weights, so `xbt serve`, the index
    and the embedding record tell a retrained directory from the one they were made with."""
    from hf_tiny import save_tiny_blip

    from xbt_dist.index.identity import model_identity, same_model
    d = save_tiny_blip(tmp_path / "blip", seed=0)
    a = model_identity({"arch": "blip", "pretrained": str(d)})
    (d / "vocab.txt").write_text((d / "vocab.txt").read_text() + "extra\n")     # not the model's weights
    assert a["sha256"] and same_model(a, model_identity({"arch": "blip", "pretrained": str(d)}))
    save_tiny_blip(d, seed=1)                                                   # retrained in place
    b = model_identity({"arch": "blip", "pretrained": str(d)})
    assert b["sha256"] and not same_model(a, b)
