"""`xbt prep {images,text,evalset,zeroshot,validate}`: argparse registration and handlers.

`add_prep_parser(subparsers)` adds the `prep` command to the main `xbt` parser; each handler is
set as `func` and takes the parsed namespace, returning an exit code. The heavy imports
(img2dataset, PIL, pyarrow) happen inside the handlers, so `xbt --help` stays fast.
`python -m xbt_dist.prep ...` runs the same parser standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields


def _images(args: argparse.Namespace) -> int:
    from xbt_dist.prep.images import PRESETS, ImagesConfig, download_images, format_report

    values = dict(PRESETS.get(args.preset, {}))
    # explicit flags win over the preset; unset flags are None and fall back to preset/defaults
    for f in fields(ImagesConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    if args.no_caption:
        values["caption_col"] = None
    cfg = ImagesConfig(url_list=args.url_list, output_folder=args.output_folder,
                       **{k: v for k, v in values.items() if k not in ("url_list", "output_folder")})
    report = download_images(cfg, run=not args.summarize_only)
    print(format_report(report))
    print(f"report: {cfg.output_folder}/report.json; next: xbt prep validate {cfg.output_folder}")
    return 0


def _text(args: argparse.Namespace) -> int:
    from xbt_dist.prep.text import TextCorpusConfig, build_text_corpus

    cfg = TextCorpusConfig(min_chars=args.min_chars, max_chars=args.max_chars,
                           texts_per_shard=args.texts_per_shard, caption_col=args.caption_col,
                           dedup=not args.no_dedup)
    counts = build_text_corpus(args.inputs, args.out, cfg)
    print(f"[prep text] read {counts.read:,}, too short {counts.too_short:,}, too long "
          f"{counts.too_long:,}, duplicates {counts.duplicates:,}, written {counts.written:,} "
          f"in {counts.shards} shards -> {args.out}")
    return 0


def _evalset(args: argparse.Namespace) -> int:
    from xbt_dist.prep.evalsets import build_retrieval_set

    split = None if args.split == "all" else args.split
    counts = build_retrieval_set(args.annotations, args.image_root, args.out, fmt=args.format,
                                 split=split, samples_per_shard=args.samples_per_shard)
    print(f"[prep evalset] {json.dumps(counts)} -> {args.out}")
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from xbt_dist.prep.evalsets import build_zeroshot_set

    counts = build_zeroshot_set(args.image_root, args.out, class_names=args.class_names,
                                templates=args.templates, mapping=args.mapping,
                                samples_per_shard=args.samples_per_shard)
    print(f"[prep zeroshot] {json.dumps(counts)} -> {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from xbt_dist.prep.validate import format_validate, validate_shards

    report = validate_shards(args.directory, kind=args.kind, decode=not args.no_decode,
                             workers=args.workers, write=not args.dry_run)
    print(format_validate(report))
    if args.strict and report["totals"]["problems"]:
        print(f"--strict: {report['totals']['problems']} problems", file=sys.stderr)
        return 1
    return 0


def _add_images(sub) -> None:
    from xbt_dist.prep.images import DISTRIBUTORS, INCREMENTAL_MODES, INPUT_FORMATS, PRESETS, RESIZE_MODES

    p = sub.add_parser("images", help="download URL lists into image-text shards with img2dataset",
                       description="Run img2dataset (webdataset output) and write report.json, sizes.json, "
                                   "manifest.json. Unset flags come from --preset, then the defaults.")
    p.add_argument("url_list", help="parquet/csv/tsv/txt file or folder of them")
    p.add_argument("output_folder")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named settings (laion400m, laion2b, test)")
    p.add_argument("--input-format", dest="input_format", choices=INPUT_FORMATS)
    p.add_argument("--url-col", dest="url_col", help="default url (LAION: URL)")
    p.add_argument("--caption-col", dest="caption_col", help="default caption (LAION: TEXT)")
    p.add_argument("--no-caption", action="store_true", help="URL list has no captions")
    p.add_argument("--save-additional-columns", dest="save_additional_columns", nargs="+")
    p.add_argument("--image-size", dest="image_size", type=int, help="default 256")
    p.add_argument("--resize-mode", dest="resize_mode", choices=RESIZE_MODES, help="default keep_ratio")
    p.add_argument("--resize-only-if-bigger", dest="resize_only_if_bigger",
                   action=argparse.BooleanOptionalAction)
    p.add_argument("--encode-format", dest="encode_format", choices=("jpg", "png", "webp"))
    p.add_argument("--encode-quality", dest="encode_quality", type=int)
    p.add_argument("--skip-reencode", dest="skip_reencode", action=argparse.BooleanOptionalAction)
    p.add_argument("--disable-all-reencoding", dest="disable_all_reencoding",
                   action=argparse.BooleanOptionalAction)
    p.add_argument("--min-image-size", dest="min_image_size", type=int)
    p.add_argument("--max-aspect-ratio", dest="max_aspect_ratio", type=float)
    p.add_argument("--processes-count", dest="processes_count", type=int, help="~ CPU cores; default 1")
    p.add_argument("--thread-count", dest="thread_count", type=int, help="per process; LAION 64-128")
    p.add_argument("--number-sample-per-shard", dest="number_sample_per_shard", type=int,
                   help="default 10000")
    p.add_argument("--timeout", type=int, help="seconds per URL, default 10")
    p.add_argument("--retries", type=int, help="default 0")
    p.add_argument("--incremental-mode", dest="incremental_mode", choices=INCREMENTAL_MODES,
                   help="incremental (default) resumes a killed run")
    p.add_argument("--distributor", choices=DISTRIBUTORS, help="default multiprocessing")
    p.add_argument("--subjob-size", dest="subjob_size", type=int)
    p.add_argument("--compute-hash", dest="compute_hash", choices=("md5", "sha256", "sha512"))
    p.add_argument("--user-agent-token", dest="user_agent_token")
    p.add_argument("--summarize-only", action="store_true",
                   help="do not download; rebuild report/sizes/manifest from an existing output folder")
    p.set_defaults(func=_images, fn=_images)  # `fn`: what xbt_dist.cli dispatches on


def add_prep_parser(subparsers) -> argparse.ArgumentParser:
    """Register `prep` and its sub-subcommands on an argparse subparsers object."""
    prep = subparsers.add_parser("prep", help="data preparation: shards, text corpora, eval sets, validation",
                                 description="Data preparation (see docs/data.md).")
    _fill_prep_parser(prep)
    return prep


def _fill_prep_parser(prep: argparse.ArgumentParser) -> None:
    sub = prep.add_subparsers(dest="prep_command", required=True, metavar="{images,text,evalset,zeroshot,validate}")
    _add_images(sub)

    p = sub.add_parser("text", help="stage-1 text corpus: normalise, filter, dedup, shard")
    p.add_argument("inputs", nargs="+", help=".parquet / .txt / .tar files, folders or globs")
    p.add_argument("--out", required=True)
    p.add_argument("--min-chars", type=int, default=5)
    p.add_argument("--max-chars", type=int, default=1000)
    p.add_argument("--texts-per-shard", type=int, default=100_000)
    p.add_argument("--caption-col", default=None, help="parquet column (default: caption, TEXT, text)")
    p.add_argument("--no-dedup", action="store_true")
    p.set_defaults(func=_text, fn=_text)  # `fn`: what xbt_dist.cli dispatches on

    p = sub.add_parser("evalset", help="COCO/Flickr30k (Karpathy JSON) or nocaps -> multi-caption eval shards")
    p.add_argument("annotations", help="dataset_coco.json, dataset_flickr30k.json or nocaps JSON")
    p.add_argument("--format", choices=("coco", "flickr30k", "nocaps"), required=True)
    p.add_argument("--image-root", required=True, help="folder holding the images")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test", help="Karpathy split: test (default), val, train, all")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.set_defaults(func=_evalset, fn=_evalset)  # `fn`: what xbt_dist.cli dispatches on

    p = sub.add_parser("zeroshot", help="image folder + class names + templates -> zero-shot shards")
    p.add_argument("image_root", help="one subfolder per class, or the root of --mapping paths")
    p.add_argument("--out", required=True)
    p.add_argument("--mapping", help="CSV path,class (class = name or index)")
    p.add_argument("--class-names", help="file: one name per line or JSON list, in class order")
    p.add_argument("--templates", help="file: one template with {} per line, or JSON list")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.set_defaults(func=_zeroshot, fn=_zeroshot)  # `fn`: what xbt_dist.cli dispatches on

    p = sub.add_parser("validate", help="scan a shard set; write sizes.json and validate.json")
    p.add_argument("directory")
    p.add_argument("--kind", default="auto", choices=("auto", "image-text", "text", "eval", "zeroshot"))
    p.add_argument("--no-decode", action="store_true", help="check image headers only (fast)")
    p.add_argument("--workers", type=int, default=1, help="shards scanned in parallel processes")
    p.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    p.add_argument("--strict", action="store_true", help="exit 1 if any problem is found")
    p.set_defaults(func=_validate, fn=_validate)  # `fn`: what xbt_dist.cli dispatches on


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m xbt_dist.prep`); input errors print one line, exit 2."""
    parser = argparse.ArgumentParser(prog="xbt prep", description="Data preparation (see docs/data.md).")
    _fill_prep_parser(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"xbt prep {args.prep_command}: error: {e}", file=sys.stderr)
        return 2
