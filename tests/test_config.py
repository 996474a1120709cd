"""Every shipped recipe loads; bad keys and values fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from xbt_dist.config import ConfigError, dump_config, load_config

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"toy", "paper_b32_l14", "paper_l14_h14", "toy_lora_only", "toy_base", "toy_full_tune"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_paper_recipes_models():
    b = load_config(RECIPES[0].parent / "paper_b32_l14.yaml")
    assert (b.old.arch, b.new.arch, b.phi.hidden, b.phi.depth) == ("ViT-B-32", "ViT-L-14", 2048, 3)
    h = load_config(RECIPES[0].parent / "paper_l14_h14.yaml")
    assert (h.old.arch, h.new.arch, h.dist.zero_stage) == ("ViT-L-14", "ViT-H-14", 3)
    assert h.train.batch_size == b.train.batch_size  # inherited through `base:`
    blip = load_config(RECIPES[0].parent / "paper_blip_base_large.yaml")
    assert (blip.old.backend, blip.old.arch, blip.new.backend, blip.new.arch) == \
        ("hf_blip", "blip-itm-base-coco", "hf_blip", "blip-itm-large-coco")
    assert b.old.backend == "open_clip" and blip.adapters == b.adapters


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train.lr=1"], "did you mean 'train.optim.lr'"),
    (["train.method=fulltune"], "train.method='fulltune' is invalid"),
    (["train.target_source=cache"], "train.target_source='cache' is invalid"),
    (["dist.zero_stage=4"], "dist.zero_stage=4 is invalid"),
    (["train.batch_size=abc"], "train.batch_size='abc' is invalid"),
    (["loss.new_new=-1"], "loss.new_new=-1.0 is invalid"),
    (["adapters.lora_rnk=4"], "unknown config key 'adapters.lora_rnk'"),
    (["noequals"], "must look like section.key=value"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("configs/toy.yaml", override)
    assert message in str(e.value)


def test_overrides_parse_numbers_and_lists():
    cfg = load_config("configs/toy.yaml", ["train.optim.lr=3e-4", "eval.ks=[1, 10]", "dist.ray_address=auto"])
    assert cfg.train.optim.lr == pytest.approx(3e-4)
    assert cfg.eval.ks == (1, 10)
    assert cfg.dist.ray_address == "auto"


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


# ---- errors name the recipe's file, line and column (one line on the command line) ----------

@pytest.mark.parametrize("text, where, problem", [
    ("name: x\ntrain:\n  batch_size: 3\n   bad: [1\n", "4:7", "invalid YAML: mapping values are not allowed here"),
    ("train: {epochs: [1\n", "2:1", "expected ',' or ']'"),
    ("train:\n\tepochs: 1\n", "2:1", "invalid YAML"),          # a tab in the indentation
    ("- a\n- b\n", "1:1", "must be a YAML mapping"),
])
def test_malformed_recipe_names_file_line_column(tmp_path, text, where, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{where}: ") and problem in msg and "\n" not in msg


def test_bad_key_and_value_name_where_they_are_set(tmp_path):
    (tmp_path / "base.yaml").write_text("name: b\ntrain:\n  epochs: 1\n  batchsize: 4\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\n\ndist:\n  workers: 2\n  zero_stage: 5\n")
    with pytest.raises(ConfigError) as e:  # the unknown key sits in the base recipe
        load_config(tmp_path / "run.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'base.yaml'}:4:3: unknown config key 'train.batchsize'")
    with pytest.raises(ConfigError) as e:  # an override of another key does not hide it
        load_config(tmp_path / "run.yaml", ["train.batch_size=4"])
    assert str(e.value).startswith(f"{tmp_path / 'base.yaml'}:4:3: unknown config key 'train.batchsize'")
    (tmp_path / "base.yaml").write_text("name: b\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError) as e:  # the bad value in the recipe itself
        load_config(tmp_path / "run.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'run.yaml'}:5:3: dist.zero_stage=5 is invalid")
    with pytest.raises(ConfigError) as e:  # set on the command line: no file position to give
        load_config(tmp_path / "run.yaml", ["dist.zero_stage=6"])
    assert str(e.value).startswith("dist.zero_stage=6 is invalid")


def test_cli_prints_one_line_for_a_malformed_recipe(tmp_path, capsys):
    from xbt_dist.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 1\n   x: 2\n")
    assert main(["params", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:3:5: invalid YAML" in err and "Traceback" not in err


def test_toy_full_tune_recipe_uses_the_validation_chosen_lr():
    """The recipe users run and the comparison bench's Full-tune row train at the same lr."""
    from bench.common import TOY_FULL_TUNE_LR
    c = load_config(RECIPES[0].parent / "toy_full_tune.yaml")
    assert c.train.method == "full_tune" and c.train.optim.lr == float(TOY_FULL_TUNE_LR)
