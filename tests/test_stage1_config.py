"""Stage 1 reads its own `stage1.seed`, `stage1.checkpoint_every` and `stage1.log_every`; a recipe
that sets them under `train` only (what stage 1 read before) runs exactly as before, with a
deprecation warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from xbt_dist.config import (ConfigError, OptimConfig, RunConfig, Stage1Config, TrainConfig, load_config,
                             stage1_setting)
from xbt_dist.data.embeddings import write_embedding_manifest, write_embedding_shard


def test_stage1_setting_prefers_own_key_and_warns_on_fallback(monkeypatch):
    """Fails when stage 1 ignores its own key, or falls back to train.* silently (when that value
    is not the default) or with a warning that does not name the key to set."""
    import xbt_dist.config as config
    monkeypatch.setattr(config, "_STAGE1_WARNED", set())
    cfg = load_config("configs/toy.yaml", ["train.seed=3", "stage1.log_every=7"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stage1_setting(cfg, "log_every") == 7  # own key: no warning
        assert stage1_setting(cfg, "checkpoint_every") == cfg.train.checkpoint_every == 0  # default
    with pytest.warns(FutureWarning, match=r"train\.seed=3 .*set stage1\.seed"):
        assert stage1_setting(cfg, "seed") == 3
    with pytest.raises(ConfigError, match="stage1.log_every"):
        load_config("configs/toy.yaml", ["stage1.log_every=0"])


def _run(tmp_path, name: str, stage1: dict, train: dict) -> tuple[dict, dict]:
    from xbt_dist.train.stage1 import load_phi, run_stage1
    c = RunConfig(name=name, out_dir=str(tmp_path / name))
    c.phi.hidden, c.phi.depth = 16, 2
    c.stage1 = Stage1Config(source="embeddings", embeddings=str(tmp_path / "emb"), epochs=1,
                            batch_size=16, optim=OptimConfig(lr=1e-2, warmup_steps=2), **stage1)
    c.train = TrainConfig(**train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        res = run_stage1(c)
    return res, load_phi(res["phi_path"]).state_dict()


def test_stage1_runs_on_its_own_keys(tmp_path):
    """Fails when run_stage1 reads seed / log_every from train.* although stage1.* is set (other
    init, other log points), or when the train.* fallback changes the numbers of an old recipe."""
    rng = np.random.default_rng(0)
    for s in range(2):  # 2 x 40 rows, batch 16: 5 steps
        w = rng.normal(size=(40, 12))
        write_embedding_shard(tmp_path / "emb", f"t{s}", [f"{s}-{i}" for i in range(40)],
                              {"text_new": w, "text_old": w[:, :8]})
    write_embedding_manifest(tmp_path / "emb", source="test", models={})
    own, phi_own = _run(tmp_path, "own", {"seed": 4, "log_every": 2}, {"seed": 9, "log_every": 1})
    old, phi_old = _run(tmp_path, "old", {}, {"seed": 4, "log_every": 2})
    assert own["steps"] == old["steps"] == 5
    for k in phi_own:
        torch.testing.assert_close(phi_own[k], phi_old[k], rtol=0, atol=0)
    import json
    steps = [r["step"] for r in json.loads((tmp_path / "own" / "phi" / "manifest.json").read_text())["history"]]
    assert steps == [2, 4, 5], steps  # every 2nd step and the last
