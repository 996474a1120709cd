"""bench.sweeps data subsets: the first N corpus rows, the first shards holding N training pairs."""

import json

import numpy as np
import pytest

from bench import sweeps
from xbt_dist.data.embed import load_embeddings
from xbt_dist.data.embeddings import write_embedding_manifest, write_embedding_shard
from xbt_dist.data.shards import list_shards


def test_subset_embeddings_takes_the_first_rows(tmp_path):
    src = tmp_path / "emb"
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    write_embedding_shard(src, "shard-000000", [f"k{i}" for i in range(3)], {"text_new": a[:3], "text_old": b[:3]})
    write_embedding_shard(src, "shard-000001", [f"k{i}" for i in range(3, 5)],
                          {"text_new": a[3:], "text_old": b[3:]})
    write_embedding_manifest(src, "test", {})
    dst = sweeps.subset_embeddings(str(src), tmp_path / "sub", 4)
    sub, full = load_embeddings(dst), load_embeddings(str(src))
    assert sub.keys() == ["k0", "k1", "k2", "k3"]
    np.testing.assert_array_equal(np.asarray(sub.load("text_old")), np.asarray(full.load("text_old"))[:4])
    with pytest.raises(ValueError, match="larger toy world"):
        sweeps.subset_embeddings(str(src), tmp_path / "too_many", 6)


def test_subset_shards_whole_shards_only(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    sizes = {f"shard-{i:06d}.tar": 10 for i in range(4)}
    for name in sizes:
        (d / name).write_bytes(b"")
    (d / "sizes.json").write_text(json.dumps(sizes))
    spec = sweeps.subset_shards(str(d), 20)
    assert spec == f"{d}/shard-{{000000..000001}}.tar"
    assert [p.rsplit("/", 1)[1] for p in list_shards(spec)] == ["shard-000000.tar", "shard-000001.tar"]
    assert list_shards(sweeps.subset_shards(str(d), 10)) == [f"{d}/shard-000000.tar"]
    with pytest.raises(ValueError, match="whole number of shards"):
        sweeps.subset_shards(str(d), 15)
    with pytest.raises(ValueError, match="larger toy world"):
        sweeps.subset_shards(str(d), 50)


def test_default_sized_points_are_one_run_shared_by_every_sweep(tmp_path):
    from xbt_dist.config import RunConfig
    base = RunConfig()
    full = {"corpus": 600, "pairs": 120}
    dirs = {sweeps.point_config(base, sweep, size, 2, tmp_path, full).out_dir
            for sweep, size in (("corpus", 600), ("pairs", 120), ("phi_width", base.phi.hidden))}
    assert dirs == {str(tmp_path / "default" / "seed2")}
    narrow = sweeps.point_config(base, "phi_width", base.phi.hidden // 2, 2, tmp_path, full)
    assert narrow.out_dir == str(tmp_path / "phi_width" / f"n{base.phi.hidden // 2}" / "seed2")
    assert narrow.phi.hidden == base.phi.hidden // 2 and base.phi.hidden != narrow.phi.hidden
    assert narrow.train.seed == 2
    with pytest.raises(ValueError, match="unknown sweep"):
        sweeps.point_config(base, "depth", 3, 0, tmp_path, full)
