"""Placement check: do `dist.workers` x (cpus_per_worker, gpus_per_worker) fit the cluster?

Ray Train asks for one bundle per worker ({"CPU": cpus_per_worker, "GPU": gpus_per_worker}) and,
when the bundles do not fit, waits for resources forever without a word. This module compares
the request with what the Ray cluster (or a SLURM allocation, before Ray starts) offers and fails
fast with the numbers and the fix:

    from xbt_dist.distributed.placement import check_ray_cluster
    check_ray_cluster(cfg.dist)          # in ray_runner, before the TorchTrainer starts

    python -m xbt_dist.distributed.placement --node-cpus '128(x4)' --gpus-per-node 8 \
        --config C --workers 32 --use-gpu [--set ...]   # what launchers/ray_on_slurm.sh runs

A bundle lives on one node, so the count is per node: node n holds
min(floor(CPU_n / cpus_per_worker), floor(GPU_n / gpus_per_worker)) workers, and the job fits when
the nodes together hold `dist.workers`. `XBT_PLACEMENT_CHECK` = fail | warn | off | auto (default):
auto fails inside a SLURM job or on a Ray we started (nothing will add nodes), and only warns on
another attached cluster, whose autoscaler may still add nodes (KubeRay, `ray up`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Sequence

from xbt_dist.config import DistConfig

EPS = 1e-9  # fractional GPUs: 0.5 + 0.5 must count as 1


class PlacementError(ValueError):
    """The requested workers cannot all be placed; the message names the numbers and the fix."""


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    cpus: float
    gpus: float = 0.0


def _fit(node: NodeCapacity, cpus_per_worker: float, gpus_per_worker: float) -> int:
    by_cpu = math.floor(node.cpus / cpus_per_worker + EPS) if cpus_per_worker > 0 else 10 ** 9
    by_gpu = math.floor(node.gpus / gpus_per_worker + EPS) if gpus_per_worker > 0 else 10 ** 9
    return min(by_cpu, by_gpu)


def workers_that_fit(nodes: Sequence[NodeCapacity], cpus_per_worker: float, gpus_per_worker: float) -> int:
    return sum(_fit(n, cpus_per_worker, gpus_per_worker) for n in nodes)


def _describe(nodes: Sequence[NodeCapacity]) -> str:
    """'4 nodes x (128 CPUs, 8 GPUs)' when the nodes are alike, else one entry per node."""
    def one(n):
        return f"{n.cpus:g} CPUs, {n.gpus:g} GPUs"
    kinds = {one(n) for n in nodes}
    if len(kinds) == 1:
        return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} x ({kinds.pop()})"
    return ", ".join(f"{n.name}: {one(n)}" for n in nodes)


def placement_problems(dist: DistConfig, nodes: Sequence[NodeCapacity], where: str = "the Ray cluster",
                       slurm: bool = False) -> list[str]:
    """Empty when the workers fit; otherwise sentences with the numbers and the fix."""
    w, cpw = dist.workers, float(dist.cpus_per_worker)
    gpw = float(dist.gpus_per_worker) if dist.use_gpu else 0.0
    total_cpu = sum(n.cpus for n in nodes)
    total_gpu = sum(n.gpus for n in nodes)
    fit = workers_that_fit(nodes, cpw, gpw)
    if fit >= w:
        return []
    head = (f"{w} workers x ({cpw:g} CPUs" + (f", {gpw:g} GPUs" if gpw else "") + ") do not fit "
            f"{where}: {_describe(nodes)} hold {fit} such workers")
    out = [head]
    if gpw and total_gpu + EPS < w * gpw:
        if total_gpu == 0:
            out.append(f"dist.use_gpu=true but {where} has no GPUs: drop --use-gpu (dist.use_gpu=false) "
                       "or run on GPU nodes" + (" (sbatch --gpus-per-node=8)" if slurm else ""))
        else:
            max_w = workers_that_fit(nodes, 0, gpw)
            need_nodes = ""
            if slurm and nodes and nodes[0].gpus:
                need_nodes = f", or ask for {math.ceil(w * gpw / nodes[0].gpus)} nodes (sbatch --nodes=...)"
            out.append(f"{w} workers x {gpw:g} GPUs = {w * gpw:g} > {total_gpu:g} GPUs in {where}: "
                       f"use --workers {max_w}{need_nodes}")
        return out
    if total_cpu + EPS < w * cpw:
        out.append(f"{w} workers x {cpw:g} CPUs = {w * cpw:g} > {total_cpu:g} CPUs in {where}")
    else:  # enough CPUs in total, but they are split over nodes so that bundles do not fit
        out.append(f"per node: {', '.join(f'{n.name} holds {_fit(n, cpw, gpw)}' for n in nodes)} "
                   f"(a worker's {cpw:g} CPUs must be on one node)")
    fixes = []
    best_cpw = next((c for c in range(int(cpw) - 1, 0, -1) if workers_that_fit(nodes, c, gpw) >= w), None)
    if best_cpw:
        fixes.append(f"set dist.cpus_per_worker={best_cpw}")
    if fit >= 1:
        fixes.append(f"use --workers {fit}")
    if slurm and nodes:
        per_node = math.ceil(w / len(nodes)) * cpw
        fixes.append(f"give each node {per_node:g} CPUs (sbatch --exclusive takes whole nodes; "
                     f"or --cpus-per-task={per_node:g} with --ntasks-per-node=1)")
    out.append("fix: " + ", or ".join(fixes) if fixes else "fix: add nodes")
    return out


def check_placement(dist: DistConfig, nodes: Sequence[NodeCapacity], where: str = "the Ray cluster",
                    slurm: bool = False) -> None:
    problems = placement_problems(dist, nodes, where, slurm)
    if problems:
        raise PlacementError("placement: " + "; ".join(problems))


def ray_node_capacities() -> list[NodeCapacity]:
    """Total (not free) CPUs and GPUs of each alive node of the connected Ray cluster."""
    import ray

    return [NodeCapacity(n.get("NodeManagerHostname") or n["NodeID"][:8], n["Resources"].get("CPU", 0.0),
                         n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"]]


def check_mode(started_locally: bool) -> str:
    mode = os.environ.get("XBT_PLACEMENT_CHECK", "auto").lower()
    if mode not in ("auto", "fail", "warn", "off"):
        raise ValueError(f"XBT_PLACEMENT_CHECK={mode!r}: expected auto, fail, warn or off")
    if mode == "auto":
        return "fail" if started_locally or os.environ.get("SLURM_JOB_ID") else "warn"
    return mode


def check_ray_cluster(dist: DistConfig, started_locally: bool = False) -> None:
    """Before training: fail (or warn, see XBT_PLACEMENT_CHECK) if the workers cannot be placed."""
    mode = check_mode(started_locally)
    if mode == "off":
        return
    slurm = bool(os.environ.get("SLURM_JOB_ID"))
    problems = placement_problems(dist, ray_node_capacities(), "the Ray cluster", slurm)
    if not problems:
        return
    msg = "placement: " + "; ".join(problems)
    if mode == "fail":
        raise PlacementError(msg)
    print(f"[xbt] WARNING {msg} (Ray waits until an autoscaler adds nodes; XBT_PLACEMENT_CHECK=fail "
          "makes this an error)", file=sys.stderr, flush=True)


# ---- SLURM allocation (before Ray starts) ---------------------------------------------------

def parse_node_cpus(spec: str) -> list[int]:
    """SLURM_JOB_CPUS_PER_NODE ('128(x2),96') -> [128, 128, 96]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot read CPUs per node {spec!r}: expected e.g. '128(x4)' or '128,96'")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def allocation_nodes(node_cpus: str, gpus_per_node: float, names: Sequence[str] = ()) -> list[NodeCapacity]:
    cpus = parse_node_cpus(node_cpus)
    names = list(names) or [f"node{i}" for i in range(len(cpus))]
    if len(names) != len(cpus):
        raise ValueError(f"{len(names)} node names but CPUs for {len(cpus)} nodes ({node_cpus!r})")
    return [NodeCapacity(n, c, gpus_per_node) for n, c in zip(names, cpus)]


