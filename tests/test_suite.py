"""The suite's own wiring: markers are registered, the marker table in conftest names real tests,
and a default per-test timeout is set (so a hanging Ray test fails instead of hanging CI)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parent.parent


def _ini() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def test_markers_registered_and_default_timeout_set():
    """Fails when a marker the suite applies is not registered (with --strict-markers every test
    run would error) or when the default timeout is dropped."""
    ini = _ini()
    registered = {m.split(":", 1)[0].strip() for m in ini["markers"]}
    assert {"slow", "cluster"} <= registered
    assert "--strict-markers" in ini["addopts"]
    assert int(ini["timeout"]) > 0
    assert "-m" not in ini["addopts"].split()  # the README's `pytest -q tests` runs everything


def test_marked_tests_exist():
    """Fails when a test in conftest's SLOW_TESTS / TIMEOUTS / CLUSTER_FILES was renamed or moved:
    its marker would silently stop applying."""
    for name in conftest.CLUSTER_FILES:
        assert (ROOT / "tests" / name).is_file(), name
    for nodeid in {**conftest.SLOW_TESTS, **conftest.TIMEOUTS}:
        path, _, func = nodeid.partition("::")
        assert (ROOT / path).is_file(), nodeid
        if func:
            tree = ast.parse((ROOT / path).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            assert func in names, f"{nodeid}: no such test in {path}; update the tables in conftest.py"
