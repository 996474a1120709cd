"""Submit xbt stages, or the whole pipeline as dependent jobs, with submitit.

    xbt submit train configs/toy.yaml --nodes 2 --gpus-per-node 8 -- --set train.steps=1000
    xbt submit pipeline configs/toy.yaml --wait
    xbt submit train configs/toy.yaml --local --wait     # no SLURM on this machine
    xbt submit train configs/paper_b32_l14.yaml --nodes 4 --gpus-per-node 8 \
        --dry-run --cpus-per-node 128     # the sbatch script and the Ray plan; submits nothing

(`python launchers/submit.py ...` is the same command.)

On SLURM each job runs `launchers/ray_on_slurm.sh` (the same Ray-cluster logic as
`sbatch launchers/xbt.slurm`) on whole nodes (`--exclusive --mem=0`, one task per node); with `--local` submitit's local executor runs the stage directly
and the stage starts its own Ray. Requeue: submitit sends SIGUSR2 before the time limit (or on
preemption); `StageJob.checkpoint` forwards SIGUSR1 to the stage, which writes its checkpoint,
and returns a fresh `StageJob` that submitit requeues; it resumes with `--resume`.

The SLURM path needs the shell launchers of a repository checkout (`launchers/ray_on_slurm.sh`
and `ray_step.sh`): they are found through $XBT_HOME, else beside the package (an editable
install); `--local` and `--dry-run` without SLURM need neither.

Python use (what `xbt submit` calls): `submit_stage(...)`, `submit_pipeline(...)`, `main(argv)`.
Defaults come from the environment: XBT_SUBMIT_FOLDER, XBT_PARTITION, XBT_NODES,
XBT_GPUS_PER_NODE, XBT_CPUS_PER_TASK, XBT_TIMEOUT_MIN.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import submitit

PIPELINE = ("embed", "pretrain-phi", "train", "eval")
RESUMABLE = ("pretrain-phi", "train")  # stages that take --resume
CHECKPOINT_WAIT_S = 60  # how long checkpoint() waits for the stage to save and exit


def launcher_dir() -> Path:
    """launchers/ of a repository checkout: $XBT_HOME/launchers, else the one beside the package."""
    home = os.environ.get("XBT_HOME")
    candidates = [Path(home) / "launchers"] if home else []
    candidates.append(Path(__file__).resolve().parent.parent / "launchers")
    for d in candidates:
        if (d / "ray_on_slurm.sh").is_file():
            return d
    raise FileNotFoundError(
        f"launchers/ray_on_slurm.sh not found in {', '.join(str(d) for d in candidates)}: SLURM jobs "
        "start their Ray cluster with the repository's shell launchers; set XBT_HOME to a checkout "
        "of the repository (or submit with --local)")


def _ignore_usr2() -> None:
    # submitit's SIGUSR2 reaches every process of the step; only submitit's handler should act
    # on it. SIG_IGN survives exec, so the stage and everything it starts inherit it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class StageJob(submitit.helpers.Checkpointable):
    """One xbt stage as a submitit job; picklable, requeues itself through `checkpoint`."""

    def __init__(self, stage: str, config: str, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        self.stage = stage
        self.config = str(config)
        self.args = list(args)
        self.env = dict(env or {})
        self._proc: subprocess.Popen | None = None
        self._terminated = False

    def command(self, on_slurm: bool) -> list[str]:
        if on_slurm:  # Ray cluster over the job's nodes, then the stage
            return ["bash", str(launcher_dir() / "ray_on_slurm.sh"), self.stage, self.config, *self.args]
        cmd = self.env.get("XBT_CMD") or os.environ.get("XBT_CMD")
        base = cmd.split() if cmd else ["xbt", self.stage]
        resume = ["--resume"] if self.stage in RESUMABLE else []
        return [*base, "--config", self.config, *resume, *self.args]

    def __call__(self) -> dict:
        job_env = submitit.JobEnvironment()
        if job_env.global_rank != 0:
            # Tasks on the other nodes only hold the allocation; ray_on_slurm.sh starts the
            # Ray workers there itself (srun --overlap).
            return {"stage": self.stage, "rank": job_env.global_rank}
        on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        env = {**os.environ, **self.env, "XBT_SELF_REQUEUE": "0"}  # submitit requeues, not the shell script
        if on_slurm:  # ray_on_slurm.sh finds ray_step.sh (and the checkout's .venv) through it
            env["XBT_HOME"] = str(launcher_dir().parent)
        env.setdefault("XBT_LOG_DIR", str(Path(job_env.paths.folder) / "logs"))

        def on_term(signum, _frame):
            # scancel / scontrol requeue / preemption: SLURM signals the stage itself; note it
            # so a non-zero exit is not reported as the job's final failure.
            self._terminated = True

        signal.signal(signal.SIGTERM, on_term)
        cmd = self.command(on_slurm)
        print(f"xbt submit: running {' '.join(cmd)}", flush=True)
        self._proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_usr2)
        rc = self._proc.wait()
        if rc != 0 and self._terminated:
            # SLURM is taking the job down (and maybe requeueing it); writing a failed result
            # now would end job.result() early. Wait for the kill.
            print(f"xbt submit: stage exited with {rc} after SIGTERM; waiting for SLURM", flush=True)
            time.sleep(600)
        if rc != 0:
            raise RuntimeError(f"xbt {self.stage} exited with status {rc} (command: {' '.join(cmd)}); "
                               f"see the job's stdout/stderr in {job_env.paths.folder}")
        return {"stage": self.stage, "config": self.config, "returncode": rc}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2: make the stage checkpoint, then requeue a fresh copy."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGUSR1)  # ray_on_slurm.sh forwards it to the stage
            try:
                self._proc.wait(timeout=CHECKPOINT_WAIT_S)
            except subprocess.TimeoutExpired:
                print(f"xbt submit: stage did not exit {CHECKPOINT_WAIT_S}s after SIGUSR1", flush=True)
        # A fresh object: the Popen handle does not pickle, and the next run starts clean.
        return submitit.helpers.DelayedSubmission(StageJob(self.stage, self.config, self.args, self.env))


def make_executor(folder: str | Path, *, local: bool = False, name: str = "xbt", nodes: int = 1,
                  gpus_per_node: int = 0, cpus_per_task: int | None = None, timeout_min: int = 240,
                  partition: str | None = None, dependency: str | None = None,
                  slurm_additional: Mapping[str, object] | None = None) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else None)
    params: dict = {"name": name, "timeout_min": timeout_min, "nodes": nodes, "tasks_per_node": 1}
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if executor.cluster == "slurm":
        # Whole nodes, as launchers/*.slurm: Ray advertises every CPU and GPU of each node.
        params["slurm_exclusive"] = True
        extra = {"requeue": True, "mem": "0", **(slurm_additional or {})}
        if dependency:
            extra["dependency"] = dependency
        params["slurm_additional_parameters"] = extra
        params["slurm_signal_delay_s"] = 120  # time for the stage to write its checkpoint
        if partition:
            params["slurm_partition"] = partition
    elif local and nodes > 1:
        raise ValueError(f"--local runs on this machine only; got nodes={nodes}, use nodes=1")
    executor.update_parameters(**params)
    return executor


def submit_stage(stage: str, config: str | Path, args: Sequence[str] = (), *, folder: str | Path,
                 local: bool = False, env: Mapping[str, str] | None = None,
                 **executor_kw) -> submitit.Job:
    """Submit one stage; `executor_kw` go to `make_executor` (nodes, gpus_per_node, ...)."""
    executor = make_executor(folder, local=local, name=f"xbt-{stage}", **executor_kw)
    return executor.submit(StageJob(stage, str(config), args, env))


def submit_pipeline(config: str | Path | Mapping[str, str], args: Sequence[str] = (), *,
                    folder: str | Path, stages: Sequence[str] = PIPELINE, local: bool = False,
                    env: Mapping[str, str] | None = None, **executor_kw) -> list[submitit.Job]:
    """Submit `stages` in order, each starting only after the previous one succeeded.

    `config` is one config for all stages or a mapping stage -> config. On SLURM the order is
    kept by `--dependency=afterok:`; the local executor has no dependencies, so each job is
    awaited before the next is submitted.
    """
    jobs: list[submitit.Job] = []
    for stage in stages:
        cfg = config[stage] if isinstance(config, Mapping) else config
        dep = f"afterok:{jobs[-1].job_id}" if jobs and not local else None
        if jobs and local:
            jobs[-1].result()  # raises if the previous stage failed
        jobs.append(submit_stage(stage, cfg, args, folder=folder, local=local, env=env,
                                 dependency=dep, **executor_kw))
    return jobs


def dry_run(stages: Sequence[str], config: str, args: Sequence[str], *, folder: str, local: bool,
            cpus_per_node: int | None = None, **executor_kw) -> int:
    """Print what would be submitted (submitit's sbatch script) and the Ray plan of each stage."""
    rc = 0
    for stage in stages:
        executor = make_executor(folder, local=local, name=f"xbt-{stage}", **executor_kw)
        print(f"# ---- {stage}: executor {executor.cluster}")
        if executor.cluster == "slurm":
            print(executor._executor._make_submission_file_text(  # what submitit would sbatch
                executor._executor._submitit_command_str, "DRYRUN"))
        job = StageJob(stage, str(config), args)
        on_slurm = executor.cluster == "slurm"
        print(f"# the job runs: {' '.join(job.command(on_slurm))}", flush=True)
        if on_slurm:
            plan = ["bash", str(launcher_dir() / "ray_on_slurm.sh"), "--dry-run",
                    "--nodes", str(executor_kw.get("nodes", 1)),
                    "--gpus-per-node", str(executor_kw.get("gpus_per_node") or 0)]
            if cpus_per_node:
                plan += ["--cpus-per-node", str(cpus_per_node)]
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
            env["XBT_HOME"] = str(launcher_dir().parent)
            rc = max(rc, subprocess.run([*plan, stage, str(config), *args], env=env).returncode)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xbt submit", description="Submit xbt stages with submitit.",
                                epilog="Arguments after -- go to the stage (e.g. -- --set train.steps=10).")
    p.add_argument("stage", choices=[*PIPELINE, "pipeline"])
    p.add_argument("config")
    p.add_argument("--folder", default=os.environ.get("XBT_SUBMIT_FOLDER", "runs/submitit/%j"))
    p.add_argument("--local", action="store_true", help="submitit's local executor (no SLURM)")
    p.add_argument("--nodes", type=int, default=int(os.environ.get("XBT_NODES", "1")))
    p.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("XBT_GPUS_PER_NODE", "0")))
    p.add_argument("--cpus-per-task", type=int, default=int(os.environ.get("XBT_CPUS_PER_TASK", "0")) or None)
    p.add_argument("--timeout-min", type=int, default=int(os.environ.get("XBT_TIMEOUT_MIN", "240")))
    p.add_argument("--partition", default=os.environ.get("XBT_PARTITION"))
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and print the results")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script and the Ray plan (ray_on_slurm.sh --dry-run); submit nothing")
    p.add_argument("--cpus-per-node", type=int,
                   help="with --dry-run: CPUs of one node, for the plan (default: this machine's)")
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, stage_args = argv[:i], argv[i + 1:]
    a = p.parse_args(argv)
    kw = dict(folder=a.folder, local=a.local, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
              cpus_per_task=a.cpus_per_task, timeout_min=a.timeout_min, partition=a.partition)
    if a.dry_run:
        stages = [s for s in PIPELINE if s != "embed"] if a.stage == "pipeline" else [a.stage]
        return dry_run(stages, a.config, stage_args, cpus_per_node=a.cpus_per_node, **kw)
    if a.stage == "pipeline":
        jobs = submit_pipeline(a.config, stage_args, **kw)
    else:
        jobs = [submit_stage(a.stage, a.config, stage_args, **kw)]
    for job in jobs:
        print(f"submitted {job.job_id}: {job.paths.stdout}")
    if a.wait:
        for job in jobs:
            print(job.job_id, job.result())
    return 0


if __name__ == "__main__":
    sys.exit(main())
