"""Tests of the streamed evaluation (xbt_dist/eval/stream.py and `run_eval` on top of it).

- canonical order, caption_to_image and skip counts do not depend on decode workers or batch size
  (real DataLoader worker processes, shard counts and batch sizes that do not divide);
- `run_eval` on real tiny open_clip models gives exactly the recalls, zero-shot accuracies and
  on-off result of the in-RAM path it replaced (bench.eval_stream.views_in_ram), ties included;
- ranking keeps fp16 inputs in fp16 and equals the fp32 path on the same values, chunked or not;
- the streamed on-off check equals the one over whole tensors; bad eval config keys are named.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from xbt_dist.config import ConfigError, load_config
from xbt_dist.eval.compat import OnOffCheck, compatibility_report, on_off_check
from xbt_dist.eval.metrics import positive_ranks, retrieval_recalls
from xbt_dist.eval.stream import embed_stream


def _jpeg(value: int, size: int = 16) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, (7 * value) % 256)).save(buf, "PNG")
    return buf.getvalue()


def write_eval_set(root: Path, layout=((0, 7), (1, 5), (2, 6)), zeroshot=False,
                   ties=False) -> dict:
    """Shards of uneven sizes; per sample 1-3 captions; a bad sample of each kind.

    Returns what the canonical order must be: image ids in order, captions per image, skips.
    Image id i is drawn with pixel value i, its captions are "cap <i> <k>" (the tokenizer used by
    the order test reads the numbers back). `ties`: image 8 is drawn exactly like image 3 and
    image 9's first caption is image 2's, so both directions have exact score ties.
    """
    import webdataset as wds
    root.mkdir(parents=True, exist_ok=True)
    expect = {"ids": [], "caps": [], "skipped": {}}
    gid = 0
    for shard, n in layout:
        with wds.TarWriter(str(root / f"eval-{shard:03d}.tar")) as w:
            for i in range(n):
                key = f"{shard:03d}{i:04d}"
                if (shard, i) in ((1, 2), (0, n - 1)):  # no caption/label: skipped; the last
                    w.write({"__key__": key, "png": _jpeg(gid)})  # one ends a worker's stream
                    reason = "missing_caption" if not zeroshot else "missing_label"
                    expect["skipped"][reason] = expect["skipped"].get(reason, 0) + 1
                    continue
                if (shard, i) == (2, 0):       # undecodable image: skipped
                    w.write({"__key__": key, "png": b"not an image", "txt": "x", "cls": "0"})
                    expect["skipped"]["bad_image"] = 1
                    continue
                caps = [f"cap {gid} {k}" for k in range(1 + gid % 3)]
                pixels = gid
                if ties and gid == 8:
                    pixels = 3
                if ties and gid == 9:
                    caps[0] = "cap 2 0"
                sample = {"__key__": key, "png": _jpeg(pixels), "txt": caps[0],
                          "json": {"captions": caps}, "cls": str(gid % 3)}
                w.write(sample)
                expect["ids"].append(gid)
                expect["caps"].append(len(caps))
                gid += 1
    if zeroshot:
        (root / "classes.json").write_text(json.dumps(
            {"classes": ["red", "green", "blue"], "templates": ["a photo of {}.", "{}"]}))
    return expect


def _pixel(im) -> torch.Tensor:
    return torch.tensor([float(im.getpixel((0, 0))[0])])


def _numbers(caps: list[str]) -> torch.Tensor:
    return torch.tensor([[float(c.split()[1]), float(c.split()[2])] for c in caps])


def _identity(batch):
    return {"v": {"image": batch["images"]["px"], "text": batch["texts"]["num"]}}


@pytest.mark.parametrize("workers,batch", [(0, 4), (1, 1), (2, 3), (3, 3), (3, 4), (5, 100)])
def test_canonical_order_independent_of_workers_and_batches(tmp_path, workers, batch):
    expect = write_eval_set(tmp_path / "eval")
    lines = []
    res = embed_stream(str(tmp_path / "eval"), _identity, {"px": _pixel}, {"num": _numbers},
                       batch_size=batch, num_workers=workers, progress_every=1,
                       log_fn=lines.append)
    assert res.views["v"]["image"].dtype == torch.float32         # eval.embed_dtype default
    assert res.views["v"]["image"][:, 0].tolist() == expect["ids"]
    want_caps = [(i, k) for i, n in zip(expect["ids"], expect["caps"]) for k in range(n)]
    assert [tuple(r) for r in res.views["v"]["text"].int().tolist()] == want_caps
    assert res.caption_to_image.tolist() == [j for j, n in enumerate(expect["caps"])
                                             for _ in range(n)]
    assert res.skipped == expect["skipped"]
    # one progress line per batch plus the closing summary
    assert len(lines) >= 2 and "images/s" in lines[0] and "embedded in" in lines[-1]


def test_zeroshot_mode_labels_in_order(tmp_path):
    expect = write_eval_set(tmp_path / "zs", zeroshot=True)
    res = embed_stream(str(tmp_path / "zs"), lambda b: {"v": {"image": b["images"]["px"]}},
                       {"px": _pixel}, mode="zeroshot", batch_size=2, num_workers=2,
                       log_fn=lambda s: None)
    assert res.views["v"]["image"][:, 0].tolist() == expect["ids"]
    assert res.labels.tolist() == [i % 3 for i in expect["ids"]]


def test_empty_set_names_the_set(tmp_path):
    import webdataset as wds
    (tmp_path / "e").mkdir()
    with wds.TarWriter(str(tmp_path / "e" / "e-000.tar")) as w:
        w.write({"__key__": "a", "png": b"broken", "txt": "x"})
    with pytest.raises(ValueError, match="holds no readable sample.*bad_image"):
        embed_stream(str(tmp_path / "e"), _identity, {"px": _pixel}, {"num": _numbers},
                     num_workers=0, log_fn=lambda s: None)


# ------------------------------------------------------------------------- ranking in fp16


def test_fp16_views_rank_like_fp32_chunked_or_not():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(37, 16, generator=g).half()
    txt = (img.float().repeat_interleave(3, 0) + torch.randn(111, 16, generator=g)).half()
    img[5] = img[4]                                  # an exact tie: counts against both
    c2i = torch.arange(37).repeat_interleave(3)
    ref = retrieval_recalls(img.float(), txt.float(), c2i, ks=(1, 5))
    for chunk in (None, 1, 7, 36, 500):              # 7 and 36 do not divide 37 or 111
        assert retrieval_recalls(img, txt, c2i, ks=(1, 5), chunk_size=chunk) == ref
    r = positive_ranks(txt, img, c2i, torch.arange(37), chunk_size=7)
    assert (r == positive_ranks(txt.float(), img.float(), c2i, torch.arange(37))).all()
    assert int(r[12]) >= 1 and int(r[15]) >= 1       # captions of images 4 and 5 tie


def test_streamed_on_off_equals_whole_tensor_check():
    g = torch.Generator().manual_seed(0)
    new = {"image": torch.randn(10, 4, generator=g), "text": torch.randn(20, 4, generator=g)}
    off = {k: v.clone() for k, v in new.items()}
    acc = OnOffCheck()
    for s in range(0, 10, 3):
        acc.update({"image": new["image"][s:s + 3], "text": new["text"][2 * s:2 * s + 6]},
                   {"image": off["image"][s:s + 3], "text": off["text"][2 * s:2 * s + 6]})
    assert acc.result() == on_off_check(new, off) == {"equal": True, "max_abs_diff": 0.0}
    off["text"][13, 2] += 1e-6                        # one element of one later batch
    acc = OnOffCheck()
    for s in range(0, 10, 3):
        acc.update({"image": new["image"][s:s + 3], "text": new["text"][2 * s:2 * s + 6]},
                   {"image": off["image"][s:s + 3], "text": off["text"][2 * s:2 * s + 6]})
    assert acc.result() == on_off_check(new, off)
    assert acc.result()["equal"] is False
    views = {"old": new, "new": new}
    assert compatibility_report(views, torch.arange(10).repeat_interleave(2),
                                on_off=acc.result())["on_off"]["equal"] is False


def test_eval_config_keys_checked():
    with pytest.raises(ConfigError, match="eval.num_workers"):
        load_config(None, ["eval.num_workers=-1"])
    with pytest.raises(ConfigError, match="eval.rank_device"):
        load_config(None, ["eval.rank_device=tpu"])


# ------------------------------------------------------------------------- old path == new


def _cases(compat: dict) -> dict:
    return {n: {d: c[d] for d in ("t2i", "i2t")} for n, c in compat["cases"].items()}


def test_run_eval_equals_in_ram_path(tiny, tmp_path):
    """The streamed `run_eval` reproduces the in-RAM eval (bench.eval_stream.views_in_ram).

    The embeddings agree to float rounding (the two paths batch differently, and CPU kernels are not
    batch-invariant to the last bit). The tiny random models put every embedding within rounding of
    the others, so ranks on this set turn on those last bits. The recalls are therefore checked
    exactly against the report of the streamed views themselves, and the views against the in-RAM
    ones to 1e-6.
    embed_dtype=float32: exactly the streamed views' recalls, verdict, zero-shot and on-off result.
    embed_dtype=float16: exactly the recalls of the float32 views rounded to float16.
    """
    from bench.eval_stream import views_in_ram, write_eval_world, zero_shot_in_ram
    from xbt_dist.eval.evaluate import load_towers, run_eval
    write_eval_set(tmp_path / "eval", ties=True)
    write_eval_set(tmp_path / "zs", zeroshot=True, ties=True)
    models = {"old": (tiny["old_arch"], tiny["old_checkpoint"]),
              "new": (tiny["new_arch"], tiny["new_checkpoint"])}
    cfg = write_eval_world(tmp_path, str(tmp_path / "eval"), models, phi_hidden=32, extra=[
        "adapters.text_prompts=2", "adapters.visual_prompts=2", "eval.batch_size=4",
        "eval.num_workers=2", "eval.chunk_size=5", "eval.tsne_points=8", "eval.ks=[1,2,5]",
        "eval.criterion_ks=[1]", "eval.rank_device=cpu", "eval.embed_dtype=float32"])
    cfg.eval.zeroshot_shards = str(tmp_path / "zs")
    towers = load_towers(cfg)
    views, c2i = views_in_ram(towers, cfg.eval.eval_shards, batch_size=3)
    ref_zs = zero_shot_in_ram(towers, cfg.eval.zeroshot_shards, batch_size=3)
    streamed = load_towers(cfg).stream(cfg.eval.eval_shards, cfg.eval, "retrieval", "eval set")
    assert torch.equal(streamed.caption_to_image, c2i)
    for v in ("old", "new", "phi", "xbt"):
        for m in ("image", "text"):
            assert streamed.views[v][m].dtype == torch.float32
            assert torch.allclose(streamed.views[v][m], views[v][m], rtol=0, atol=1e-6), (v, m)
    ref = compatibility_report(streamed.views, c2i, ks=(1, 2, 5), verdict_ks=(1,))

    res = run_eval(cfg)
    assert res["compat"]["eval_set"]["n_images"] == len(views["old"]["image"])
    assert res["compat"]["eval_set"]["skipped"] == {"missing_caption": 2, "bad_image": 1}
    assert _cases(res["compat"]) == _cases(ref)
    assert res["compat"]["verdict"] == ref["verdict"]
    assert res["compat"]["on_off"] == on_off_check(views["new"], views["new_adapters_off"]) \
        == {"equal": True, "max_abs_diff": 0.0}
    assert res["zero_shot"] == ref_zs
    assert set(res["compat"]["cases"]) == {"old/old", "new/old", "phi/old", "xbt/old",
                                            "new/new", "xbt/xbt"}
    md = Path(res["paths"]["report_md"]).read_text()
    assert "On-off check" in md and "**pass**" in md

    # float16 (opt-in, half the memory): the kept rows are the float32 ones rounded to fp16, in order,
    # and ranking them gives exactly the recalls of those views rounded the same way
    cfg.eval.embed_dtype = "float16"
    s16 = load_towers(cfg).stream(cfg.eval.eval_shards, cfg.eval, "retrieval", "eval set")
    assert torch.equal(s16.caption_to_image, c2i)
    for v in ("old", "new", "phi", "xbt"):
        for m in ("image", "text"):
            assert s16.views[v][m].dtype == torch.float16
            assert torch.equal(s16.views[v][m], streamed.views[v][m].half()), (v, m)
    ref16 = compatibility_report({v: {m: x.half() for m, x in mods.items()}
                                  for v, mods in streamed.views.items()}, c2i, ks=(1, 2, 5),
                                 verdict_ks=(1,))
    res16 = run_eval(cfg, out_dir=str(tmp_path / "eval16"))
    assert _cases(res16["compat"]) == _cases(ref16)
    assert res16["compat"]["on_off"]["equal"] is True
