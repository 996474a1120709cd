"""Stage-1 TextEmbeddingStream: exact coverage over (rank, worker) slots for any count, block
shuffle, the global data cursor (bit-identical resume; resume on 2 -> 1 ranks and 1 -> 2 DataLoader
workers without re-reading), both shard layouts, and run_stage1 resuming on another world size."""

import numpy as np
import pytest
import torch

from xbt_dist.data.embeddings import (EmbeddingShardSet, convert_to_npy, write_embedding_manifest,
                                      write_embedding_shard)
from xbt_dist.data.text_stream import EpochOrder, TextEmbeddingStream, cut, drop_front, merge

SIZES = [37, 50, 13, 0, 41]  # uneven, one empty shard: 141 rows


def id_set(root, sizes=SIZES, layouts=("npy",), manifest=True):
    """Rows whose column 0 holds the global row id (exact in fp16 below 2048)."""
    k = 0
    for s, n in enumerate(sizes):
        v = np.zeros((n, 4), np.float32)
        v[:, 0] = np.arange(k, k + n)
        v[:, 1] = 1.0
        write_embedding_shard(root, f"s{s:02d}", [str(k + i) for i in range(n)],
                              {"text_new": v, "text_old": v[:, :3] * 2}, normalize=False,
                              layout=layouts[s % len(layouts)])
        k += n
    if manifest:
        write_embedding_manifest(root, source="test", models={})
    return str(root)


def ids(batch) -> list[int]:
    x = batch["w_new"]
    assert x.dtype == torch.float16 and batch["w_old"].dtype == torch.float16
    assert torch.equal(batch["w_old"][:, 0], x[:, 0] * 2)  # the two fields stay row-aligned
    return x[:, 0].int().tolist()


def epoch_ids(src, world_size, num_workers, **kw) -> list[list[int]]:
    out = []
    for rank in range(world_size):
        s = TextEmbeddingStream(src, rank=rank, world_size=world_size, num_workers=num_workers, **kw)
        out.append([i for b in s for i in ids(b)])
    return out


def test_interval_helpers():
    assert cut([(0, 10)], 3, equal=False) == [[(0, 4)], [(4, 7)], [(7, 10)]]
    assert cut([(0, 10)], 3, equal=True) == [[(0, 3)], [(3, 6)], [(6, 9)]]
    assert cut([(0, 2), (5, 9)], 2, equal=False) == [[(0, 2), (5, 6)], [(6, 9)]]
    assert drop_front([(0, 2), (5, 9)], 3) == [(6, 9)]
    assert merge([[(5, 6)], [(0, 2), (6, 9)], []]) == [(0, 2), (5, 9)]


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (3, 2), (2, 3)])
def test_every_row_exactly_once_for_any_slot_count(tmp_path, world_size, num_workers):
    src = id_set(tmp_path, layouts=("npy", "npz"))  # both layouts in one set
    for epoch in range(2):
        per_rank = []
        for rank in range(world_size):
            s = TextEmbeddingStream(src, batch_size=5, rank=rank, world_size=world_size,
                                    num_workers=num_workers, drop_last=False, block_rows=8, mix=3)
            s.set_epoch(epoch)
            per_rank.append([i for b in s for i in ids(b)])
        got = sorted(i for r in per_rank for i in r)
        assert got == list(range(sum(SIZES))), f"epoch {epoch}: rows missing or repeated"
        sizes = [len(r) for r in per_rank]
        assert max(sizes) - min(sizes) <= max(1, num_workers), sizes  # balanced slots


def test_drop_last_gives_every_rank_the_same_batch_count(tmp_path):
    src = id_set(tmp_path)
    for ws, nw in ((2, 0), (3, 2)):
        counts = [len(list(TextEmbeddingStream(src, batch_size=4, rank=r, world_size=ws, num_workers=nw,
                                               block_rows=8)))
                  for r in range(ws)]
        assert len(set(counts)) == 1 and counts[0] > 0, counts


