"""`ray job submit` on a token-authenticated Ray cluster, as docs/launching.md tells users to.

One local Ray head started like `ray start --head` with token auth on (Ray 2.60's default; the
token in a private file, never ~/.ray/auth_token), its dashboard serving the Jobs API. Through
the `ray job` CLI and the shipped `cluster/ray/runtime_env.yaml`:
- stage 1 (`xbt pretrain-phi`, Ray Train + DeepSpeed, 1 worker) is submitted and followed to the
  end: it succeeds, writes phi, and every progress line appears exactly once in the job's logs
  (Ray Train's print patch printed each twice);
- stage 2 (`xbt train`) is stopped midway with `ray job stop`: the SIGTERM makes the entrypoint
  checkpoint and exit within RAY_JOB_STOP_WAIT_TIME_S; resubmitted with `--resume` it continues
  from that checkpoint (not from step 0) to the last step and writes the adapters;
- a client without the token is refused (the cluster really is authenticated).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from xbt_dist.config import dump_config
from xbt_testing import distributed as T

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
STEPS = 30  # stage 2: enough steps after the first log line for the stop to land midway

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("rayjobs")
    home_token = Path.home() / ".ray" / "auth_token"
    before = home_token.stat().st_mtime_ns if home_token.exists() else None
    # A Ray temp dir of its own: the job supervisor hands the entrypoint RAY_ADDRESS resolved from
    # <temp dir>/ray_current_cluster, which any other local Ray on this machine (another test
    # run) may have overwritten in the shared /tmp/ray; the job then trained on THAT cluster.
    # Short, under /tmp: Ray's socket paths live below it (AF_UNIX 107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="xbtjob-", dir="/tmp")
    try:
        with open(root / "nodes.log", "w") as log:
            c = T.LocalRayCluster(nodes=1, cpus_per_node=2, temp_dir=temp_dir, auth_dir=str(root / "auth"),
                                  dashboard=True)
            c.start(log=log)
            yield c
            c.stop()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    after = home_token.stat().st_mtime_ns if home_token.exists() else None
    assert after == before, "the token-auth test cluster wrote ~/.ray/auth_token"


def _ray_job(cluster, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    # cwd = the repository: runtime_env.yaml's working_dir "." is the checkout, as for a user.
    return subprocess.run([RAY, "job", *args], cwd=REPO, env=env or cluster.client_env(),
                          capture_output=True, text=True, timeout=timeout)


def _recipe(tiny, tmp_path) -> Path:
    from xbt_dist.pipeline import toy_run_config

    cfg = toy_run_config(tiny, tmp_path, overrides=[
        "phi.hidden=32", "stage1.source=text", "stage1.batch_size=32", "stage1.epochs=1",
        "train.batch_size=8", f"train.max_steps={STEPS}", "train.log_every=2", "train.checkpoint_every=4",
        "train.num_workers=0", "train.target_source=old_model", "train.shuffle_buffer=16",
        "adapters.text_prompts=2", "adapters.visual_prompts=2",
        "dist.backend=ray", "dist.workers=1", "dist.zero_stage=2", "dist.report_every_s=0"])
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    return path


def _entry(stage: str, recipe: Path, *extra: str) -> list[str]:
    # `python -m xbt_dist.cli` is the `xbt` console script, without relying on PATH in the job
    return ["--runtime-env", "cluster/ray/runtime_env.yaml", "--", sys.executable, "-m", "xbt_dist.cli",
            stage, "--config", str(recipe), *extra]


def _progress_lines(logs: str, name: str) -> list[str]:
    return re.findall(rf"\[{name}\] step \d+/\d+ loss .*", logs)


def test_unauthenticated_client_is_refused(cluster):
    env = {k: v for k, v in cluster.client_env().items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    r = _ray_job(cluster, "list", env=env, timeout=120)
    assert r.returncode != 0 and "auth" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def test_submit_follow_stop_resume(cluster, tiny, tmp_path):
    recipe = _recipe(tiny, tmp_path)
    out = tmp_path / "run"

    # ---- stage 1: submitted and followed (`ray job submit` tails the logs until the end) ----
    r = _ray_job(cluster, "submit", "--submission-id", "xbt-phi", *_entry("pretrain-phi", recipe))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "phi" / "phi.pt").is_file()
    logs = _ray_job(cluster, "logs", "xbt-phi").stdout
    lines = _progress_lines(logs, "phi")
    steps = [re.search(r"step (\d+)/", ln).group(1) for ln in lines]
    assert steps and len(steps) == len(set(steps)), "progress lines repeated in the job logs:\n" + "\n".join(lines)
    # dist.report_every_s=0 reports at every log point; Ray Train's INFO line per report stays out
    assert "Reporting training result" not in logs, "Ray Train's per-report INFO line is in the job logs"

    # ---- stage 2: stopped midway by `ray job stop`, then resubmitted with --resume ----------
    r = _ray_job(cluster, "submit", "--no-wait", "--submission-id", "xbt-train-1", *_entry("train", recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    follow = subprocess.Popen([RAY, "job", "logs", "--follow", "xbt-train-1"], cwd=REPO,
                              env=cluster.client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, training = [], threading.Event()

    def read_follow():
        for line in follow.stdout:
            seen.append(line)
            if _progress_lines(line, "train:xbt"):
                training.set()     # the first progress line: the stage is training
    reader = threading.Thread(target=read_follow, daemon=True)
    reader.start()
    try:
        # Stop at the first progress line or the first checkpoint, whichever shows first: on a loaded
        # machine the followed log can lag the job by more than the whole stage, the file system does not.
        deadline = time.monotonic() + 300
        while not (training.is_set() or _checkpoint_step(out / "train") > 0) and time.monotonic() < deadline:
            if follow.poll() is not None and not reader.is_alive():
                break
            time.sleep(0.1)
    finally:
        stop = _ray_job(cluster, "stop", "xbt-train-1")
        follow.kill()
        follow.wait()
        reader.join(timeout=10)
    assert training.is_set() or _checkpoint_step(out / "train") > 0, \
        "stage 2 ended without a progress line or a checkpoint:\n" + "".join(seen)[-3000:]
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = _ray_job(cluster, "status", "xbt-train-1").stdout
    assert "was stopped" in status, status
    logs = _ray_job(cluster, "logs", "xbt-train-1").stdout
    stopped_at = _checkpoint_step(out / "train")
    assert 0 < stopped_at < STEPS, f"the stop did not land midway (checkpoint at {stopped_at}):\n{logs[-3000:]}"
    # graceful: the SIGTERM checkpointed at the next log point (not only the periodic checkpoints)
    assert f"checkpointed at step {stopped_at} on request" in logs, logs[-3000:]
    assert not (out / "train" / "adapters.pt").exists(), "the stopped job wrote final adapters"

    r = _ray_job(cluster, "submit", "--submission-id", "xbt-train-2", *_entry("train", recipe, "--resume"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    logs = _ray_job(cluster, "logs", "xbt-train-2").stdout
    assert f"resumed from step_{stopped_at:08d} at step {stopped_at}" in logs, logs[-3000:]
    steps = [int(re.search(r"step (\d+)/", ln).group(1)) for ln in _progress_lines(logs, "train:xbt")]
    assert steps and min(steps) > stopped_at and max(steps) == STEPS, steps
    assert (out / "train" / "adapters.pt").is_file()
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == STEPS and manifest["counts"]["samples"] == STEPS * 8, manifest["counts"]


def _checkpoint_step(stage_dir: Path) -> int:
    """The step of the stage's latest complete checkpoint (`checkpoints/latest`; 0: none)."""
    pointer = stage_dir / "checkpoints" / "latest"
    m = re.fullmatch(r"step_(\d+)", pointer.read_text().strip()) if pointer.is_file() else None
    return int(m.group(1)) if m else 0
