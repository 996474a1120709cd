"""Command-line flags become typed config fields, validated like `--set` overrides.

- a bad flag value (`--workers 0`, `serve --port 70000`) stops with the ConfigError a bad
  `--set` of the same field gets, before any work starts, not after being assigned past the checks;
- a flag value is not re-read as YAML: `--ray-address [::1]:6379` stays that string;
- more than one worker (from a flag or from `--set`) runs on Ray; a flag wins over `--set`;
- the demo's flags and filled-in paths go through the same checks (`with_fields`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xbt_dist.cli import _load, build_parser, main
from xbt_dist.config import ConfigError, load_config, with_fields

TOY = "configs/toy.yaml"


def _args(*argv: str):
    return build_parser().parse_args(["params", "--config", TOY, *argv])


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_bad_flag_value_gets_the_error_of_a_bad_set(capsys):
    """Fails when a flag skips the field's check or words its error differently from `--set`."""
    via_set = _error(capsys, ["params", "--config", TOY, "--set", "dist.workers=0"])
    via_flag = _error(capsys, ["params", "--config", TOY, "--workers", "0"])
    assert "dist.workers=0 is invalid: expected an int >= 1" in via_set
    assert via_flag == via_set


def test_serve_port_flag_is_checked_before_serving(capsys):
    """`--port` used to be assigned after validation: 70000 reached the socket. Fails if it is
    not refused by the serve.port check (the index is never opened: the config fails first)."""
    via_set = _error(capsys, ["serve", "--config", TOY, "--set", "serve.port=70000"])
    via_flag = _error(capsys, ["serve", "--config", TOY, "--port", "70000"])
    assert "serve.port=70000 is invalid: expected a TCP port" in via_flag
    assert via_flag == via_set


def test_a_flag_value_is_not_reparsed_as_yaml():
    """As a `dist.ray_address=[::1]:6379` string, YAML read the address as a list and failed."""
    cfg = _load(_args("--ray-address", "[::1]:6379"))
    assert cfg.dist.ray_address == "[::1]:6379"
    assert cfg.dist.backend == "ray"  # an address means Ray


def test_workers_imply_ray_from_a_flag_or_a_set_and_the_flag_wins():
    assert _load(_args()).dist.backend == "local"
    flag = _load(_args("--workers", "2", "--zero-stage", "2"))
    assert (flag.dist.workers, flag.dist.zero_stage, flag.dist.backend) == (2, 2, "ray")
    via_set = _load(_args("--set", "dist.workers=3"))
    assert (via_set.dist.workers, via_set.dist.backend) == (3, "ray")
    both = _load(_args("--set", "dist.workers=3", "--workers", "2"))
    assert both.dist.workers == 2


def test_with_fields_validates_names_the_key_and_leaves_the_input_alone():
    cfg = load_config(TOY)
    before = cfg.dist.workers
    with pytest.raises(ConfigError, match=r"dist\.zero_stage=5 is invalid"):
        with_fields(cfg, {"dist.zero_stage": 5})
    with pytest.raises(ConfigError, match=r"unknown config key 'dist\.worker' \(did you mean 'workers'\?\)"):
        with_fields(cfg, {"dist.worker": 2})
    new = with_fields(cfg, {"dist.workers": 4})
    assert (new.dist.workers, cfg.dist.workers) == (4, before)


def test_demo_fields_and_paths_are_validated():
    """The demo fills the toy world's paths and its flags in through `with_fields`."""
    from xbt_dist.pipeline import toy_run_config

    world = {"old_arch": "toy-old", "old_checkpoint": "old.pt", "new_arch": "toy-new",
             "new_checkpoint": "new.pt", "models_dir": "models", "text": "text", "train": "train",
             "eval": "eval", "zeroshot": "zs"}
    cfg = toy_run_config(world, Path("out"), fields={"dist.workers": 2, "dist.backend": "ray"})
    assert (cfg.old.arch, cfg.new.pretrained, cfg.train.targets) == ("toy-old", "new.pt", "out/emb/train")
    assert (cfg.dist.workers, cfg.dist.backend) == (2, "ray")
    with pytest.raises(ConfigError, match=r"dist\.zero_stage=7 is invalid"):
        toy_run_config(world, Path("out"), fields={"dist.zero_stage": 7})
