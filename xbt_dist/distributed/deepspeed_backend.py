"""DeepSpeed engine as a training `Backend`: ZeRO 0-3, AdamW, warmup + cosine, accumulation, clipping.

The stage loops are written against `xbt_dist.train.backend.Backend`; on a Ray Train worker
`make_deepspeed_backend(dist_cfg)` is the `WorkerContext.make_backend` factory, so the same loop
runs plain PyTorch locally and a DeepSpeed engine per worker. Only this package imports deepspeed.

What DeepSpeed does for us here, and what it costs:
- gradient averaging over ranks (the global-batch InfoNCE relies on it, see `xbt_dist.losses`);
- ZeRO 1/2 shard optimiser state / gradients; ZeRO-3 also shards parameters, which means any
  trainable tensor read outside a forward (saving adapters, phi) must be gathered first: use
  `backend.gathered()` (a collective, every rank must enter it);
- the run state (`state_dict`/`load_state_dict`): trainable fp32 masters and Adam moments by
  parameter name through DeepSpeed's world-size-independent `safe_get/set_full_*` accessors,
  never the frozen towers and never per ZeRO partition (see `xbt_dist.train.checkpoint`);
- nothing about precision: DeepSpeed's bf16/fp16 modes are off and the engine holds fp32 weights;
  `dist.precision` is torch.autocast around the forward (xbt_dist.train.precision). CPU runs use
  `DS_ACCELERATOR=cpu` and gloo.

ZeRO-3 and the XBT model: base CLIP towers are frozen and only adapters, soft prompts and phi train.
ZeRO-3 fetches a parameter in the pre-forward hook of the module that owns it, which breaks for
parameters read by *another* module's forward or by a non-forward method: open_clip's
`nn.MultiheadAttention` reads `out_proj.weight` itself (out_proj.forward never runs), peft's LoRA
wrapper of MHA merges into those weights, and `CLIP.encode_text` reads `text_projection` and
`positional_embedding` outside any forward. `prepare_zero3` fixes both cases (see there).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from xbt_dist.config import DistConfig, OptimConfig
from xbt_dist.train.backend import param_groups, warmup_cosine

log = logging.getLogger(__name__)

# Keys of a DeepSpeed JSON that we always own: they are derived from the typed config so that
# the batch arithmetic and the optimiser can never disagree with the loop.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "optimizer", "scheduler")


def _offloads(zero: dict) -> bool:
    """Whether a `zero_optimization` section moves optimiser state or parameters off the device."""
    return any((zero.get(k) or {}).get("device", "none") not in ("none", None)
               for k in ("offload_optimizer", "offload_param"))


def build_ds_config(dist_cfg: DistConfig, optim: OptimConfig, local_batch: int, world_size: int,
                    on_gpu: bool) -> dict:
    """DeepSpeed config dict from `dist.deepspeed_config` (a JSON) or from `dist.zero_stage`.

    A JSON's `zero_optimization.stage` wins over `dist.zero_stage` (the JSON is the specific
    choice); batch sizes, accumulation and clipping are always filled in from the typed config,
    `optimizer`/`scheduler` sections are dropped because we pass our own, and DeepSpeed's
    bf16/fp16 modes are always off: `dist.precision` (resolved for `on_gpu`) becomes DeepSpeed's
    `torch_autocast` section, i.e. torch.autocast around the engine's forward, fp32 weights.
    """
    if local_batch < 1:
        raise ValueError(f"local batch {local_batch} < 1: the global batch must be >= dist.workers")
    cfg: dict = {}
    if dist_cfg.deepspeed_config:
        path = Path(dist_cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(
                f"dist.deepspeed_config={str(path)!r} not found (shipped configs are in cluster/deepspeed/)")
        cfg = json.loads(path.read_text())
        dropped = [k for k in ("optimizer", "scheduler") if k in cfg]
        if dropped:
            log.warning("%s: ignoring %s; AdamW + warmup/cosine come from the optim config", path, dropped)
    for k in _OWNED_KEYS:
        cfg.pop(k, None)
    zero = cfg.setdefault("zero_optimization", {})
    zero.setdefault("stage", dist_cfg.zero_stage)
    if world_size == 1 and int(zero["stage"]) > 0 and not _offloads(zero):
        # ZeRO partitions optimiser state, gradients (and at 3 parameters) over data-parallel
        # ranks; with one rank it partitions nothing and only adds its bookkeeping: 1.4x the
        # step time of stage 0 for the paper phi on CPU (docs/PERFORMANCE.md). Offloading is the
        # one thing ZeRO still does for a single rank, so a config that offloads keeps its stage.
        log.info("ZeRO-%s at world size 1 partitions nothing: running DeepSpeed at stage 0 "
                 "(the run state loads on any stage and world size)", zero["stage"])
        cfg["zero_optimization"] = zero = {"stage": 0}
    cfg.update({
        "train_micro_batch_size_per_gpu": int(local_batch),
        "gradient_accumulation_steps": int(optim.grad_accum),
        "train_batch_size": int(local_batch) * int(optim.grad_accum) * int(world_size),
        "gradient_clipping": float(optim.grad_clip),
        # A torch optimiser under ZeRO is "untested" for DeepSpeed; AdamW is fine.
        "zero_allow_untested_optimizer": True,
    })
    cfg.setdefault("steps_per_print", 10 ** 9)  # our progress line does the logging
    cfg.setdefault("wall_clock_breakdown", False)
    # Precision is `dist.precision`, applied as torch.autocast around the forward by the stages
    # (xbt_dist.train.precision). DeepSpeed's own bf16/fp16 modes stay off on every device: they
    # cast all parameters (frozen towers included) to 16 bits, leave the inputs fp32 (a dtype
    # mismatch at the first matmul) and, at ZeRO stage 0, step AdamW on bf16 weights with no fp32
    # master copy. With them off the engine holds fp32 weights: the master weights, on every stage.
    asked = [k for k in ("bf16", "fp16") if cfg.get(k, {}).get("enabled")]
    if asked:
        log.info("DeepSpeed config enables %s: ignored, the forward precision is dist.precision (autocast, "
                 "fp32 weights)", asked)
    cfg["bf16"] = {"enabled": False}
    cfg["fp16"] = {"enabled": False}
    # The engine's forward must run under autocast itself: DeepSpeed turns an autocast entered
    # outside it OFF inside `engine(...)` unless its `torch_autocast` section is on. An empty
    # `lower_precision_safe_modules` keeps gradient all-reduces in fp32 (DeepSpeed would otherwise
    # reduce Linear/Conv gradients in bf16; they are only the adapters' and phi's, ~8M values).
    from xbt_dist.train.precision import resolve_precision

    precision = resolve_precision(dist_cfg.precision, "cuda" if on_gpu else "cpu")
    cfg["torch_autocast"] = ({"enabled": True, "dtype": precision,
                              "lower_precision_safe_modules": []}
                             if precision != "fp32" else {"enabled": False})
    return cfg


# -- ZeRO-3 preparation ----------------------------------------------------------------------

def _leaf_classes() -> list[type]:
    """Module classes whose forward reads their children's weights directly (ZeRO-3 leaves)."""
    classes: list[type] = [nn.MultiheadAttention]
    try:  # peft wraps MHA and merges LoRA into in_proj/out_proj weights inside its own forward
        from peft.tuners.lora.layer import MultiheadAttention as LoraMHA
        classes.append(LoraMHA)
    except ImportError:
        pass
    try:  # reads its frozen LayerNorm's weight/bias next to the deltas, outside LN.forward
        from xbt_dist.models.adapters import LayerNormDelta
        classes.append(LayerNormDelta)
    except ImportError:
        pass
    return classes


