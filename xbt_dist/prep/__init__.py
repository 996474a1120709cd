"""Preprocessing stage: from URL lists, caption dumps and eval datasets to the shard
sets of docs/architecture.md (Shard formats), plus `validate` for any shard set.

- `images`: img2dataset on URL lists -> image-text shards + failure report.
- `text`: captions -> normalised, filtered, deduplicated text shards (stage-1 corpus).
- `evalsets`: COCO / Flickr30k (Karpathy JSON), nocaps JSON -> multi-caption eval shards;
  image folders -> zero-shot class shards.
- `validate`: counts, truncated tars, undecodable images, missing captions -> sizes.json.
- `cli`: `add_prep_parser(subparsers)` for `xbt prep ...` (also `python -m xbt_dist.prep`).

Submodules are imported lazily by the CLI, so `import xbt_dist.prep` stays cheap.
"""
