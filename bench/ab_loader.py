"""A/B of the stage-2 sample stream between two checkouts: epochs and mid-epoch resume.

    git archive <old commit> xbt_dist bench | tar -x -C /tmp/before
    python -m bench.ab_loader --before /tmp/before --after . --repeats 3 --out bench/results

Data: 14 image-text shards x 300 samples of 48 px JPEGs (14 shards: not a multiple of the
2 x 2 slots, so the old stream reads every shard in every worker and filters by index).
Cases, each in a fresh interpreter per checkout, before/after alternating so load drift hits both:
  * epochs: rank 0 of world size 2, 2 DataLoader workers, 3 whole epochs of batch 64 with a
    random-crop transform: samples/s including each epoch's start (worker start, buffer fill);
  * resume: one process (num_workers=0) stops at 80 % of an epoch, saves `state_dict()`, and a
    new stream loads it: seconds to its first batch and MB the process read from disk for it
    (/proc/self/io rchar; the old stream replays the consumed samples, the new one seeks).
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
from torchvision import transforms as T
from xbt_dist.data.stream import SampleStream
src, case = sys.argv[1], sys.argv[2]
tf = T.Compose([T.RandomResizedCrop(32), T.ToTensor()])

def rchar():
    return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])

if case == "epochs":
    s = SampleStream(src, batch_size=64, transform=tf, num_workers=2, shuffle_buffer=256,
                     drop_last=True, rank=0, world_size=2)
    t, n = time.perf_counter(), 0
    for _ in range(3):
        for b in s:
            n += len(b["keys"])
    print(n / (time.perf_counter() - t))
else:
    kw = dict(batch_size=64, transform=tf, num_workers=0, shuffle_buffer=256, drop_last=True)
    s = SampleStream(src, **kw)
    it = iter(s)
    for _ in range(int(0.8 * 14 * 300 / 64)):
        next(it)
    state = s.state_dict()
    del it, s
    r0, t = rchar(), time.perf_counter()
    s2 = SampleStream(src, **kw)
    s2.load_state_dict(state)
    next(iter(s2))
    print(time.perf_counter() - t, (rchar() - r0) / 2 ** 20)
'''


def run(root: str, data: str, case: str) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
    out = subprocess.run([sys.executable, "-c", SNIPPET, data, case], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()[-2 if case == "resume" else -1:]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", default=".")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    out = Path(a.out)
    data = out / "data" / "ab-loader"
    if not data.is_dir():
        from xbt_testing.synthetic import write_image_text_shards
        write_image_text_shards(data, n_shards=14, per_shard=300, image_size=48, sizes=True)
    res: dict = {side: {"epochs": [], "resume_s": [], "resume_mb": []} for side in ("before", "after")}
    for _ in range(a.repeats):
        for side, root in (("before", a.before), ("after", a.after)):
            res[side]["epochs"] += run(root, str(data.resolve()), "epochs")
            sec, mb = run(root, str(data.resolve()), "resume")
            res[side]["resume_s"].append(sec)
            res[side]["resume_mb"].append(mb)

    def med(v):
        return sorted(v)[len(v) // 2]

    rows = [("epochs: samples/s (rank 0 of 2, 2 workers, 3 epochs)", "epochs"),
            ("resume at 80 %: seconds to first batch", "resume_s"),
            ("resume at 80 %: MB read to first batch", "resume_mb")]
    md = ["| case | before | after | after/before |", "|---|---|---|---|"]
    for name, k in rows:
        b, f = med(res["before"][k]), med(res["after"][k])
        md.append(f"| {name} | {b:.3g} | {f:.3g} | {f / b:.2f}x |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_loader.json").write_text(json.dumps({"values": res, "repeats": a.repeats,
                                                    "before": a.before, "after": a.after}, indent=1))
    (out / "ab_loader.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
