"""End to end on tiny real models: embed -> stage 1 -> stage 2 -> eval, through the library and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xbt_dist.config import dump_config
from xbt_dist.pipeline import embed_for_config, run_stage
from xbt_dist.train.stage1 import run_stage1
from xbt_dist.train.stage2 import run_stage2


def test_pipeline_end_to_end(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg
    embed_for_config(cfg, batch_size=16)
    r1 = run_stage(run_stage1, cfg)
    assert r1["steps"] >= 1 and Path(r1["phi_path"]).is_file()
    # precomputed targets: the old model must never be loaded in stage 2
    import xbt_dist.train.stage2 as s2
    loaded = []
    real = s2.load_encoder
    monkeypatch.setattr(s2, "load_encoder", lambda ref, device: loaded.append(ref.arch) or real(ref, device))
    r2 = run_stage(run_stage2, cfg)
    assert loaded == [cfg.new.arch] and r2["old_model_loaded"] is False
    assert r2["steps"] == 3 and r2["samples"] == 24
    sd = torch.load(r2["adapters_path"], weights_only=False)
    n_saved = sum(v.numel() for part in ("adapters", "phi") for v in sd[part].values())
    n_base = sum(v.numel() for v in torch.load(cfg.new.pretrained, weights_only=False)["state_dict"].values())
    assert n_saved < n_base  # adapters + phi only, never base weights

    from xbt_dist.eval.evaluate import run_eval
    res = run_eval(cfg)
    compat = res["compat"]
    assert set(compat["cases"]) == {"old/old", "new/old", "phi/old", "xbt/old", "new/new", "xbt/xbt"}
    assert compat["on_off"]["equal"] is True  # adapters off == untouched new model, bit for bit
    for f in ("eval_json", "report_md", "recall_bars", "tsne"):
        assert Path(res["paths"][f]).stat().st_size > 0
    assert "old/old" in Path(res["paths"]["report_md"]).read_text()


def _printed(out: str) -> list[dict]:
    """Every JSON object the CLI printed (each starts a line), in order."""
    found, dec = [], json.JSONDecoder()
    for i in [0] + [j + 1 for j, c in enumerate(out) if c == "\n"]:
        if out.startswith("{", i):
            try:
                found.append(dec.raw_decode(out, i)[0])
            except ValueError:
                pass
    return found


def test_cli_stages_and_resume(tiny_cfg, tmp_path, capsys):
    """The CLI path end to end, checked by the files and numbers each command leaves (an exit
    code of 0 with an empty embedding set, no phi file or a skipped step would fail here)."""
    from xbt_dist.cli import main
    from xbt_dist.data.embeddings import EmbeddingShardSet
    cfg = tiny_cfg
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(cfg))

    assert main(["embed", "--config", str(cfg_path), "--batch-size", "16"]) == 0
    emb = _printed(capsys.readouterr().out)[-1]
    # the tiny world: 2 text shards x 64 captions, 2 image-text shards x 32 pairs, none bad
    assert emb[cfg.stage1.embeddings]["samples"] == 128 and emb[cfg.train.targets]["samples"] == 64
    assert all(r["skipped"] == {} and r["complete"] for r in emb.values())
    assert sum(EmbeddingShardSet(cfg.train.targets).counts().values()) == 64

    assert main(["pretrain-phi", "--config", str(cfg_path)]) == 0
    phi = _printed(capsys.readouterr().out)[-1]
    assert phi["stage"] == "phi" and phi["steps"] >= 1 and np.isfinite(phi["final_loss"])
    assert Path(phi["phi_path"]).stat().st_size > 0

    assert main(["train", "--config", str(cfg_path), "--set", "train.checkpoint_every=2"]) == 0
    train = _printed(capsys.readouterr().out)[-1]
    assert train["stage"] == "train" and train["steps"] == 3 and train["samples"] == 24  # 3 x batch 8
    assert train["skipped"] == {} and np.isfinite(train["final_loss"])
    assert Path(train["adapters_path"]).stat().st_size > 0
    ckpts = Path(cfg.stage_dir("train")) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    # resuming a finished run continues from its final checkpoint: 2 more steps, not 5
    assert main(["train", "--config", str(cfg_path), "--resume", "--set", "train.max_steps=5"]) == 0
    resumed = _printed(capsys.readouterr().out)[-1]
    assert resumed["steps"] == 5 and (ckpts / "latest").read_text() == "step_00000005"

    assert main(["eval", "--config", str(cfg_path)]) == 0
    ev = _printed(capsys.readouterr().out)[-1]
    assert isinstance(ev["verdict"]["compatible"], bool)
    for f in ("eval_json", "report_md", "recall_bars"):
        assert Path(ev["report"][f]).stat().st_size > 0
    result = json.loads(Path(ev["report"]["eval_json"]).read_text())
    cases = result["compat"]["cases"]
    assert set(cases) >= {"old/old", "new/old", "xbt/old"}
    for name in ("old/old", "new/old", "xbt/old"):
        for direction in ("t2i", "i2t"):
            r = cases[name][direction]  # recall fractions, non-decreasing in K
            ks = sorted((k for k in r if k.startswith("R@")), key=lambda k: int(k[2:]))
            assert ks and all(0.0 <= r[k] <= 1.0 for k in ks), (name, r)
            assert all(r[a] <= r[b] for a, b in zip(ks, ks[1:])), (name, r)


def test_cli_rejects_unknown_key(tmp_path, capsys):
    from xbt_dist.cli import main
    assert main(["train", "--config", "configs/toy.yaml", "--set", "train.lr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err.replace("train.optim", "optim")
