"""Precision (dist.precision), the global-mean loss report, QuickGELU for OpenAI tags, uint8 images.

Each test names the failure it catches:
- precision config: a typo or fp16 fails at load time with the field and the fix;
- DeepSpeed never runs its own bf16/fp16 mode (it would cast the weights: no fp32 master copy);
- bf16 runs both stages on CPU through autocast, ends with fp32 trainables, lands within a stated
  tolerance of fp32, and really ran in bf16 (the numbers differ from fp32);
- ZeRO-0 and ZeRO-2 engines under bf16 autocast keep fp32 weights and optimiser moments;
- the reported loss is the mean over ranks, not rank 0's share (2 gloo processes);
- `ViT-B-32` + `openai` (every QuickGELU-trained tag) builds QuickGELU, without any download;
- uint8 batches normalised on the device give the numbers of the host-side fp32 transform.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xbt_dist.config import ConfigError, DistConfig, ModelRef, OptimConfig, load_config
import xbt_testing.distributed as T
from xbt_dist.train.precision import forward_autocast, resolve_precision

REPO = Path(__file__).resolve().parents[1]

# Stated tolerance of a bf16 run against fp32 on the same data and init: every logged loss within
# 3 % relative (bf16 keeps 8 mantissa bits in the towers' matmuls; the loss itself is fp32).
BF16_LOSS_RTOL = 0.03


# -- configuration -----------------------------------------------------------------------------

def test_precision_config_is_validated():
    assert load_config(None).dist.precision is None
    assert load_config(None, ["dist.precision=bf16"]).dist.precision == "bf16"
    with pytest.raises(ConfigError, match=r"dist.precision='bf61' is invalid.*fp32"):
        load_config(None, ["dist.precision=bf61"])
    with pytest.raises(ConfigError, match="fp16 needs dynamic loss scaling.*Fix: use dist.precision=bf16"):
        load_config(None, ["dist.precision=fp16"])
    # default: bf16 on a GPU, fp32 on CPU; an explicit choice wins
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision(None, "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"


@pytest.mark.parametrize("on_gpu", [False, True])
def test_deepspeed_never_casts_the_weights(on_gpu):
    from xbt_dist.distributed.deepspeed_backend import build_ds_config

    # the shipped ZeRO JSONs turn DeepSpeed's bf16 on; dist.precision (autocast) replaces it
    shipped = DistConfig(deepspeed_config=str(REPO / "cluster/deepspeed/zero2.json"), precision="bf16")
    for dist_cfg in (shipped, DistConfig(zero_stage=0, precision="bf16")):
        ds = build_ds_config(dist_cfg, OptimConfig(), local_batch=4, world_size=2, on_gpu=on_gpu)
        assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
        # autocast inside the engine (DeepSpeed disables an outer one), fp32 gradient reduction
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": []}
    fp32 = build_ds_config(DistConfig(precision="fp32"), OptimConfig(), 4, 2, on_gpu=on_gpu)
    assert fp32["torch_autocast"] == {"enabled": False} and fp32["bf16"] == {"enabled": False}
    default = build_ds_config(DistConfig(), OptimConfig(), 4, 2, on_gpu=on_gpu)["torch_autocast"]
    assert default["enabled"] is on_gpu  # bf16 on a GPU, fp32 on CPU


# -- engines keep fp32 master weights under bf16 autocast ----------------------------------------

OPTIM = OptimConfig(lr=1e-3, warmup_steps=1, grad_clip=1.0, weight_decay=0.01)


def _bf16_engine_worker(rank, world_size, out_dir, stages):
    from xbt_dist.distributed.deepspeed_backend import make_deepspeed_backend
    from xbt_dist.losses import xbt_loss
    from xbt_dist.train.precision import fp32_unit

    batch = T.tiny_xbt_batch()
    n = batch["images"].shape[0] // world_size
    part = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    weights = {"image_to_old_text": 1.0, "text_to_old_image": 1.0, "new_new": 1.0}
    for stage in stages:
        model = T.tiny_xbt_model()
        backend = make_deepspeed_backend(DistConfig(zero_stage=stage, precision="bf16"), world_size,
                                         on_gpu=False)(model, OPTIM, 2, n)
        dtypes = set()
        for _ in range(2):
            with forward_autocast("bf16", "cpu"):
                out = backend.module(part["images"], part["tokens"])
            dtypes.add(out["phi_v"].dtype)
            embeds = {"phi_v": fp32_unit(out["phi_v"]), "phi_w": fp32_unit(out["phi_w"]),
                      "v_old": part["v_old"], "w_old": part["w_old"]}
            loss, _ = xbt_loss(embeds, weights, out["logit_scale"].float(), rank, world_size)
            assert loss.dtype == torch.float32
            backend.backward(loss)
            backend.step()
        with backend.gathered():
            state = model.trainable_state_dict() if rank == 0 else None
        base = getattr(backend.optimizer, "optimizer", backend.optimizer)  # ZeRO wraps the torch AdamW
        moments = {v.dtype for st in base.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")}
        if rank == 0:
            torch.save({"state": state, "forward_dtypes": dtypes, "moments": moments,
                        "param_dtypes": {p.dtype for p in model.parameters()}},
                       f"{out_dir}/bf16_zero{stage}.pt")


def _flat(state: dict, prefix="") -> dict:
    out = {}
    for k, v in state.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_bf16_autocast_keeps_fp32_master_weights_on_zero0_and_zero2(tmp_path):
    from xbt_dist.train.backend import TorchBackend

    _, ref_state, _ = T.train_tiny_xbt(lambda m, o, t, b: TorchBackend(m, o, t), 0, 1, T.tiny_xbt_batch(), OPTIM)
    ref = _flat(ref_state)
    T.spawn_gloo(_bf16_engine_worker, 2, str(tmp_path), (0, 2))
    for stage in (0, 2):
        got = torch.load(tmp_path / f"bf16_zero{stage}.pt", weights_only=False)
        assert got["forward_dtypes"] == {torch.bfloat16}, "the forward did not run in bf16"
        assert got["param_dtypes"] == {torch.float32}, f"ZeRO-{stage} cast weights: {got['param_dtypes']}"
        assert got["moments"] == {torch.float32}, f"ZeRO-{stage} optimiser moments {got['moments']}"
        flat = _flat(got["state"])
        assert all(v.dtype == torch.float32 for v in flat.values())
        # same two steps as fp32 up to bf16 rounding in the forward, and not bit-identical to it
        diffs = [float((flat[k] - ref[k]).abs().max()) for k in ref]
        assert max(diffs) < 5e-3, f"ZeRO-{stage} bf16 drifted from fp32: {max(diffs)}"
        assert max(diffs) > 0, f"ZeRO-{stage}: bf16 gave bit-identical weights: autocast not applied?"


# -- both stages, locally, bf16 vs fp32 -----------------------------------------------------------

def _run_both(tiny_cfg, stage_fn, stage):
    """fp32 and bf16 runs of one stage from the same init and data; (result, losses, trainables)."""
    import copy

    from xbt_dist.pipeline import embed_for_config, run_stage

    embed_for_config(tiny_cfg, batch_size=16)
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.dist.precision = precision
        cfg.out_dir = f"{tiny_cfg.out_dir}-{precision}"
        cfg.train.phi_init = "random"  # stage 2 without a stage-1 phi: same seeded init in both runs
        res = run_stage(stage_fn, cfg)
        hist = json.loads((Path(cfg.stage_dir(stage)) / "manifest.json").read_text())["history"]
        path = res["phi_path"] if stage == "phi" else res["adapters_path"]
        out[precision] = (res, [h["loss"] for h in hist], torch.load(path, weights_only=False))
    return out


def _assert_close_curves(fp32, bf16):
    assert len(fp32) == len(bf16) and len(fp32) >= 2
    np.testing.assert_allclose(bf16, fp32, rtol=BF16_LOSS_RTOL)
    assert bf16 != fp32, "bf16 losses are bit-identical to fp32: autocast was not applied"


def test_stage1_bf16_local_lands_near_fp32(tiny_cfg):
    from xbt_dist.train.stage1 import load_phi, run_stage1

    runs = _run_both(tiny_cfg, run_stage1, "phi")
    assert runs["bf16"][0]["precision"] == "bf16" and runs["fp32"][0]["precision"] == "fp32"
    _assert_close_curves(runs["fp32"][1], runs["bf16"][1])
    phi = load_phi(runs["bf16"][0]["phi_path"])
    assert {p.dtype for p in phi.parameters()} == {torch.float32}


def test_stage2_bf16_local_lands_near_fp32(tiny_cfg):
    from xbt_dist.train.stage2 import run_stage2

    runs = _run_both(tiny_cfg, run_stage2, "train")
    assert runs["bf16"][0]["precision"] == "bf16"
    _assert_close_curves(runs["fp32"][1], runs["bf16"][1])
    saved = _flat(runs["bf16"][2])
    assert {v.dtype for v in saved.values()} == {torch.float32}, "adapters must be saved in fp32"


# -- the reported loss is the global mean -------------------------------------------------------

class _RankBatches:
    """Four batches whose loss depends on the rank, so rank 0's value differs from the mean."""

    def __init__(self, rank):
        self.rank = rank

    def __iter__(self):
        for _ in range(4):
            yield {"x": torch.full((3,), float(self.rank + 1))}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _mean_loss_worker(rank, world_size, out_dir):
    import torch.distributed as dist

    from xbt_dist.train.backend import TorchBackend
    from xbt_dist.train.context import WorkerContext, all_reduce_mean
    from xbt_dist.train.loop import LoopPlan, run_loop

    ctx = WorkerContext(rank=rank, world_size=world_size, barrier=dist.barrier,
                        mean_over_ranks=lambda xs: all_reduce_mean(xs, torch.device("cpu"), world_size))
    module = nn.Linear(3, 1, bias=False)
    nn.init.constant_(module.weight, 0.5)
    backend = TorchBackend(module, OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0), 4)
    local = []

    def step_fn(batch):
        loss = module(batch["x"]).sum()
        local.append(loss.item())
        return loss, {"term": 2 * loss.detach()}

    plan = LoopPlan(name="mean", total_steps=4, global_batch=2 * world_size, stage_dir=f"{out_dir}/stage",
                    log_every=1)
    state = run_loop(plan, ctx, backend, stream=_RankBatches(rank), step_fn=step_fn)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    if rank == 0:
        torch.save({"history": state.history, "local": gathered}, f"{out_dir}/mean.pt")


