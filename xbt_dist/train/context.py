"""Where a training function runs: rank, world size, device, and the backend that steps it.

The stage functions (`run_stage1`, `run_stage2`, embedding) take a `WorkerContext` and nothing
else distributed: a local run uses the default (rank 0 of 1, plain PyTorch), and a Ray Train
worker builds one from `ray.train.get_context()` with a DeepSpeed backend factory. This keeps
model, loss and loop code free of Ray and DeepSpeed imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from xbt_dist.config import OptimConfig
from xbt_dist.train.backend import Backend, TorchBackend


def _torch_backend(module: nn.Module, cfg: OptimConfig, total_steps: int, local_batch: int) -> Backend:
    return TorchBackend(module, cfg, total_steps)


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # (trainable module, optim config, total optimiser steps, local micro-batch) -> Backend
    make_backend: Callable[[nn.Module, OptimConfig, int, int], Backend] = _torch_backend
    # metrics sink called at log points on every rank (Ray: ray.train.report)
    report: Callable[[dict], None] | None = None
    # collective barrier across workers (no-op locally)
    barrier: Callable[[], None] = lambda: None
    # collective "is this flag set on any rank?" (all-reduce max); identity locally
    any_rank: Callable[[bool], bool] = bool
    # collective: every rank's picklable value, in rank order (all_gather_object); [x] locally
    gather: Callable[[Any], list] = lambda x: [x]
    # collective: element-wise mean over ranks of a list of floats (one all-reduce); identity
    # locally. For reporting at log points (the global-batch loss, not rank 0's share of it).
    mean_over_ranks: Callable[[list[float]], list[float]] = lambda xs: [float(x) for x in xs]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def all_reduce_mean(values: list[float], device: torch.device, world_size: int) -> list[float]:
    """`WorkerContext.mean_over_ranks` over the default torch.distributed group: ONE all-reduce of
    all the values (a collective: every rank calls it at the same point, with the same length)."""
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size).tolist()
