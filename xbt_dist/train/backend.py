"""Optimisation backends: what turns a loss into a parameter update.

The training loops only call `backward(loss)`, `step()` and `state_dict()`/`load_state_dict()`,
so the same loop drives plain PyTorch here (`TorchBackend`: AdamW, warmup + cosine, clipping,
gradient accumulation) and DeepSpeed engines on Ray workers (`xbt_dist.distributed.deepspeed_backend`).
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Protocol

import torch
from torch import nn

from xbt_dist.config import OptimConfig


class Backend(Protocol):
    module: nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> bool:
        """Apply an optimiser step at the end of an accumulation window; True when it did."""

    def lr(self) -> float: ...

    def gathered(self) -> ContextManager:
        """Context in which rank 0 sees full trainable tensors (ZeRO-3 gathers them)."""

    def state_dict(self) -> dict:
        """Collective: the full, world-size-independent training state (every rank gets it)."""

    def load_state_dict(self, state: dict) -> None:
        """Collective: restore `state_dict()`'s output, written by any world size or backend."""


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup, then cosine decay to 0 at `total_steps`."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, prompts and the temperature (1-d or scalar params)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and p.shape[0] > 1 and p.shape[-1] > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class TorchBackend:
    """Single-process AdamW with warmup + cosine, global-norm clipping and accumulation."""

    def __init__(self, module: nn.Module, cfg: OptimConfig, total_steps: int):
        self.module = module
        self.cfg = cfg
        groups = param_groups(module, cfg.weight_decay)
        if not any(g["params"] for g in groups):
            raise ValueError("the model has no trainable parameters: check `adapters` and `train.method`")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.warmup_steps, total_steps))
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        # Scale so accumulated gradients are the mean over micro-batches, as one big batch.
        (loss / self.cfg.grad_accum).backward()
        self._micro += 1

    def step(self) -> bool:
        if self._micro % self.cfg.grad_accum:
            return False
        if self.cfg.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def gathered(self) -> ContextManager:
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        """Trainable tensors + AdamW + scheduler by parameter name (`xbt_dist.train.optim_state`)."""
        from xbt_dist.train.optim_state import torch_adamw_state
        return {**torch_adamw_state(self.module, self.optimizer, self.scheduler),
                "micro_steps": self._micro, "global_steps": int(self.scheduler.last_epoch)}

    def load_state_dict(self, state: dict) -> None:
        from xbt_dist.train.optim_state import load_torch_adamw_state
        load_torch_adamw_state(state, self.module, self.optimizer, self.scheduler)
        self._micro = int(state["micro_steps"])
