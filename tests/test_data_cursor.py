"""The global data cursor: whole shards per (rank, worker) slot for any shard count, resume that
seeks (no replay), bit-identical continuation on the same layout, exactly-once on another one,
and augmentations that depend on the sample, not on the worker that reads it."""

from collections import Counter

import pytest
import torch
from torchvision import transforms as T

import tracefs
from xbt_dist.data.cursor import epoch_order, slot_shards
from xbt_dist.data.stream import SampleStream
from xbt_testing.synthetic import write_image_text_shards

TO_TENSOR = T.ToTensor()
# random augmentations, as a train transform has: any RNG difference shows in the pixels
AUGMENT = T.Compose([T.RandomResizedCrop(12, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def stream(src, **kw):
    args = dict(batch_size=3, transform=TO_TENSOR, shuffle_buffer=4, seed=5)
    args.update(kw)
    return SampleStream(src, **args)


def test_7_shards_2_ranks_x_3_workers_each_shard_opened_once_per_epoch(tmp_path):
    """6 slots, 7 shards: whole shards per slot, each opened by one slot per epoch
    (counted in the real file opens, in the DataLoader worker processes), every sample once."""
    paths = write_image_text_shards(tmp_path / "s", n_shards=7, per_shard=5)
    log = tmp_path / "trace.log"
    tracefs.install(log)
    streams = [stream(tracefs.url(tmp_path / "s"), rank=r, world_size=2, num_workers=3) for r in range(2)]
    epoch_keys, epoch_pids = [], []
    for epoch in range(2):
        tracefs.clear(log)
        keys = [k for s in streams for k in keys_of(list(s))]
        assert [s.epoch for s in streams] == [epoch + 1] * 2
        opened = tracefs.events(log, "open")
        # each shard opened exactly once this epoch, by one process (one slot)
        assert Counter(name for _, name, _ in opened) == Counter(p.rsplit("/", 1)[1] for p in paths)
        assert len(keys) == len(set(keys)) == 35
        epoch_keys.append(keys)
        epoch_pids.append({pid for pid, _, _ in opened})
    # 6 slots over 7 shards: 6 worker processes read, 7 files; persistent workers: same processes
    assert len(epoch_pids[0]) == 6 and epoch_pids[0] == epoch_pids[1]
    assert epoch_keys[0] != epoch_keys[1] and sorted(epoch_keys[0]) == sorted(epoch_keys[1])
    for s in streams:
        s.close()


def test_slot_split_is_whole_shards_for_any_count():
    for n_shards in range(1, 12):
        for ws in (1, 2, 3):
            for nw in (1, 2, 3):
                order = epoch_order(n_shards, seed=1, epoch=2, shuffle=True)
                got = [slot_shards(order, r, ws, w, nw) for r in range(ws) for w in range(nw)]
                assert sorted(s for g in got for s in g) == list(range(n_shards))
                assert max(map(len, got)) - min(map(len, got)) <= 1


def _consume(streams, n_batches):
    """The first `n_batches` batches of each rank's stream, then each rank's saved part."""
    keys, states = [], []
    for s in streams:
        it = iter(s)
        keys += keys_of([next(it) for _ in range(n_batches)])
        states.append(s.state_dict())
        s.close()
    return keys, states


@pytest.mark.parametrize("old,new", [((1, 2), (1, 1)), ((1, 1), (1, 2)), ((2, 1), (1, 1)),
                                     ((2, 2), (3, 1))])
def test_resume_on_another_layout_reads_each_remaining_sample_once(tmp_path, old, new):
    """(world_size, num_workers) old -> new, mid-epoch: consumed + resumed = every sample once."""
    write_image_text_shards(tmp_path, n_shards=5, per_shard=7)
    (ws0, nw0), (ws1, nw1) = old, new
    keys, states = _consume([stream(tmp_path, rank=r, world_size=ws0, num_workers=nw0)
                             for r in range(ws0)], n_batches=3)
    resumed = []
    for r in range(ws1):
        s = stream(tmp_path, rank=r, world_size=ws1, num_workers=nw1)
        s.load_state_dict(states)
        resumed += keys_of(list(s))
        assert s.epoch == 1
    assert not set(keys) & set(resumed)
    assert Counter(keys + resumed) == Counter({k: 1 for k in keys + resumed})
    assert len(keys + resumed) == 35


def test_same_layout_resume_is_bit_identical(tmp_path):
    """Same batches, same order, same augmented pixels, across the epoch boundary too."""
    write_image_text_shards(tmp_path, n_shards=5, per_shard=7)
    kw = dict(transform=AUGMENT, num_workers=2, shuffle_buffer=6, world_size=2, rank=1)
    full = stream(tmp_path, **kw)
    ref = list(full) + list(full)  # two epochs, uninterrupted (persistent workers)
    s = stream(tmp_path, **kw)
    it = iter(s)
    head = [next(it) for _ in range(3)]  # odd: the resumed loader must start at worker 1's turn
    state = s.state_dict()
    s.close()
    again = stream(tmp_path, **kw)
    again.load_state_dict(_all_parts(tmp_path, kw, state))
    got = head + list(again) + list(again)
    assert [b["keys"] for b in got] == [b["keys"] for b in ref]
    for a, b in zip(got, ref):
        assert torch.equal(a["images"], b["images"])
    full.close()
    again.close()


def _all_parts(src, kw, own):
    """Every rank's part at the same point: rank 0's from its own stream (same 3 batches)."""
    s0 = stream(src, **{**kw, "rank": 0})
    it = iter(s0)
    for _ in range(3):
        next(it)
    parts = [s0.state_dict(), own]
    s0.close()
    return parts


def test_resume_seeks_instead_of_rereading(tmp_path):
    """A shard half consumed at the checkpoint is reopened at its byte offset, not from 0."""
    (path,) = write_image_text_shards(tmp_path / "s", n_shards=1, per_shard=20)
    log = tmp_path / "trace.log"
    tracefs.install(log)
    src = tracefs.url(tmp_path / "s")
    full = keys_of(list(stream(src, batch_size=4, shuffle=False)))
    s = stream(src, batch_size=4, shuffle=False)
    it = iter(s)
    head = keys_of([next(it) for _ in range(2)])
    state = s.state_dict()
    tracefs.clear(log)
    again = stream(src, batch_size=4, shuffle=False)
    again.load_state_dict([state])
    rest = keys_of(list(again))
    assert head + rest == full
    seeks = tracefs.events(log, "seek")
    size = (tmp_path / "s" / "shard-000.tar").stat().st_size
    assert seeks and seeks[0][2] > size // 3  # first seek goes past the 8 consumed samples
    # read after the seek: at most what is left of the file after it (plus one read-ahead block)
    read_after = sum(n for _, _, n in tracefs.events(log, "read"))
    assert read_after <= size - seeks[0][2] + 512


def test_augmentation_independent_of_workers_and_start(tmp_path):
    """The same sample gets the same pixels with 0 or 3 DataLoader workers."""
    write_image_text_shards(tmp_path, n_shards=3, per_shard=6)
    by_key = []
    for nw in (0, 3):
        s = stream(tmp_path, transform=AUGMENT, num_workers=nw)
        by_key.append({k: img for b in s for k, img in zip(b["keys"], b["images"])})
        s.close()
    assert by_key[0].keys() == by_key[1].keys() and len(by_key[0]) == 18
    for k, img in by_key[0].items():
        assert torch.equal(img, by_key[1][k]), k
    # and the augmentation is random across samples and epochs (not one fixed crop)
    s = stream(tmp_path, transform=AUGMENT)
    e0 = {k: img for b in s for k, img in zip(b["keys"], b["images"])}
    e1 = {k: img for b in s for k, img in zip(b["keys"], b["images"])}
    assert sum(not torch.equal(e0[k], e1[k]) for k in e0) > len(e0) // 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_leaves_the_training_rng_alone(tmp_path, num_workers):
    """Reading (and resuming) draws nothing from the global torch/Python RNGs: a resumed run's
    dropout and noise continue exactly where the checkpoint's RNG state left them."""
    import random
    write_image_text_shards(tmp_path, n_shards=2, per_shard=5)
    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    s = stream(tmp_path, transform=AUGMENT, num_workers=num_workers)
    it = iter(s)
    next(it)
    again = stream(tmp_path, transform=AUGMENT, num_workers=num_workers)
    again.load_state_dict([s.state_dict()])
    list(again)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1], "the stream moved the RNG"
    s.close()
    again.close()


def test_resampled_resume_continues_the_same_draws(tmp_path):
    """Resampled (endless) streams resume mid-stream too: same shards drawn, same pixels."""
    write_image_text_shards(tmp_path, n_shards=3, per_shard=4)
    kw = dict(transform=AUGMENT, resampled=True, shuffle_buffer=3)
    it = iter(stream(tmp_path, **kw))
    ref = [next(it) for _ in range(12)]
    s = stream(tmp_path, **kw)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    again = stream(tmp_path, **kw)
    again.load_state_dict([s.state_dict()])
    it2 = iter(again)
    got = head + [next(it2) for _ in range(7)]
    assert [b["keys"] for b in got] == [b["keys"] for b in ref]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(got, ref))
