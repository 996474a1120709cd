"""A/B of the stage-1 embedding stream between two checkouts, interleaved on the same machine.

    git worktree add /tmp/before <old commit>
    python -m bench.ab_stream --before /tmp/before --after . --repeats 5 --out bench/results

Each repeat runs a whole epoch of 32k random 768/512-d rows at batch 512 (the paper phi's input)
in a fresh interpreter per checkout, alternating before/after so load drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SNIPPET = r'''
import sys, time
from bench.world import random_text_embeddings
from xbt_dist.data.stream import SampleStream
src = random_text_embeddings(sys.argv[1], 32768, 768, 512, per_shard=4096)
s = SampleStream(src, mode="embeddings", batch_size=512, fields={"w_new": "text_new", "w_old": "text_old"},
                 shuffle_buffer=4096, drop_last=True)
t = time.perf_counter(); n = 0
for b in s:
    n += len(b["keys"])
print(n / (time.perf_counter() - t))
'''


def rate(root: str, data: str) -> float:
    # The checkout's own bench/world.py writes the shards (same seed: identical data for both).
    env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
    out = subprocess.run([sys.executable, "-c", SNIPPET, data], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--after", default=".")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    data = str(Path(a.out).resolve() / "data" / "ab-stream")
    res = {"before": [], "after": []}
    for _ in range(a.repeats):
        for name in res:
            res[name].append(rate(getattr(a, name), data))
            print(name, round(res[name][-1]), "rows/s", file=sys.stderr, flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    summary = {"rows_per_s": res, "median": med, "speedup": med["after"] / med["before"],
               "before": a.before, "after": a.after}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ab_stream.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"median": med, "speedup": round(summary["speedup"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
