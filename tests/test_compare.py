"""bench.compare end to end on the tiny world: every row of the comparison, both splits, intervals."""

import json

import pytest

from bench import compare
from xbt_dist.pipeline import embed_for_config


def test_compare_tiny_world(tiny, tiny_cfg, tmp_path):
    cfg = tiny_cfg
    cfg.eval.val_shards = tiny["eval"]        # the tiny world has one gallery: enough to run both splits
    cfg.eval.num_workers = 0
    embed_for_config(cfg)
    res = compare.run(cfg, seeds=[0, 1], methods=["xbt"], out=tmp_path / "cmp", n_boot=200)
    for split in ("val", "test"):
        rows = res["summary"][split]
        assert set(rows) == {"old/old", "new/old", "phi", "lsq", "procrustes", "residual", "fusion", "xbt"}
        x = rows["xbt"]
        assert len(x["recalls"]["t2i R@1"]) == 2 and x["seeds"] == [0, 1]
        g = x["gain"]["i2t R@5"]
        assert g["lo"] <= g["gain"] <= g["hi"] and g["n_queries"] == 12
        assert rows["xbt"]["params"] > 0 and rows["lsq"]["params"] == 24 * 16 + 16
        assert rows["fusion"]["params"] == 0 and rows["fusion"]["query_us"]["mean"] > 0
        # old/old against itself: no gain, no flips
        assert rows["old/old"]["gain"]["t2i R@1"]["gain"] == 0.0
        # XBT minus a method, paired on the same queries: the difference of their gains over old/old
        assert rows["xbt"]["xbt_minus"] is None and rows["old/old"]["xbt_minus"] is None
        for name in ("phi", "residual", "new/old"):
            for c in ("t2i R@5", "i2t R@1"):
                d = rows[name]["xbt_minus"][c]
                assert d["lo"] <= d["gain"] <= d["hi"]
                assert d["gain"] == pytest.approx(x["gain"][c]["gain"] - rows[name]["gain"][c]["gain"], abs=1e-12)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "OLD ENCODER AT QUERY TIME" in md and "XBT verdict on test" in md and "XBT minus each method on val" in md
    meta = json.loads((tmp_path / "cmp" / "compare.json").read_text())["meta"]
    assert meta["seeds"] == [0, 1] and len(meta["alpha"]) == 2


def test_gallery_split_needs_its_shards(tiny_cfg):
    import pytest
    from xbt_dist.eval.evaluate import gallery_shards
    assert gallery_shards(tiny_cfg, "test") == tiny_cfg.eval.eval_shards
    tiny_cfg.eval.val_shards = None
    with pytest.raises(ValueError, match="eval.val_shards is not set"):
        gallery_shards(tiny_cfg, "val")
    with pytest.raises(ValueError, match="use 'test'"):
        gallery_shards(tiny_cfg, "train")


def test_zero_shot_uses_the_papers_single_prompt_by_default(tiny_cfg):
    """eval.zeroshot_prompts: "single" embeds one "a photo of a {}." per class; "ensemble" every
    template of classes.json (the tiny set has 2)."""
    from xbt_dist.eval import evaluate
    seen = []
    towers = evaluate.load_towers(tiny_cfg)
    real = towers.class_texts
    towers.class_texts = lambda prompts, bs: seen.append(list(prompts)) or real(prompts, bs)
    tiny_cfg.eval.num_workers = 0
    assert tiny_cfg.eval.zeroshot_prompts == "single"
    single = evaluate._zero_shot(tiny_cfg.eval.zeroshot_shards, towers, tiny_cfg.eval, "cpu")
    tiny_cfg.eval.zeroshot_prompts = "ensemble"
    evaluate._zero_shot(tiny_cfg.eval.zeroshot_shards, towers, tiny_cfg.eval, "cpu")
    assert seen[0] == ["a photo of a red.", "a photo of a green.", "a photo of a blue."]
    assert seen[1] == ["a photo of red.", "red", "a photo of green.", "green", "a photo of blue.", "blue"]
    assert "old/old" in str(single)


def test_eval_on_the_val_split_writes_its_own_report(tiny, tiny_cfg):
    from pathlib import Path

    from xbt_dist.eval.evaluate import run_eval
    tiny_cfg.eval.val_shards, tiny_cfg.eval.num_workers, tiny_cfg.eval.zeroshot_shards = tiny["eval"], 0, None
    res = run_eval(tiny_cfg, split="val")
    path = Path(res["paths"]["eval_json"])
    assert path.parent.name == "eval_val"
    assert json.loads(path.read_text())["meta"]["split"] == "val"


def test_method_set_overrides_what_a_method_pins(tiny_cfg, tmp_path):
    """`--set` reaches every method but Full-tune pins its own lr; `--method-set` comes after it."""
    tiny_cfg.out_dir = str(tmp_path / "seed0")
    tiny_cfg.train.optim.lr = 4e-3                     # what `--set train.optim.lr=4e-3` gives every method
    assert compare.method_config(tiny_cfg, "full_tune").train.optim.lr == 1e-3
    assert compare.method_config(tiny_cfg, "xbt").train.optim.lr == 4e-3
    sets = compare.parse_method_sets(["full_tune:train.optim.lr=4e-4", "full_tune:train.epochs=3"])
    assert sets == {"full_tune": ["train.optim.lr=4e-4", "train.epochs=3"]}
    c = compare.method_config(tiny_cfg, "full_tune", sets["full_tune"])
    assert (c.train.optim.lr, c.train.epochs, c.train.method) == (4e-4, 3, "full_tune")
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        compare.parse_method_sets(["train.optim.lr=4e-4"])
    with pytest.raises(SystemExit):                    # the CLI names the problem before building anything
        compare.main(["--method-set", "full_tune", "--out", str(tmp_path / "x")])
