"""`python -m bench <name> --out DIR`: run one benchmark (or all) and write JSON + markdown.

    python -m bench all --out bench/results          # every row of docs/PERFORMANCE.md (~10 min, 2 CPUs)
    python -m bench stage1 --out DIR [--cases embeddings/paper] [--repeats 3]
    python -m bench stage2 --out DIR [--cases toy/xbt paper/xbt paper/base]
    python -m bench data --out DIR
    python -m bench scaling --out DIR [--stage stage2] [--workers 1 2]
    python -m bench report --out DIR                 # rebuild DIR/table.md from the JSONs there

Common flags: `--device cuda` to measure on a GPU, `--peak-tflops X` to turn achieved FLOP/s into
MFU (known GPUs are looked up automatically), `--toy-root PATH` for another toy world, `--threads`.
The ablation bench (`python -m bench.ablation`) and the text-corpus bench have their own entry points.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import rows_markdown, setup_torch, write_result

BENCHES = ("stage1", "stage2", "data", "scaling")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=BENCHES + ("all", "report"))
    p.add_argument("--out", default="bench/results", help="output directory for <name>.json/.md")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (median reported)")
    p.add_argument("--cases", nargs="*", default=None, help="subset of cases (stage1/stage2)")
    p.add_argument("--steps", type=int, default=None, help="steps per stage-1/scaling run")
    p.add_argument("--batch", type=int, default=None, help="stage-1 global batch / data bench batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--toy-root", default=None, help="toy world dir (default runs/toy-seed0)")
    p.add_argument("--stage", default="stage1", choices=("stage1", "stage2"), help="scaling: which stage")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="scaling: worker counts")
    p.add_argument("--paper-repeats", type=int, default=1, help="stage2: repeats of the ViT-L-14 cases")
    p.add_argument("--samples", type=int, default=None, help="data: samples per measurement")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--flush-denormal", action="store_true",
                   help="stage2: torch.set_flush_denormal(True) in each run (the proposed CPU fix)")
    return p


def _kw(**kw):
    return {k: v for k, v in kw.items() if v is not None}


def run_bench(name: str, a: argparse.Namespace) -> dict:
    out = Path(a.out)
    if name == "stage1":
        from bench.stage1 import bench_stage1
        res = bench_stage1(out, cases=a.cases, device=a.device, peak_tflops=a.peak_tflops,
                           **_kw(repeats=a.repeats, steps=a.steps, batch=a.batch, toy_root=a.toy_root))
    elif name == "stage2":
        from bench.stage2 import bench_stage2
        res = bench_stage2(out, cases=a.cases, device=a.device, peak_tflops=a.peak_tflops,
                           paper_repeats=a.paper_repeats, flush_denormal=a.flush_denormal,
                           threads=a.threads,
                           **_kw(repeats=a.repeats, toy_root=a.toy_root))
    elif name == "data":
        from bench.data import bench_data
        res = bench_data(out, **_kw(repeats=a.repeats, samples=a.samples, batch=a.batch,
                                    toy_root=a.toy_root))
    else:
        from bench.scaling import bench_scaling
        res = bench_scaling(out, stage=a.stage, workers=tuple(a.workers),
                            **_kw(repeats=a.repeats, steps=a.steps, toy_root=a.toy_root))
    res["command"] = _command(name, a)
    if a.cases:
        res = _carry_other_cases(out, res)
    return write_result(out, res)


def _carry_other_cases(out: Path, res: dict) -> dict:
    """A `--cases` subset rerun keeps the earlier rows of the cases it did not run, labelled with
    when they were measured, so one case can be remeasured without losing the others."""
    prev_file = out / f"{res['name']}.json"
    if not prev_file.is_file():
        return res
    prev = json.loads(prev_file.read_text())
    ran = {r["case"] for r in res["rows"]}
    kept = [r for r in prev["rows"] if r["case"] not in ran and r["case"].split(": ")[0] not in ran]
    if not kept:
        return res
    cases = sorted({r["case"] for r in kept})
    note = (f"rows of {', '.join(cases)} are carried over from `{prev['command']}` of {prev['created']} "
            f"(load avg {prev['machine']['load_avg_1m']:.1f}); the other rows are from this run")
    return {**res, "rows": res["rows"] + kept, "notes": [*res.get("notes", []), note],
            "carried": {"from": prev["created"], "cases": cases}}


def _command(name: str, a: argparse.Namespace) -> str:
    return "python -m bench " + " ".join([name] + sys.argv[2:]) if sys.argv[1:2] == [name] else \
        f"python -m bench {name} --out {a.out}"


def build_table(out: Path) -> str:
    """One markdown table of every bench JSON in `out`, each block with its command."""
    parts = []
    for name in ("stage1", "stage2", "stage2_flush_denormal", "data", "scaling", "scaling_stage2"):
        f = out / f"{name}.json"
        if f.is_file():
            res = json.loads(f.read_text())
            m = res["machine"]
            parts.append(f"### {name}\n\nMeasured {res['created']} on {m['cpu_model']} x{m['cpu_cores']}"
                         f" (GPU: {m['gpu'] or 'none'}, load avg {m['load_avg_1m']:.1f}).\n\n"
                         + rows_markdown(res["rows"], res["command"]))
    table = "\n".join(parts)
    (out / "table.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    setup_torch(a.threads)
    if a.name == "report":
        print(build_table(Path(a.out)))
        return 0
    names = BENCHES if a.name == "all" else (a.name,)
    for name in names:
        t = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        res = run_bench(name, a)
        print(f"[bench] {name}: {len(res['rows'])} rows in {time.perf_counter() - t:.0f}s -> "
              f"{a.out}/{res['name']}.json", file=sys.stderr, flush=True)
    build_table(Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
