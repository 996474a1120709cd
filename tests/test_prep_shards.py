"""One shard format: `xbt prep validate`, the training stream, `xbt embed` and the plain iterators
agree about every sample of a messy shard set, and the one writer writes only what reads back.

The set mixes what real shards contain: nested directories and dots in member paths, upper-case
extensions, multi-dot fields, PAX headers (long and non-ASCII names, a global header), directory
and symlink members, macOS `._` forks, members without extension, a sample split over
non-adjacent members, corrupt / truncated / missing images, missing / blank / non-utf-8 captions,
a tar cut mid-member and a tar cut between members.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xbt_dist.data.embed import embed_shards
from xbt_dist.data.shards import (ShardWriter, check_member_name, check_sample, decode_caption,
                                  decode_image, is_good_sample, iter_image_text, iter_raw_samples,
                                  split_member_name, tar_is_complete)
from xbt_dist.data.stream import SampleStream
from xbt_dist.prep.validate import validate_shards


def _img(fmt: str = "JPEG", color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, format=fmt)
    return buf.getvalue()


def _noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


LONG_DIR = "long/" + "x" * 140  # > 100 bytes: only a PAX `path` record can hold it
DIR, SYMLINK = ("type", tarfile.DIRTYPE), ("type", tarfile.SYMTYPE)  # non-regular members
MESSY = [  # (member name, data bytes or a non-regular type), in archive order
    ("imgs/", DIR),
    ("imgs/sub/good0.jpg", _img()), ("imgs/sub/good0.txt", b"a nested key"),
    ("imgs/sub/GOOD1.JPG", _img()), ("imgs/sub/GOOD1.TXT", b"upper-case extensions"),
    ("d.x/k2.png", _img("PNG")), ("d.x/k2.txt", b"a dot in the directory"),
    ("k3.seg.png", _img("PNG")), ("k3.jpg", _img()), ("k3.txt", b"multi-dot field"),
    (f"{LONG_DIR}/k4.jpg", _img()), (f"{LONG_DIR}/k4.txt", b"long name via PAX"),
    ("café/ünï.jpg", _img()), ("café/ünï.txt", "non-ASCII name via PAX".encode()),
    ("bad_img.jpg", b"\xff\xd8 not a jpeg"), ("bad_img.txt", b"corrupt image"),
    ("cut_img.jpg", _noisy_jpeg()[:800]), ("cut_img.txt", b"header fine, pixel data cut short"),
    ("no_cap.jpg", _img()),
    ("blank_cap.jpg", _img()), ("blank_cap.txt", b"  \n "),
    ("bin_cap.jpg", _img()), ("bin_cap.txt", b"\xff\xfe\x00bad"),
    ("no_img.txt", b"caption without image"), ("no_img.json", b"{}"),
    ("both_bad.jpg", b"junk"),
    ("._good5.jpg", b"macOS resource fork"),
    ("README", b"no extension: ignored"),
    ("link.jpg", SYMLINK),
    ("good5.jpg", _img()), ("good5.txt", b"after the junk members"),
    ("split.jpg", _img()), ("between.txt", b"between the halves"), ("split.txt", b"other half"),
]
GOOD_MESSY = ["imgs/sub/good0", "imgs/sub/GOOD1", "d.x/k2", "k3", f"{LONG_DIR}/k4", "café/ünï",
              "good5"]


def _write_messy(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as t:
        for name, data in MESSY:
            info = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                info.type = data[1]
                info.linkname = "good5.jpg" if data == SYMLINK else ""
                t.addfile(info)


def _messy_set(d: Path) -> None:
    d.mkdir(parents=True)
    _write_messy(d / "a-000.tar")
    with ShardWriter(d, prefix="b", samples_per_shard=3) as w:
        for i in range(6):
            w.write({"__key__": f"w{i}", "jpg": _img(color=(i * 40, 0, 0)), "txt": f"caption {i}",
                     "json": {"i": i, "pad": "x" * 50}})
    # b-000000: cut in the middle of w2's json, its last member: w2 is read with the image and the
    # caption it has (as webdataset yields it), so it is a good sample for training and validate
    raw = (d / "b-000000.tar").read_bytes()
    with tarfile.open(d / "b-000000.tar") as t:
        m = [m for m in t.getmembers() if m.name == "w2.json"][0]
    (d / "b-000000.tar").write_bytes(raw[: m.offset_data + 3])
    # b-000001: cut exactly between w4 and w5 (no half member: only the missing end marker tells)
    raw = (d / "b-000001.tar").read_bytes()
    with tarfile.open(d / "b-000001.tar") as t:
        m = [m for m in t.getmembers() if m.name == "w5.jpg"][0]
    (d / "b-000001.tar").write_bytes(raw[: m.offset])


def _stream_keys(shard: str) -> tuple[list[str], Counter]:
    stream = SampleStream([shard], batch_size=4, shuffle=False)
    keys = [k for batch in stream for k in batch["keys"]]
    return keys, stream.skipped


def test_validate_training_embed_agree_on_a_messy_set(tmp_path):
    """Fails when validate and training judge a sample differently (key grouping, truncation
    handling, caption or image rule): sizes.json, the stream's keys, the skip counts of the
    stream, of `xbt embed` and of `iter_image_text` are compared shard by shard."""
    d = tmp_path / "set"
    _messy_set(d)
    report = validate_shards(d)
    sizes = json.loads((d / "sizes.json").read_text())

    keys, skipped = {}, Counter()
    for shard in sorted(d.glob("*.tar")):
        keys[shard.name], s = _stream_keys(str(shard))
        skipped += s
    assert keys == {"a-000.tar": GOOD_MESSY, "b-000000.tar": ["w0", "w1", "w2"],
                    "b-000001.tar": ["w3", "w4"]}
    assert sizes == {name: len(k) for name, k in keys.items()}
    assert report["totals"]["good"] == sum(sizes.values()) == 12
    assert report["skipped"] == dict(skipped) == {
        "bad_image": 5,  # bad_img, cut_img, no_img, between, the txt half of split
        "missing_caption": 5,  # no_cap, blank_cap, bin_cap, both_bad, the jpg half of split
        "truncated_shard": 1}, report["skipped"]  # the mid-member cut; a missing end marker reads clean

    # validate names each bad sample with its key and the reason training skips it for
    first = {}
    for p in report["problems"]:
        first.setdefault((p["shard"], p["key"]), p["problem"])
    assert first[("a-000.tar", "bad_img")] == first[("a-000.tar", "cut_img")] == "bad_image"
    assert first[("a-000.tar", "both_bad")] == "missing_caption"  # caption is checked first
    assert first[("b-000000.tar", "w2")] == "truncated_tar"
    assert first[("b-000001.tar", "w4")] == "truncated_tar"
    assert report["totals"]["truncated_shards"] == 2  # the mid-member cut and the missing end marker

    # `xbt embed` (old-model targets) keeps the same samples and counts the same skips
    enc = {"image_old": lambda ims: np.ones((len(ims), 2)), "text_old": lambda t: np.ones((len(t), 2))}
    counts = embed_shards(str(d), tmp_path / "emb", enc, ["image_old", "text_old"], progress=None)
    assert counts["samples"] == 12 and counts["skipped"] == report["skipped"]
    stats = Counter()
    assert [k for k, *_ in iter_image_text(str(d), stats)] == [k for n in sorted(keys) for k in keys[n]]
    assert dict(stats) == report["skipped"]

    # --no-decode parses headers only: the cut image passes there but not in training (documented)
    fast = validate_shards(d, decode=False, write=False)
    assert fast["totals"]["good"] == 13 and fast["skipped"]["bad_image"] == 4


def test_training_stream_applies_check_sample(tmp_path, monkeypatch):
    """Fails when the training stream judges samples with its own decoders instead of the one
    rule: a stricter `check_sample` (captions of 20+ characters only) must change what it skips,
    under the rule's reason, and the images it yields must be the ones the rule decoded."""
    import xbt_dist.data.stream as stream_mod
    _write_messy(tmp_path / "m.tar")
    rule, decoded = stream_mod.check_sample, {}

    def strict(sample, kind="image-text", **kw):
        verdict = rule(sample, kind, **kw)
        if verdict.good and len(verdict.caption) < 20:
            verdict.problems.append(("missing_caption", "shorter than 20 characters"))
        decoded[sample["__key__"]] = verdict.image
        return verdict

    before = SampleStream([str(tmp_path / "m.tar")], batch_size=4, shuffle=False)
    assert [k for b in before for k in b["keys"]] == GOOD_MESSY
    monkeypatch.setattr(stream_mod, "check_sample", strict)
    stream = SampleStream([str(tmp_path / "m.tar")], batch_size=4, shuffle=False)
    batches = list(stream)
    keys = [k for b in batches for k in b["keys"]]
    captions = [c for b in batches for c in b["captions"]]
    assert keys and all(len(c) >= 20 for c in captions), captions
    short = [k for k in GOOD_MESSY if k not in keys]
    assert short, "the stricter rule rejected nothing: the stream did not ask it"
    assert stream.skipped["missing_caption"] == before.skipped["missing_caption"] + len(short)
    assert stream.skipped["bad_image"] == before.skipped["bad_image"]
    for b in batches:
        for k, im in zip(b["keys"], b["images"]):
            assert im is decoded[k]  # decoded once, by the rule


