"""Shared storage for real: `out_dir: s3://...` on a local S3-compatible server (moto's standalone
server on 127.0.0.1), a 2-node local Ray cluster whose nodes have SEPARATE scratch directories
(each node's TMPDIR), a Ray worker killed mid-run, the restarted group resuming from the bucket.

What it catches: a checkpoint staged in a node's /tmp and uploaded by rank 0 alone (rank 1's file
never reaches the bucket: resume fails), final artifacts and manifests written with pathlib (a
local folder named `s3:` instead of objects), restart detection that needs a local filesystem
(the restarted group would start over instead of resuming), and a result that differs from the
same run on a local out_dir.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
pytest.importorskip("moto.server", reason="moto[server] (the `test` extra) runs the local S3 endpoint")
pytest.importorskip("s3fs")

from xbt_dist.config import DistConfig  # noqa: E402
import xbt_testing.distributed as T  # noqa: E402

pytestmark = pytest.mark.timeout(1500)
BUCKET = "xbt-shared"


@pytest.fixture(scope="module")
def s3_cluster(tmp_path_factory):
    """(endpoint, Ray cluster) with S3 settings in every node's environment, as on a real cluster."""
    import ray
    from moto.server import ThreadedMotoServer

    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("s3ray")
    port = T.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "FSSPEC_S3_ENDPOINT_URL": endpoint}  # fsspec reads FSSPEC_<PROTOCOL>_<KWARG> at import
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint  # this (already-importing) process
    # short paths: Ray puts AF_UNIX sockets below TMPDIR, and those may not exceed 107 bytes
    scratch = [Path(tempfile.mkdtemp(prefix=f"xbt-n{i}-")) for i in range(2)]
    try:
        with open(root / "nodes.log", "w") as log:
            c = T.LocalRayCluster(nodes=2, cpus_per_node=1,
                                  node_env=[{"TMPDIR": str(d)} for d in scratch]).start(log=log)
            try:
                yield {"endpoint": endpoint, "cluster": c, "scratch": scratch}
            finally:
                c.stop()
    finally:
        server.stop()
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)
        fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cfg(tiny, out_dir: str, emb: str, cluster):
    from xbt_dist.config import Stage1Config
    from xbt_dist.pipeline import toy_run_config

    cfg = toy_run_config(tiny, Path("unused"), overrides=[
        "phi.hidden=32", "train.batch_size=8", "train.max_steps=6", "train.log_every=2",
        "train.checkpoint_every=2", "train.num_workers=1", "train.phi_init=stage1",
        "train.target_source=old_model", "train.shuffle_buffer=16",
        "adapters.text_prompts=2", "adapters.visual_prompts=2"])
    cfg.out_dir = out_dir
    cfg.stage1 = Stage1Config(source="embeddings", embeddings=emb, epochs=2, batch_size=16)
    cfg.dist = DistConfig(backend="ray", workers=2, ray_address=cluster.address, zero_stage=2,
                          max_failures=1)
    return cfg


def test_s3_out_dir_two_nodes_kill_resume_every_artifact(s3_cluster, tiny, tmp_path, monkeypatch):
    import s3fs

    from test_dist_ray import _assert_bit_identical, _text_embeddings
    from xbt_dist import storage
    from xbt_dist.distributed.ray_runner import run_on_ray
    from xbt_dist.train.stage1 import run_stage1
    from xbt_dist.train.stage2 import run_stage2

    fs = s3fs.S3FileSystem(endpoint_url=s3_cluster["endpoint"])
    fs.mkdir(BUCKET)
    emb = _text_embeddings(tmp_path / "emb", d_new=24, d_old=16)  # the tiny models' dims
    cluster = s3_cluster["cluster"]
    # The reference: the same run on a local out_dir, no fault.
    local = _cfg(tiny, str(tmp_path / "local"), emb, cluster)
    run_on_ray(run_stage1, local)
    ref = run_on_ray(run_stage2, local)

    url = f"s3://{BUCKET}/run"
    cfg = _cfg(tiny, url, emb, cluster)
    monkeypatch.chdir(tmp_path)  # a pathlib write of the URL would show up here as ./s3:
    phi = run_on_ray(run_stage1, cfg)
    monkeypatch.setenv("XBT_FAULT_AT_STEP", "3")  # rank 1 dies after the step-2 checkpoint
    res = run_on_ray(run_stage2, cfg)
    assert fs.exists(f"{BUCKET}/run/train/.fault_injected"), "the fault never fired"
    assert res["attempt"] == 1, "Ray did not restart the group, or the restart was not detected"
    assert res["steps"] == 6 and phi["phi_path"] == f"{url}/phi/phi.pt"

    files = set(fs.find(f"{BUCKET}/run"))
    for stage in ("phi", "train"):
        ck = f"{BUCKET}/run/{stage}/checkpoints"
        latest = fs.cat_file(f"{ck}/latest").decode()
        for f in ("state.pt", "meta.json", "rank_00000.pt", "rank_00001.pt"):  # BOTH ranks' parts
            assert f"{ck}/{latest}/{f}" in files, f"{stage}: {f} missing from {latest}"
        assert f"{BUCKET}/run/{stage}/manifest.json" in files
    assert f"{BUCKET}/run/phi/phi.pt" in files and f"{BUCKET}/run/train/adapters.pt" in files
    assert fs.cat_file(f"{BUCKET}/run/train/checkpoints/latest").decode() == "step_00000006"
    assert not (tmp_path / "s3:").exists(), "something wrote the URL as a local path"
    for d in s3_cluster["scratch"]:  # nothing staged in a node's scratch dir
        assert not list(d.rglob("*.pt")), f"checkpoint files staged in node scratch {d}"

    _assert_bit_identical(storage.load_torch(ref["adapters_path"]), storage.load_torch(res["adapters_path"]),
                          "the S3 run (killed at step 3 and resumed) vs the same run on a local out_dir")
    assert storage.read_text(f"{url}/train/manifest.json").count('"adapters"') >= 1
