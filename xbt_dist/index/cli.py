"""CLI of the upgrade's serving side: `xbt index build|eval` and `xbt serve`.

    xbt index build --config C        embed the gallery views once, build flat / IVF-PQ / HNSW indexes
    xbt index eval  --config C        six retrieval cases through each index, next to flat
    xbt serve       --config C        HTTP search service + web page over the old-gallery index
    xbt backfill plan --config C      recall vs partial-backfill budget per ordering, in GPU-hours
    xbt card --config C               compatibility card (card.md + card.json) and the cutover gate

Registered into `xbt` by `add_upgrade_parsers` so the main CLI needs two lines for all of it.
"""

from __future__ import annotations

import argparse
import json


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe of the trained run (configs/*.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. index.types='[flat, hnsw]' serve.port=8000")
    # _load() of the main CLI reads these; the index/serve commands always run in this process.
    p.set_defaults(workers=None, use_gpu=None, zero_stage=None, ray_address=None)


def _load(args, **fields):
    from xbt_dist.cli import _load as load_stage_config
    return load_stage_config(args, **fields)


def cmd_index(args) -> int:
    cfg = _load(args)
    if args.action == "build":
        from xbt_dist.index.build import build_indexes
        m = build_indexes(cfg)
        print(json.dumps({"index_dir": str(cfg.index.dir or cfg.stage_dir("index")),
                          "indexes": {k: {"n": v["n"], "build_s": v["build_s"], "bytes": v["bytes"]}
                                      for k, v in m["indexes"].items()}}, indent=2))
    else:
        from xbt_dist.index.evaluate import evaluate_indexes
        res = evaluate_indexes(cfg)
        print(json.dumps({"verdict": res["verdict"],
                          "report": f"{res['index_dir']}/index_eval.md"}, indent=2))
    return 0


def cmd_serve(args) -> int:
    from xbt_dist.serve.app import serve
    flags = {"serve.host": args.host or None, "serve.port": args.port}
    serve(_load(args, **{key: value for key, value in flags.items() if value is not None}))
    return 0


def cmd_backfill(args) -> int:
    from xbt_dist.index.backfill import plan_backfill
    cfg = _load(args)
    res = plan_backfill(cfg, budgets=args.budgets, gallery_items=args.gallery_items, seed=args.seed,
                        device="cuda" if args.gpu else "cpu", merge=args.merge)
    print(json.dumps({"auc": {p: c["auc"] for p, c in res["policies"].items()},
                      "plot": res["plot"]}, indent=2))
    return 0


def cmd_card(args) -> int:
    from xbt_dist.index.card import write_card
    res = write_card(_load(args))
    print(json.dumps({"cutover": res["card"]["cutover"], **res["paths"]}, indent=2))
    return 0


def add_upgrade_parsers(sub) -> None:
    p = sub.add_parser("index", help="old-gallery FAISS indexes: build, eval")
    p.add_argument("action", choices=["build", "eval"])
    _common(p)
    p.set_defaults(fn=cmd_index)
    p = sub.add_parser("serve", help="HTTP search service over the old-gallery index (+ web page)")
    _common(p)
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default serve.port; 0 picks a free one)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("backfill", help="partial backfill plan: recall vs budget, ordering policies, cost")
    p.add_argument("action", choices=["plan"])
    _common(p)
    p.add_argument("--budgets", type=float, nargs="*", help="fractions re-embedded (default 0, 0.1, ..., 1)")
    p.add_argument("--gallery-items", type=int, help="price budgets for this many items (default: this gallery)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ordering")
    p.add_argument("--gpu", action="store_true", help="measure embedding throughput on the GPU")
    p.add_argument("--merge", choices=["zscore", "raw"], default="zscore",
                   help="how old-space and new-space scores are merged (default zscore: per query and "
                        "space, standardised over a reference sample; raw: cosines as they come)")
    p.set_defaults(fn=cmd_backfill)
    p = sub.add_parser("card", help="compatibility card of a run (card.md + card.json), cutover gate")
    _common(p)
    p.set_defaults(fn=cmd_card)
