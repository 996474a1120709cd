"""The run-state layer: what a checkpoint holds, that it loads into a FRESH backend exactly, on
another world size, through fsspec URLs, and that `latest` only ever names a whole checkpoint.

- plain PyTorch: 3 steps, save, load into a fresh backend built from a DIFFERENT init, 3 more
  steps on both: bit-identical (a load that skipped Adam moments, the LR, the scheduler or the
  step count would diverge);
- DeepSpeed ZeRO-2 and ZeRO-3 (every parameter partitioned: persistence threshold 0) on 2 gloo
  ranks: the same, plus the saved state continues in ONE process (2 -> 1 workers) within float
  tolerance of the 2-rank continuation, and holds only trainable tensors, by name;
- the Checkpointer on a `memory://` URL: a save that dies before `meta.json`/`latest` leaves the
  previous checkpoint as `latest`; old ones are pruned; nothing local is created.
"""

from __future__ import annotations

import json

import pytest
from conftest import flat_state
import torch

from xbt_dist import storage
from xbt_dist.config import DistConfig, OptimConfig
import xbt_testing.distributed as T
from xbt_dist.train.checkpoint import Checkpointer

OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0, weight_decay=0.01)
WEIGHTS = {"image_to_old_text": 1.0, "text_to_old_image": 1.0, "new_new": 1.0}
TOTAL = 6


def _steps(backend, rank, world_size, batch, n):
    """`n` optimiser steps of the XBT loss on this rank's slice of `batch` (as train_tiny_xbt)."""
    from xbt_dist.losses import xbt_loss

    k = batch["images"].shape[0] // world_size
    part = {key: v[rank * k:(rank + 1) * k] for key, v in batch.items()}
    for _ in range(n):
        out = backend.module(part["images"], part["tokens"])
        loss, _ = xbt_loss({**out, "v_old": part["v_old"], "w_old": part["w_old"]}, WEIGHTS,
                           out["logit_scale"], rank, world_size)
        backend.backward(loss)
        backend.step()


def _fresh_model():
    """The same frozen base (it comes from the pretrained checkpoint, never from ours) with other
    trainable values: a load that restores nothing, or only part, is caught."""
    model = T.tiny_xbt_model()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


_flat = flat_state


def _assert_equal_states(a: dict, b: dict, what: str):
    a, b = _flat(a), _flat(b)
    assert set(a) == set(b)
    diff = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"{what}: not bit-identical: {dict(list(diff.items())[:5])}"


def test_torch_backend_resumes_into_a_fresh_backend_bit_identically(tmp_path):
    from xbt_dist.train.backend import TorchBackend

    batch = T.tiny_xbt_batch()
    model = T.tiny_xbt_model()
    a = TorchBackend(model, OPTIM, TOTAL)
    _steps(a, 0, 1, batch, 3)
    ckpt = Checkpointer(str(tmp_path / "stage"))
    ckpt.save(3, a.state_dict(), {"data": {"epoch": 0}, "step": 3, "samples": 24})
    fresh_model = _fresh_model()
    b = TorchBackend(fresh_model, OPTIM, TOTAL)
    loaded = Checkpointer(str(tmp_path / "stage")).load()
    b.load_state_dict(loaded.state)
    _steps(a, 0, 1, batch, 3)
    _steps(b, 0, 1, batch, 3)
    _assert_equal_states(model.trainable_state_dict(), fresh_model.trainable_state_dict(), "torch resume")
    # Only trainable tensors are in the checkpoint: no frozen tower weight.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert set(loaded.state["params"]) == set(loaded.state["exp_avg"]) == trainable and frozen


