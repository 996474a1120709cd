"""Distributed equivalence without Ray: 2 gloo processes vs 1 process on the same global batch.

- the global-batch XBT loss (gather-with-grad, local loss) gives the same loss and, after the
  rank average DDP/DeepSpeed apply, the same gradients on 2 workers as on 1;
- DeepSpeed ZeRO-2 and ZeRO-3 engines over the real XBT module (open_clip + peft LoRA + soft
  prompts + LayerNorm deltas + phi, base weights frozen) take the same steps as plain PyTorch
  AdamW in one process. (Their run state loading into a FRESH engine: test_runstate.py.)
Ray tests (placement on two nodes, fault recovery) are in test_dist_ray.py.
"""

from __future__ import annotations

import pytest
from conftest import flat_state
import torch
import torch.nn.functional as F

from xbt_dist.config import DistConfig, OptimConfig
import xbt_testing.distributed as T

WEIGHTS = {"image_to_old_text": 1.0, "text_to_old_image": 1.0, "new_new": 1.0, "text_to_old_text": 0.5}


def _features(n=8):
    g = torch.Generator().manual_seed(3)
    return {"v_new": torch.randn(n, 12, generator=g), "w_new": torch.randn(n, 12, generator=g),
            "v_old": F.normalize(torch.randn(n, 6, generator=g), dim=-1),
            "w_old": F.normalize(torch.randn(n, 6, generator=g), dim=-1)}


def _loss_worker(rank, world_size, out):
    loss, grads = T.xbt_loss_and_grads(rank, world_size, _features(), WEIGHTS)
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)


def test_global_batch_loss_and_grads_match_single_worker(tmp_path):
    loss1, grads1 = T.xbt_loss_and_grads(0, 1, _features(), WEIGHTS)
    T.spawn_gloo(_loss_worker, 2, str(tmp_path / "r.pt"))
    two = torch.load(tmp_path / "r.pt")
    assert two["loss"] == pytest.approx(loss1, rel=1e-6)
    assert set(two["grads"]) == set(grads1) == {"proj.weight", "proj.bias", "log_logit_scale"}
    for k in grads1:
        torch.testing.assert_close(two["grads"][k], grads1[k], rtol=1e-5, atol=1e-7)
    # Without the gather the 2-worker loss is a different (smaller-batch) loss: the test has teeth.
    half = {k: v[:4] for k, v in _features().items()}
    assert T.xbt_loss_and_grads(0, 1, half, WEIGHTS)[0] != pytest.approx(loss1, rel=1e-3)


OPTIM = OptimConfig(lr=1e-3, warmup_steps=1, grad_clip=1.0, weight_decay=0.01)


def _zero_worker(rank, world_size, out_dir, stages):
    from xbt_dist.distributed.deepspeed_backend import make_deepspeed_backend

    for stage in stages:
        make = make_deepspeed_backend(DistConfig(zero_stage=stage), world_size, on_gpu=False)
        losses, state, backend = T.train_tiny_xbt(make, rank, world_size, T.tiny_xbt_batch(), OPTIM)
        if rank == 0:
            torch.save({"losses": losses, "state": state,
                        "frozen_grads": [n for n, p in backend.model.named_parameters()
                                         if not p.requires_grad and p.grad is not None]},
                       f"{out_dir}/zero{stage}.pt")


_flat = flat_state


def test_deepspeed_zero2_zero3_match_single_process_on_xbt_model(tmp_path):
    from xbt_dist.train.backend import TorchBackend

    ref_losses, ref_state, _ = T.train_tiny_xbt(lambda m, o, t, b: TorchBackend(m, o, t), 0, 1,
                                                T.tiny_xbt_batch(), OPTIM)
    ref = _flat(ref_state)
    init = _flat(T.tiny_xbt_model().trainable_state_dict())
    T.spawn_gloo(_zero_worker, 2, str(tmp_path), (2, 3))
    for stage in (2, 3):
        got = torch.load(tmp_path / f"zero{stage}.pt", weights_only=False)
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), f"ZeRO-{stage} losses"
        assert got["frozen_grads"] == [], f"ZeRO-{stage}: frozen base weights got gradients"
        flat = _flat(got["state"])
        assert set(flat) == set(ref)
        moved = 0
        for k in ref:
            assert flat[k].shape == ref[k].shape, f"ZeRO-{stage} {k}: shape {flat[k].shape} != {ref[k].shape}"
            torch.testing.assert_close(flat[k], ref[k], rtol=1e-4, atol=1e-6, msg=f"ZeRO-{stage} {k}")
            moved += int(not torch.equal(ref[k], init[k]))
        assert moved >= len(ref) // 2, "most trainable tensors should have moved after 2 steps"


def _one_rank_worker(rank, world_size, out_dir):
    from xbt_dist.distributed.deepspeed_backend import make_deepspeed_backend

    make = make_deepspeed_backend(DistConfig(zero_stage=2), world_size, on_gpu=False)
    losses, state, backend = T.train_tiny_xbt(make, rank, world_size, T.tiny_xbt_batch(), OPTIM)
    torch.save({"losses": losses, "state": state, "stage": backend.zero_stage,
                "allreduce": backend.engine.enable_backward_allreduce}, f"{out_dir}/one.pt")


def test_zero_at_one_rank_runs_stage0_without_the_noop_allreduce(tmp_path):
    """ZeRO-1/2/3 partition over ranks: at world size 1 the engine runs stage 0 and skips the
    gradient all-reduce (its bookkeeping cost 1.2x the local step time), unless it offloads."""
    from xbt_dist.distributed.deepspeed_backend import build_ds_config
    from xbt_dist.train.backend import TorchBackend

    for stage in (1, 2, 3):
        one = build_ds_config(DistConfig(zero_stage=stage), OPTIM, 8, world_size=1, on_gpu=False)
        two = build_ds_config(DistConfig(zero_stage=stage), OPTIM, 8, world_size=2, on_gpu=False)
        assert one["zero_optimization"] == {"stage": 0}
        assert two["zero_optimization"]["stage"] == stage
    offload = tmp_path / "offload.json"
    offload.write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')
    kept = build_ds_config(DistConfig(deepspeed_config=str(offload)), OPTIM, 8, world_size=1, on_gpu=False)
    assert kept["zero_optimization"]["stage"] == 2  # offloading is what ZeRO still does for one rank

    ref_losses, ref_state, _ = T.train_tiny_xbt(lambda m, o, t, b: TorchBackend(m, o, t), 0, 1,
                                                T.tiny_xbt_batch(), OPTIM)
    T.spawn_gloo(_one_rank_worker, 1, str(tmp_path))
    got = torch.load(tmp_path / "one.pt", weights_only=False)
    assert (got["stage"], got["allreduce"]) == (0, False)
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
    ref, flat = _flat(ref_state), _flat(got["state"])
    for k in ref:
        torch.testing.assert_close(flat[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_ray_reports_are_throttled_and_agreed_by_all_ranks():
    from xbt_dist.distributed.ray_runner import ReportThrottle

    now = [0.0]
    votes = []

    def any_rank(flag):  # another rank whose clock says "due" at t=12 makes every rank report
        votes.append(flag)
        return flag or now[0] == 12.0

    t = ReportThrottle(10.0, any_rank, clock=lambda: now[0])
    reported = []
    for now[0] in (0.0, 1.0, 5.0, 10.0, 11.0, 12.0, 15.0, 21.9, 22.0):
        reported.append(t.due())
    assert reported == [True, False, False, True, False, True, False, False, True]
    assert len(votes) == 9  # the vote (a collective) runs at every log point, reported or not
