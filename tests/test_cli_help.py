"""Every option of the `xbt` commands defined in cli.py says what it does in `--help`."""

from __future__ import annotations

import argparse

import pytest

from xbt_dist.cli import build_parser

OWN = ("pretrain-phi", "train", "embed", "eval", "params", "toy-world", "demo")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("cmd", OWN)
def test_every_option_has_help(cmd):
    """Fails when an option of an `xbt` command is added (or left) without a help text: `--help`
    would list it unexplained."""
    p = _subparsers()[cmd]
    missing = [a.option_strings or a.dest for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"xbt {cmd}: options without help: {missing}"
