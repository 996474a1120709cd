"""Prep stages without network: text corpus, validate, eval/zero-shot converters, CLI wiring."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from xbt_dist.prep.cli import main as prep_main
from xbt_dist.prep.evalsets import build_retrieval_set, build_zeroshot_set
from xbt_dist.data.shards import ShardWriter, ustar_header
from xbt_dist.data.stream import SampleStream
from xbt_dist.prep.text import HashSet64, TextCorpusConfig, build_text_corpus, normalize_text
from xbt_dist.prep.validate import validate_shards


def read_sizes(d: Path) -> dict:
    return json.loads((d / "sizes.json").read_text())


def _jpeg(color=(200, 30, 30), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _read_texts(d: Path) -> list[tuple[str, str]]:
    ds = wds.WebDataset(sorted(str(p) for p in d.glob("*.tar")), shardshuffle=False)
    return [(s["__key__"], s["txt"].decode()) for s in ds]


# ---------------------------------------------------------------- shard writer

@pytest.mark.parametrize("name,size", [("k.txt", 0), ("0000000001.txt", 37), ("é_ü.jpg", 512),
                                       ("a" * 96 + ".txt", 10**6), ("d" * 60 + "/" + "b" * 60 + ".txt", 3)])
def test_ustar_header_matches_tarfile(name, size):
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.size = 0o644, 0, size
    assert ustar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")


def test_tar_shard_writer_reads_back_with_tarfile_and_webdataset(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=2) as w:
        for i in range(3):
            w.write({"__key__": f"s{i}", "txt": "x" * (i * 300), "json": {"i": i}})
    assert read_sizes(tmp_path) == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        assert [m.name for m in tf] == ["s0.txt", "s0.json", "s1.txt", "s1.json"]
    assert (tmp_path / "shard-000000.tar").stat().st_size % 10240 == 0
    got = [(s["__key__"], len(s["txt"])) for s in
           wds.WebDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), shardshuffle=False)]
    assert got == [("s0", 0), ("s1", 300), ("s2", 600)]
    assert validate_shards(tmp_path, kind="text")["totals"]["problems"] == 1  # s0: empty txt


# ---------------------------------------------------------------- text corpus

def test_normalize_text():
    assert normalize_text("  a\tcat \n on\u00a0a  mat ") == "a cat on a mat"
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # NFD -> NFC


def test_hashset64_matches_python_set():
    rng = np.random.default_rng(0)
    s, ref = HashSet64(), set()
    for _ in range(40):
        batch = rng.integers(0, 500, size=int(rng.integers(1, 60)), dtype=np.uint64)
        new = s.add_batch(batch)
        expect = []
        for h in batch.tolist():
            expect.append(h not in ref)
            ref.add(h)
        assert new.tolist() == expect
    assert len(s) == len(ref) and len(s.runs) <= 12


def test_text_corpus_from_parquet_txt_and_tar(tmp_path):
    import pandas as pd

    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"TEXT": ["a dog on grass", None, "a  dog on grass", "x", "caf\u0065\u0301 at night"],
                  "URL": ["u"] * 5}).to_parquet(src / "a.parquet")
    (src / "b.txt").write_text("a dog on grass\nthe red bus\n\n" + "y" * 50 + "\ncafé at night\n")
    with ShardWriter(tmp_path / "wds", samples_per_shard=10) as w:
        w.write({"__key__": "k0", "jpg": _jpeg(), "txt": "the red bus"})
        w.write({"__key__": "k1", "jpg": _jpeg(), "txt": "a boat"})

    out = tmp_path / "corpus"
    cfg = TextCorpusConfig(min_chars=3, max_chars=40, texts_per_shard=2, batch_size=3)
    counts = build_text_corpus([str(src), str(tmp_path / "wds" / "*.tar")], out, cfg)

    texts = [t for _, t in _read_texts(out)]
    assert texts == ["a dog on grass", "café at night", "the red bus", "a boat"]
    assert counts.read == 12 and counts.written == 4
    assert counts.too_short == 3 and counts.too_long == 1 and counts.duplicates == 4
    assert read_sizes(out) == {"text-000000.tar": 2, "text-000001.tar": 2}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "text_shards" and manifest["counts"]["written"] == 4

    # deterministic: same inputs -> byte-identical shards
    out2 = tmp_path / "corpus2"
    build_text_corpus([str(src), str(tmp_path / "wds" / "*.tar")], out2, cfg)
    for p in sorted(out.glob("*.tar")):
        assert p.read_bytes() == (out2 / p.name).read_bytes()


def test_text_corpus_names_missing_parquet_column(tmp_path):
    import pandas as pd

    pd.DataFrame({"sentence": ["hello there"]}).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="--caption-col"):
        build_text_corpus([str(tmp_path / "a.parquet")], tmp_path / "o")


# ---------------------------------------------------------------- validate

def _make_bad_set(d: Path) -> None:
    with ShardWriter(d, samples_per_shard=4) as w:
        for i in range(4):
            w.write({"__key__": f"a{i}", "jpg": _jpeg(), "txt": f"caption {i}"})
        w.write({"__key__": "b0", "jpg": b"\xff\xd8 not really a jpeg", "txt": "corrupt image"})
        w.write({"__key__": "b1", "jpg": _jpeg()})  # missing caption
        w.write({"__key__": "b2", "jpg": _jpeg(), "txt": "fine"})
        for i in range(4):
            w.write({"__key__": f"c{i}", "jpg": _jpeg(size=(64, 64)), "txt": f"c {i}"})
    # cut the third shard in the middle of its last member
    third = d / "shard-000002.tar"
    with tarfile.open(third) as tf:
        last_jpg = [m for m in tf.getmembers() if m.name.endswith(".jpg")][-1]
    third.write_bytes(third.read_bytes()[: last_jpg.offset_data + last_jpg.size // 2])


def test_validate_reports_truncated_corrupt_and_missing_caption(tmp_path, capsys):
    d = tmp_path / "set"
    _make_bad_set(d)
    report = validate_shards(d)
    kinds = {(p["shard"], p["key"], p["problem"]) for p in report["problems"]}
    assert ("shard-000001.tar", "b0", "bad_image") in kinds
    assert ("shard-000001.tar", "b1", "missing_caption") in kinds
    assert any(s == "shard-000002.tar" and p == "truncated_tar" for s, _, p in kinds)
    assert report["totals"]["truncated_shards"] == 1
    sizes = read_sizes(d)
    assert sizes["shard-000000.tar"] == 4 and sizes["shard-000001.tar"] == 2
    assert sizes["shard-000002.tar"] == 2  # c1, c2 before the cut
    assert json.loads((d / "validate.json").read_text())["totals"]["problems"] == 3
    parallel = validate_shards(d, workers=2, write=False)
    assert parallel["totals"] == report["totals"] and parallel["problems"] == report["problems"]

    # CLI: summary printed, exit 0 unless --strict
    assert prep_main(["validate", str(d)]) == 0
    out = capsys.readouterr().out
    assert "bad_image" in out and "truncated_tar" in out and "missing_caption" in out
    assert prep_main(["validate", str(d), "--strict", "--no-decode", "--dry-run"]) == 1


def test_validate_sizes_match_what_training_stream_yields(tmp_path):
    """Acceptance: validate's sizes.json == the samples the training stream keeps; the stream
    skips (and counts) the same bad samples instead of crashing."""
    d = tmp_path / "set"
    _make_bad_set(d)
    report = validate_shards(d)
    stream = SampleStream(str(d), batch_size=4, shuffle=False)
    keys = [k for batch in stream for k in batch["keys"]]
    assert len(keys) == sum(read_sizes(d).values()) == report["totals"]["good"]
    assert stream.skipped["missing_caption"] == 1 and stream.skipped["bad_image"] == 1
    assert stream.skipped["truncated_shard"] == 1


def test_validate_tar_cut_at_member_boundary(tmp_path):
    d = tmp_path / "set"
    with ShardWriter(d, samples_per_shard=10) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "txt": f"text number {i}"})
    p = d / "shard-000000.tar"
    with tarfile.open(p) as tf:
        cut = tf.getmembers()[2].offset  # header of the third sample: a clean member boundary
    p.write_bytes(p.read_bytes()[:cut])
    report = validate_shards(d, kind="text")
    assert report["totals"]["truncated_shards"] == 1 and report["totals"]["good"] == 2


# ---------------------------------------------------------------- eval sets

def test_karpathy_coco_and_flickr_and_nocaps(tmp_path):
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (root / "val2014" / name).write_bytes(_jpeg())
    Image.new("RGB", (8, 8)).save(root / "c.png")
    coco = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 1,
         "sentences": [{"raw": "first a"}, {"raw": "second a "}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "train", "cocoid": 2,
         "sentences": [{"raw": "train b"}]},
        {"filepath": "val2014", "filename": "gone.jpg", "split": "test", "cocoid": 3,
         "sentences": [{"raw": "missing"}]},
        {"filepath": "", "filename": "c.png", "split": "test", "cocoid": 4,
         "sentences": [{"raw": "png c"}, {"raw": "c again"}, {"raw": "c thrice"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(coco))
    counts = build_retrieval_set(tmp_path / "dataset_coco.json", root, tmp_path / "coco", fmt="coco")
    assert counts == {"images": 2, "captions": 5, "missing_images": 1, "no_captions": 0}
    samples = list(wds.WebDataset(str(tmp_path / "coco" / "coco-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["1", "4"]
    assert samples[0]["txt"] == b"first a" and "jpg" in samples[0] and "png" in samples[1]
    assert json.loads(samples[0]["json"])["captions"] == ["first a", "second a"]
    assert json.loads(samples[1]["json"])["captions"] == ["png c", "c again", "c thrice"]
    assert json.loads((tmp_path / "coco" / "manifest.json").read_text())["counts"]["missing_images"] == 1
    assert validate_shards(tmp_path / "coco")["totals"]["problems"] == 0

    flickr = {"images": [{"filename": "a.jpg", "split": "test", "imgid": 0,
                          "sentences": [{"raw": f"cap {i}"} for i in range(5)]}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    # Flickr has no filepath; the flat-folder fallback finds a.jpg in a subfolder-less root too
    assert prep_main(["evalset", str(tmp_path / "dataset_flickr30k.json"), "--format", "flickr30k",
                      "--image-root", str(root / "val2014"), "--out", str(tmp_path / "flickr")]) == 0
    s = next(iter(wds.WebDataset(str(tmp_path / "flickr" / "flickr30k-000000.tar"), shardshuffle=False)))
    assert len(json.loads(s["json"])["captions"]) == 5

    nocaps = {"images": [{"id": 7, "file_name": "a.jpg", "domain": "out-domain"},
                         {"id": 8, "file_name": "nope.jpg"}],
              "annotations": [{"image_id": 7, "caption": "n1", "id": 1},
                              {"image_id": 7, "caption": "n2", "id": 2},
                              {"image_id": 8, "caption": "n3", "id": 3}]}
    (tmp_path / "nocaps.json").write_text(json.dumps(nocaps))
    counts = build_retrieval_set(tmp_path / "nocaps.json", root / "val2014", tmp_path / "nc", fmt="nocaps")
    assert counts["images"] == 1 and counts["missing_images"] == 1 and counts["captions"] == 2


def test_zeroshot_from_folder_and_mapping(tmp_path):
    root = tmp_path / "imgs"
    for ci, cls in enumerate(["n001", "n002"]):
        (root / cls).mkdir(parents=True)
        for j in range(2):
            (root / cls / f"{j}.jpg").write_bytes(_jpeg((ci * 100, 0, 0)))
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    (tmp_path / "tmpl.txt").write_text("a photo of a {}.\na sketch of a {}.\n")
    assert prep_main(["zeroshot", str(root), "--out", str(tmp_path / "zs"), "--class-names",
                      str(tmp_path / "names.txt"), "--templates", str(tmp_path / "tmpl.txt")]) == 0
    classes = json.loads((tmp_path / "zs" / "classes.json").read_text())
    assert classes == {"classes": ["cat", "dog"], "templates": ["a photo of a {}.", "a sketch of a {}."]}
    samples = list(wds.WebDataset(str(tmp_path / "zs" / "zeroshot-000000.tar"), shardshuffle=False))
    assert [int(s["cls"]) for s in samples] == [0, 0, 1, 1]
    rep = validate_shards(tmp_path / "zs")
    assert rep["kind"] == "zeroshot" and rep["totals"]["good"] == 4

    (tmp_path / "map.csv").write_text("path,class\nn002/0.jpg,dog\nn001/1.jpg,cat\nn001/9.jpg,cat\n")
    counts = build_zeroshot_set(root, tmp_path / "zs2", mapping=tmp_path / "map.csv")
    assert counts == {"images": 2, "missing_images": 1, "classes": 2}
    with pytest.raises(ValueError, match="one name per class"):
        (tmp_path / "three.txt").write_text("a\nb\nc\n")
        build_zeroshot_set(root, tmp_path / "zs3", class_names=tmp_path / "three.txt")
    with pytest.raises(ValueError, match="templates must contain"):
        build_zeroshot_set(root, tmp_path / "zs4", templates=["a photo"])


# ---------------------------------------------------------------- CLI wiring

def test_add_prep_parser_registers_all_subcommands(tmp_path, capsys):
    import argparse

    from xbt_dist.prep.cli import add_prep_parser

    ap = argparse.ArgumentParser(prog="xbt")
    add_prep_parser(ap.add_subparsers(dest="cmd", required=True))
    for cmd in ("images", "text", "evalset", "zeroshot", "validate"):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(["prep", cmd, "--help"])
        assert e.value.code == 0
    args = ap.parse_args(["prep", "images", "u.parquet", "out", "--preset", "laion400m", "--thread-count", "8"])
    assert args.func.__name__ == "_images" and args.thread_count == 8 and args.image_size is None
    # input errors: one line naming the problem, exit 2, no traceback
    assert prep_main(["validate", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
