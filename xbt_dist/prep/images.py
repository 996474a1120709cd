"""Image-text shards from URL lists with img2dataset, plus a report of what failed and why.

`download_images(cfg)` checks the URL list (format, url/caption columns) before starting, runs
`img2dataset.download(..., output_format="webdataset")`, then reads img2dataset's per-shard
`NNNNN_stats.json` (counts, error messages) and `NNNNN.parquet` (one row per URL with status and
error_message) into `report.json`, and writes `sizes.json` (successes per tar: the samples the
tars really hold) and `manifest.json`. Its output is the contract's image-text shard set.

LAION-scale settings (see docs/data.md): one img2dataset *process* handles one shard at a time
with `thread_count` download threads; throughput is bound by DNS/network, so processes ~ cores and
threads 64-128 each. `incremental_mode="incremental"` skips shards whose `_stats.json` exists, so
rerunning the same command resumes a killed download. Distributors: `multiprocessing` (one node),
`pyspark` or `ray` (many nodes; the cluster must be running and the output folder shared).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from xbt_dist.artifacts import atomic_write_text, write_manifest
from xbt_dist.data.shards import write_sizes

INPUT_FORMATS = ("parquet", "csv", "tsv", "txt", "csv.gz", "tsv.gz", "txt.gz", "json", "jsonl")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
INCREMENTAL_MODES = ("incremental", "overwrite", "extend")
MAX_LISTED_FAILURES = 1000  # failures listed by URL in report.json; all are counted


@dataclass
class ImagesConfig:
    """img2dataset settings exposed by `xbt prep images` (field names follow img2dataset)."""

    url_list: str  # file or folder of parquet/csv/tsv/txt URL lists
    output_folder: str
    input_format: str | None = None  # None = from the file suffix(es)
    url_col: str = "url"  # LAION parquet: "URL"
    caption_col: str | None = "caption"  # LAION parquet: "TEXT"; None = no captions
    save_additional_columns: list[str] | None = None  # e.g. ["similarity", "LICENSE"], kept in json
    image_size: int = 256  # target side for resize_mode
    resize_mode: str = "keep_ratio"  # keep aspect: open_clip's transform crops later
    resize_only_if_bigger: bool = True  # never upscale small images (wasted bytes, blur)
    encode_format: str = "jpg"
    encode_quality: int = 95
    skip_reencode: bool = False  # keep the original bytes when no resize was needed
    disable_all_reencoding: bool = False  # store downloaded bytes as-is (fastest; no resize)
    min_image_size: int = 0
    max_aspect_ratio: float | None = None  # None = no limit
    processes_count: int = 1  # ~ CPU cores of the node
    thread_count: int = 32  # download threads per process; 64-128 at LAION scale
    number_sample_per_shard: int = 10000  # ~10k samples ~ 150-500 MB tars
    timeout: int = 10  # seconds per URL
    retries: int = 0  # LAION URLs that fail once mostly fail again; retries cost time
    incremental_mode: str = "incremental"  # resume: skip shards already finished
    distributor: str = "multiprocessing"
    subjob_size: int = 1000  # shards per pyspark/ray subjob
    compute_hash: str | None = "sha256"
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] | None = None  # None = img2dataset default (honour noai)

    def __post_init__(self) -> None:
        for name, allowed in (("resize_mode", RESIZE_MODES), ("distributor", DISTRIBUTORS),
                              ("incremental_mode", INCREMENTAL_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format={self.input_format!r} is not one of {INPUT_FORMATS}")
        for name in ("image_size", "processes_count", "thread_count", "number_sample_per_shard", "timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# Named recipes: start from these and override single flags (img2dataset's published LAION runs).
PRESETS: dict[str, dict] = {
    "test": dict(processes_count=1, thread_count=4, number_sample_per_shard=100, timeout=2,
                 compute_hash=None),
    "laion400m": dict(url_col="URL", caption_col="TEXT", processes_count=16, thread_count=128,
                      image_size=256, resize_mode="border", resize_only_if_bigger=False,
                      save_additional_columns=["NSFW", "similarity", "LICENSE"]),
    "laion2b": dict(url_col="URL", caption_col="TEXT", processes_count=16, thread_count=64,
                    image_size=384, resize_mode="keep_ratio", resize_only_if_bigger=True,
                    skip_reencode=True, distributor="pyspark",
                    save_additional_columns=["similarity", "hash", "punsafe", "pwatermark", "LICENSE"]),
}


def detect_input_format(url_list: str) -> str:
    p = Path(url_list)
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    for f in files:
        for fmt in sorted(INPUT_FORMATS, key=len, reverse=True):  # "csv.gz" before "csv"
            if f.name.endswith("." + fmt):
                return fmt
    raise ValueError(f"cannot tell the format of {url_list} from its file names; pass --input-format "
                     f"(one of {INPUT_FORMATS})")


def _check_columns(cfg: ImagesConfig, fmt: str) -> None:
    """Fail before img2dataset starts worker processes when the url/caption columns are absent."""
    p = Path(cfg.url_list)
    first = p if p.is_file() else next((q for q in sorted(p.iterdir()) if q.name.endswith(fmt)), None)
    if first is None:
        raise FileNotFoundError(f"no *.{fmt} URL lists in {cfg.url_list}")
    if fmt == "parquet":
        import pyarrow.parquet as pq
        names = pq.ParquetFile(first).schema_arrow.names
    elif fmt in ("csv", "tsv"):
        with open(first, encoding="utf-8") as f:
            names = f.readline().rstrip("\r\n").split("," if fmt == "csv" else "\t")
    else:
        return  # txt has no columns; compressed/json lists are checked by img2dataset itself
    wanted = [("url_col", cfg.url_col)] + ([("caption_col", cfg.caption_col)] if cfg.caption_col else [])
    for field_name, col in wanted:
        if col not in names:
            flag = "--" + field_name.replace("_", "-")
            raise ValueError(f"{first}: column {col!r} ({field_name}) not found; columns are {names}; "
                             f"pass {flag} NAME (LAION parquets use --url-col URL --caption-col TEXT)")


def summarize_stats(output_folder: str | os.PathLike, max_listed: int = MAX_LISTED_FAILURES) -> dict:
    """Aggregate img2dataset's `*_stats.json` and per-shard parquet into one report dict."""
    out = Path(output_folder)
    totals = Counter()
    errors = Counter()
    per_shard: dict[str, dict] = {}
    for stats_file in sorted(out.glob("*_stats.json")):
        shard = stats_file.name[: -len("_stats.json")]
        s = json.loads(stats_file.read_text())
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(s.get(k, 0))
        for msg, n in s.get("status_dict", {}).items():
            if msg != "success":
                errors[msg] += int(n)
        per_shard[shard + ".tar"] = {k: s.get(k, 0) for k in
                                     ("count", "successes", "failed_to_download", "failed_to_resize")}
    failures = []
    n_failures = totals["failed_to_download"] + totals["failed_to_resize"]
    if n_failures:
        import pyarrow.parquet as pq
        for pq_file in sorted(out.glob("*.parquet")):
            cols = [c for c in ("key", "url", "status", "error_message")
                    if c in pq.ParquetFile(pq_file).schema_arrow.names]
            for row in pq.read_table(pq_file, columns=cols).to_pylist():
                if row.get("status") != "success" and len(failures) < max_listed:
                    failures.append({"shard": pq_file.stem + ".tar", **row})
    return {
        "totals": dict(totals),
        "success_rate": round(totals["successes"] / totals["count"], 4) if totals["count"] else 0.0,
        "errors": dict(errors.most_common()),
        "per_shard": per_shard,
        "failures": failures,
        "failures_listed": len(failures),
        "failures_total": n_failures,
    }


