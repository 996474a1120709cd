"""Stage-1 data stream at scale: TextEmbeddingStream on the npz and npy layouts.

    nice -n 10 python -m bench.stage1_stream --out bench/results --rows 2000000 --repeats 3

Data: a `--rows` set of random (text_new 768-d, text_old 512-d) float16 rows, the paper's phi
input, in shards of 100k rows (the paper corpus is 67M rows, 670 such shards), written once in the
old npz layout and converted to the npy layout (`convert_to_npy`). Each variant reads one whole
epoch at batch 512 in a fresh interpreter (so peak RSS is the variant's own), the variants
alternating within each repeat so machine load drifts hit all alike:

  * `TextEmbeddingStream`, npz set (its members memory-mapped in place), workers=0;
  * `TextEmbeddingStream`, npy set, workers=0, and workers=1 (batches through a DataLoader worker).

Reported per variant: rows/s over the epoch after the first batch (median over repeats), rows per
CPU-second of the process and its DataLoader workers (the number that survives a loaded machine),
seconds to the first batch, peak RSS of the process tree and RSS at 10 points through the epoch (flat
memory = the last point near the first).

The "before" row of docs/PERFORMANCE.md (`SampleStream(mode="embeddings")`, which loaded a shard
whole, permuted it and converted each batch to fp32 on the host) was measured by this bench up to
commit 1f7d9c4; that mode had no user left and was removed, and so was its variant here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SNIPPET = r'''
import json, os, resource, sys, time
from pathlib import Path
variant, src, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])

def rss_mb(pid=None):
    """RSS of this process plus its children (DataLoader workers), from /proc."""
    pids, total = [pid or os.getpid()], 0.0
    while pids:
        p = pids.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS"):
                    total += int(line.split()[1]) / 1024
            for t in os.listdir(f"/proc/{p}/task"):
                pids += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            pass
    return total

t0 = time.perf_counter()
fields = {"w_new": "text_new", "w_old": "text_old"}
from xbt_dist.data.text_stream import TextEmbeddingStream
s = TextEmbeddingStream(src, batch_size=batch, fields=fields, drop_last=True,
                        num_workers=int(variant.split("w")[-1]))
n_total = s.n_rows if hasattr(s, "n_rows") else sum(__import__("xbt_dist.data.embeddings",
          fromlist=["x"]).EmbeddingShardSet(src).counts().values())
it = iter(s)
first = next(it)
t_first = time.perf_counter() - t0
n, t, marks, peak = 0, time.perf_counter(), [], rss_mb()
cpu0 = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
           for f in ("ru_utime", "ru_stime"))
every = max(1, n_total // batch // 10)
for i, b in enumerate(it):
    n += b["w_new"].shape[0]
    if i % every == 0:
        r = rss_mb()
        marks.append(round(r))
        peak = max(peak, r)
dt = time.perf_counter() - t
del it  # DataLoader workers exit and are reaped: their CPU time lands in RUSAGE_CHILDREN
cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
          for f in ("ru_utime", "ru_stime")) - cpu0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of the bench process that
# generated the sets (GBs) would report the parent's peak as its own
peak = max(peak, next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
print(json.dumps({"rows_per_s": n / dt, "rows_per_cpu_s": n / max(cpu, 1e-9), "rows": n + len(first["w_new"]), "first_batch_s": t_first,
                  "peak_rss_mb": peak, "rss_marks_mb": marks, "dtype": str(first["w_new"].dtype)}))
'''

VARIANTS = {"tes-npz-w0": "TextEmbeddingStream, npz set (memory-mapped members), workers=0",
            "tes-npy-w0": "TextEmbeddingStream, npy set, workers=0",
            "tes-npy-w1": "TextEmbeddingStream, npy set, workers=1"}


def make_sets(root: Path, rows: int, d_new: int = 768, d_old: int = 512, per_shard: int = 100_000
              ) -> tuple[str, str]:
    from xbt_dist.data.embeddings import convert_to_npy, write_embedding_manifest, write_embedding_shard

    npz, npy = root / f"npz-{rows}", root / f"npy-{rows}"
    if not (npz / "manifest.json").is_file():
        rng = np.random.default_rng(0)
        # one random block, rolled per shard: drawing 2.6G normals took longer than the bench, and
        # the stream's cost does not depend on the values (fp16 rows are copied, never looked at)
        base = {"text_new": rng.standard_normal((per_shard, d_new), dtype=np.float32),
                "text_old": rng.standard_normal((per_shard, d_old), dtype=np.float32)}
        for s, start in enumerate(range(0, rows, per_shard)):
            m = min(per_shard, rows - start)
            write_embedding_shard(npz, f"text-{s:06d}", [f"{start + i:012d}" for i in range(m)],
                                  {f: np.roll(x, s, axis=0)[:m] for f, x in base.items()}, layout="npz")
        write_embedding_manifest(npz, source="random", models={"old": "random", "new": "random"})
    if not (npy / "manifest.json").is_file():
        convert_to_npy(npz, npy)
    return str(npz), str(npy)


def run_variant(variant: str, src: str, batch: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SNIPPET, variant, src, str(batch)], cwd=root, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--data", default=None, help="where the sets are written (default OUT/data)")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    a = p.parse_args(argv)
    from bench.common import median_of, row, write_result

    data = Path(a.data or Path(a.out) / "data")
    t = time.perf_counter()
    npz, npy = make_sets(data, a.rows)
    print(f"sets ready in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in a.variants}
    for r in range(a.repeats):
        for v in a.variants:
            res = run_variant(v, npz if "npz" in v else npy, a.batch)
            runs[v].append(res)
            print(r, v, {k: (round(x) if isinstance(x, float) else x) for k, x in res.items()},
                  file=sys.stderr, flush=True)
    rows = []
    for v, rs in runs.items():
        for key, metric, unit in (("rows_per_s", "rows/s", "rows/s (target >= 1M)"),
                                  ("rows_per_cpu_s", "rows per CPU-second (process + workers)", "rows/CPU-s"),
                                  ("first_batch_s", "time to first batch", "s"),
                                  ("peak_rss_mb", "peak RSS (process + workers)", "MB")):
            if not all(key in x for x in rs):
                continue
            m = median_of([x[key] for x in rs])
            rows.append(row("stage1_stream", VARIANTS[v], metric, m["median"], unit,
                            min=m["min"], max=m["max"], n=m["n"]))
    result = {"name": "stage1_stream", "rows": rows,
              "details": {"runs": runs, "sets": {"npz": npz, "npy": npy}},
              "config": {"rows": a.rows, "batch": a.batch, "repeats": a.repeats, "d_new": 768,
                         "d_old": 512, "per_shard": 100_000},
              "command": "python -m bench.stage1_stream " + " ".join(argv or sys.argv[1:]),
              "notes": ["one whole epoch per variant and repeat, each in a fresh interpreter "
                        "(OMP_NUM_THREADS=1), variants alternating; rows/s after the first batch.",
                        "RSS marks (MB, 10 points through the epoch) are in the JSON details.",
                        "TextEmbeddingStream batches are fp16 (converted on the device by stage 1's "
                        "step)."]}
    write_result(a.out, result)
    print(json.dumps({r["case"] + " | " + r["metric"]: r["value"] for r in rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
