"""The SLURM launchers with the REAL stages: `sbatch --wait launchers/xbt.slurm CONFIG` on a small
toy world leaves the adapters and the eval report with the verdict; `scontrol requeue` of a running
`xbt train` job resumes from its checkpoint and ends with the same adapters as an uninterrupted run;
submitit runs the same stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_slurm import _slurm_reason, job_gone, sbatch_wait, slurm_logs, wait_until
from xbt_dist.config import dump_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(_slurm_reason() is not None, reason=str(_slurm_reason()))


@pytest.fixture(scope="module")
def toy_prepared(tmp_path_factory):
    """A small toy world with embeddings and a stage-1 phi: what stage 2 needs."""
    from xbt_dist.pipeline import embed_for_config, run_stage, toy_run_config
    from xbt_dist.toy import ToyWorldConfig, build_toy_world
    from xbt_dist.train.stage1 import run_stage1

    root = tmp_path_factory.mktemp("slurm_toy")
    world = build_toy_world(root / "toy", ToyWorldConfig(
        seed=3, n_train=512, n_text=1024, n_eval=64, n_zeroshot=64, per_shard=128,
        text_per_shard=512, old_epochs=1, new_epochs=1, batch_size=64, evaluate=False))
    cfg = toy_run_config(world, root / "prepared", overrides=[
        "phi.hidden=64", "stage1.epochs=1", "stage1.batch_size=128", "train.batch_size=16",
        "train.num_workers=0", "train.log_every=2", "eval.tsne_points=30"])
    embed_for_config(cfg)
    run_stage(run_stage1, cfg)
    return cfg


def _config(cfg, out: Path, **train) -> Path:
    import copy
    cfg = copy.deepcopy(cfg)
    phi_dir = Path(cfg.stage_dir("phi"))
    cfg.out_dir = str(out)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    out.mkdir(parents=True, exist_ok=True)
    (out / "phi").symlink_to(phi_dir)  # share the stage-1 result
    path = out / "config.yaml"
    path.write_text(dump_config(cfg))
    return path


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "XBT_LOG_DIR": str(tmp_path / "logs"), **extra}
    for k in ("RAY_ADDRESS", "XBT_CMD"):
        env.pop(k, None)
    return env


def _sbatch(tmp_path, config, env, wait=False):
    cmd = ["sbatch", "--parsable", "-o", str(tmp_path / "slurm-%j.out"),
           str(REPO / "launchers" / "xbt.slurm"), str(config)]
    if wait:
        return sbatch_wait(cmd, 500, cwd=REPO, env=env)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)


@pytest.mark.timeout(600)
def test_sbatch_xbt_train_on_ray_leaves_adapters_and_verdict(toy_prepared, tmp_path):
    config = _config(toy_prepared, tmp_path / "run", max_steps=6)
    proc = _sbatch(tmp_path, config, _env(tmp_path), wait=True)
    assert proc.returncode == 0, proc.stderr + slurm_logs(tmp_path)
    run = tmp_path / "run"
    assert (run / "train" / "adapters.pt").is_file()
    report = (run / "eval" / "report.md").read_text()
    assert "Backward compatible:" in report and "`xbt/old`" in report
    log = slurm_logs(tmp_path)
    assert "--ray-address" in log  # the stage ran on the job's Ray cluster


@pytest.mark.timeout(600)
def test_scontrol_requeue_of_xbt_train_resumes_to_same_adapters(toy_prepared, tmp_path):
    steps = 120
    ref_cfg = _config(toy_prepared, tmp_path / "ref", max_steps=steps, checkpoint_every=4)
    from xbt_dist.cli import main as xbt
    assert xbt(["train", "--config", str(ref_cfg)]) == 0  # uninterrupted reference, in process

    config = _config(toy_prepared, tmp_path / "run", max_steps=steps, checkpoint_every=4)
    proc = _sbatch(tmp_path, config, _env(tmp_path, XBT_RAY_CLUSTER="0"))
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    latest = tmp_path / "run" / "train" / "checkpoints" / "latest"
    wait_until(lambda: latest.exists(), 240, "the first checkpoint of the running job")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_until(lambda: job_gone(job_id), 420, f"requeued job {job_id} to finish", poll=2)
    log = slurm_logs(tmp_path)
    assert "resumed from step_" in log, log
    assert (tmp_path / "run" / "eval" / "report.md").is_file(), log
    ref = torch.load(tmp_path / "ref" / "train" / "adapters.pt", weights_only=False)
    got = torch.load(tmp_path / "run" / "train" / "adapters.pt", weights_only=False)
    for part in ("adapters", "phi"):
        for k in ref[part]:
            assert torch.allclose(ref[part][k], got[part][k], atol=1e-5), (part, k)


@pytest.mark.timeout(600)
def test_submitit_runs_xbt_train(toy_prepared, tmp_path):
    sys.path.insert(0, str(REPO / "launchers"))
    import submit
    config = _config(toy_prepared, tmp_path / "run", max_steps=4)
    job = submit.submit_stage("train", config, folder=tmp_path / "submitit", timeout_min=10,
                              env={"XBT_RAY_CLUSTER": "0", "XBT_LOG_DIR": str(tmp_path / "logs")})
    assert job.result()["returncode"] == 0
    assert (tmp_path / "run" / "train" / "adapters.pt").is_file()


def _last_step(tmp_path) -> int:
    import re
    steps = re.findall(r"\[train(?::\w+)?\] step (\d+)/", slurm_logs(tmp_path))
    return int(steps[-1]) if steps else -1


@pytest.mark.timeout(1500)
def test_scancel_term_of_xbt_train_on_ray_checkpoints_requeues_and_resumes(toy_prepared, tmp_path):
    """`scancel --signal=TERM` of a running `xbt train` on the job's Ray
    cluster. No periodic checkpoints (checkpoint_every=0), so the only checkpoint the resumed run
    can find is the one the Ray workers wrote on the signal; the job requeues itself, the second
    run resumes from that step and finishes with adapters and the eval report."""
    # Enough that the first run is still training when the TERM lands (it stops within ~30
    # steps of step 2 here), few enough that the resumed run is short.
    steps = 150
    config = _config(toy_prepared, tmp_path / "run", max_steps=steps, checkpoint_every=0, log_every=2)
    # Shared dev machines: Ray's memory monitor kills actors when *other* processes fill the
    # node. (DeepSpeed's CPU comm op is built once per venv: TORCH_EXTENSIONS_DIR, conftest.py.)
    env = _env(tmp_path, RAY_memory_monitor_refresh_ms="0")
    proc = _sbatch(tmp_path, config, env)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    wait_until(lambda: _last_step(tmp_path) >= 2, 600, "the first run's step 2 on Ray")
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    wait_until(lambda: job_gone(job_id), 720, f"job {job_id} to requeue itself and finish", poll=3)
    log = slurm_logs(tmp_path)
    assert "--ray-address" in log
    import re
    stopped = re.search(r"checkpointed at step (\d+) on request", log)
    resumed = re.search(r"resumed from step_0*(\d+) at step (\d+)", log)
    assert stopped and resumed, log
    assert 0 < int(stopped.group(1)) < steps and resumed.group(2) == stopped.group(1), log
    assert f"requeueing job {job_id}" in (tmp_path / "logs" / job_id / "job.txt").read_text()
    assert (tmp_path / "run" / "train" / "adapters.pt").is_file(), log
    assert (tmp_path / "run" / "eval" / "report.md").is_file(), log
