"""Experiment trackers: Weights & Biases and MLflow, optional, off by default (`log.*` config).

The training loop's `Progress` hands every log point's record (the progress line's numbers:
loss and its terms, samples/s, lr, ETA) to TensorBoard and to the trackers opened here, under the
same names (`phi/loss`, `train:xbt/samples_per_s`, ...), so the three never disagree (MLflow:
`phi/loss.text_to_old_text` for TensorBoard's `phi/loss/text_to_old_text`, see `metric_name`). Each tracker
also gets the whole run config (W&B `config`, MLflow params plus `config.yaml` as an artifact).

Rank 0 only: `open_trackers` returns nothing on other ranks, so a 32-worker job is one run in the
tracker, not 32. A resumed stage (`--resume`, a Ray restart, a SLURM requeue) continues the same
tracker run: its id is kept in the stage directory (`tracking.json`).

Offline use (tests, air-gapped clusters): `log.wandb_mode: offline` (or WANDB_MODE=offline) writes
the run under `<stage dir>/wandb` for `wandb sync`; MLflow's tracking URI (`log.mlflow_tracking_uri`,
else $MLFLOW_TRACKING_URI) may be a server (`http://...`), a database (`sqlite:///...`, full
`mlflow`) or a directory (`file:///...`; MLflow 3.17 refuses it unless MLFLOW_ALLOW_FILE_STORE=true).
Neither package is a dependency: `pip install xbt_dist[tracking]` (wandb, mlflow-skinny).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from typing import Any

from xbt_dist import storage

TRACKING_FILE = "tracking.json"  # tracker run ids of this stage, so a resume continues the run


def _numbers(metrics: dict) -> dict[str, float]:
    """The finite scalar metrics of a record (trackers take numbers only)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Ids:
    """Tracker run ids stored in the stage dir (read by every resume of this stage)."""

    def __init__(self, stage_dir: str):
        self.path = storage.join(stage_dir, TRACKING_FILE)
        self.ids = json.loads(storage.read_text(self.path)) if storage.exists(self.path) else {}

    def get(self, key: str) -> str | None:
        return self.ids.get(key)

    def put(self, key: str, value: str) -> None:
        self.ids[key] = value
        storage.write_text(self.path, json.dumps(self.ids, indent=2))


class WandbTracker:
    """A W&B run: one per stage, grouped by the run name; resumes by id."""

    def __init__(self, cfg, stage: str, stage_dir: str, config: dict, ids: _Ids, resume: bool):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("log.wandb=true needs the wandb package: pip install wandb "
                              "(or xbt_dist[tracking]); or set log.wandb=false") from e
        lc = cfg.log
        run_id = ids.get("wandb") if resume else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:8]  # W&B run ids: short, [a-z0-9]
            ids.put("wandb", run_id)
        # A local directory for W&B's files (offline runs live there until `wandb sync`).
        wdir = stage_dir if not storage.is_remote(stage_dir) else os.path.join(os.getcwd(), "wandb-runs")
        os.makedirs(wdir, exist_ok=True)
        # console="off": W&B would otherwise replace sys.stdout/stderr to capture the console; in a
        # Ray worker that makes Ray Train's print patch (if a user turns it on) tee every line.
        self.run = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, group=cfg.name,
                              job_type=stage, name=f"{cfg.name}-{stage}", id=run_id, resume="allow",
                              config=config, dir=wdir, mode=lc.wandb_mode, reinit="create_new",
                              settings=wandb.Settings(console="off"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self, summary: dict | None = None) -> None:
        if summary:
            self.run.summary.update(_numbers(summary))
        self.run.finish()


class MlflowTracker:
    """An MLflow run in experiment `log.mlflow_experiment`, through MlflowClient (no global state:
    the active-run stack of `mlflow.start_run` would leak between stages in one process)."""

    def __init__(self, cfg, stage: str, stage_dir: str, config: dict, ids: _Ids, resume: bool):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("log.mlflow=true needs the mlflow package: pip install mlflow-skinny "
                              "(or xbt_dist[tracking]); or set log.mlflow=false") from e
        lc = cfg.log
        # None: MLflow's own choice ($MLFLOW_TRACKING_URI, else its default store)
        self.client = MlflowClient(tracking_uri=lc.mlflow_tracking_uri)
        exp = self.client.get_experiment_by_name(lc.mlflow_experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(lc.mlflow_experiment)
        run_id = ids.get("mlflow") if resume else None
        if run_id is None:
            run = self.client.create_run(exp_id, run_name=f"{cfg.name}-{stage}",
                                         tags={"xbt.stage": stage, "xbt.run": cfg.name})
            run_id = run.info.run_id
            ids.put("mlflow", run_id)
            from mlflow.entities import Param

            # MLflow params are write-once: only a new run gets them (a resumed run has them).
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
                self.client.log_batch(run_id, params=params[i:i + 100])
            import yaml

            self.client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        self.run_id = run_id

    @staticmethod
    def metric_name(key: str) -> str:
        """TensorBoard's name, but `phi/loss/text_to_old_text` -> `phi/loss.text_to_old_text`: MLflow's
        directory store keeps a metric per file, and `phi/loss` is already a file."""
        stage, _, rest = key.partition("/")
        return f"{stage}/{rest.replace('/', '.')}" if rest else key

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self.metric_name(k), v, ts, step)
                                                    for k, v in _numbers(metrics).items()])

    def close(self, summary: dict | None = None) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(cfg, stage: str, stage_dir: str, rank: int, resume: bool = False) -> list:
    """The trackers `cfg.log` turns on, opened on rank 0 (an empty list elsewhere or when off)."""
    if rank != 0 or not (cfg.log.wandb or cfg.log.mlflow):
        return []
    from xbt_dist.config import to_dict

    config = to_dict(cfg)
    ids = _Ids(stage_dir)
    trackers: list = []
    if cfg.log.wandb:
        trackers.append(WandbTracker(cfg, stage, stage_dir, config, ids, resume))
    if cfg.log.mlflow:
        trackers.append(MlflowTracker(cfg, stage, stage_dir, config, ids, resume))
    return trackers