def test_reported_loss_is_the_mean_over_ranks(tmp_path):
    T.spawn_gloo(_mean_loss_worker, 2, str(tmp_path))
    got = torch.load(tmp_path / "mean.pt", weights_only=False)
    rank0, rank1 = got["local"]
    assert rank0 != pytest.approx(rank1)  # otherwise the test could not tell the mean from rank 0
    for rec, a, b in zip(got["history"], rank0, rank1, strict=True):
        assert rec["loss"] == pytest.approx((a + b) / 2, rel=1e-12)
        assert rec["loss/term"] == pytest.approx(a + b, rel=1e-12)


# -- QuickGELU for weights trained with it -------------------------------------------------------

def _activations(model: nn.Module) -> set[str]:
    return {type(m.mlp.gelu).__name__ for tower in (model.visual.transformer, model.transformer)
            for m in tower.resblocks}


def test_openai_tags_resolve_to_quick_gelu_without_download():
    import open_clip

    from xbt_dist.models.clip import load_clip, needs_quick_gelu

    # every tag whose weights were trained with QuickGELU, from open_clip's own registry
    flagged = [(a, t) for a, t in open_clip.list_pretrained()
               if open_clip.get_pretrained_cfg(a, t).get("quick_gelu")]
    openai = [(a, t) for a, t in open_clip.list_pretrained() if t == "openai"]
    assert openai and set(openai) <= set(flagged)
    assert all(needs_quick_gelu(ModelRef(a, t)) for a, t in flagged)
    assert not needs_quick_gelu(ModelRef("ViT-B-32", "laion2b_s34b_b79k"))
    # the same resolution code builds the model (random init: nothing read or downloaded)
    b32 = load_clip(ModelRef("ViT-B-32", "openai"), load_weights=False)
    assert _activations(b32.model) == {"QuickGELU"}
    laion = load_clip(ModelRef("ViT-B-32", "laion2b_s34b_b79k"), load_weights=False)
    assert _activations(laion.model) == {"GELU"}