def test_check_sample_is_the_decode_rule_training_uses(tmp_path):
    """Fails when the rule validate and training use (`check_sample`) and the decoders `xbt embed`
    and evaluation call (`decode_caption`, `decode_image`) disagree on any sample of the messy shard."""
    _write_messy(tmp_path / "m.tar")
    samples = list(iter_raw_samples(str(tmp_path / "m.tar")))
    assert len(samples) == 17  # 7 good, 10 bad; ._ fork, README, dir and symlink ignored
    for s in samples:
        verdict = check_sample(s, "image_text")
        caption, image = decode_caption(s), decode_image(s)
        assert verdict.good == (caption is not None and image is not None) == is_good_sample(s), s["__key__"]
        if verdict.good:
            assert verdict.caption == caption
            assert np.array_equal(np.asarray(verdict.image), np.asarray(image))
        elif caption is None:
            assert verdict.reason == "missing_caption"
        else:
            assert verdict.reason == "bad_image"
        # text kind: only the caption matters
        assert check_sample(s, "text").good == (caption is not None)
    # training stops at the first problem (no image decode for a sample without caption)
    both = next(s for s in samples if s["__key__"] == "both_bad")
    assert [r for r, _ in check_sample(both).problems] == ["missing_caption"]
    assert [r for r, _ in check_sample(both, all_problems=True).problems] == ["missing_caption", "bad_image"]
    with pytest.raises(ValueError, match="kind='images'"):
        check_sample(both, "images")


