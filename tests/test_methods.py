"""Method recipes (train.method): the paper's Table 6 baselines and the renamed ablations."""

from pathlib import Path

import pytest

from xbt_dist.config import METHODS, load_config
from xbt_dist.train.model import resolve_method

TOY = Path(__file__).parents[1] / "configs" / "toy.yaml"


def _resolved(method: str):
    cfg = load_config(TOY)
    cfg.train.method = method
    r = resolve_method(cfg)
    a = r.adapters
    return (r.train.phi_init, r.train.target_source, a.full_tune,
            a.text_prompts + a.visual_prompts > 0, a.tune_layernorm)


@pytest.mark.parametrize("method,expected", [
    # (phi init, targets, all weights train, prompts, LayerNorms)
    ("xbt", ("stage1", "precomputed", False, True, True)),
    # the paper's baselines: no text-only pretraining, the old model runs online
    ("base", ("random", "old_model", False, True, True)),
    ("lora_only", ("random", "old_model", False, False, False)),
    ("full_tune", ("random", "old_model", True, True, True)),
    # what base / lora_only / full_tune meant before the paper's names
    ("xbt_old_online", ("stage1", "old_model", False, True, True)),
    ("lora_only_stored", ("random", "precomputed", False, False, False)),
    ("full_tune_stage1", ("stage1", "precomputed", True, True, True)),
])
def test_recipe(method, expected):
    assert method in METHODS
    assert _resolved(method) == expected


def test_recipe_does_not_touch_the_input():
    cfg = load_config(TOY)
    cfg.train.method = "base"
    resolve_method(cfg)
    assert (cfg.train.phi_init, cfg.train.target_source) == ("stage1", "precomputed")
