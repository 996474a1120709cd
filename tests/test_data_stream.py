"""SampleStream: coverage across ranks x workers, shuffling, resampling, resume, targets join."""

from collections import Counter

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from xbt_dist.data.embeddings import write_embedding_shard
from xbt_dist.data.shards import shard_name
from xbt_dist.data.stream import SampleStream
from xbt_testing.synthetic import write_bad_shard, write_image_text_shards, write_text_shards

TO_TENSOR = T.ToTensor()


def toy_tokenizer(texts):
    return torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def run_cluster(src, world_size, num_workers, epoch=0, **kw):
    per_rank = []
    for rank in range(world_size):
        s = SampleStream(src, batch_size=3, rank=rank, world_size=world_size,
                         num_workers=num_workers, transform=TO_TENSOR, **kw)
        s.set_epoch(epoch)
        per_rank.append(keys_of(list(s)))
    return per_rank


@pytest.mark.parametrize("n_shards", [4, 3])  # 4: one shard per slot; 3: fewer shards than slots
def test_exact_coverage_2_ranks_x_2_workers(tmp_path, n_shards):
    write_image_text_shards(tmp_path, n_shards=n_shards, per_shard=5)
    per_rank = run_cluster(tmp_path, world_size=2, num_workers=2, shuffle_buffer=4)
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)) == n_shards * 5
    # whole shards per slot: ranks differ by at most one shard
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= (0 if n_shards == 4 else 5)


def test_shuffle_deterministic_per_seed_epoch(tmp_path):
    write_image_text_shards(tmp_path, n_shards=3, per_shard=6)
    a = run_cluster(tmp_path, 1, 0, epoch=0, seed=1)[0]
    b = run_cluster(tmp_path, 1, 0, epoch=0, seed=1)[0]
    c = run_cluster(tmp_path, 1, 0, epoch=1, seed=1)[0]
    plain = run_cluster(tmp_path, 1, 0, shuffle=False)[0]
    assert a == b and a != c and sorted(a) == sorted(c) == sorted(plain) and a != plain
    assert plain == sorted(plain)  # no shuffle: canonical order


def test_epochs_advance_and_drop_last(tmp_path):
    write_image_text_shards(tmp_path, n_shards=2, per_shard=5)
    s = SampleStream(tmp_path, batch_size=4, transform=TO_TENSOR, tokenizer=toy_tokenizer, drop_last=True)
    e0 = list(s)
    assert s.epoch == 1 and [len(b["keys"]) for b in e0] == [4, 4]
    b = e0[0]
    assert b["images"].shape == (4, 3, 16, 16) and b["tokens"].shape == (4, 2)
    assert b["captions"][0].startswith("a photo of thing")
    e1 = list(s)
    assert keys_of(e1) != keys_of(e0) and s.epoch == 2


def test_resampled_is_infinite_and_deterministic(tmp_path):
    write_image_text_shards(tmp_path, n_shards=2, per_shard=4)
    def take(n):
        s = SampleStream(tmp_path, batch_size=4, transform=TO_TENSOR, resampled=True, seed=3)
        it = iter(s)
        return [next(it) for _ in range(n)]
    a, b = take(10), take(10)  # 40 samples from an 8-sample set
    assert keys_of(a) == keys_of(b)
    assert set(keys_of(a)) <= {f"{s:03d}{i:05d}" for s in range(2) for i in range(4)}
    assert Counter(keys_of(a)).most_common(1)[0][1] > 1


