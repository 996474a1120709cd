"""From URLs to training: URL list (good and bad URLs) -> img2dataset shards -> validate -> a short XBT
run on them; a corrupted shard in the set is reported by validate and skipped (counted) by training."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from test_prep_images import _Handler, server  # noqa: F401  (the local HTTP server fixture)
from xbt_dist.cli import main as xbt
from xbt_dist.config import dump_config
from xbt_testing.synthetic import write_bad_shard
from xbt_dist.prep.images import ImagesConfig, download_images


@pytest.mark.timeout(300)
def test_urls_to_shards_to_xbt_run(server, tiny_cfg, tmp_path):  # noqa: F811
    rows = [{"url": server + p, "caption": f"caption of {p}"} for p in sorted(_Handler.images)]
    rows += [{"url": server + p, "caption": "bad"} for p in ("/missing.jpg", "/not_image.jpg")]
    pd.DataFrame(rows).to_parquet(tmp_path / "urls.parquet")
    shards = tmp_path / "shards"
    report = download_images(ImagesConfig(
        url_list=str(tmp_path / "urls.parquet"), output_folder=str(shards), processes_count=1,
        thread_count=4, number_sample_per_shard=3, timeout=2, image_size=32, compute_hash=None))
    assert report["totals"]["successes"] == 6 and report["failures_total"] == 2
    write_bad_shard(shards / "zz-corrupt.tar")  # 2 good samples, a corrupt jpg, a missing caption

    assert xbt(["prep", "validate", str(shards)]) == 0
    v = json.loads((shards / "validate.json").read_text())
    kinds = sorted(p["problem"] if "problem" in p else p.get("kind", "") for p in v["problems"])
    assert v["totals"]["good"] == 8 and v["totals"]["problems"] == 2, v["totals"]
    assert json.loads((shards / "sizes.json").read_text())["zz-corrupt.tar"] == 2

    cfg = tiny_cfg
    cfg.train.train_shards, cfg.train.phi_init = str(shards), "random"
    cfg.train.batch_size, cfg.train.max_steps = 4, 2
    cfg.data.max_bad_fraction = 0.5  # 2 bad of 10 samples: far above the 5 % a real set may lose
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    assert xbt(["embed", "--config", str(path)]) == 0  # old-model targets of the 8 good samples
    assert xbt(["train", "--config", str(path)]) == 0
    manifest = json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 8
    assert manifest["counts"]["skipped"] == {"bad_image": 1, "missing_caption": 1}
