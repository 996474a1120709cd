"""Launchers against a real SLURM cluster (cluster/slurm/setup_local_slurm.sh starts one).

The stage run by the launchers is a parameter: XBT_TEST_CMD (default: launchers/smoke_payload.py,
which joins the Ray cluster, counts steps into a checkpoint and resumes from it). Each test writes
a payload config into tmp_path and checks the files the run leaves there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
PAYLOAD_CMD = os.environ.get("XBT_TEST_CMD", f"{sys.executable} {LAUNCHERS / 'smoke_payload.py'}")

sys.path.insert(0, str(LAUNCHERS))
import smoke_payload  # noqa: E402


def _slurm_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH: start a local cluster with cluster/slurm/setup_local_slurm.sh (root)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return f"slurmctld not answering ({ping.stdout.strip() or ping.stderr.strip()}): run cluster/slurm/setup_local_slurm.sh"
    return None


pytestmark = pytest.mark.skipif(_slurm_reason() is not None, reason=str(_slurm_reason()))


def payload_config(tmp_path: Path, **cfg) -> Path:
    cfg.setdefault("out", str(tmp_path / "out"))
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(cfg))
    return path


def launcher_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "XBT_CMD": PAYLOAD_CMD, "XBT_LOG_DIR": str(tmp_path / "logs"), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def sbatch(tmp_path: Path, config: Path, *args: str, wait: bool = False, env=None) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--parsable", "-o", str(tmp_path / "slurm-%j.out"), *args]
    if wait:
        cmd.insert(1, "--wait")
    cmd += [str(LAUNCHERS / "xbt.slurm"), str(config)]
    return subprocess.run(cmd, cwd=REPO, env=env or launcher_env(tmp_path), capture_output=True,
                          text=True, timeout=240)


def wait_until(predicate, timeout: float, what: str, poll: float = 1.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_gone(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.returncode != 0 or not out.stdout.strip()


def ckpt_step(out: Path) -> int:
    try:
        return json.loads((out / "ckpt.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def slurm_logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))


def assert_resumed_run(tmp_path: Path, steps: int) -> None:
    out = tmp_path / "out"
    result = json.loads((out / "result.json").read_text())
    assert result == {"acc": smoke_payload.expected_result(steps), "steps": steps}, slurm_logs(tmp_path)
    runs = [json.loads(line) for line in (out / "runs.log").read_text().splitlines()]
    assert len(runs) == 2, runs
    assert runs[0]["start_step"] == 0 and runs[1]["start_step"] > 0, runs
    assert runs[1]["restart"] == "1", runs


@pytest.mark.timeout(240)
def test_sbatch_runs_stage_on_ray_cluster(tmp_path):
    """sbatch --wait xbt.slurm: Ray cluster over the job's node, stage runs, Ray stopped, exit 0."""
    cfg = payload_config(tmp_path, steps=3, step_s=0.1, use_ray=True)
    proc = sbatch(tmp_path, cfg, wait=True)
    job_id = proc.stdout.strip().split(";")[0]
    assert proc.returncode == 0, proc.stderr + slurm_logs(tmp_path)
    out = tmp_path / "out"
    ray_info = json.loads((out / "ray.json").read_text())
    assert ray_info["nodes"] == 1 and len(ray_info["tasks"]) == 1
    assert ray_info["address"].endswith(f":{20000 + 100 * (int(job_id) % 400)}")  # per-job port
    assert json.loads((out / "result.json").read_text())["steps"] == 3
    runs = [json.loads(line) for line in (out / "runs.log").read_text().splitlines()]
    assert len(runs) == 1 and runs[0]["job"] == job_id
    log_dir = tmp_path / "logs" / job_id
    assert "stage exited with 0" in (log_dir / "job.txt").read_text()
    assert (log_dir / "stage.log").exists() and (log_dir / "ray-logs").is_dir()
    # Ray was taken down with the job: its per-job temp dir is gone.
    assert not Path(f"/tmp/xbt-ray-{job_id}").exists()


@pytest.mark.timeout(180)
def test_scontrol_requeue_resumes_to_same_result(tmp_path):
    """scontrol requeue of a running job: the stage checkpoints, the requeued job resumes."""
    steps = 12
    cfg = payload_config(tmp_path, steps=steps, step_s=1.0, use_ray=False)
    # No Ray cluster here: the requeue mechanics do not depend on it, and Ray start is slow.
    proc = sbatch(tmp_path, cfg, env=launcher_env(tmp_path, XBT_RAY_CLUSTER="0"))
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    out = tmp_path / "out"
    wait_until(lambda: ckpt_step(out) >= 3, 90, "the first run to reach step 3")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_until(lambda: job_gone(job_id), 150, f"requeued job {job_id} to finish", poll=2)
    assert_resumed_run(tmp_path, steps)


@pytest.mark.timeout(180)
def test_usr1_checkpoints_and_self_requeues(tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit)."""
    steps = 12
    cfg = payload_config(tmp_path, steps=steps, step_s=1.0, use_ray=False)
    proc = sbatch(tmp_path, cfg, env=launcher_env(tmp_path, XBT_RAY_CLUSTER="0"))
    job_id = proc.stdout.strip().split(";")[0]
    out = tmp_path / "out"
    wait_until(lambda: ckpt_step(out) >= 3, 90, "the first run to reach step 3")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_until(lambda: job_gone(job_id), 150, f"self-requeued job {job_id} to finish", poll=2)
    assert_resumed_run(tmp_path, steps)
    job_txt = (tmp_path / "logs" / job_id / "job.txt").read_text()
    assert "got SIGUSR1" in job_txt and f"requeueing job {job_id}" in job_txt
    assert "checkpointed" in slurm_logs(tmp_path)


@pytest.mark.timeout(180)
def test_submitit_runs_stage(tmp_path):
    """The same stage through submitit's AutoExecutor on SLURM; job.result() returns."""
    import submit

    cfg = payload_config(tmp_path, steps=3, step_s=0.1, use_ray=False)
    job = submit.submit_stage("train", cfg, folder=tmp_path / "submitit", timeout_min=10,
                              env={"XBT_CMD": PAYLOAD_CMD, "XBT_RAY_CLUSTER": "0",
                                   "XBT_LOG_DIR": str(tmp_path / "logs")})
    assert job.result() == {"stage": "train", "config": str(cfg), "returncode": 0}
    assert json.loads((tmp_path / "out" / "result.json").read_text())["steps"] == 3


@pytest.mark.timeout(180)
def test_submitit_preemption_checkpoints_and_resumes(tmp_path):
    """submitit's USR2 -> StageJob.checkpoint -> USR1 to the stage -> requeue -> resumed run."""
    import submit

    steps = 12
    cfg = payload_config(tmp_path, steps=steps, step_s=1.0, use_ray=False)
    job = submit.submit_stage("train", cfg, folder=tmp_path / "submitit", timeout_min=10,
                              env={"XBT_CMD": PAYLOAD_CMD, "XBT_RAY_CLUSTER": "0",
                                   "XBT_LOG_DIR": str(tmp_path / "logs")})
    out = tmp_path / "out"
    wait_until(lambda: ckpt_step(out) >= 3, 90, "the first run to reach step 3")
    job._interrupt(timeout=True)  # what SLURM sends slurm_signal_delay_s before the time limit
    assert job.result()["returncode"] == 0
    assert_resumed_run(tmp_path, steps)
