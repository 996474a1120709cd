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