def _zero_worker(rank, world_size, out_dir, stage, phase):
    """phase "save": 3 steps, save the state, 3 more steps; phase "fresh": a NEW process group and
    engine (as after a Ray restart) loads the saved state and takes the same 3 steps."""
    from xbt_dist.distributed.deepspeed_backend import make_deepspeed_backend

    ds_json = f"{out_dir}/zero{stage}.json"
    make = make_deepspeed_backend(DistConfig(deepspeed_config=ds_json), world_size, on_gpu=False)
    batch = T.tiny_xbt_batch()
    model = T.tiny_xbt_model() if phase == "save" else _fresh_model()
    engine = make(model, OPTIM, TOTAL, batch["images"].shape[0] // world_size)
    if phase == "save":
        _steps(engine, rank, world_size, batch, 3)
        saved = engine.state_dict()  # collective
        if rank == 0:
            torch.save(saved, f"{out_dir}/zero{stage}-saved.pt")
    else:
        engine.load_state_dict(torch.load(f"{out_dir}/zero{stage}-saved.pt", weights_only=False))
    _steps(engine, rank, world_size, batch, 3)
    with engine.gathered():  # collective
        state = {k: v.clone() for k, v in _flat(model.trainable_state_dict()).items()}
    if rank == 0:
        torch.save({"state": state, "names": [n for n, p in model.named_parameters() if p.requires_grad]},
                   f"{out_dir}/zero{stage}-{phase}.pt")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_state_loads_into_fresh_engine_and_another_world_size(tmp_path, stage):
    from xbt_dist.train.backend import TorchBackend

    zero = {"stage": stage}
    if stage == 3:  # partition even tiny tensors, as phi hidden 1024 would be at full size
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0)
    (tmp_path / f"zero{stage}.json").write_text(json.dumps({"zero_optimization": zero}))
    T.spawn_gloo(_zero_worker, 2, str(tmp_path), stage, "save")
    T.spawn_gloo(_zero_worker, 2, str(tmp_path), stage, "fresh")  # new processes, fresh engines
    got = {ph: torch.load(tmp_path / f"zero{stage}-{ph}.pt", weights_only=False) for ph in ("save", "fresh")}
    got["continued"], got["names"] = got["save"]["state"], got["save"]["names"]
    _assert_equal_states(got["continued"], got["fresh"]["state"], f"ZeRO-{stage} 2 ranks -> fresh 2 ranks")
    saved = torch.load(tmp_path / f"zero{stage}-saved.pt", weights_only=False)
    assert set(saved["params"]) == set(saved["exp_avg"]) == set(got["names"]), "trainables only, by name"
    assert saved["adam_step"] == 3.0 and saved["global_steps"] == 3
    # 2 -> 1 workers: the name-keyed state continues in one process on the whole batch.
    model = _fresh_model()
    one = TorchBackend(model, OPTIM, TOTAL)
    one.load_state_dict(saved)
    _steps(one, 0, 1, T.tiny_xbt_batch(), 3)
    mine = _flat(model.trainable_state_dict())
    for k, v in got["continued"].items():
        torch.testing.assert_close(mine[k], v.reshape(mine[k].shape), rtol=1e-4, atol=1e-6,
                                   msg=f"ZeRO-{stage} -> 1 worker: {k}")


def test_checkpointer_latest_moves_last_on_a_url(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    root = "memory://xbt-test-run/phi"
    ck = Checkpointer(root, keep=2)
    state = {"format": "x", "params": {"w": torch.ones(3)}}
    for step in (1, 2):
        ck.save(step, state, {"step": step, "data": {"epoch": 0}})
    assert ck.latest() == "step_00000002"

    real = storage.write_text

    def dies_before_publishing(url, text):
        if url.endswith("meta.json"):
            raise OSError("node lost")
        return real(url, text)

    monkeypatch.setattr(storage, "write_text", dies_before_publishing)
    with pytest.raises(OSError):
        ck.save(3, state, {"step": 3, "data": {"epoch": 0}})
    monkeypatch.setattr(storage, "write_text", real)
    assert ck.latest() == "step_00000002", "`latest` moved before the checkpoint was whole"
    assert ck.load().ranks[0]["step"] == 2
    ck.save(4, state, {"step": 4, "data": {"epoch": 0}})
    names = storage.listdir(f"{root}/checkpoints")
    assert ck.latest() == "step_00000004" and "step_00000001" not in names
    assert not list(tmp_path.iterdir()), "a URL out_dir created local files"


def test_loop_plan_names_a_period_the_loop_cannot_run_with():
    """A log period of 0 would reach the loop as a ZeroDivisionError at step 1; the plan names the field."""
    from xbt_dist.train.loop import LoopPlan

    LoopPlan(name="phi", total_steps=4, global_batch=8, stage_dir="/unused", log_every=1)
    with pytest.raises(ValueError, match=r"LoopPlan\('phi'\)\.log_every=0"):
        LoopPlan(name="phi", total_steps=4, global_batch=8, stage_dir="/unused", log_every=0)
    with pytest.raises(ValueError, match=r"checkpoint_every=-1"):
        LoopPlan(name="phi", total_steps=4, global_batch=8, stage_dir="/unused", checkpoint_every=-1)