def test_block_shuffle_order(tmp_path):
    src = id_set(tmp_path)
    a = epoch_ids(src, 1, 0, batch_size=7, drop_last=False, block_rows=8, mix=2, seed=1)[0]
    b = epoch_ids(src, 1, 0, batch_size=7, drop_last=False, block_rows=8, mix=2, seed=1)[0]
    c = epoch_ids(src, 1, 0, batch_size=7, drop_last=False, block_rows=8, mix=2, seed=2)[0]
    assert a == b and a != c and a != sorted(a)  # deterministic per seed, shuffled
    # rows are shuffled inside their blocks too, not only blocks/runs moved around
    assert sum(y == x + 1 for x, y in zip(a, a[1:])) < len(a) // 4
    s = TextEmbeddingStream(src, batch_size=7, drop_last=False, block_rows=8, mix=2, seed=1)
    next(iter(s))
    s.set_epoch(1)
    assert [i for bt in s for i in ids(bt)] != a  # and per epoch
    # each unit of the order is `mix` contiguous blocks: its rows come from <= 2 runs of <= 8 rows
    order = EpochOrder(SIZES, 8, 2, seed=1, epoch=0, shuffle=True)
    for u, unit in enumerate(order.units):
        assert len(unit) <= 2 and all(hi - lo <= 8 for _, lo, hi in unit)
    assert order.n == sum(SIZES)
    plain = epoch_ids(src, 1, 0, batch_size=7, drop_last=False, shuffle=False)[0]
    assert plain == list(range(sum(SIZES)))


def _run(streams, steps=None):
    """Per-rank lists of batch id lists, `steps` batches per rank (None: to the epoch's end)."""
    its = [iter(s) for s in streams]
    out = [[] for _ in streams]
    while steps is None or len(out[0]) < steps:
        try:
            for r, it in enumerate(its):
                out[r].append(ids(next(it)))
        except StopIteration:
            break
    return out


def test_resume_same_layout_is_bit_identical(tmp_path):
    src = id_set(tmp_path)
    kw = dict(batch_size=4, world_size=2, num_workers=2, block_rows=8, mix=2, seed=3)
    full = _run([TextEmbeddingStream(src, rank=r, **kw) for r in range(2)])
    first = [TextEmbeddingStream(src, rank=r, **kw) for r in range(2)]
    head = _run(first, steps=3)  # odd: rank's next batch comes from its DataLoader worker 1
    states = [s.state_dict() for s in first]
    assert all(st["epoch"] == 0 and "remaining" in st for st in states)
    resumed = [TextEmbeddingStream(src, rank=r, **kw) for r in range(2)]
    for s in resumed:
        s.load_state_dict(states)
    tail = _run(resumed)
    assert [h + t for h, t in zip(head, tail)] == full
    # the run-state layer today hands each rank its own part: same layout, same continuation
    own = TextEmbeddingStream(src, rank=1, **kw)
    own.load_state_dict(states[1])
    assert _run([own])[0] == tail[1]


@pytest.mark.parametrize("old,new", [((2, 0), (1, 0)), ((1, 1), (1, 2)), ((2, 2), (3, 0))])
def test_resume_on_another_layout_reads_each_unconsumed_row_once(tmp_path, old, new):
    src = id_set(tmp_path)
    kw = dict(batch_size=4, block_rows=8, mix=2, seed=5, drop_last=False)
    first = [TextEmbeddingStream(src, rank=r, world_size=old[0], num_workers=old[1], **kw)
             for r in range(old[0])]
    consumed = [i for r in _run(first, steps=5) for b in r for i in b]
    states = [s.state_dict() for s in first]
    rest = []
    for r in range(new[0]):
        s = TextEmbeddingStream(src, rank=r, world_size=new[0], num_workers=new[1], **kw)
        s.load_state_dict(states)
        rest += [i for b in s for i in ids(b)]
        assert s.epoch == 1  # the resumed epoch ended; the next starts fresh
    assert not set(consumed) & set(rest), "a consumed row was read again"
    assert sorted(consumed + rest) == list(range(sum(SIZES))), "an unconsumed row was lost or repeated"


def test_cursor_errors_name_the_problem(tmp_path):
    src = id_set(tmp_path)
    s = TextEmbeddingStream(src, batch_size=4, world_size=2, rank=0)
    st = s.state_dict()
    with pytest.raises(ValueError, match="seed"):
        TextEmbeddingStream(src, batch_size=4, world_size=2, seed=9).load_state_dict([st, st])
    with pytest.raises(ValueError, match="every old rank's part"):
        TextEmbeddingStream(src, batch_size=4).load_state_dict(st)
    with pytest.raises(ValueError, match="every rank's part"):
        TextEmbeddingStream(src, batch_size=4).load_state_dict([st])
    with pytest.raises(ValueError, match="not a stage-1"):
        TextEmbeddingStream(src, batch_size=4).load_state_dict([{"epoch": 0, "consumed": [3]}])