def test_bad_samples_counted_in_stream(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    write_bad_shard(d / "a-000.tar")
    s = SampleStream(d, batch_size=8, transform=TO_TENSOR, num_workers=2)
    assert sorted(keys_of(list(s))) == ["bad0", "bad3"]
    assert s.skipped == Counter(bad_image=1, missing_caption=1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_neither_repeats_nor_skips(tmp_path, num_workers):
    write_image_text_shards(tmp_path, n_shards=4, per_shard=6)
    kw = dict(batch_size=3, transform=TO_TENSOR, num_workers=num_workers, shuffle_buffer=5,
              world_size=2, seed=7)
    full, resumed = [], []
    for rank in range(2):
        full += keys_of(list(SampleStream(tmp_path, rank=rank, **kw)))
        s = SampleStream(tmp_path, rank=rank, **kw)
        it = iter(s)
        resumed += keys_of([next(it) for _ in range(3)])   # interrupted after 3 batches
        state = s.state_dict()
        del it
        s2 = SampleStream(tmp_path, rank=rank, **kw)
        s2.load_state_dict(state)
        resumed += keys_of(list(s2))
        assert s2.epoch == 1
    assert len(resumed) == len(set(resumed)) == 24
    assert sorted(resumed) == sorted(full)


def test_own_part_alone_needs_the_same_layout(tmp_path):
    """One rank's part (a dict) cannot be redistributed: another layout needs every rank's part."""
    write_image_text_shards(tmp_path, n_shards=2, per_shard=2)
    s = SampleStream(tmp_path, batch_size=2, transform=TO_TENSOR)
    with pytest.raises(ValueError, match="pass every rank's part"):
        SampleStream(tmp_path, batch_size=2, num_workers=2).load_state_dict(s.state_dict())
    other = SampleStream(tmp_path, batch_size=2, num_workers=2, transform=TO_TENSOR)
    other.load_state_dict([s.state_dict()])
    assert len(keys_of(list(other))) == 4


def fake_embeddings(out_dir, shards, fields=("image_old", "text_old", "text_new"), drop_key=None):
    table = {}
    for shard, keys in shards.items():
        keys = [k for k in keys if k != drop_key]
        arrays = {f: np.stack([np.random.default_rng([int(k), j]).normal(size=8) for k in keys])
                  for j, f in enumerate(fields)}
        write_embedding_shard(out_dir, shard, keys, arrays)
        for i, k in enumerate(keys):
            table[k] = {f: arrays[f][i] / np.linalg.norm(arrays[f][i]) for f in fields}
    return table


def shard_keys(paths, per_shard):
    return {shard_name(p): [f"{s:03d}{i:05d}" for i in range(per_shard)] for s, p in enumerate(paths)}


def test_targets_joined_by_key(tmp_path):
    paths = write_image_text_shards(tmp_path / "s", n_shards=2, per_shard=5)
    table = fake_embeddings(tmp_path / "e", shard_keys(paths, 5))
    s = SampleStream(tmp_path / "s", batch_size=4, transform=TO_TENSOR, targets=tmp_path / "e",
                     num_workers=2)
    batches = list(s)
    assert sorted(keys_of(batches)) == sorted(table)
    for b in batches:
        assert set(b) >= {"keys", "images", "v_old", "w_old"} and b["v_old"].dtype == torch.float32
        for i, k in enumerate(b["keys"]):
            np.testing.assert_allclose(b["v_old"][i].numpy(), table[k]["image_old"], atol=2e-3)
            np.testing.assert_allclose(b["w_old"][i].numpy(), table[k]["text_old"], atol=2e-3)


def test_misaligned_targets_skipped_counted_or_fail_clearly(tmp_path):
    paths = write_image_text_shards(tmp_path / "s", n_shards=1, per_shard=4)
    fake_embeddings(tmp_path / "e", shard_keys(paths, 4), drop_key="00000002")
    s = SampleStream(tmp_path / "s", batch_size=4, transform=TO_TENSOR, targets=tmp_path / "e")
    assert sorted(keys_of(list(s))) == ["00000000", "00000001", "00000003"]
    assert s.skipped == Counter(missing_target_key=1)
    with pytest.raises(KeyError, match="lacks fields"):
        SampleStream(tmp_path / "s", batch_size=4, targets=tmp_path / "e", fields=["image_new"])


def test_text_modes(tmp_path):
    write_text_shards(tmp_path / "t", n_shards=2, per_shard=3)
    b = next(iter(SampleStream(tmp_path / "t", mode="text", batch_size=6, tokenizer=toy_tokenizer)))
    assert b["tokens"].shape == (6, 2) and "images" not in b
    with pytest.raises(ValueError, match="mode='embeddings'"):  # stage 1's embeddings: text_stream.py
        SampleStream(tmp_path / "t", mode="embeddings", batch_size=4)
