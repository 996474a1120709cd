"""`xbt` command line: one subcommand per pipeline stage, all driven by the same YAML recipes.

    xbt demo                                  toy world -> stage 1 -> stage 2 -> eval (CPU, minutes)
    xbt toy-world --out runs/toy --seed 0     the toy world alone
    xbt embed --config C                      old/new embedding shards the config reads
    xbt pretrain-phi --config C [--resume]    stage 1
    xbt train --config C [--resume]           stage 2 (XBT, or a baseline via train.method)
    xbt eval --config C                       compatibility report
    xbt params --config C                     trainable-parameter report (paper Table 6)
    xbt prep ...  /  xbt submit ...           data preparation / SLURM submission
    xbt index build|eval --config C           old-gallery FAISS indexes (flat, IVF-PQ, HNSW)
    xbt serve --config C                      HTTP search service + web page over the index

Every stage command takes `--set section.key=value` overrides and the distribution flags
(`--workers`, `--use-gpu`, `--zero-stage`, `--ray-address`); more than one worker, or a Ray
address, runs the stage as a Ray Train job with DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from xbt_dist.config import ConfigError, RunConfig, load_config, with_fields


def _stage_args(p: argparse.ArgumentParser, resume: bool = True) -> None:
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides with dotted names, e.g. train.lr=3e-4 dist.workers=2")
    p.add_argument("--workers", type=int, help="Ray Train workers (implies dist.backend=ray if > 1)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--ray-address", help="attach to this Ray cluster and run on Ray (default: $XBT_RAY_ADDRESS; unset: the recipe's dist.ray_address, then $RAY_ADDRESS, else a local Ray)")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")


def _flag_fields(args) -> dict:
    """The distribution flags the user gave, as typed config fields (`dist.workers`: 2, ...)."""
    address = args.ray_address or os.environ.get("XBT_RAY_ADDRESS")
    given = {"dist.workers": args.workers, "dist.use_gpu": True if args.use_gpu else None,
             "dist.zero_stage": args.zero_stage, "dist.ray_address": address or None}
    return {key: value for key, value in given.items() if value is not None}


def _load(args, **fields) -> RunConfig:
    """The recipe with `--set`, then the flags (and a command's own `fields`), all validated.

    More than one worker, a Ray address or GPUs (from a flag or the recipe) run on Ray.
    """
    cfg = load_config(args.config, args.set)
    cfg = with_fields(cfg, {**_flag_fields(args), **fields})
    if cfg.dist.backend != "ray" and (cfg.dist.workers > 1 or cfg.dist.ray_address or cfg.dist.use_gpu):
        cfg = with_fields(cfg, {"dist.backend": "ray"})
    return cfg


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_stage(args) -> int:
    from xbt_dist.pipeline import run_stage
    from xbt_dist.train.loop import PREEMPTED_EXIT, StopRequested, install_stop_handlers
    cfg = _load(args)
    if args.cmd == "pretrain-phi":
        from xbt_dist.train.stage1 import run_stage1 as fn
    else:
        from xbt_dist.train.stage2 import run_stage2 as fn
    install_stop_handlers(cfg.stage_dir("phi" if args.cmd == "pretrain-phi" else "train"))
    try:
        _print(run_stage(fn, cfg, resume=args.resume))
    except StopRequested as e:
        print(f"[xbt] {e}; rerun with --resume", file=sys.stderr)
        return PREEMPTED_EXIT
    return 0


def cmd_embed(args) -> int:
    from xbt_dist.pipeline import embed_for_config
    _print(embed_for_config(_load(args), args.batch_size))
    return 0


def cmd_eval(args) -> int:
    from xbt_dist.eval.evaluate import run_eval
    res = run_eval(_load(args), device="cuda" if args.use_gpu else "cpu", out_dir=args.out, split=args.split)
    _print({"verdict": res["compat"]["verdict"], "report": res["paths"]})
    return 0


def cmd_params(args) -> int:
    from xbt_dist.models.params import format_report, parameter_report
    cfg = _load(args)
    report = parameter_report(cfg.old, cfg.new, cfg.adapters, cfg.phi.hidden, cfg.phi.depth)
    if args.json:
        _print(report)
    else:
        print(format_report(report))
    return 0


def cmd_toy(args) -> int:
    from xbt_dist.toy import ToyWorldConfig, build_toy_world
    _print(build_toy_world(args.out, ToyWorldConfig(seed=args.seed)))
    return 0


def cmd_demo(args) -> int:
    from xbt_dist.pipeline import run_demo
    fields = {"dist.workers": args.workers, "dist.backend": "ray"} if args.workers else {}
    if args.zero_stage is not None:
        fields["dist.zero_stage"] = args.zero_stage
    res = run_demo(args.out, args.seed, args.set, args.config, quick=args.quick, fields=fields)
    print(open(res["paths"]["report_md"]).read())
    v = res["compat"]["verdict"]
    print(f"[demo] backward compatible: {v['compatible']} | timings (s): {res['timings_s']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="xbt", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("pretrain-phi", "stage 1: text-only pretraining of phi"),
                        ("train", "stage 2: XBT training (or a baseline)")):
        p = sub.add_parser(name, help=help_)
        _stage_args(p)
        p.set_defaults(fn=cmd_stage)
    p = sub.add_parser("embed", help="precompute old/new embedding shards named by the config")
    _stage_args(p, resume=False)
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples per encoder forward pass (default %(default)s)")
    p.set_defaults(fn=cmd_embed)
    p = sub.add_parser("eval", help="compatibility report of a trained run")
    _stage_args(p, resume=False)
    p.add_argument("--out", help="report directory (default <out_dir>/eval, or <out_dir>/eval_val)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="gallery: test = eval.eval_shards (reported), val = eval.val_shards (for tuning)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("params", help="trainable parameters per method (paper Table 6)")
    _stage_args(p, resume=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_params)
    p = sub.add_parser(
        "toy-world", help="generate the toy world and train its old/new CLIPs",
        description="Generate the toy world (synthetic image-text, text, eval and zero-shot shard "
                    "sets) and train its small OLD and NEW CLIP models from scratch on CPU. A rerun "
                    "with the same settings reuses what is already built.")
    p.add_argument("--out", default="runs/toy",
                   help="directory for the shard sets, models/ and manifest.json (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the generated data and of both models' training (default %(default)s)")
    p.set_defaults(fn=cmd_toy)
    p = sub.add_parser(
        "demo", help="the whole pipeline on the toy world",
        description="Toy world -> embed -> stage 1 (phi) -> stage 2 (XBT) -> compatibility report, "
                    "on CPU. Each step is skipped when its inputs and settings are unchanged since "
                    "it last finished (a cache.json in the step's directory).")
    p.add_argument("--out", default="runs/demo",
                   help="run directory: the toy world in OUT/toy, embeddings in OUT/emb, the run "
                        "(checkpoints, report) in OUT/run (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="toy world seed (data and base models; default %(default)s); the training "
                        "seeds are the recipe's stage1.seed and train.seed")
    p.add_argument("--config", help="recipe whose paths the demo fills in (default: the shipped "
                                    "configs/toy.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides with dotted names, e.g. train.max_steps=50 stage1.epochs=1")
    p.add_argument("--workers", type=int, default=0,
                   help="run stage 1 and 2 as Ray Train jobs on N workers with DeepSpeed (default 0: "
                        "in this process)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3],
                   help="DeepSpeed ZeRO stage for the Ray workers (default: the recipe's dist.zero_stage)")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run: a world of a few hundred samples, one-epoch base "
                        "models, a few training steps (numbers are not meaningful)")
    p.set_defaults(fn=cmd_demo)
    from xbt_dist.prep.cli import add_prep_parser
    add_prep_parser(sub)
    from xbt_dist.index.cli import add_upgrade_parsers  # xbt index build|eval, xbt serve
    add_upgrade_parsers(sub)
    # Listed for --help; main() hands its arguments to xbt_dist.submit untouched (its own parser
    # splits off the stage arguments after `--`).
    sub.add_parser("submit", add_help=False,
                   help="submit stages or the whole pipeline to SLURM with submitit (xbt submit --help)")
    return ap


def cmd_submit(argv: list[str]) -> int:
    from xbt_dist.submit import main as submit_main  # submitit only when asked for
    return submit_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["submit"]:
        return cmd_submit(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"xbt {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
