"""Shipped cluster configs parse and say what the launchers rely on; submitit --local works.

No SLURM needed here (tests/test_slurm.py covers the real scheduler).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launchers"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_configs(stage):
    cfg = json.loads((REPO / "cluster" / "deepspeed" / f"zero{stage}.json").read_text())
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["bf16"]["enabled"] is True
    assert cfg["train_micro_batch_size_per_gpu"] == "auto"  # filled in by the trainer
    assert cfg["gradient_clipping"] > 0


def test_ray_and_kuberay_yaml():
    cluster = yaml.safe_load((REPO / "cluster/ray/cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    runtime_env = yaml.safe_load((REPO / "cluster/ray/runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "." and ".git" in runtime_env["excludes"]
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("xbt train")
    # The runtime env embedded in the manifest is YAML too.
    assert "env_vars" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_launch_scripts_are_valid_bash():
    for script in ["launchers/ray_on_slurm.sh", "launchers/xbt.slurm", "launchers/phi.slurm",
                   "cluster/slurm/setup_local_slurm.sh", "cluster/slurm/stop_local_slurm.sh"]:
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)
    for script in ["launchers/xbt.slurm", "launchers/phi.slurm"]:
        text = (REPO / script).read_text()
        assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text


def test_ray_on_slurm_refuses_outside_slurm(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "launchers/ray_on_slurm.sh"), "train", "c.yaml"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "inside a SLURM allocation" in proc.stderr


def test_submitit_local_runs_stage(tmp_path):
    """--local path: submitit's local executor runs the stage directly (no SLURM, no Ray)."""
    import smoke_payload
    import submit

    cfg = tmp_path / "payload.json"
    cfg.write_text(json.dumps({"out": str(tmp_path / "out"), "steps": 3, "step_s": 0.0, "use_ray": False}))
    cmd = f"{sys.executable} {REPO / 'launchers' / 'smoke_payload.py'}"
    job = submit.submit_stage("train", cfg, folder=tmp_path / "submitit", local=True, timeout_min=5,
                              env={"XBT_CMD": cmd})
    assert job.result()["returncode"] == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result == {"acc": smoke_payload.expected_result(3), "steps": 3}
    run = json.loads((tmp_path / "out" / "runs.log").read_text())
    assert run["start_step"] == 0  # --resume passed, nothing to resume from
