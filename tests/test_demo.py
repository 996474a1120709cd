"""The README's first command, `xbt demo`, in its quick form: toy world -> embed -> stage 1 ->
stage 2 -> eval from a directory that is not the repository (the recipe must come from the
package), ending with the six retrieval cases, the on-off check and the verdict on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CASES = ("old/old", "new/old", "phi/old", "xbt/old", "new/new", "xbt/xbt")


def test_quick_demo_runs_the_whole_pipeline_from_any_directory(tmp_path):
    xbt = Path(sys.executable).parent / "xbt"
    proc = subprocess.run([str(xbt), "demo", "--quick", "--out", "demo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[demo] backward compatible:" in proc.stdout + proc.stderr
    run = tmp_path / "demo" / "run"
    compat = json.loads((run / "eval" / "eval.json").read_text())["compat"]
    assert set(CASES) <= set(compat["cases"])
    for case in CASES:
        for d in ("t2i", "i2t"):
            assert 0.0 <= compat["cases"][case][d]["R@1"] <= compat["cases"][case][d]["R@5"] <= 1.0
    assert compat["on_off"]["equal"] is True  # adapters off == the untouched new model
    assert isinstance(compat["verdict"]["compatible"], bool)
    for artefact in ("phi", "train"):
        assert (run / artefact).is_dir()
    report = (run / "eval" / "report.md").read_text()
    assert "`xbt/old`" in report and "Backward compatible" in report
