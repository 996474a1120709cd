"""Shared fixtures: tiny open_clip architectures with saved checkpoints and tiny shard sets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

# xbt_testing (test machinery kept out of the package and its wheel) sits at the repository root.
# Ray workers import its stage functions by module name, and Ray nodes, DeepSpeed's gloo ranks and
# submitit jobs are separate processes: the root goes on their inherited PYTHONPATH as well as on
# this process's path (pytest itself only puts tests/ there).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray 2.60 starts a local instance with token authentication on, and a driver's auth mode is
# process-global: after one test's `ray.init(address="local")` every later connection of this
# process to a test cluster (started without auth, see LocalRayCluster) sends a token, and Ray
# Train's controller actor is cancelled before it starts. Every Ray the tests start is a
# throwaway on 127.0.0.1, so the whole session runs without token auth.
os.environ["RAY_AUTH_MODE"] = "disabled"
# DeepSpeed JIT-builds its CPU comm op (~75 CPU-s) into TORCH_EXTENSIONS_DIR, keyed by name, not
# by the DeepSpeed install it was built from: checkouts with their own venvs sharing ~/.cache would
# rebuild it for each other. One directory per venv: every test, Ray worker and SLURM job of this
# session (they inherit the environment) builds it at most once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
torch.set_num_threads(2)

TINY_OLD = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_NEW = {"embed_dim": 24, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def write_tiny_models(root: Path) -> dict:
    """Random-init tiny OLD/NEW open_clip models saved as local checkpoints (the real load path)."""
    import open_clip
    model_dir = root / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    out = {"models_dir": str(model_dir)}
    for role, arch_cfg in (("old", TINY_OLD), ("new", TINY_NEW)):
        name = f"tiny-{role}"
        (model_dir / f"{name}.json").write_text(json.dumps(arch_cfg))
        open_clip.add_model_config(str(model_dir / f"{name}.json"))
        torch.manual_seed(0 if role == "old" else 1)
        model = open_clip.create_model(name)
        ckpt = model_dir / f"{role}.pt"
        torch.save({"state_dict": model.state_dict()}, ckpt)
        out[f"{role}_arch"], out[f"{role}_checkpoint"] = name, str(ckpt)
    return out


def write_tiny_world(root: Path) -> dict:
    """Image-text, text, multi-caption eval and zero-shot shard sets of a few dozen samples."""
    from xbt_testing.synthetic import write_image_text_shards, write_text_shards
    import webdataset as wds
    import numpy as np
    from xbt_testing.synthetic import jpeg_bytes
    world = {"train": str(root / "train"), "text": str(root / "text"),
             "eval": str(root / "eval"), "zeroshot": str(root / "zeroshot")}
    write_image_text_shards(world["train"], n_shards=2, per_shard=32, sizes=True)
    write_text_shards(world["text"], n_shards=2, per_shard=64)
    rng = np.random.default_rng(5)
    for name, n in (("eval", 12), ("zeroshot", 9)):
        Path(world[name]).mkdir(parents=True)
        with wds.TarWriter(str(Path(world[name]) / f"{name}-000.tar")) as w:
            for i in range(n):
                caps = [f"picture {i}", f"image number {i}"]
                w.write({"__key__": f"{i:04d}", "jpg": jpeg_bytes(rng), "txt": caps[0],
                         "json": {"captions": caps}, "cls": str(i % 3)})
    (Path(world["zeroshot"]) / "classes.json").write_text(
        json.dumps({"classes": ["red", "green", "blue"], "templates": ["a photo of {}.", "{}"]}))
    return world


# ---- suite markers and timeouts (registered in pyproject.toml; the README's `pytest -q tests`
# runs everything; a quick loop deselects both: `pytest -m "not slow and not cluster"`)
# `cluster`: starts a Ray cluster or submits to SLURM -- whole files, so new tests there are marked.
# `slow`: over ~20 s in one full `pytest --durations=0` run on the shared 2-core machine (seconds
# from that run, under load); new tests mark themselves with `@pytest.mark.slow`.
# `TIMEOUTS`: tests that may legitimately run past the default `timeout` of pyproject.toml (a
# first DeepSpeed run JIT-compiles its CPU ops: minutes on 2 cores); a test's own
# `@pytest.mark.timeout` wins. Tables keep other files free of edits; `tests/test_suite.py`
# fails when an entry goes stale.
CLUSTER_FILES = ("test_dist_ray.py", "test_slurm.py", "test_slurm_xbt.py", "test_data_ray.py",
                 "test_precision_ray.py", "test_embed_job.py", "test_slurm_placement.py",
                 "test_s3_storage.py", "test_ray_jobs.py")
SLOW_TESTS: dict[str, float] = {  # seconds in the full `--durations=0` run (shared machine, load ~7)
    "tests/test_dist.py::test_deepspeed_zero2_zero3_match_single_process_on_xbt_model": 1685,  # JIT build wait
    "tests/test_dist.py::test_global_batch_loss_and_grads_match_single_worker": 33,
    "tests/test_prep_images.py::test_prep_images_records_failures_and_keeps_good_samples": 98,
    "tests/test_prep_to_train.py::test_urls_to_shards_to_xbt_run": 70,
    "tests/test_adapters.py::test_disabled_is_bit_identical_after_training": 35,
    "tests/test_adapters.py::test_each_of_q_k_v_out_lora_is_active": 23,
    "tests/test_demo.py::test_quick_demo_runs_the_whole_pipeline_from_any_directory": 130,
    "tests/test_compare.py::test_compare_tiny_world": 112,   # 24 s CPU; 2 seeds x (stage 1 + 2 + 2 evals)
    "tests/test_baselines.py::test_residual_adapter_learns_what_a_linear_map_cannot": 40,
    "tests/test_compare.py::test_eval_on_the_val_split_writes_its_own_report": 37,
    "tests/test_compare.py::test_zero_shot_uses_the_papers_single_prompt_by_default": 30,
    "tests/test_toy_world.py::test_val_gallery_is_its_own_and_leaves_the_test_gallery_unchanged": 25,
    "tests/test_wheel.py": 30,  # builds and installs the wheel, three `xbt` subprocesses
    # cluster tests that are slow too (the quick loop deselects them either way)
    "tests/test_dist_ray.py": 416,
    "tests/test_slurm.py::test_submitit_preemption_checkpoints_and_resumes": 114,
    "tests/test_slurm.py::test_sbatch_runs_stage_on_ray_cluster": 106,
    "tests/test_slurm.py::test_scontrol_requeue_resumes_to_same_result": 37,
    "tests/test_slurm.py::test_usr1_checkpoints_and_self_requeues": 31,
    "tests/test_slurm_xbt.py": 137,
    "tests/test_ray_jobs.py": 422,  # 4 Ray jobs (driver + Train controller + DeepSpeed each); load ~15
    "tests/test_tracking.py::test_trackers_log_the_progress_metrics_and_config": 33,
}
TIMEOUTS: dict[str, int] = {
    # DeepSpeed ZeRO on 2 gloo ranks; the first test JIT-compiles DeepSpeed's shm op (190-460 s
    # per build measured here under load, while other checkouts held the build lock)
    "tests/test_dist.py": 900,
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        test = item.nodeid.split("[", 1)[0]
        if path.rsplit("/", 1)[-1] in CLUSTER_FILES:
            item.add_marker(pytest.mark.cluster)
        if test in SLOW_TESTS or path in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        limit = TIMEOUTS.get(test, TIMEOUTS.get(path))
        if limit is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {**write_tiny_models(root), **write_tiny_world(root), "root": str(root)}


@pytest.fixture
def tiny_cfg(tiny, tmp_path):
    """A RunConfig over the tiny world, writing below tmp_path."""
    from xbt_dist.pipeline import toy_run_config
    cfg = toy_run_config(tiny, tmp_path, overrides=[
        "phi.hidden=32", "stage1.batch_size=32", "stage1.epochs=1", "train.batch_size=8",
        "train.max_steps=3", "train.log_every=1", "train.num_workers=0", "eval.tsne_points=10",
        "adapters.text_prompts=2", "adapters.visual_prompts=2"])
    return cfg


def local_ray_cluster(tmp_path_factory, nodes: int, cpus_per_node: int):
    """Generator body of the module-scoped `cluster` fixtures of the Ray test files: a fresh local
    Ray cluster (any Ray this process had is shut down first), stopped afterwards."""
    import ray

    import xbt_testing.distributed as T

    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("ray")
    with open(root / "nodes.log", "w") as log:
        c = T.LocalRayCluster(nodes=nodes, cpus_per_node=cpus_per_node).start(log=log)
        yield c
        c.stop()


def flat_state(state: dict, prefix: str = "") -> dict:
    """A nested state dict as one level of dotted names (for tensor-by-tensor comparisons)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat_state(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
