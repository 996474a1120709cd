"""Ablation table: merge several `eval.json` results (methods x seeds) into one markdown table.

Rows are methods; runs with the same method name (different seeds) are averaged and shown as
`mean ± std (n=..)`. Columns: t2i/i2t R@1/R@5 of the compatibility case (default `xbt/old`), the
new-to-new case (`xbt/xbt` t2i R@1), and the verdict (how many runs passed). The `old/old` reference
row is taken from the first result so the reader sees the bar every method must clear.

    python -m xbt_dist.eval.ablation runs/*/eval.json --out ablation.md
    python -m xbt_dist.eval.ablation "XBT=runs/a/eval.json" "phi-only=runs/b/eval.json"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from xbt_dist.eval.report import md_table

DEFAULT_COLUMNS: tuple[tuple[str, str, str], ...] = (   # (case, direction, metric)
    ("xbt/old", "t2i", "R@1"), ("xbt/old", "t2i", "R@5"),
    ("xbt/old", "i2t", "R@1"), ("xbt/old", "i2t", "R@5"),
    ("xbt/xbt", "t2i", "R@1"),
)


def load_result(path: str | os.PathLike) -> dict:
    """One eval.json (as written by report.write_report), or a run dir holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: pass eval.json files or the dirs that hold them")
    res = json.loads(p.read_text())
    if "compat" not in res:
        raise ValueError(f"{p} is not an xbt_dist eval.json (no 'compat' key)")
    return res


def method_name(result: Mapping, path: str | os.PathLike | None = None) -> str:
    """Row name: meta.method, else the run dir's name."""
    name = result.get("meta", {}).get("method")
    if name:
        return str(name)
    if path is not None:
        p = Path(path)
        return (p.parent if p.name == "eval.json" else p).name
    return "?"


def _value(result: Mapping, case: str, direction: str, metric: str):
    c = result["compat"]["cases"].get(case)
    if c is None:
        return None
    v = c[direction].get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _cell(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def ablation_table(results: Iterable[tuple[str, Mapping]],
                   columns: Sequence[tuple[str, str, str]] = DEFAULT_COLUMNS,
                   reference: bool = True) -> str:
    """Markdown table from (method name, eval result) pairs; same-name results are merged."""
    grouped: dict[str, list[Mapping]] = {}
    for name, res in results:
        grouped.setdefault(name, []).append(res)
    if not grouped:
        raise ValueError("ablation_table: no results given")
    header = (["method", "runs"] + [f"{c} {d} {m}" for c, d, m in columns]
              + ["compatible"])
    rows = []
    if reference:
        first = next(iter(grouped.values()))[0]
        # old/old under each xbt/old column: the bar that column must clear (Eqn 1)
        rows.append(["old/old (reference)", "-"]
                    + [_cell([_value(first, "old/old", d, m)]) if c == "xbt/old" else "-"
                       for c, d, m in columns] + ["-"])
    for name, runs in grouped.items():
        judged = [r["compat"]["verdict"].get("compatible") for r in runs]
        judged = [j for j in judged if j is not None]     # None: no candidate view in that run
        passed = sum(bool(j) for j in judged)
        verdict = ("n/a" if not judged else "yes" if passed == len(judged)
                   else "no" if passed == 0 else f"{passed}/{len(judged)}")
        rows.append([name, str(len(runs))]
                    + [_cell([_value(r, c, d, m) for r in runs]) for c, d, m in columns]
                    + [verdict])
    return md_table(header, rows)


def ablation_from_paths(paths: Sequence[str], columns=DEFAULT_COLUMNS,
                        reference: bool = True) -> str:
    """Paths are `eval.json` / run dirs, optionally prefixed `NAME=` to set the row name."""
    pairs = []
    for spec in paths:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        res = load_result(path)
        pairs.append((name or method_name(res, path), res))
    return ablation_table(pairs, columns, reference)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="eval.json files or run dirs, optionally NAME=PATH")
    ap.add_argument("--out", help="write the table here (default: stdout)")
    args = ap.parse_args(argv)
    table = ablation_from_paths(args.results)
    if args.out:
        Path(args.out).write_text(table + "\n")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
