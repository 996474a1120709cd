"""Bad and missing training data: skipped and counted by reason with the files
named, transient read errors retried, and a stop with the files named past max_bad_fraction."""

import os
from collections import Counter

import numpy as np
import pytest
from torchvision import transforms as T

import tracefs
from xbt_dist.data.cursor import epoch_order, slot_shards
from xbt_dist.data.embeddings import write_embedding_shard
from xbt_dist.data.shards import shard_name
from xbt_dist.data.stream import DataBudgetExceeded, SampleStream
from xbt_testing.synthetic import write_bad_shard, write_image_text_shards

TO_TENSOR = T.ToTensor()


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def targets_for(out_dir, paths, per_shard, drop_key=None):
    for s, p in enumerate(paths):
        keys = [f"{s:03d}{i:05d}" for i in range(per_shard) if f"{s:03d}{i:05d}" != drop_key]
        vals = np.ones((len(keys), 4))
        write_embedding_shard(out_dir, shard_name(p), keys, {"image_old": vals, "text_old": vals})


def test_shard_deleted_mid_epoch_is_skipped_and_counted(tmp_path):
    paths = write_image_text_shards(tmp_path, n_shards=4, per_shard=20)
    s = SampleStream(tmp_path, batch_size=3, transform=TO_TENSOR, num_workers=2, shuffle_buffer=2)
    # the last shard of worker 1 this epoch: not opened after the first batch (a worker reads at
    # most 2 prefetched + 1 batch + the buffer + 1 = 12 samples ahead, its first shard holds 20)
    victim = paths[slot_shards(epoch_order(4, 0, 0, True), 0, 1, 1, 2)[-1]]
    it = iter(s)
    keys = keys_of([next(it)])
    os.remove(victim)
    keys += keys_of(list(it))
    assert len(keys) == len(set(keys)) == 60
    assert not any(k.startswith(f"{paths.index(victim):03d}") for k in keys)
    assert s.skipped == Counter(missing_shard=1)
    assert list(s.bad_files) == [f"{victim} (missing_shard)"]


def test_missing_targets_file_and_keys_are_skipped_and_counted(tmp_path):
    paths = write_image_text_shards(tmp_path / "s", n_shards=3, per_shard=4)
    targets_for(tmp_path / "e", paths, 4, drop_key="00100002")
    gone = list((tmp_path / "e").glob(f"{shard_name(paths[2])}.*"))  # npy layout: keys + fields
    assert gone
    for f in gone:
        os.remove(f)
    s = SampleStream(tmp_path / "s", batch_size=2, transform=TO_TENSOR, targets=tmp_path / "e")
    keys = keys_of(list(s))
    assert sorted(keys) == sorted(f"{sh:03d}{i:05d}" for sh in (0, 1) for i in range(4)
                                  if (sh, i) != (1, 2))
    assert s.skipped == Counter(missing_targets=1, missing_target_key=1)
    assert set(s.bad_files) == {f"{paths[2]} (missing_targets)", f"{paths[1]} (missing_target_key)"}


def test_transient_read_errors_are_retried_then_counted(tmp_path):
    paths = write_image_text_shards(tmp_path / "s", n_shards=2, per_shard=12)
    tracefs.install(tmp_path / "trace.log")
    src = tracefs.url(tmp_path / "s")
    name = os.path.basename(paths[0])
    clean = sorted(keys_of(list(SampleStream(src, batch_size=4, transform=TO_TENSOR))))
    try:
        # two failures mid-shard: retried (reopen + seek to the first sample not yet returned)
        tracefs.TracedFS.failures, tracefs.TracedFS.fail_after = {name: 2}, 10_000
        s = SampleStream(src, batch_size=4, transform=TO_TENSOR, read_retries=3, retry_backoff_s=0.001)
        keys = keys_of(list(s))
        assert sorted(keys) == clean and len(keys) == 24 and not s.skipped
        assert tracefs.TracedFS.failures[name] == 0
        # failing for good: after the retries the rest of the shard is skipped and counted
        tracefs.TracedFS.failures, tracefs.TracedFS.fail_after = {name: 100}, 0
        s = SampleStream(src, batch_size=4, transform=TO_TENSOR, read_retries=2, retry_backoff_s=0.001)
        keys = keys_of(list(s))
        assert s.skipped == Counter(read_error=1) and len(keys) == 12
        assert tracefs.TracedFS.failures[name] == 100 - 3
        assert list(s.bad_files) == [f"{src}/{name} (read_error)"]
    finally:
        tracefs.TracedFS.failures, tracefs.TracedFS.fail_after = {}, 2048


def test_max_bad_fraction_stops_naming_the_files(tmp_path):
    write_image_text_shards(tmp_path, n_shards=4, per_shard=5)
    write_bad_shard(tmp_path / "zz-bad.tar")  # 2 of 4 samples bad: 2 of 24 = 8 %
    kw = dict(batch_size=4, transform=TO_TENSOR, shuffle=False)
    with pytest.raises(DataBudgetExceeded, match=r"8.3%.*max_bad_fraction=0.05.*zz-bad.tar \(bad_image\)"):
        list(SampleStream(tmp_path, max_bad_fraction=0.05, **kw))
    ok = SampleStream(tmp_path, max_bad_fraction=0.1, **kw)
    assert len(keys_of(list(ok))) == 22 and ok.skipped == Counter(bad_image=1, missing_caption=1)
    assert ok.bad_fraction() == 0  # a new epoch starts a new budget


def test_max_bad_fraction_counts_a_missing_shard_by_its_size(tmp_path):
    """With sizes.json a lost shard weighs what it held: 1 of 4 equal shards = 25 %."""
    paths = write_image_text_shards(tmp_path, n_shards=4, per_shard=5, sizes=True)
    os.remove(paths[1])
    spec = str(tmp_path / "shard-{000..003}.tar")  # names the lost shard (LAION style ranges do)
    kw = dict(batch_size=2, transform=TO_TENSOR)
    with pytest.raises(DataBudgetExceeded, match=r"25.0%.*shard-001.tar \(missing_shard\)"):
        list(SampleStream(spec, max_bad_fraction=0.2, **kw))
    s = SampleStream(spec, max_bad_fraction=0.3, **kw)
    assert len(keys_of(list(s))) == 15 and s.skipped == Counter(missing_shard=1)