def prepare_zero3(module: nn.Module) -> tuple[int, int]:
    """Make a model with non-forward parameter reads safe under ZeRO-3; returns (leaves, external).

    1. Attention modules (and xbt's LayerNormDelta) become ZeRO-3 *leaf* modules: all their
       parameters (including children's) are fetched at the attention forward. Cost: one
       attention block's weights live unsharded during its forward, which is what a forward
       needs anyway.
    2. Direct parameters of container modules (modules with both own params and children, e.g.
       CLIP's `text_projection`, `positional_embedding`, `logit_scale`, ViT class/pos embeddings,
       soft prompts held next to the towers) are registered as *external* parameters of the root,
       so they are gathered for the whole root forward whichever method reads them. They are
       small (O(width^2) per tower) next to the sharded transformer blocks.
    The loop must therefore run the model through `backend.module(...)` (the root forward).
    """
    from deepspeed.utils import set_z3_leaf_modules
    import deepspeed

    leaf_types = tuple(_leaf_classes())
    # A model can also opt a module class in with a `_z3_leaf = True` class attribute.
    leaf_mods = [m for m in module.modules() if isinstance(m, leaf_types) or getattr(m, "_z3_leaf", False)]
    present = sorted({type(m) for m in leaf_mods}, key=str)
    leaves = len(set_z3_leaf_modules(module, present)) if present else 0
    inside_leaf = {id(p) for m in leaf_mods for p in m.parameters()}
    external = 0
    for m in module.modules():
        if m is module or not any(True for _ in m.children()):
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in inside_leaf:
                deepspeed.zero.register_external_parameter(module, p)
                external += 1
    return leaves, external


