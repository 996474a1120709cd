"""Shard listing, sizes, plain iterators and bad-sample handling."""

import json
import tarfile
from collections import Counter

import pytest

from xbt_dist.data.shards import (ShardError, iter_image_text, iter_text,
                                  list_shards, shard_sizes)
from xbt_testing.synthetic import write_bad_shard, write_image_text_shards, write_text_shards


def test_list_dir_glob_brace_and_url(tmp_path):
    paths = write_image_text_shards(tmp_path, n_shards=3, per_shard=2)
    assert list_shards(tmp_path) == paths
    assert list_shards(str(tmp_path / "*.tar")) == paths
    assert list_shards(str(tmp_path / "shard-{000..002}.tar")) == paths
    assert list_shards(f"file://{tmp_path}") == paths
    assert list_shards([paths[0], paths[2]]) == [paths[0], paths[2]]


def test_list_errors_name_path_and_fix(tmp_path):
    write_image_text_shards(tmp_path, n_shards=2, per_shard=1)
    with pytest.raises(ShardError, match=r"shard-002.tar.*fix the brace range"):
        list_shards(str(tmp_path / "shard-{000..002}.tar"))
    with pytest.raises(ShardError, match="no shard matches the glob"):
        list_shards(str(tmp_path / "nope-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="holds no"):
        list_shards(tmp_path / "empty")
    with pytest.raises(ShardError, match="does not exist"):
        list_shards(tmp_path / "missing")


def test_sizes_from_json_or_count(tmp_path):
    write_image_text_shards(tmp_path / "a", n_shards=2, per_shard=3)
    assert shard_sizes(tmp_path / "a") == {"shard-000.tar": 3, "shard-001.tar": 3}
    write_image_text_shards(tmp_path / "b", n_shards=2, per_shard=3, sizes=True)
    (tmp_path / "b" / "sizes.json").write_text(json.dumps({"shard-000.tar": 7, "shard-001.tar": 3}))
    assert shard_sizes(tmp_path / "b")["shard-000.tar"] == 7  # trusted, not recounted


def test_iterators(tmp_path):
    write_image_text_shards(tmp_path / "it", n_shards=2, per_shard=3)
    rows = list(iter_image_text(tmp_path / "it"))
    assert len(rows) == 6
    key, image, caption, meta = rows[0]
    assert key == "00000000" and image.size == (16, 16) and image.mode == "RGB"
    assert caption == "a photo of thing 00000000" and meta == {"shard": 0, "i": 0}
    write_text_shards(tmp_path / "t", n_shards=2, per_shard=2)
    assert [k for k, _ in iter_text(tmp_path / "t")] == ["00000000", "00000001", "00100000", "00100001"]


def truncate_tar(src, dst, keep_samples):
    """Copy `src` cut in the middle of sample number `keep_samples` (a truncated download)."""
    data = open(src, "rb").read()
    with tarfile.open(src) as t:
        members = t.getmembers()
    per = len(members) // len({m.name.split(".")[0] for m in members})
    cut = members[keep_samples * per].offset_data + 5
    open(dst, "wb").write(data[:cut])


def test_bad_samples_skipped_and_counted(tmp_path, caplog):
    d = tmp_path / "bad"
    d.mkdir()
    write_bad_shard(d / "a-000.tar")
    src = write_image_text_shards(tmp_path / "ok", n_shards=1, per_shard=4)[0]
    truncate_tar(src, d / "a-001.tar", keep_samples=2)
    stats = Counter()
    keys = [k for k, *_ in iter_image_text(d, stats)]
    assert keys == ["bad0", "bad3", "00000000", "00000001"]
    assert stats == Counter(bad_image=1, missing_caption=1, truncated_shard=1)
    assert "bad1" in caplog.text and "a-000.tar" in caplog.text and "a-001.tar" in caplog.text


def test_fsspec_url_shard_set(tmp_path):
    import fsspec
    from xbt_dist.data.stream import SampleStream
    fs = fsspec.filesystem("memory")
    for p in write_image_text_shards(tmp_path, n_shards=2, per_shard=3):
        fs.put(p, f"xbt-data-test/set/{p.rsplit('/', 1)[1]}")
    url = "memory://xbt-data-test/set"
    assert [s.rsplit("/", 1)[1] for s in list_shards(url)] == ["shard-000.tar", "shard-001.tar"]
    assert len(list_shards(url + "/shard-{000..001}.tar")) == 2
    assert len(list(iter_image_text(url))) == 6
    assert sum(len(b["keys"]) for b in SampleStream(url, batch_size=4)) == 6
    with pytest.raises(ShardError, match="shard-002.tar"):
        list_shards(url + "/shard-{000..002}.tar")