def format_report(report: dict) -> str:
    t = report["totals"]
    lines = [f"img2dataset: {t.get('successes', 0)}/{t.get('count', 0)} URLs downloaded "
             f"({100 * report['success_rate']:.1f}%), {t.get('failed_to_download', 0)} failed to download, "
             f"{t.get('failed_to_resize', 0)} failed to decode/resize, {len(report['per_shard'])} shards"]
    for msg, n in list(report["errors"].items())[:10]:
        lines.append(f"  {n:>8}  {msg}")
    return "\n".join(lines)


def download_images(cfg: ImagesConfig, run: bool = True) -> dict:
    """Run img2dataset (unless run=False: only summarise an existing folder) and write the report,
    sizes.json and manifest.json into `cfg.output_folder`. Returns the report dict."""
    if cfg.input_format or run or Path(cfg.url_list).exists():
        fmt = cfg.input_format or detect_input_format(cfg.url_list)
    else:
        fmt = None  # summarising a copied output folder without its URL list
    if run:
        if not Path(cfg.url_list).exists():
            raise FileNotFoundError(f"URL list {cfg.url_list} does not exist")
        _check_columns(cfg, fmt)
        # albumentations (imported by img2dataset) otherwise asks PyPI for updates on import,
        # which hangs for seconds on offline cluster nodes
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        import img2dataset  # heavy import (albumentations, cv2); only when actually downloading

        kwargs = dataclasses.asdict(cfg)
        kwargs.update(input_format=fmt, output_format="webdataset", enable_wandb=False)
        if kwargs["max_aspect_ratio"] is None:
            kwargs["max_aspect_ratio"] = float("inf")
        if kwargs["disallowed_header_directives"] is None:
            del kwargs["disallowed_header_directives"]
        img2dataset.download(**kwargs)
    report = summarize_stats(cfg.output_folder)
    if not report["per_shard"]:
        raise RuntimeError(f"no *_stats.json in {cfg.output_folder}: img2dataset wrote no shard "
                           "(empty URL list, or every worker crashed; see its log above)")
    atomic_write_text(Path(cfg.output_folder) / "report.json", json.dumps(report, indent=1) + "\n")
    sizes = {name: int(s["successes"]) for name, s in report["per_shard"].items()
             if (Path(cfg.output_folder) / name).is_file()}
    write_sizes(cfg.output_folder, sizes)
    write_manifest(cfg.output_folder, "image_text_shards",
                   config={**dataclasses.asdict(cfg), "input_format": fmt},
                   inputs={"url_list": str(cfg.url_list)},
                   counts={**report["totals"], "errors": report["errors"], "per_shard": sizes},
                   tool="img2dataset")
    return report
