"""Bad data on Ray Train: a shard deleted mid-run on 2 Ray workers is skipped and
counted and the run finishes; past data.max_bad_fraction the job stops with the file named after
ONE restart, however many `dist.max_failures` allow (no crash-loop: distributed/ray_runner.py)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import local_ray_cluster
import ray.cloudpickle

from xbt_dist.config import DistConfig, RunConfig
from xbt_dist.data.cursor import epoch_order, slot_shards
from xbt_dist.data.stream import DataBudgetExceeded
from xbt_testing.synthetic import write_image_text_shards
from xbt_dist.distributed.ray_runner import run_on_ray

pytestmark = pytest.mark.timeout(900)
# Ray workers cannot import this test module: ship the stage function by value (Ray's own cloudpickle).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_SHARDS, PER_SHARD = 8, 16


def stream_stage(cfg, ctx, resume: bool = False, shards: str = "", victim: str = "",
                 max_bad_fraction: float = 1.0) -> dict:
    """Each rank streams its part of one epoch (2 DataLoader workers); after every rank took one
    batch, rank 0 deletes `victim`, a shard no slot has opened yet."""
    from torchvision import transforms

    from xbt_dist.data.stream import SampleStream
    s = SampleStream(shards, batch_size=2, transform=transforms.ToTensor(), rank=ctx.rank,
                     world_size=ctx.world_size, num_workers=2, shuffle_buffer=2,
                     max_bad_fraction=max_bad_fraction)
    it = iter(s)
    keys = list(next(it)["keys"])
    ctx.barrier()
    if ctx.rank == 0 and os.path.exists(victim):
        os.remove(victim)
    ctx.barrier()
    for b in it:
        keys += b["keys"]
    s.close()
    return {"ranks": ctx.gather({"keys": keys, "skipped": dict(s.skipped),
                                 "bad_files": list(s.bad_files)})}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from local_ray_cluster(tmp_path_factory, nodes=1, cpus_per_node=2)


def _setup(tmp_path, cluster, max_failures):
    paths = write_image_text_shards(tmp_path / "shards", n_shards=N_SHARDS, per_shard=PER_SHARD)
    # the second shard of slot (rank 0, worker 0): with shards of 16, batches of 2 and a prefetch
    # of 2 batches, no worker is past its first shard when rank 0 deletes it
    victim = paths[slot_shards(epoch_order(N_SHARDS, 0, 0, True), 0, 2, 0, 2)[1]]
    cfg = RunConfig(name="bad", out_dir=str(tmp_path / "run"),
                    dist=DistConfig(backend="ray", workers=2, ray_address=cluster.address,
                                    max_failures=max_failures))
    return cfg, victim


def test_shard_deleted_mid_run_on_2_ray_workers_is_skipped_and_counted(cluster, tmp_path):
    cfg, victim = _setup(tmp_path, cluster, max_failures=0)
    res = run_on_ray(stream_stage, cfg, report_progress=False, shards=str(tmp_path / "shards"),
                     victim=victim)
    keys = [k for r in res["ranks"] for k in r["keys"]]
    lost = {f"{Path(victim).stem[-3:]}{i:05d}" for i in range(PER_SHARD)}
    assert not os.path.exists(victim) and res["attempt"] == 0
    assert len(keys) == len(set(keys)) == (N_SHARDS - 1) * PER_SHARD and not lost & set(keys)
    skipped = sum((Counter(r["skipped"]) for r in res["ranks"]), Counter())
    assert skipped == Counter(missing_shard=1)
    assert [f for r in res["ranks"] for f in r["bad_files"]] == [f"{victim} (missing_shard)"]


def test_max_bad_fraction_stops_without_crash_loop(cluster, tmp_path):
    cfg, victim = _setup(tmp_path, cluster, max_failures=3)
    with pytest.raises(DataBudgetExceeded, match=rf"{Path(victim).name} \(missing_shard\)"):
        run_on_ray(stream_stage, cfg, report_progress=False, name="budget",
                   shards=str(tmp_path / "shards"), victim=victim, max_bad_fraction=0.05)
    # attempt 0 failed, attempt 1 found the marker and returned: 2 starts per rank, not 4
    attempts = sorted(p.name for p in (tmp_path / "run" / "ray" / "budget" / "attempts").iterdir())
    assert attempts == ["rank00000.attempt0", "rank00000.attempt1",
                        "rank00001.attempt0", "rank00001.attempt1"]
