"""`embed_on_ray`: a queue of small shard tasks on a local Ray, a failing task retried, failures
reported by shard name, and per-shard resume."""

from __future__ import annotations

import numpy as np
import pytest

from xbt_dist.config import DistConfig
from xbt_dist.data.embed import embed_shards
from xbt_dist.data.embeddings import EmbeddingShardSet
from xbt_testing.synthetic import write_text_shards
import xbt_testing.distributed as T
from xbt_dist.distributed.embed_job import FAULT_ENV, embed_on_ray, task_groups

pytestmark = pytest.mark.timeout(900)
ENC = {"text_old": T.text_encoder_old, "text_new": T.text_encoder_new}
FIELDS = ["text_old", "text_new"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
    yield
    ray.shutdown()


def test_task_groups_largest_first():
    shards = [f"/d/s{i}.tar" for i in range(5)]
    groups = task_groups(shards, 2, {"s0.tar": 1, "s1.tar": 1, "s2.tar": 5, "s3.tar": 1, "s4.tar": 9})
    assert groups == [["/d/s4.tar"], ["/d/s2.tar", "/d/s3.tar"], ["/d/s0.tar", "/d/s1.tar"]]


def test_many_small_tasks_with_a_retried_fault(ray_local, tmp_path, monkeypatch):
    write_text_shards(tmp_path / "t", n_shards=7, per_shard=5)
    monkeypatch.setenv(FAULT_ENV, "text-003")  # the first attempt at shard-003 raises once
    dist = DistConfig(backend="ray", workers=2, cpus_per_worker=1)
    res = embed_on_ray(str(tmp_path / "t"), str(tmp_path / "ray"), ENC, FIELDS, batch_size=4,
                       dist_cfg=dist, shards_per_task=2, progress=None)
    assert (tmp_path / "ray" / ".fault_text-003").exists(), "the fault never fired"
    assert res["complete"] and not res["failed"] and res["pending_before"] == 7
    assert len(res["tasks"]) == 4  # 4 tasks > 2 slots: a queue
    # the retried task (text-002, text-003) skipped the shard its failed attempt had written
    retried = [r for r in res["tasks"] if any(s.endswith("text-003.tar") for s in r["shards"])]
    assert retried[0]["already_done"] == 1 and retried[0]["written"] == 1 and res["written"] == 6
    assert sorted(s for r in res["tasks"] for s in r["shards"]) == sorted(
        str(p) for p in (tmp_path / "t").glob("*.tar"))
    embed_shards(tmp_path / "t", tmp_path / "local", ENC, FIELDS, batch_size=4, progress=None)
    a = EmbeddingShardSet(tmp_path / "ray", require_complete=True)
    b = EmbeddingShardSet(tmp_path / "local")
    assert a.keys() == b.keys() and a.manifest["layout"] == "npy"
    for f in FIELDS:
        np.testing.assert_array_equal(a.load(f), b.load(f))


def test_spent_retries_name_the_shard_and_a_rerun_finishes(ray_local, tmp_path, monkeypatch):
    write_text_shards(tmp_path / "t", n_shards=3, per_shard=4)
    monkeypatch.setenv(FAULT_ENV, "text-001")
    dist = DistConfig(backend="ray", workers=2)
    with pytest.raises(RuntimeError, match="text-001: RuntimeError: .*injected fault.*rerun"):
        embed_on_ray(str(tmp_path / "t"), str(tmp_path / "e"), ENC, FIELDS, dist_cfg=dist, retries=0,
                     progress=None)
    emb = EmbeddingShardSet(tmp_path / "e")
    assert emb.shard_names == ["text-000", "text-002"] and emb.manifest is None
    again = embed_on_ray(str(tmp_path / "t"), str(tmp_path / "e"), ENC, FIELDS, dist_cfg=dist,
                         progress=None)  # the marker is there: the fault does not fire again
    assert again["pending_before"] == 1 and again["written"] == 1 and again["complete"]
