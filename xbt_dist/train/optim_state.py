"""The optimiser half of the run state, keyed by parameter NAME (world-size independent).

Both backends save and load this one format, so a checkpoint moves between world sizes, ZeRO
stages and between the plain-PyTorch backend and DeepSpeed:

    {"format": "xbt-optim-v1",
     "params":     {name: fp32 tensor},    the master weights of every trainable parameter
     "exp_avg":    {name: fp32 tensor},    AdamW first moment (absent before the first step)
     "exp_avg_sq": {name: fp32 tensor},    AdamW second moment
     "adam_step":  float | None,           AdamW's step count (one for all parameters)
     "lr":         [float per param group], the LR the next step uses (set by the scheduler)
     "scheduler":  LambdaLR.state_dict(),
     "micro_steps": int, "global_steps": int}

Frozen parameters are never in it. The two param groups are `param_groups()` (decay, no decay),
identical in both backends.
"""

from __future__ import annotations

import torch
from torch import nn

FORMAT = "xbt-optim-v1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable_named(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def check_names(state: dict, module: nn.Module) -> None:
    """Fail with both name lists' difference when a checkpoint belongs to another model."""
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint optimiser state has format {state.get('format')!r}, expected "
                         f"{FORMAT!r}: it was written by an older xbt_dist; start a new out_dir")
    have = {n for n, _ in trainable_named(module)}
    saved = set(state["params"])
    if have != saved:
        raise ValueError(
            f"checkpoint trainables do not match the model: missing {sorted(have - saved)[:5]}, "
            f"unexpected {sorted(saved - have)[:5]}; resume with the config that wrote it "
            "(adapters, phi, train.method) or start a new out_dir")


def torch_adamw_state(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """The format above from a plain torch AdamW over `module`'s trainable parameters."""
    out = {"format": FORMAT, "params": {}, "exp_avg": {}, "exp_avg_sq": {}, "adam_step": None,
           "lr": [g["lr"] for g in optimizer.param_groups], "scheduler": scheduler.state_dict()}
    for name, p in trainable_named(module):
        out["params"][name] = p.detach().float().cpu().clone()
        st = optimizer.state.get(p)
        if st:
            for k in MOMENTS:
                out[k][name] = st[k].detach().float().cpu().clone()
            out["adam_step"] = float(st["step"])
    return out


def load_torch_adamw_state(state: dict, module: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler) -> None:
    """Inverse of `torch_adamw_state` into a freshly built optimiser."""
    check_names(state, module)
    with torch.no_grad():
        for name, p in trainable_named(module):
            p.copy_(state["params"][name])
            if state["adam_step"] is not None:
                optimizer.state[p] = {
                    "step": torch.tensor(state["adam_step"], dtype=torch.float32),
                    **{k: state[k][name].to(p.device, torch.float32).clone() for k in MOMENTS}}
    set_lrs(optimizer, state["lr"])
    scheduler.load_state_dict(state["scheduler"])


def set_lrs(optimizer, lrs: list[float]) -> None:
    # LambdaLR writes a group's LR only when it steps: without this the first step after a
    # resume would run at the LR the fresh optimiser was built with.
    if len(lrs) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(lrs)} optimiser param groups, the model {len(optimizer.param_groups)}")
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
