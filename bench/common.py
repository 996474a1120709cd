"""Shared bench plumbing: machine/version record, repeats with medians, JSON + markdown output.

Every bench returns a dict `{"name", "rows": [...], "config", ...}`; `write_result` adds the
machine (CPU model, core count, GPU if any), library versions and the command line, then writes
`<out>/<name>.json` and `<out>/<name>.md`. Rows are flat dicts whose `metric`/`value`/`unit`
fields are what docs/PERFORMANCE.md tabulates, so the doc is regenerated from JSON, not retyped.

Timing on a shared 2-core machine is noisy: benches repeat each measurement (`--repeats`) and
report the median with the min and max, never a single best run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

THREADS = 2  # the dev machines have 2 cores shared by several developers; pin for comparability
# Full-tune (paper) on the toy world updates every weight of the new model, so it gets its own stage-2
# lr, chosen on the validation gallery over 1e-4..4e-3 by the rule XBT's lr was chosen by (docs/RESULTS.md,
# "Full-tune (paper): its own lr"); configs/toy_full_tune.yaml holds the same value.
TOY_FULL_TUNE_LR = "1e-3"


def setup_torch(threads: int = THREADS) -> None:
    """Pin intra-op threads (and one inter-op thread) so runs are comparable across benches."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process: harmless
        pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers were measured on; GPU fields are None on CPU-only machines."""
    info = {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "gpu": None, "gpu_count": 0,
            "mem_total_gb": _mem_total_gb(), "load_avg_1m": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    out = {}
    for dist in ("torch", "deepspeed", "ray", "open_clip_torch", "peft", "webdataset", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def median_of(values: list[float]) -> dict:
    """Median with its spread, the summary every timed row reports."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def repeat(fn: Callable[[], float], repeats: int) -> dict:
    """Call `fn` (returns one measurement) `repeats` times; median summary plus raw values."""
    vals = [fn() for _ in range(repeats)]
    return {**median_of(vals), "values": vals}


def peak_rss_mb() -> float:
    """Process high-water mark (KiB on Linux): the memory a job must be given."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


class Timer:
    """Accumulates wall time per named phase; `sync` makes CUDA work count where it ran."""

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        if self.sync:
            torch.cuda.synchronize()  # a sync point: only in the instrumented replica, never in training
        t = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t

    def reset(self) -> None:
        self.totals = {}


def row(bench: str, case: str, metric: str, value, unit: str, **extra) -> dict:
    return {"bench": bench, "case": case, "metric": metric, "value": value, "unit": unit, **extra}


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def rows_markdown(rows: list[dict], command: str | None = None) -> str:
    lines = ["| bench | case | metric | value | unit | spread (min-max, n) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        spread = ""
        if r.get("min") is not None and r.get("n", 1) > 1:
            spread = f"{_fmt(r['min'])}-{_fmt(r['max'])}, n={r['n']}"
        lines.append(f"| {r['bench']} | {r['case']} | {r['metric']} | {_fmt(r['value'])} | "
                     f"{r['unit']} | {spread} |")
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def write_result(out: str | Path, result: dict) -> dict:
    """Stamp machine, versions and command onto `result`; write `<name>.json` and `<name>.md`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": machine_info(), "versions": versions(),
              "command": result.get("command") or "python -m " + " ".join(["bench"] + sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    name = result["name"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    m = result["machine"]
    md = [f"# bench: {name}", "",
          f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), "
          f"GPU: {m['gpu'] or 'none'}; load avg {m['load_avg_1m']:.1f}.",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
          rows_markdown(result["rows"], result["command"])]
    for note in result.get("notes", []):
        md.append(f"- {note}")
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    return result


class LogClock:
    """`WorkerContext.report` sink: wall and process-CPU time at each of the loop's log points.

    On a shared machine wall time swings with other users' load; the process's CPU time
    (`time.process_time`, all threads of this process, not DataLoader worker processes) moves far
    less, so benches report both. The first log window holds warm-up and is dropped.
    """

    def __init__(self):
        self.points: list[tuple[int, float, float]] = []

    def record(self, rec: dict) -> None:
        self.points.append((rec["step"], time.perf_counter(), time.process_time()))

    def rates(self, batch: int) -> dict:
        """Samples/s by wall and by CPU time between the first and the last log point."""
        if len(self.points) < 2:
            return {"wall": None, "cpu": None}
        (s0, w0, c0), (s1, w1, c1) = self.points[0], self.points[-1]
        n = (s1 - s0) * batch
        return {"wall": n / max(w1 - w0, 1e-9), "cpu": n / max(c1 - c0, 1e-9)}


def timed_rate(fn: Callable[[int], object], warmup: int, steps: int, batch: int,
               sync: Callable[[], object] = lambda: None) -> dict:
    """Samples/s of `fn(i)` by wall and by process CPU time after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    sync()
    w, c = time.perf_counter(), time.process_time()
    for i in range(steps):
        fn(warmup + i)
    sync()
    return {"wall": steps * batch / max(time.perf_counter() - w, 1e-9),
            "cpu": steps * batch / max(time.process_time() - c, 1e-9)}


def link_stage1_phi(out_dir: str, phi_dir: str) -> None:
    """A variant trains in its own run dir `out_dir` but reads the shared stage-1 phi: make
    `out_dir/phi` a link to `phi_dir` (kept if it is already there)."""
    link = Path(out_dir) / "phi"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink() and not link.exists():    # a link made before phi was trained dangles until then
        os.symlink(Path(phi_dir).resolve(), link)
