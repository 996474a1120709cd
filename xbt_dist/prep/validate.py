"""`xbt prep validate`: scan a shard set, count samples, find what training would trip over.

It reads each tar with the training reader (`data.shards.iter_raw_samples`: same member grouping,
key rule and truncation handling) and judges each sample with the training stream's rule
(`data.shards.check_sample`), so validation and training cannot disagree about a sample:
`sizes.json` holds the *good* samples per shard, exactly what the skip-bad-samples stream yields
(used for epoch length and rank splits), and `skipped` in `validate.json` equals the
stream's skip counts. Problems: `missing_caption`, `bad_image` (missing or undecodable; the
detail says which), `bad_class` (zero-shot), `bad_json` (eval), and `truncated_tar` for a tar
cut mid-member (the samples before the cut still count) or lacking its end-of-archive blocks.
`validate.json` lists every problem with shard and key.

Cost: dominated by image decode, ~2-5 ms per 256 px JPEG per core; `workers` scans shards in
parallel processes. `decode=False` only parses image headers (~20x faster); then an image that
fails only in a full decode is counted good here but skipped by training.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xbt_dist.artifacts import atomic_write_text
from xbt_dist.data.shards import (IMAGE_EXTS, SAMPLE_KINDS, check_sample, iter_raw_samples,
                                  tar_is_complete, write_sizes)

KINDS = ("auto",) + SAMPLE_KINDS
_MANIFEST_KINDS = {"image_text_shards": "image-text", "text_shards": "text",
                   "eval_shards": "eval", "zeroshot_shards": "zeroshot"}
MAX_LISTED_PROBLEMS = 100_000  # problems listed in validate.json; all are counted


@dataclass
class ShardResult:
    shard: str
    samples: int = 0
    good: int = 0
    truncated: bool = False
    # what the training stream's `skipped` counter says for this shard: the first problem of each
    # bad sample, plus `truncated_shard` when the reader hit a cut
    skipped: dict = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)


def list_tars(directory: str | os.PathLike) -> list[Path]:
    """Sorted `*.tar` files of a shard-set directory (sorted order is the canonical order)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"shard set {d} is not a directory; pass the folder holding the *.tar files")
    return sorted(p for p in d.iterdir() if p.suffix == ".tar" and p.is_file())


def scan_shard(path: str | os.PathLike, kind: str, decode: bool = True,
               n_classes: int | None = None) -> ShardResult:
    """Read one tar as training does and check every sample with training's rule."""
    path = Path(path)
    res = ShardResult(shard=path.name)
    stats: Counter = Counter()
    skips: Counter = Counter()
    key = None
    for sample in iter_raw_samples(str(path), stats):
        key = sample["__key__"]
        res.samples += 1
        verdict = check_sample(sample, kind, decode=decode, n_classes=n_classes, all_problems=True)
        for reason, detail in verdict.problems:
            res.problems.append({"shard": res.shard, "key": key, "problem": reason, "detail": detail})
        if verdict.good:
            res.good += 1
        else:
            skips[verdict.reason] += 1
    if stats["truncated_shard"]:
        skips["truncated_shard"] += stats["truncated_shard"]
        res.truncated = True
        res.problems.append({"shard": res.shard, "key": key, "problem": "truncated_tar",
                             "detail": f"tar is cut or corrupt after key {key}: the rest of the shard "
                                       "is lost (the samples before it count, as in training)"})
    elif not tar_is_complete(str(path)):  # also catches a 0-byte tar (a failed copy)
        res.truncated = True
        res.problems.append({"shard": res.shard, "key": key, "problem": "truncated_tar",
                             "detail": f"no end-of-archive marker after key {key}: the tar was cut "
                                       "between members; samples after the cut are missing"})
    res.skipped = dict(skips)
    return res


def detect_kind(directory: Path) -> str:
    if (directory / "classes.json").is_file():
        return "zeroshot"
    try:
        kind = json.loads((directory / "manifest.json").read_text()).get("kind")
        if kind in _MANIFEST_KINDS:
            return _MANIFEST_KINDS[kind]
    except (OSError, ValueError):
        pass
    # no manifest: peek at the first samples of the first shard
    for tar in list_tars(directory):
        for i, sample in enumerate(iter_raw_samples(str(tar))):
            if any(e in sample for e in IMAGE_EXTS):
                return "image-text"
            if i >= 20:
                break
        return "text"
    return "image-text"


def validate_shards(directory: str | os.PathLike, kind: str = "auto", decode: bool = True,
                    workers: int = 1, write: bool = True) -> dict:
    """Scan every `*.tar` in `directory`; write sizes.json + validate.json there (if `write`)."""
    directory = Path(directory)
    tars = list_tars(directory)
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {directory}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    kind = detect_kind(directory) if kind == "auto" else kind
    n_classes = None
    if kind == "zeroshot" and (directory / "classes.json").is_file():
        n_classes = len(json.loads((directory / "classes.json").read_text())["classes"])
    args = [(t, kind, decode, n_classes) for t in tars]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(scan_shard, *zip(*args)))
    else:
        results = [scan_shard(*a) for a in args]

    problems = [p for r in results for p in r.problems]
    by_kind = Counter(p["problem"] for p in problems)
    report = {
        "directory": str(directory),
        "kind": kind,
        "decode": decode,
        "totals": {"shards": len(results), "samples": sum(r.samples for r in results),
                   "good": sum(r.good for r in results), "problems": len(problems),
                   "truncated_shards": sum(r.truncated for r in results)},
        "problem_counts": dict(by_kind),
        # what the training stream's `skipped` counter will say for one pass over the set
        "skipped": dict(sum((Counter(r.skipped) for r in results), Counter())),
        "shards": {r.shard: {k: v for k, v in asdict(r).items() if k not in ("shard", "problems")}
                   for r in results},
        "problems": problems[:MAX_LISTED_PROBLEMS],
    }
    if write:
        write_sizes(directory, {r.shard: r.good for r in results})
        atomic_write_text(directory / "validate.json", json.dumps(report, indent=1) + "\n")
    return report


def format_validate(report: dict, max_lines: int = 20) -> str:
    t = report["totals"]
    lines = [f"validate {report['directory']} ({report['kind']}): {t['shards']} shards, "
             f"{t['samples']} samples, {t['good']} good, {t['problems']} problems, "
             f"{t['truncated_shards']} truncated shards"]
    lines += [f"  {n:>8}  {p}" for p, n in sorted(report["problem_counts"].items())]
    for p in report["problems"][:max_lines]:
        lines.append(f"  {p['shard']} key={p['key']} {p['problem']}: {p['detail']}")
    if len(report["problems"]) > max_lines:
        lines.append(f"  ... {t['problems'] - max_lines} more in validate.json")
    return "\n".join(lines)