def test_npz_sets_stay_readable_and_convert(tmp_path):
    old = id_set(tmp_path / "old", layouts=("npz",))
    new = id_set(tmp_path / "new")
    assert not list((tmp_path / "old").glob("*.npy")) and list((tmp_path / "old").glob("*.npz"))
    kw = dict(batch_size=6, world_size=1, num_workers=0, drop_last=False, block_rows=8, seed=1)
    assert epoch_ids(old, **kw) == epoch_ids(new, **kw)
    # stage 2's key join works on both layouts
    for d in (old, new):
        row = EmbeddingShardSet(d).shard("s01").rows("40", ["text_new", "text_old"])
        assert row["text_new"][0] == 40 and row["text_old"].shape == (3,)
        assert EmbeddingShardSet(d).shard("s01").rows("nope", ["text_new"]) is None
    res = convert_to_npy(old)
    assert res["converted"] == 5 and not list((tmp_path / "old").glob("*.npz"))  # empty shard too
    emb = EmbeddingShardSet(old, require_complete=True)
    assert emb.manifest["layout"] == "npy" and emb.keys() == EmbeddingShardSet(new).keys()
    np.testing.assert_array_equal(emb.load("text_new"), EmbeddingShardSet(new).load("text_new"))


def test_startup_reads_counts_from_the_manifest(tmp_path):
    src = id_set(tmp_path)
    for p in tmp_path.glob("*.keys.npy"):
        p.write_bytes(b"not an npy file")  # stage 1 never needs the keys
    s = TextEmbeddingStream(src, batch_size=8, drop_last=False)
    assert s.n_rows == sum(SIZES) and len([i for b in s for i in ids(b)]) == sum(SIZES)


def test_missing_field_and_bad_args(tmp_path):
    src = id_set(tmp_path)
    with pytest.raises(KeyError, match="lacks fields"):
        TextEmbeddingStream(src, batch_size=4, fields={"w_new": "text_big"})
    with pytest.raises(ValueError, match="block_rows=0"):
        TextEmbeddingStream(src, batch_size=4, block_rows=0)


def test_run_stage1_stops_and_resumes_to_the_same_phi(tmp_path):
    """run_stage1 on this stream, stopped mid-epoch (STOP file at a log point) and resumed from its
    checkpoint, ends with the phi of an uninterrupted run: the cursor round-trips through the
    real loop and checkpoint (same layout)."""
    from xbt_dist.config import OptimConfig, RunConfig, Stage1Config, TrainConfig
    from xbt_dist.train.context import WorkerContext
    from xbt_dist.train.loop import STOP_FILE, StopRequested
    from xbt_dist.train.stage1 import load_phi, run_stage1

    rng = np.random.default_rng(0)
    for s in range(3):  # 3 x 40 rows, batch 16: 7 steps per epoch, 2 epochs
        w = rng.normal(size=(40, 12))
        write_embedding_shard(tmp_path / "emb", f"t{s}", [f"{s}-{i}" for i in range(40)],
                              {"text_new": w, "text_old": w[:, :8] + 0.1 * rng.normal(size=(40, 8))})
    write_embedding_manifest(tmp_path / "emb", source="test", models={})

    def cfg(name):
        c = RunConfig(name=name, out_dir=str(tmp_path / name))
        c.phi.hidden, c.phi.depth = 16, 2
        c.stage1 = Stage1Config(source="embeddings", embeddings=str(tmp_path / "emb"), epochs=2,
                                batch_size=16, optim=OptimConfig(lr=1e-2, warmup_steps=2))
        c.train = TrainConfig(log_every=1, checkpoint_every=0, seed=4)
        return c

    clean = run_stage1(cfg("clean"))

    def stop_at_5(rec):
        if rec["step"] == 5:
            (tmp_path / "cut" / "phi" / STOP_FILE).touch()
    with pytest.raises(StopRequested):
        run_stage1(cfg("cut"), WorkerContext(report=stop_at_5))
    resumed = run_stage1(cfg("cut"), resume=True)
    assert resumed["steps"] == clean["steps"] == 15
    a, b = load_phi(clean["phi_path"]).state_dict(), load_phi(resumed["phi_path"]).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
