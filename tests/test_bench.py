"""The bench entry point runs end to end in a seconds-long config and writes what the docs read.

No timing assertions (the machine is shared): only that the JSON/markdown exist, carry the machine,
versions, config and command, and that every measured number is positive.
"""

from __future__ import annotations

import json

from bench.__main__ import main


def test_stage1_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    # a synthetic world (no toy world at that path), one case, 8 steps of 64: a few seconds
    assert main(["stage1", "--out", str(out), "--toy-root", str(tmp_path / "no-toy"),
                 "--cases", "embeddings/toy", "--repeats", "1", "--steps", "8", "--batch", "64",
                 "--threads", "1"]) == 0
    res = json.loads((out / "stage1.json").read_text())
    assert res["name"] == "stage1"
    for key in ("machine", "versions", "config", "command", "rows", "created"):
        assert key in res
    assert res["machine"]["cpu_cores"] >= 1 and res["machine"]["cpu_model"]
    assert {"torch", "deepspeed", "ray", "open_clip_torch"} <= set(res["versions"])
    assert res["command"].startswith("python -m bench stage1")
    metrics = {r["metric"]: r["value"] for r in res["rows"]}
    for m in ("samples/s (run_stage1)", "samples/s (plain PyTorch loop)",
              "step time ratio framework/plain (wall)", "model FLOPs per sample", "trainable params"):
        assert metrics[m] is not None and metrics[m] > 0, m
    assert metrics["MFU"] is None  # CPU without --peak-tflops: n/a, not a made-up number
    # the phi of the toy shape: 96->512->512->64 plus the temperature
    assert metrics["trainable params"] == 96 * 512 + 512 + 512 * 512 + 512 + 512 * 64 + 64 + 1
    md = (out / "stage1.md").read_text()
    assert "| stage1 | embeddings/toy | samples/s (run_stage1) |" in md
    assert "Command: `python -m bench stage1" in md
    table = (out / "table.md").read_text()
    assert "### stage1" in table and "embeddings/toy" in table


def test_mfu_needs_a_peak():
    from bench.flops import count_flops, mfu
    import torch

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert mfu(1e9, 100.0, None)["mfu"] is None
    assert abs(mfu(1e9, 100.0, 1.0)["mfu"] - 0.1) < 1e-12