def _patch_zero_dim_broadcast() -> None:
    """Let DeepSpeed broadcast 0-dim parameters (CLIP's `logit_scale`, a learnt temperature).

    `DeepSpeedEngine._broadcast_model` does `p.data.view(torch.uint8)`, which raises for 0-dim
    float tensors ("self.dim() cannot be 0 to view Float as Byte"). The broadcast runs inside
    `initialize`, before ZeRO flattens anything, so viewing those parameters as shape (1,) for the
    duration of the call and restoring shape () afterwards is exact (same storage).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model
    if getattr(original, "_xbt_zero_dim_safe", False):
        return

    def broadcast_model(self):
        zero_dim = [p for p in self.module.parameters() if p.dim() == 0]
        for p in zero_dim:
            p.data = p.data.reshape(1)
        try:
            original(self)
        finally:
            for p in zero_dim:
                p.data = p.data.reshape(())

    broadcast_model._xbt_zero_dim_safe = True
    DeepSpeedEngine._broadcast_model = broadcast_model


# -- backend ---------------------------------------------------------------------------------

class DeepSpeedBackend:
    """The `Backend` protocol around `deepspeed.initialize`.

    `module` is the engine: calling it runs the model's forward with ZeRO hooks, and attribute
    access falls through to the wrapped model (`backend.module.encode_text(...)` works, but under
    ZeRO-3 prefer the root forward, see `prepare_zero3`). `model` is the wrapped nn.Module.
    """

    def __init__(self, module: nn.Module, optim: OptimConfig, total_steps: int, local_batch: int,
                 dist_cfg: DistConfig, world_size: int = 1, on_gpu: bool = False):
        import deepspeed

        self.cfg = optim
        self.ds_config = build_ds_config(dist_cfg, optim, local_batch, world_size, on_gpu)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        if dist_cfg.activation_checkpointing:
            _enable_grad_checkpointing(module)
        # 0-dim params: see _patch_zero_dim_broadcast; ZeRO-3 partitioning also views params as
        # bytes, so there they live as shape (1,) and `gathered()` shows them as () again.
        self._zero_dim = [p for p in module.parameters() if p.dim() == 0] if self.zero_stage == 3 else []
        for p in self._zero_dim:
            p.data = p.data.reshape(1)
        if self.zero_stage == 3:
            leaves, ext = prepare_zero3(module)
            log.info("ZeRO-3: %d attention leaf modules, %d external params", leaves, ext)
        # Collect trainable params before initialize: ZeRO-3 replaces .data with empty shards and
        # param_groups() classifies by shape.
        groups = param_groups(module, optim.weight_decay)
        if not any(g["params"] for g in groups):
            raise ValueError("the model has no trainable parameters: check `adapters` and `train.method`")
        # Frozen base weights never reach the optimiser, so ZeRO keeps no state for them.
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.98), eps=1e-6)
        schedule = warmup_cosine(optim.warmup_steps, total_steps)
        _patch_zero_dim_broadcast()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.ds_config,
            # a callable: DeepSpeed binds it to its (possibly ZeRO-wrapped) base optimiser
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        if world_size == 1 and self.zero_stage == 0:
            # One rank: the gradient all-reduce has nothing to average, but DeepSpeed would still
            # flatten every gradient into buckets, all-reduce them over the process group and copy
            # them back (8 ms of a 120 ms paper-phi step on CPU).
            self.engine.enable_backward_allreduce = False
        self.module = self.engine
        self.model = module

    # -- Backend protocol --------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself (mean over micro-batches).
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        # Every micro-batch goes through engine.step(): it counts micro-steps and, at a boundary,
        # clips, steps AdamW and the scheduler, and zeroes gradients.
        self.engine.step()
        return bool(boundary)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def gathered(self, modifier_rank: int | None = None) -> ContextManager:
        """Full trainable tensors inside the block (ZeRO-3: a collective gather; else no-op).

        Use `modifier_rank=0` when rank 0 writes into the tensors (loading adapters) so the
        change is broadcast and re-partitioned on exit.
        """
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        return self._gathered_zero3(modifier_rank)

    @contextlib.contextmanager
    def _gathered_zero3(self, modifier_rank: int | None):
        import deepspeed

        params = [p for p in self.model.parameters() if p.requires_grad]
        # Only the gathered (trainable) 0-dim params are whole here: a frozen one (open_clip's own
        # logit_scale) stays partitioned, empty on every rank once it passes the persistence
        # threshold, and cannot be shown as shape ().
        zero_dim = [p for p in self._zero_dim if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            # Show 0-dim params in their model shape so state dicts match a single-device model.
            for p in zero_dim:
                p.data = p.data.reshape(())
            try:
                yield
            finally:
                for p in zero_dim:
                    p.data = p.data.reshape(1)

    # -- run state (the checkpoint's backend half, see xbt_dist.train.optim_state) -----------
    def _hp_partitions(self) -> list[torch.Tensor]:
        """The flat fp32 master partitions AdamW steps on this rank (its `state` keys)."""
        opt = self.engine.optimizer
        if self.zero_stage == 3:
            return list(opt.fp32_partitioned_groups_flat)
        return list(getattr(opt, "single_partition_of_fp32_groups", []))

    def _base_optimizer(self) -> torch.optim.Optimizer:
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)  # ZeRO wraps the torch AdamW; stage 0 fp32 does not

    def _sharded(self, p: nn.Parameter) -> bool:
        # ZeRO-3 params carry ds_id, ZeRO-1/2 (and bf16) ones an lp->hp mapping; else plain AdamW.
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")

    def state_dict(self) -> dict:
        """Collective: full fp32 masters and Adam moments BY NAME on every rank.

        DeepSpeed's `safe_get_full_*` accessors all-reduce (ZeRO-1/2) or all-gather (ZeRO-3)
        each tensor from its owners, so every rank must call this; rank 0 writes the result.
        Unlike `engine.save_checkpoint`, nothing frozen is included and nothing is per partition:
        the state loads on any world size and ZeRO stage. Cost: one collective per trainable
        tensor (x3 with the moments) and the full trainable state in each rank's memory.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        from xbt_dist.train.optim_state import FORMAT, MOMENTS, trainable_named

        base, opt = self._base_optimizer(), self.engine.optimizer
        step = next((float(st["step"]) for st in base.state.values() if "step" in st), None)
        if step is not None and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link each parameter's view of the Adam state once, right after the first
            # group's first step, when later groups have no state yet: relink so every view exists.
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        out = {"format": FORMAT, "params": {}, "exp_avg": {}, "exp_avg_sq": {}, "adam_step": step,
               "lr": [g["lr"] for g in base.param_groups], "scheduler": self.scheduler.state_dict(),
               "micro_steps": int(self.engine.micro_steps), "global_steps": int(self.engine.global_steps),
               "global_samples": int(self.engine.global_samples)}
        zero_dim = {id(p) for p in self._zero_dim}
        for name, p in trainable_named(self.model):
            shape = () if id(p) in zero_dim else None  # ZeRO-3 holds 0-dim params as (1,)
            if self._sharded(p):
                full = {"params": safe_get_full_fp32_param(p)}
                if step is not None:
                    full.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
            else:
                full = {"params": p.detach(), **({k: base.state[p][k] for k in MOMENTS} if step is not None else {})}
            for k, v in full.items():
                v = v.detach().float().cpu().clone()
                out[k][name] = v.reshape(shape) if shape is not None else v
        return out

    def _set_z3_partition(self, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """This rank's slice of a full tensor into its ZeRO-3 fp32 partition (master or moment).

        DeepSpeed's `safe_set_full_*` narrows the full tensor at `partition_numel * rank`, which
        runs past the end on the last rank when the tensor's size is not a multiple of the world
        size (the partition is padded): copy what exists and leave the padding at zero.
        """
        opt = self.engine.optimizer
        part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        start = part.numel() * opt._get_param_partition_rank(p)
        chunk = value.flatten().to(part.dtype)[start:start + part.numel()]
        part.data.zero_()
        part.data[:chunk.numel()].copy_(chunk)
        if key is None:  # the module's own copy: this rank's partition, and a persistent full copy
            p.ds_tensor.data.view(-1)[:chunk.numel()].copy_(chunk.to(p.ds_tensor.dtype))
            if p.data.numel() == p.ds_numel:
                p.data.copy_(value.reshape(p.data.shape).to(p.data.dtype))

    def load_state_dict(self, state: dict) -> None:
        """Collective: restore `state_dict()` output (any world size / ZeRO stage / backend).

        A fresh engine has no Adam state until its first step (DeepSpeed links the per-parameter
        views into the flat partitions lazily), so it is created here, zero-filled, linked, and
        then every tensor is written through `safe_set_full_*` (each rank keeps its own slice).
        The low-precision/module copies are refreshed from the masters at the end.
        """
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from xbt_dist.train.optim_state import MOMENTS, check_names, set_lrs, trainable_named

        check_names(state, self.model)
        base, opt = self._base_optimizer(), self.engine.optimizer
        step = state["adam_step"]
        named = trainable_named(self.model)
        if step is not None:
            for flat in self._hp_partitions():
                base.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                                    **{k: torch.zeros_like(flat) for k in MOMENTS}}
            if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16 optimiser
                opt._hp_optimizer_states_linked = False
                opt._lazy_init_hp_params_optimizer_state()
        with torch.no_grad():
            for name, p in named:
                value = state["params"][name].to(p.device)
                if self.zero_stage == 3:
                    self._set_z3_partition(p, value)
                    if step is not None:
                        for k in MOMENTS:
                            self._set_z3_partition(p, state[k][name].to(p.device), k)
                elif self._sharded(p):
                    safe_set_full_fp32_param(p, value)
                    if step is not None:
                        for k in MOMENTS:
                            safe_set_full_optimizer_state(p, state[k][name].to(p.device), k)
                else:
                    p.copy_(value)
                    if step is not None:
                        base.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                                         **{k: state[k][name].to(p.device).clone() for k in MOMENTS}}
            # The module's (lp) copies of the masters: ZeRO-1/2 re-gather them from the updated
            # partitions; ZeRO-3 wrote its lp partitions in `_set_z3_partition`.
            if self.zero_stage != 3 and hasattr(opt, "update_lp_params"):
                opt.update_lp_params()
        set_lrs(base, state["lr"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.engine.micro_steps = int(state["micro_steps"])
        self.engine.global_steps = int(state["global_steps"])
        self.engine.global_samples = int(state.get("global_samples", 0))


def _enable_grad_checkpointing(module: nn.Module) -> None:
    """Turn on activation checkpointing in every submodule that supports it (open_clip towers)."""
    found = False
    for m in module.modules():
        fn = getattr(m, "set_grad_checkpointing", None)
        if callable(fn) and m is not module:
            fn(True)
            found = True
    if not found:
        log.warning("dist.activation_checkpointing=true but no submodule has set_grad_checkpointing")


def make_deepspeed_backend(dist_cfg: DistConfig, world_size: int | None = None,
                           on_gpu: bool | None = None) -> Callable:
    """`WorkerContext.make_backend` factory: (module, optim, total_steps, local_batch) -> backend."""
    def make(module: nn.Module, optim: OptimConfig, total_steps: int, local_batch: int) -> DeepSpeedBackend:
        import torch.distributed as dist

        ws = world_size if world_size is not None else (dist.get_world_size() if dist.is_initialized() else 1)
        gpu = on_gpu if on_gpu is not None else (dist_cfg.use_gpu and torch.cuda.is_available())
        return DeepSpeedBackend(module, optim, total_steps, local_batch, dist_cfg, ws, gpu)
    return make
