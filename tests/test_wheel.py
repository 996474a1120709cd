"""The package runs from a wheel: recipes ship as package data, `xbt submit` is a module.

The wheel is built from a copy of the package (not the checkout, so nothing is written into the
source tree) and installed into a throwaway directory; the commands then run from another
directory with only that install on PYTHONPATH (dependencies from this venv). An editable install
or the repository's configs/ next to the cwd would hide a missing recipe or a path that reaches
outside the package, so both are kept out of sight.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    # symlinks=True: xbt_dist/configs stays the symlink to ../configs it is in the repository,
    # so the test sees what the wheel build makes of it.
    shutil.copytree(ROOT / "xbt_dist", src / "xbt_dist", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", src / "configs")
    shutil.copytree(ROOT / "xbt_testing", src / "xbt_testing", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, timeout=300)
    wheel = next((tmp / "dist").glob("xbt_dist-*.whl"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("XBT_HOME", None)
    return {"wheel": wheel, "site": site, "cwd": elsewhere, "env": env}


def _run(installed, *cmd) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=installed["cwd"], env=installed["env"], capture_output=True,
                          text=True, timeout=120)


def test_wheel_packs_recipes_and_submit_module(installed):
    """Fails when the recipes are not package data (the symlink not followed, package-data
    dropped) or when test machinery (xbt_testing, tests/) ends up in the wheel."""
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = {f"xbt_dist/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "xbt_dist/submit.py" in names
    # the hf_blip architecture configs `xbt params` counts from (paper_blip_base_large.yaml)
    arch = {f"xbt_dist/models/hf_configs/{p.name}" for p in (ROOT / "xbt_dist/models/hf_configs").glob("*.json")}
    assert len(arch) == 2 and arch <= names, sorted(arch - names)
    assert not [n for n in names if n.startswith(("tests/", "launchers/", "bench/", "xbt_testing/"))]


def test_installed_wheel_loads_toy_recipe(installed):
    """Fails when the installed package finds its recipes outside itself (the checkout's
    configs/) or cannot resolve `configs/toy.yaml` from another directory."""
    code = ("import xbt_dist, xbt_dist.pipeline as p\n"
            "from xbt_dist.config import load_config\n"
            "print(xbt_dist.__file__)\n"
            "cfg = load_config(p.CONFIG_DIR / 'toy.yaml')\n"
            "assert load_config('configs/toy.yaml') == cfg\n"
            "print(p.CONFIG_DIR.resolve(), cfg.train.method)\n")
    proc = _run(installed, sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    module_file, recipe_line = proc.stdout.splitlines()[:2]
    site = str(installed["site"].resolve())
    assert Path(module_file).resolve().is_relative_to(site), module_file  # not the checkout
    assert recipe_line.startswith(site), recipe_line


@pytest.mark.parametrize("sub, expect", [("submit", "--gpus-per-node"), ("demo", "--quick")])
def test_installed_wheel_runs_xbt_help(installed, sub, expect):
    """Fails when `xbt submit` / `xbt demo` need the repository (submit loaded by file path from
    launchers/, say): the installed console script runs them from elsewhere."""
    proc = _run(installed, str(installed["site"] / "bin" / "xbt"), sub, "--help")
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
