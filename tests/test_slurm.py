"""Launchers against a real SLURM cluster (cluster/slurm/setup_local_slurm.sh starts one).

The stage run by the launchers is a parameter: XBT_TEST_CMD (default: launchers/smoke_payload.py,
which joins the Ray cluster, counts steps into a checkpoint and resumes from it). Each test writes
a payload config into tmp_path and checks the files the run leaves there.
"""

from __future__ import annotations

import json
import os
import re
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


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}


def sbatch_wait(cmd: list[str], timeout: float, **run_kw) -> subprocess.CompletedProcess:
    """What `sbatch --wait CMD` returns (the job's exit code), without its polling.

    `sbatch --wait` sleeps 2, 8, then 32 s between its checks, so a job of 12 s returned after
    42 s (three tests here took exactly 42.02 s). Submit with --parsable, then ask `scontrol`
    every 0.5 s (the local cluster keeps ended jobs for MinJobAge=30 s).
    """
    assert "--wait" not in cmd and "--parsable" in cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **run_kw)
    if proc.returncode:
        return proc
    job_id = proc.stdout.strip().split(";")[0]
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        state = re.search(r"JobState=(\S+)", out.stdout)
        if state is None:
            raise AssertionError(f"job {job_id} unknown to scontrol: {out.stdout}{out.stderr}")
        if state.group(1) in TERMINAL:
            code, sig = map(int, re.search(r"ExitCode=(\d+):(\d+)", out.stdout).groups())
            rc = code or (128 + sig if sig else 0) or int(state.group(1) != "COMPLETED")
            return subprocess.CompletedProcess(cmd, rc, proc.stdout, proc.stderr)
        time.sleep(0.5)
    raise subprocess.TimeoutExpired(cmd, timeout)


def sbatch(tmp_path: Path, config: Path, *args: str, wait: bool = False, env=None) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--parsable", "-o", str(tmp_path / "slurm-%j.out"), *args]
    cmd += [str(LAUNCHERS / "xbt.slurm"), str(config)]
    kw = {"cwd": REPO, "env": env or launcher_env(tmp_path)}
    if wait:
        return sbatch_wait(cmd, 240, **kw)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)


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


def _scancel_steps_term(job_id: str) -> None:
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)


def _scontrol_requeue(job_id: str) -> None:
    subprocess.run(["scontrol", "requeue", job_id], check=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", [_scancel_steps_term, _scontrol_requeue], ids=["scancel-TERM", "requeue"])
def test_sigterm_keeps_ray_up_checkpoints_and_resumes(tmp_path, stop):
    """SIGTERM with the job's Ray cluster up: `scancel --signal=TERM` (the Ray steps only) and
    `scontrol requeue` (every process of the job). Ray must outlive the signal (the payload runs
    a Ray task on the node at every step and again while checkpointing), the stage checkpoints,
    and the job comes back (self-requeue resp. SLURM's requeue) and resumes to the same result."""
    steps = 40
    cfg = payload_config(tmp_path, steps=steps, step_s=0.5, use_ray=True, ray_every_step=True)
    proc = sbatch(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    out = tmp_path / "out"
    wait_until(lambda: ckpt_step(out) >= 3, 150, "the first run to reach step 3")
    stop(job_id)
    wait_until(lambda: job_gone(job_id), 240, f"job {job_id} to come back and finish", poll=2)
    assert_resumed_run(tmp_path, steps)
    stops = [json.loads(line) for line in (out / "stops.log").read_text().splitlines()]
    assert stops == [{"signal": "SIGTERM", "step": stops[0]["step"], "ray_ok": True}], stops
    job_txt = (tmp_path / "logs" / job_id / "job.txt").read_text()
    assert "got SIGTERM" in job_txt, job_txt
    if stop is _scancel_steps_term:  # only the Ray steps were signalled: the job requeued itself
        assert "a Ray step got SIGTERM" in job_txt and f"requeueing job {job_id}" in job_txt, job_txt
    else:  # SLURM requeued the job; the script must not requeue it a second time
        assert "requeueing job" not in job_txt and "SLURM decides" in job_txt, job_txt


@pytest.mark.timeout(120)
def test_impossible_placement_fails_fast_before_ray(tmp_path):
    """3 workers x 2 CPUs on the 2-CPU node: the job ends at once with the numbers and the fix,
    without starting Ray (today's alternative: Ray waits for the bundles forever)."""
    env = {k: v for k, v in launcher_env(tmp_path).items() if k != "XBT_CMD"}
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    workers = cpus + 1
    proc = sbatch_wait(["sbatch", "--parsable", "-o", str(tmp_path / "slurm-%j.out"),
                        str(LAUNCHERS / "xbt.slurm"), str(REPO / "configs" / "toy.yaml"),
                        "--set", f"dist.workers={workers}", "dist.cpus_per_worker=2",
                        f"out_dir={tmp_path / 'run'}"], 110, cwd=REPO, env=env)
    job_id = proc.stdout.strip().split(";")[0]
    assert proc.returncode != 0
    log = slurm_logs(tmp_path)
    assert f"{workers} workers x (2 CPUs) do not fit the allocation" in log, log
    assert f"{workers} workers x 2 CPUs = {2 * workers} > {cpus} CPUs in the allocation" in log, log
    assert f"use --workers {cpus // 2}" in log and "nothing started" in log, log
    assert not (tmp_path / "logs" / job_id / "ray-head.log").exists()  # Ray never started


@pytest.mark.timeout(120)
def test_dry_run_in_allocation_prints_plan(tmp_path):
    """`sbatch xbt.slurm --dry-run CONFIG`: the plan for the real allocation, nothing started."""
    env = {k: v for k, v in launcher_env(tmp_path).items() if k != "XBT_CMD"}
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    proc = sbatch_wait(["sbatch", "--parsable", "-o", str(tmp_path / "slurm-%j.out"),
                        str(LAUNCHERS / "xbt.slurm"), "--dry-run", str(REPO / "configs" / "toy.yaml"),
                        "--set", "dist.workers=1", f"out_dir={tmp_path / 'run'}"], 110, cwd=REPO, env=env)
    log = slurm_logs(tmp_path)
    assert proc.returncode == 0, proc.stderr + log
    assert f"plan: cpus_per_node={cpus} gpus_per_node=0" in log, log
    assert f"--cpus-per-task={cpus}" in log and f"--num-cpus={cpus}" in log and "--gres" not in log, log
    assert "plan: placement: OK" in log and "plan: dry run, nothing started" in log, log
    assert "kill_wait_s=30" in log, log  # the local cluster's KillWait: the stage's time to checkpoint
