"""Placement check: workers x (cpus_per_worker, gpus_per_worker) against what the cluster offers.

The arithmetic on described nodes (the paper's 4 x 8-GPU allocation and its failure modes), then
the check wired into `run_on_ray` and `xbt train` on a real local Ray: an impossible placement
fails in seconds with the numbers and the fix instead of Ray waiting forever. No SLURM needed
(tests/test_slurm.py runs the same check inside a real allocation).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xbt_dist.config import DistConfig, load_config
from xbt_dist.distributed.placement import (NodeCapacity, PlacementError, allocation_nodes, check_placement,
                                     check_ray_cluster, parse_node_cpus, placement_problems)

REPO = Path(__file__).resolve().parents[1]


def nodes(n: int, cpus: int, gpus: int = 0) -> list[NodeCapacity]:
    return [NodeCapacity(f"n{i}", cpus, gpus) for i in range(n)]


def gpu_dist(workers=32, cpus=8, gpus=1.0) -> DistConfig:
    return DistConfig(backend="ray", workers=workers, use_gpu=True, cpus_per_worker=cpus, gpus_per_worker=gpus)


def test_paper_allocation_fits():
    """sbatch --nodes=4 --gpus-per-node=8 on 128-CPU nodes: 32 workers x (8 CPUs, 1 GPU)."""
    assert placement_problems(gpu_dist(), nodes(4, 128, 8)) == []
    check_placement(gpu_dist(), nodes(4, 64, 8))  # exactly full: 8 x 8 CPUs per node


def test_too_few_cpus_names_numbers_and_fix():
    with pytest.raises(PlacementError) as e:
        check_placement(gpu_dist(), nodes(4, 32, 8), "the allocation", slurm=True)
    msg = str(e.value)
    assert "32 workers x (8 CPUs, 1 GPUs) do not fit the allocation: 4 nodes x (32 CPUs, 8 GPUs) hold 16" in msg
    assert "32 workers x 8 CPUs = 256 > 128 CPUs in the allocation" in msg
    assert "set dist.cpus_per_worker=4" in msg and "use --workers 16" in msg
    assert "--cpus-per-task=64" in msg  # 8 workers per node x 8 CPUs


def test_too_few_gpus():
    msg = "; ".join(placement_problems(gpu_dist(), nodes(2, 128, 8), "the allocation", slurm=True))
    assert "32 workers x 1 GPUs = 32 > 16 GPUs in the allocation: use --workers 16" in msg
    assert "ask for 4 nodes" in msg
    msg = "; ".join(placement_problems(gpu_dist(workers=2), nodes(1, 2, 0)))
    assert "dist.use_gpu=true but the Ray cluster has no GPUs" in msg


def test_bundles_do_not_span_nodes():
    """12 CPUs in total for 3 x 4 CPUs, but 6 per node: only one worker fits on each."""
    dist = DistConfig(backend="ray", workers=3, cpus_per_worker=4)
    msg = "; ".join(placement_problems(dist, nodes(2, 6)))
    assert "hold 2 such workers" in msg and "must be on one node" in msg
    assert "set dist.cpus_per_worker=3" in msg


def test_fractional_gpus_and_cpu_only():
    assert placement_problems(gpu_dist(workers=16, cpus=1, gpus=0.5), nodes(1, 16, 8)) == []
    assert placement_problems(DistConfig(workers=4, cpus_per_worker=2, use_gpu=False), nodes(1, 8, 0)) == []


def test_slurm_cpus_per_node_format():
    assert parse_node_cpus("128(x2),96") == [128, 128, 96]
    assert [n.cpus for n in allocation_nodes("2", 0, ["vm"])] == [2]
    with pytest.raises(ValueError, match="128\\(x4\\)"):
        parse_node_cpus("lots")


@pytest.fixture
def small_ray():
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.timeout(120)
def test_run_on_ray_fails_fast_on_attached_cluster(small_ray, tmp_path, monkeypatch, capsys):
    """An attached 2-CPU cluster, 3 workers x 1 CPU: run_on_ray raises before any worker starts."""
    from xbt_dist.distributed.ray_runner import run_on_ray
    from xbt_testing.distributed import node_probe_stage

    cfg = load_config(None, [f"out_dir={tmp_path}", "dist.backend=ray", "dist.workers=3"])
    monkeypatch.setenv("XBT_PLACEMENT_CHECK", "fail")
    with pytest.raises(PlacementError, match="3 workers x 1 CPUs = 3 > 2 CPUs in the Ray cluster"):
        run_on_ray(node_probe_stage, cfg)
    # auto on an attached cluster outside SLURM: an autoscaler may add nodes, so only a warning.
    monkeypatch.setenv("XBT_PLACEMENT_CHECK", "auto")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    check_ray_cluster(cfg.dist, started_locally=False)
    assert "WARNING placement: 3 workers" in capsys.readouterr().err


@pytest.mark.timeout(180)
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without GPUs")
def test_xbt_train_use_gpu_without_gpus_fails_fast(tmp_path):
    """`xbt train --use-gpu` on a machine without GPUs: exit 2 and the fix, not a silent hang."""
    proc = subprocess.run([sys.executable, "-m", "xbt_dist.cli", "train", "--config",
                           str(REPO / "configs" / "toy.yaml"), "--workers", "2", "--use-gpu",
                           "--set", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "2 workers x (1 CPUs, 1 GPUs) do not fit the Ray cluster" in proc.stderr
    assert "dist.use_gpu=true but the Ray cluster has no GPUs: drop --use-gpu" in proc.stderr
