"""Ray Train jobs on a local two-node Ray cluster (two `ray start` nodes on this machine).

One module-scoped cluster serves every test (Ray start-up is the slow part):
- placement: a 2-worker TorchTrainer job through `run_on_ray(..., ray_address)` runs one worker
  on each node;
- Ray + DeepSpeed ZeRO-2: 2 workers training a Linear phi on fixed features with the global-batch
  InfoNCE end with the same parameters as one process on the whole batch;
- fault recovery: stage 1 (phi on precomputed embeddings) with rank 1 killed once mid-run
  (`XBT_FAULT_AT_STEP`), restarted by FailureConfig(max_failures=1), resumes from its checkpoint
  and ends with the same phi as an uninterrupted 2-worker run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from xbt_dist.config import DistConfig, OptimConfig, RunConfig, Stage1Config, TrainConfig
from xbt_dist.dist import testing as T
from xbt_dist.dist.ray_runner import run_on_ray

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("ray")
    with open(root / "nodes.log", "w") as log:
        c = T.LocalRayCluster(nodes=2, cpus_per_node=1).start(log=log)
        yield c
        c.stop()


def _cfg(tmp_path, cluster, **dist) -> RunConfig:
    return RunConfig(name="t", out_dir=str(tmp_path / "run"),
                     dist=DistConfig(backend="ray", workers=2, ray_address=cluster.address, **dist))


def test_workers_placed_on_both_nodes(cluster, tmp_path):
    assert len(cluster.node_ids()) == 2
    res = run_on_ray(T.node_probe_stage, _cfg(tmp_path, cluster), report_progress=False)
    nodes = {w["node_id"] for w in res["workers"]}
    assert nodes == set(cluster.node_ids()), res["workers"]
    assert res["world_size"] == 2 and res["attempt"] == 0


def test_ray_deepspeed_zero2_matches_single_process(cluster, tmp_path):
    optim = OptimConfig(lr=0.05, warmup_steps=1, grad_clip=1.0)
    ref_losses, ref_state = T.linear_phi_reference(T.fixed_features(), optim, steps=3)
    res = run_on_ray(T.linear_phi_stage, _cfg(tmp_path, cluster, zero_stage=2), report_progress=False,
                     features=T.fixed_features(), optim=optim, steps=3)
    assert res["losses"] == pytest.approx(ref_losses, rel=1e-5)
    for k, v in ref_state.items():
        torch.testing.assert_close(torch.tensor(res["state"][k]), v, rtol=1e-5, atol=1e-6)


def _text_embeddings(root, shards=2, per_shard=32, d_new=12, d_old=8):
    from xbt_dist.data.embeddings import write_embedding_manifest, write_embedding_shard

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(d_new, d_old))
    for s in range(shards):
        w_new = rng.normal(size=(per_shard, d_new))
        w_old = w_new @ mix + 0.1 * rng.normal(size=(per_shard, d_old))
        write_embedding_shard(root, f"text-{s:03d}", [f"{s}-{i}" for i in range(per_shard)],
                              {"text_new": w_new, "text_old": w_old})
    write_embedding_manifest(root, source="synthetic", models={})
    return str(root)


def _stage1_cfg(tmp_path, cluster, emb, name):
    cfg = _cfg(tmp_path / name, cluster, zero_stage=2, max_failures=1)
    cfg.phi.hidden, cfg.phi.depth = 16, 2
    cfg.stage1 = Stage1Config(source="embeddings", embeddings=emb, epochs=4, batch_size=16,
                              optim=OptimConfig(lr=1e-2, warmup_steps=2))
    # checkpoints at steps 3, 6, ...: the fault at step 5 resumes mid-epoch from step 3
    cfg.train = TrainConfig(checkpoint_every=3, log_every=2)
    return cfg


def test_fault_recovery_stage1_resumes_and_matches(cluster, tmp_path, monkeypatch):
    from xbt_dist.train.stage1 import load_phi, run_stage1

    # Relative paths, as in `xbt pretrain-phi --config runs/...`: Ray Train starts workers in its own
    # directory, so they must resolve against the driver's working directory.
    monkeypatch.chdir(tmp_path)
    emb = _text_embeddings(Path("emb"))
    clean = run_on_ray(run_stage1, _stage1_cfg(Path("."), cluster, emb, "clean"))
    assert not Path(clean["phi_path"]).is_absolute() and (tmp_path / clean["phi_path"]).is_file()
    monkeypatch.setenv("XBT_FAULT_AT_STEP", "5")
    faulty_cfg = _stage1_cfg(tmp_path, cluster, emb, "faulty")
    faulty = run_on_ray(run_stage1, faulty_cfg)
    assert (tmp_path / "faulty" / "run" / "phi" / ".fault_injected").exists(), "the fault never fired"
    assert faulty["attempt"] == 1, "Ray did not restart the worker group"
    assert faulty["steps"] == clean["steps"] == 16
    a, b = load_phi(clean["phi_path"]).state_dict(), load_phi(faulty["phi_path"]).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_embed_on_ray_matches_single_process_and_resumes(cluster, tiny, tmp_path):
    from xbt_dist.data.embed import embed_shards
    from xbt_dist.data.embeddings import EmbeddingShardSet
    from xbt_dist.dist.embed_job import embed_on_ray

    enc = {"text_old": T.text_encoder_old, "text_new": T.text_encoder_new}
    fields = ["text_old", "text_new"]
    dist = DistConfig(backend="ray", workers=2, ray_address=cluster.address)
    res = embed_on_ray(tiny["text"], str(tmp_path / "ray"), enc, fields, batch_size=16, dist_cfg=dist)
    assert res["complete"] and res["pending_before"] == 2 and len(res["tasks"]) == 2
    embed_shards(tiny["text"], str(tmp_path / "local"), enc, fields, batch_size=16, progress=None)
    a, b = EmbeddingShardSet(tmp_path / "ray", require_complete=True), EmbeddingShardSet(tmp_path / "local")
    assert a.keys() == b.keys() and len(a.keys()) == 128
    for f in fields:
        np.testing.assert_array_equal(a.load(f), b.load(f))
    # Resumable: only the missing shard is recomputed.
    victim = sorted((tmp_path / "ray").glob("*.keys.npy"))[0]  # the npy layout's completion mark
    victim.unlink()
    again = embed_on_ray(tiny["text"], str(tmp_path / "ray"), enc, fields, batch_size=16, dist_cfg=dist)
    assert again["pending_before"] == 1 and again["written"] == 1 and again["complete"]
    assert victim.exists()
