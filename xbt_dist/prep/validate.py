"""`xbt prep validate`: scan a shard set, count samples, find what training would trip over.

Per shard it reads the tar sequentially (as the training stream does), groups members into
samples by webdataset's key rule (basename up to the first dot), and checks each sample:
image present and decodable (full PIL decode by default, since that is what training does),
caption present and non-empty, `cls` an index into `classes.json` for zero-shot sets. A tar that
ends mid-member or lacks the end-of-archive blocks is reported as truncated; the samples before
the cut still count. Output: `sizes.json` with the *good* samples per shard (what a
skip-bad-samples loader yields; used for epoch length and rank splits), and `validate.json` listing
every problem with shard and key.

Cost: dominated by image decode, ~2-5 ms per 256 px JPEG per core; `workers` scans shards in
parallel processes. `decode=False` only parses image headers (~20x faster).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xbt_dist.artifacts import atomic_write_text
from xbt_dist.prep.shardio import IMAGE_EXTS, list_tars, write_sizes

KINDS = ("auto", "image-text", "text", "eval", "zeroshot")
_MANIFEST_KINDS = {"image_text_shards": "image-text", "text_shards": "text",
                   "eval_shards": "eval", "zeroshot_shards": "zeroshot"}
MAX_LISTED_PROBLEMS = 100_000  # problems listed in validate.json; all are counted


@dataclass
class ShardResult:
    shard: str
    samples: int = 0
    good: int = 0
    truncated: bool = False
    problems: list[dict] = field(default_factory=list)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the basename, field = the rest."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _check_image(data: bytes, decode: bool) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if decode:
                im.load()
        return None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        # drop "<_io.BytesIO object at 0x...>" so reports of the same data compare equal
        return re.sub(r" ?<[^>]* at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}")[:200]


def check_sample(key: str, fields: dict[str, bytes], kind: str, decode: bool,
                 n_classes: int | None) -> list[tuple[str, str]]:
    """Problems of one sample as (problem, detail) pairs; empty list = good."""
    problems = []
    if kind != "text":
        img = next((e for e in IMAGE_EXTS if e in fields), None)
        if img is None:
            problems.append(("missing_image", f"no {'/'.join(IMAGE_EXTS)} field; fields: {sorted(fields)}"))
        else:
            err = _check_image(fields[img], decode)
            if err:
                problems.append(("undecodable_image", err))
    if kind != "zeroshot" or "txt" in fields:
        txt = fields.get("txt")
        if txt is None:
            problems.append(("missing_caption", "no txt field"))
        else:
            try:
                if not txt.decode("utf-8").strip():
                    problems.append(("missing_caption", "empty txt"))
            except UnicodeDecodeError as e:
                problems.append(("missing_caption", f"txt is not utf-8: {e}"))
    if kind == "zeroshot":
        try:
            c = int(fields["cls"])
            if n_classes is not None and not 0 <= c < n_classes:
                problems.append(("bad_class", f"cls {c} outside [0, {n_classes})"))
        except (KeyError, ValueError) as e:
            problems.append(("bad_class", f"missing or non-integer cls ({e!r})"))
    if kind == "eval" and "json" in fields:
        try:
            caps = json.loads(fields["json"]).get("captions")
            if not caps:
                problems.append(("missing_caption", "json has no captions"))
        except (ValueError, AttributeError) as e:
            problems.append(("bad_json", str(e)[:200]))
    return problems


def scan_shard(path: str | os.PathLike, kind: str, decode: bool = True,
               n_classes: int | None = None) -> ShardResult:
    path = Path(path)
    res = ShardResult(shard=path.name)
    key, fields = None, {}

    def finish() -> None:
        res.samples += 1
        probs = check_sample(key, fields, kind, decode, n_classes)
        for p, detail in probs:
            res.problems.append({"shard": res.shard, "key": key, "problem": p, "detail": detail})
        res.good += not probs

    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if not ext or member.name.rpartition("/")[2].startswith("._"):
                    continue  # macOS resource forks / extension-less members: the loader ignores them too
                if key is not None and k != key:
                    finish()  # before reading on: the previous sample is whole even if this one is cut
                    fields = {}
                key = k
                data = tf.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut after {len(data)} of {member.size} bytes")
                fields[ext] = data
            end = tf.offset
            size = raw.seek(0, os.SEEK_END)
        if key is not None:
            finish()
        if size - end < 1024:  # a complete tar ends with two zero 512-byte blocks
            res.truncated = True
            res.problems.append({"shard": res.shard, "key": key, "problem": "truncated_tar",
                                 "detail": f"no end-of-archive marker after byte {end} of {size}"})
    except (tarfile.TarError, EOFError, OSError) as e:
        # the sample being read when the tar ended is lost; samples before it were counted
        res.truncated = True
        res.problems.append({"shard": res.shard, "key": key, "problem": "truncated_tar",
                             "detail": f"{type(e).__name__}: {e}"[:200]})
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
    # no manifest: peek at the first members of the first shard
    for tar in list_tars(directory):
        try:
            with tarfile.open(tar, "r|*") as tf:
                for i, m in enumerate(tf):
                    if split_key(m.name)[1] in IMAGE_EXTS:
                        return "image-text"
                    if i > 20:
                        break
            return "text"
        except (tarfile.TarError, OSError):
            continue
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