def test_local_checkpoints_keep_working_and_can_ask_for_quick_gelu(tiny):
    from xbt_dist.models.clip import load_clip

    ref = dict(arch=tiny["new_arch"], pretrained=tiny["new_checkpoint"], config_dir=tiny["models_dir"])
    plain = load_clip(ModelRef(**ref))
    quick = load_clip(ModelRef(**ref, quick_gelu=True))
    assert _activations(plain.model) == {"GELU"} and _activations(quick.model) == {"QuickGELU"}
    # same weights loaded (strictly) into both; only the activation differs
    for (k, a), (_, b) in zip(plain.model.state_dict().items(), quick.model.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="model.quick_gelu"):
        ModelRef("ViT-B-32", quick_gelu="yes")


# -- uint8 images, normalised on the device ------------------------------------------------------

def test_uint8_batches_normalised_on_device_match_the_fp32_transform(tiny):
    from PIL import Image

    from xbt_dist.models.clip import load_clip, split_device_normalize

    bundle = load_clip(ModelRef(tiny["new_arch"], tiny["new_checkpoint"], tiny["models_dir"]))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 52, 3), dtype=np.uint8)) for i in range(4)]
    host, normalize = split_device_normalize(bundle.preprocess_train)
    torch.manual_seed(7)  # the random crop draws from torch's RNG: same draws for both paths
    before = torch.stack([bundle.preprocess_train(im) for im in images])
    torch.manual_seed(7)
    small = torch.stack([host(im) for im in images])
    assert small.dtype == torch.uint8 and small.nbytes * 4 == before.nbytes
    after = normalize(small)
    assert after.dtype == torch.float32
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        normalize(before)
    with pytest.raises(ValueError, match="ToTensor"):
        split_device_normalize(bundle.preprocess_train.transforms[0])
