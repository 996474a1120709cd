"""Experiment trackers (W&B offline, MLflow file store): the progress line's metrics and the config.

A real stage-1 run (tiny models, local backend) with `log.wandb` and `log.mlflow` on: both
trackers hold exactly the loss/lr/samples-per-s of every log point that the stage's history (the
progress line, TensorBoard) has, at the same steps, and the run config. A resumed stage continues
the same tracker run; ranks other than 0 open none; both are off by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xbt_dist.artifacts import read_manifest
from xbt_dist.config import load_config
from xbt_dist.train.tracking import open_trackers

wandb = pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def _cfg(tiny, tmp_path):
    from xbt_dist.pipeline import toy_run_config

    return toy_run_config(tiny, tmp_path, overrides=[
        "phi.hidden=32", "stage1.source=text", "stage1.batch_size=32", "stage1.epochs=2",
        "train.log_every=1", "log.wandb=true", "log.wandb_mode=offline", "log.wandb_project=xbt-test",
        "log.mlflow=true", f"log.mlflow_tracking_uri=file://{tmp_path}/mlruns"])


def _wandb_log_records(path: Path):
    """The protobuf records of a .wandb file: W&B's LevelDB-style log (7-byte file header, then
    32 KiB blocks of chunks: crc32 u32, length u16, type u8 full=1/first=2/middle=3/last=4)."""
    import struct

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a .wandb log"
    pos, block, record = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield record
            record = b""


def _wandb_records(run_dir: Path) -> tuple[list[dict], dict]:
    """History rows and config of an offline W&B run, read from its .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    history, config = [], {}
    for data in _wandb_log_records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind in ("config", "run"):  # the init config travels in the run record
            items = rec.config.update if kind == "config" else rec.run.config.update
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return history, config


def test_trackers_log_the_progress_metrics_and_config(tiny, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from xbt_dist.pipeline import run_stage
    from xbt_dist.train.stage1 import run_stage1

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a directory store otherwise
    cfg = _cfg(tiny, tmp_path)
    run_stage(run_stage1, cfg)
    stage_dir = Path(cfg.stage_dir("phi"))
    history = read_manifest(stage_dir)["history"]
    assert len(history) >= 2
    ids = json.loads((stage_dir / "tracking.json").read_text())

    # MLflow: one run, every log point's numbers under TensorBoard's names, the config as params
    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    for key in ("loss", "lr", "samples_per_s", "loss/text_to_old_text"):
        name = f"phi/{key.replace('/', '.')}"
        got = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], name))
        assert got == [(h["step"], pytest.approx(h[key])) for h in history], key
    run = client.get_run(ids["mlflow"])
    assert run.data.params["stage1.batch_size"] == "32" and run.data.params["name"] == cfg.name
    assert run.info.status == "FINISHED"

    # W&B (offline): the same rows and the config
    (run_dir,) = (stage_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}")
    rows, config = _wandb_records(run_dir)
    rows = [r for r in rows if "phi/loss" in r]
    assert [(r["_step"], r["phi/loss"]) for r in rows] == [(h["step"], pytest.approx(h["loss"])) for h in history]
    assert [r["phi/lr"] for r in rows] == pytest.approx([h["lr"] for h in history])
    assert [r["phi/loss/text_to_old_text"] for r in rows] == pytest.approx([h["loss/text_to_old_text"] for h in history])
    assert config["stage1"]["batch_size"] == 32 and config["phi"]["hidden"] == 32


def test_resume_continues_the_tracker_run_and_only_rank0_logs(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = _cfg(tiny, tmp_path)
    cfg.log.wandb = False  # MLflow alone: the id handling is shared
    stage_dir = str(tmp_path / "stage")
    first = open_trackers(cfg, "phi", stage_dir, rank=0)
    again = open_trackers(cfg, "phi", stage_dir, rank=0, resume=True)
    fresh = open_trackers(cfg, "phi", stage_dir, rank=0, resume=False)
    assert again[0].run_id == first[0].run_id != fresh[0].run_id
    assert open_trackers(cfg, "phi", stage_dir, rank=1) == []
    for t in first + again + fresh:
        t.close()
    assert open_trackers(load_config("configs/toy.yaml"), "phi", stage_dir, rank=0) == []  # off by default
