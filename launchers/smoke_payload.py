"""A stand-in stage for checking launchers and clusters without training anything.

It takes the same arguments as an `xbt` stage (`--config`, `--ray-address`, `--resume`,
`--workers`, `--use-gpu`, `--set key=value`) and behaves like one where the launch layer can
see it: it joins the Ray cluster and checks that every node of the SLURM job is in it, runs
a Ray task on each node, counts steps into a checkpoint file, resumes from that file, and on
SIGUSR1/SIGTERM saves and exits with status 3. Use it to try a new cluster:

    XBT_CMD="python launchers/smoke_payload.py" sbatch launchers/xbt.slurm smoke.json

The config is a JSON file: {"out": DIR, "steps": 5, "step_s": 0.2, "use_ray": true,
"ray_every_step": false}. With ray_every_step every step, and the checkpoint after a stop signal,
runs a Ray task on every node: the run only checkpoints if the Ray cluster outlived the signal
(as the real stage needs its Ray workers to write theirs).
Writes into DIR: ckpt.json (step counter + running value), runs.log (one line per start),
ray.json (what the Ray cluster looked like), stops.log (one line per stop: signal, step, whether
Ray still answered), result.json (final value).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

EXIT_CHECKPOINTED = 3


def step_value(acc: int, step: int) -> int:
    """The 'training': an order-dependent running value, so a skipped or repeated step shows."""
    return (acc * 31 + step + 7) % 1_000_003


def expected_result(steps: int) -> int:
    acc = 0
    for step in range(steps):
        acc = step_value(acc, step)
    return acc


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def check_ray(address: str | None, out: Path, keep: bool = False):
    """Join the cluster, run a task on each node; with keep, return a callable that does it again."""
    import ray

    ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
    want = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) != want:
        raise SystemExit(f"smoke_payload: Ray cluster has {len(nodes)} nodes, the job has {want}")

    @ray.remote(num_cpus=0)
    def where(x: int) -> tuple[str, int]:
        import socket

        return socket.gethostname(), x * x

    # One task pinned to each node: proves every node runs work, not just that it registered.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def on_every_node(timeout: float = 120) -> list:
        refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(i)
                for i, n in enumerate(nodes)]
        return ray.get(refs, timeout=timeout)

    results = on_every_node()
    _write_json(out / "ray.json", {"nodes": len(nodes), "address": address,
                                   "tasks": [list(r) for r in results]})
    if keep:
        return on_every_node
    ray.shutdown()
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    cfg = {"steps": 5, "step_s": 0.2, "use_ray": True, "ray_every_step": False}
    cfg.update(json.loads(Path(args.config).read_text()))
    for item in args.set:
        key, _, value = item.partition("=")
        cfg[key] = json.loads(value)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    ckpt = out / "ckpt.json"
    state = {"step": 0, "acc": 0}
    if args.resume and ckpt.exists():
        state = json.loads(ckpt.read_text())
    with open(out / "runs.log", "a") as f:
        f.write(json.dumps({"start_step": state["step"], "job": os.environ.get("SLURM_JOB_ID"),
                            "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
                            "workers": args.workers, "use_gpu": args.use_gpu}) + "\n")

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ray_round = None
    if cfg["use_ray"]:
        ray_round = check_ray(args.ray_address, out, keep=cfg["ray_every_step"])
    # Again after ray.init: it installs a C-level SIGTERM handler that kills the driver (xbt's
    # run_on_ray re-arms its stop handlers after connecting the same way).
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    while state["step"] < cfg["steps"]:
        if stop["signal"]:
            ray_ok = None
            if ray_round is not None:  # the checkpoint needs the Ray cluster, as the real one does
                ray_ok = len(ray_round(timeout=20)) > 0
            with open(out / "stops.log", "a") as f:
                f.write(json.dumps({"signal": stop["signal"], "step": state["step"], "ray_ok": ray_ok}) + "\n")
            _write_json(ckpt, state)
            print(f"smoke_payload: {stop['signal']} at step {state['step']}: checkpointed", flush=True)
            return EXIT_CHECKPOINTED
        time.sleep(cfg["step_s"])
        if ray_round is not None:
            ray_round()
        state = {"step": state["step"] + 1, "acc": step_value(state["acc"], state["step"])}
        _write_json(ckpt, state)
    _write_json(out / "result.json", {"acc": state["acc"], "steps": state["step"]})
    print(f"smoke_payload: done, {state['step']} steps, acc={state['acc']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