def plan_lines(dist: DistConfig, nodes: Sequence[NodeCapacity], data_workers: int | None = None) -> list[str]:
    """The Ray Train side of a launch plan, one fact per line."""
    gpw = dist.gpus_per_worker if dist.use_gpu else 0
    lines = [f"ray_workers={dist.workers} per_worker=(CPU={dist.cpus_per_worker:g}, GPU={gpw:g}) "
             f"use_gpu={str(dist.use_gpu).lower()} zero_stage={dist.zero_stage}",
             f"need: CPU={dist.workers * dist.cpus_per_worker:g} GPU={dist.workers * gpw:g}; "
             f"offer: CPU={sum(n.cpus for n in nodes):g} GPU={sum(n.gpus for n in nodes):g} "
             f"({_describe(nodes)}); fits {workers_that_fit(nodes, dist.cpus_per_worker, gpw)} workers"]
    if data_workers is not None:
        lines.append(f"each Ray worker runs train.num_workers={data_workers} DataLoader processes "
                     f"on its {dist.cpus_per_worker:g} CPUs")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m xbt_dist.distributed.placement --node-cpus SPEC [--gpus-per-node G] STAGE-ARGS...`

    STAGE-ARGS are exactly what the stage gets (`--config C --workers N --use-gpu --set ...`), read
    by the stage's own argument parser, so the plan sees the config the stage will run with.
    """
    from xbt_dist.cli import _load, _stage_args
    from xbt_dist.config import ConfigError

    p = argparse.ArgumentParser(description="Check (and print) a Ray Train placement against a SLURM allocation.")
    p.add_argument("--node-cpus", required=True, help="CPUs per node, SLURM_JOB_CPUS_PER_NODE format: 128(x4)")
    p.add_argument("--gpus-per-node", type=float, default=0)
    p.add_argument("--node-names", default="", help="space-separated node names")
    _stage_args(p)
    a = p.parse_args(argv)
    try:
        cfg = _load(a)
        nodes = allocation_nodes(a.node_cpus, a.gpus_per_node, a.node_names.split())
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"placement: error: {e}", file=sys.stderr)
        return 2
    for line in plan_lines(cfg.dist, nodes, cfg.train.num_workers):
        print(line)
    problems = placement_problems(cfg.dist, nodes, "the allocation", slurm=True)
    if problems:
        print("placement: FAIL: " + "; ".join(problems), file=sys.stderr)
        return 2
    print("placement: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
