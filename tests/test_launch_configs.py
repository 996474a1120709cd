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
    for script in ["launchers/ray_on_slurm.sh", "launchers/ray_step.sh", "launchers/xbt.slurm", "launchers/phi.slurm",
                   "cluster/slurm/setup_local_slurm.sh", "cluster/slurm/stop_local_slurm.sh"]:
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)
    for script in ["launchers/xbt.slurm", "launchers/phi.slurm"]:
        text = (REPO / script).read_text()
        assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
        # Whole nodes, one task (Ray node) per node; no small --cpus-per-task default that would
        # make each Ray node advertise 2 CPUs.
        for directive in ("--exclusive", "--mem=0", "--ntasks-per-node=1"):
            assert f"#SBATCH {directive}\n" in text, (script, directive)
        assert "#SBATCH --cpus-per-task" not in text, script


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


def dry_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`bash launchers/xbt.slurm --dry-run ...` outside SLURM: plans for the described allocation."""
    import os
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "XBT_CMD"}
    e.update(env or {})
    return subprocess.run(["bash", str(REPO / "launchers" / "xbt.slurm"), "--dry-run", *args],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_dry_run_paper_4_nodes_x_8_gpus():
    """The GPU branch of the launcher (no GPUs here): sbatch --nodes=4 --gpus-per-node=8 on
    128-CPU nodes -> one Ray node per node with all its CPUs and GPUs, 32 GPU workers."""
    proc = dry_run("--nodes", "4", "--gpus-per-node", "8", "--cpus-per-node", "128",
                   "configs/paper_b32_l14.yaml")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "plan: nodes=4 (node1 node2 node3 node4) tasks_per_node=1 head=node1" in out
    assert "plan: cpus_per_node=128(x4) gpus_per_node=8" in out
    head = next(line for line in out.splitlines() if line.startswith("plan: ray head on node1:"))
    for flag in ("srun --overlap --nodes=1 --ntasks=1 -w node1 --cpus-per-task=128 --gres=gpu:8",
                 "ray start --head", "--num-cpus=128", "--num-gpus=8", "--block"):
        assert flag in head, (flag, head)
    workers = [line for line in out.splitlines() if line.startswith("plan: ray worker on")]
    assert len(workers) == 3
    for i, line in enumerate(workers, start=2):
        assert f"-w node{i} --cpus-per-task=128 --gres=gpu:8" in line and "--num-gpus=8" in line, line
        assert "--address=HEAD_IP:20000" in line
    stage = next(line for line in out.splitlines() if line.startswith("plan: stage:"))
    assert "xbt train --config configs/paper_b32_l14.yaml --ray-address HEAD_IP:20000 --resume" in stage
    assert "--workers 32 --use-gpu" in stage
    assert "plan: ray_workers=32 per_worker=(CPU=8, GPU=1)" in out
    assert "need: CPU=256 GPU=32; offer: CPU=512 GPU=32" in out
    assert "plan: placement: OK" in out


@pytest.mark.timeout(900)
def test_dry_run_impossible_placement_fails_with_fix():
    proc = dry_run("--nodes", "4", "--gpus-per-node", "8", "--cpus-per-node", "32",
                   "configs/paper_b32_l14.yaml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "32 workers x 8 CPUs = 256 > 128 CPUs in the allocation" in proc.stdout
    assert "set dist.cpus_per_worker=4" in proc.stdout
    # Stage arguments reach the check as they reach the stage: 4 CPUs per worker fit.
    proc = dry_run("--nodes", "4", "--gpus-per-node", "8", "--cpus-per-node", "32",
                   "configs/paper_b32_l14.yaml", "--set", "dist.cpus_per_worker=4")
    assert proc.returncode == 0 and "plan: placement: OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.timeout(900)
def test_dry_run_cpu_allocation_and_workers_knob():
    """No GPUs: no --gres, no --use-gpu; XBT_WORKERS reaches the stage and the check."""
    proc = dry_run("--nodes", "2", "--cpus-per-node", "16", "configs/toy.yaml",
                   env={"XBT_WORKERS": "4"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "--gres" not in out and "--use-gpu" not in out
    assert "--cpus-per-task=16" in out and "--num-gpus=0" in out
    assert "--workers 4" in out and "plan: ray_workers=4 per_worker=(CPU=1, GPU=0)" in out


@pytest.mark.timeout(900)
@pytest.mark.skipif(__import__("shutil").which("srun") is None, reason="submitit picks its SLURM executor only where srun exists")
def test_submit_dry_run_whole_nodes_and_plan(tmp_path):
    """`xbt submit ... --dry-run`: submitit's sbatch script asks whole nodes, and the Ray plan of
    the allocation follows; nothing is submitted."""
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), "train",
                           "configs/paper_b32_l14.yaml", "--nodes", "4", "--gpus-per-node", "8",
                           "--dry-run", "--cpus-per-node", "128", "--folder", str(tmp_path / "sub")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for line in ("#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue"):
        assert line in out, line
    assert "--cpus-per-task=128 --gres=gpu:8" in out and "--workers 32 --use-gpu" in out
    assert "plan: placement: OK" in out
    assert not list((tmp_path / "sub").glob("*.pkl"))  # nothing submitted