def test_key_rule_and_writer_round_trip(tmp_path):
    """Fails when the writer accepts a key the reader would split, hide or rename, or when what
    it writes does not read back as the same sample dicts."""
    assert split_member_name("a/b.c/k.seg.PNG") == ("a/b.c/k", "seg.png")
    assert split_member_name("dir/._k.jpg") == (None, None)
    assert split_member_name("README") == (None, None)
    for key, field in (("a.b", "txt"), ("._k", "txt"), ("k", "JPG"), ("", "txt"), ("k", "")):
        with pytest.raises(ValueError, match="does not survive the tar round trip"):
            check_member_name(key, field)

    samples = [{"__key__": "dir/sub/k0", "jpg": _img(), "txt": "ü nested", "json": {"i": 0}},
               {"__key__": "k1", "seg.png": _img("PNG"), "txt": "plain", "cls": 3},
               {"__key__": "z" * 120, "txt": "long key"}]
    with ShardWriter(tmp_path, samples_per_shard=2) as w:
        for s in samples:
            w.write(s)
        with pytest.raises(ValueError, match="'bad.key'"):
            w.write({"__key__": "bad.key", "txt": "x"})
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"shard-000000.tar": 2,
                                                                  "shard-000001.tar": 1}
    back = [s for p in sorted(tmp_path.glob("*.tar")) for s in iter_raw_samples(str(p))]
    assert [s["__key__"] for s in back] == [s["__key__"] for s in samples]
    assert back[0]["txt"] == "ü nested".encode() and json.loads(back[0]["json"]) == {"i": 0}
    assert back[1]["seg.png"] == samples[1]["seg.png"] and back[1]["cls"] == b"3"
    assert all(tar_is_complete(str(p)) for p in tmp_path.glob("*.tar"))
    assert not list(tmp_path.glob(".*.tmp"))  # the failed write left no temp file
