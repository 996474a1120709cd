"""`xbt card`: the compatibility card of a trained run, `card.md` + `card.json`, the evidence that
travels with the vectors and gates the cutover.

It collects what earlier steps measured, never recomputes: identities (models and checkpoint
digests, adapters and phi digests, the old model the index was built from), training data and
counts (stage-2 manifest), exact-search recalls with 95% Wilson intervals and the Eqn-1 verdict
(`xbt eval`), the on-off check, per-index recalls, ANN recall, verdicts and negative flip rates
(`xbt index eval`), the backfill curve's AUC and prices (`xbt backfill plan`), and the rollback
recipe. Missing steps are listed, not guessed.

Gate: `cutover` is "go" only when the exact verdict AND the verdict on the served index type are
compatible, adapters-off reproduces the untouched new model, and the index was built from the old
model the run was trained against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from xbt_dist.artifacts import atomic_write_text, read_manifest
from xbt_dist.config import RunConfig
from xbt_dist.index.build import index_dir
from xbt_dist.index.identity import describe, file_sha256, model_identity, same_model


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion p over n queries (captions of one image are not
    independent, so for multi-caption t2i this is on the narrow side)."""
    if not n:
        return [float("nan"), float("nan")]
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def build_card(cfg: RunConfig) -> dict:
    from xbt_dist.serve.service import trained_old_identity
    from xbt_dist.train.stage1 import PHI_FILE
    from xbt_dist.train.stage2 import ADAPTERS_FILE
    out, missing = Path(cfg.out_dir), []
    adapters = Path(cfg.stage_dir("train")) / ADAPTERS_FILE
    phi = Path(cfg.stage_dir("phi")) / PHI_FILE
    card = {"run": cfg.name, "out_dir": cfg.out_dir,
            "identities": {"old": model_identity(cfg.old), "new": model_identity(cfg.new),
                           "trained_against_old": trained_old_identity(cfg),
                           "adapters_sha256": file_sha256(adapters) if adapters.is_file() else None,
                           "phi_sha256": file_sha256(phi) if phi.is_file() else None}}
    try:
        m = read_manifest(cfg.stage_dir("train"))
        card["training"] = {"method": m.get("result", {}).get("method"), "inputs": m.get("inputs"),
                            "counts": m.get("counts"),
                            "trainable_params": m.get("result", {}).get("trainable_params"),
                            "wall_s": m.get("result", {}).get("wall_s")}
    except FileNotFoundError:
        missing.append("xbt train")
    ev = _json(Path(cfg.stage_dir("eval")) / "eval.json")
    if ev:
        compat = ev["compat"]
        card["exact"] = {"verdict": compat.get("verdict"), "on_off": compat.get("on_off"), "cases": {
            case: {d: {k: {"value": v, "ci95": wilson(v, r[d].get("n_queries", 0))}
                       for k, v in r[d].items() if k.startswith("R@")} for d in ("t2i", "i2t")}
            for case, r in compat["cases"].items()}}
    else:
        missing.append("xbt eval")
    ie = _json(index_dir(cfg) / "index_eval.json")
    served = cfg.serve.index_type
    if ie:
        imf = read_manifest(index_dir(cfg))
        card["index"] = {"served_type": served, "old_model": imf.get("old_model"),
                         "matches_run": same_model(imf.get("old_model") or {}, trained_old_identity(cfg)),
                         "verdict": ie["verdict"], "negative_flip_rate@1": ie.get("negative_flip_rate@1"),
                         "xbt/old": {k: v for k, v in ie["cases"].get("xbt/old", {}).items()},
                         "old/old": {k: v for k, v in ie["cases"].get("old/old", {}).items()}}
    else:
        missing.append("xbt index eval")
    bf = _json(out / "backfill" / "backfill.json")
    if bf:
        card["backfill"] = {"auc": {p: c["auc"] for p, c in bf["policies"].items()},
                            "merge": bf.get("merge", "raw"),
                            "cost": bf["cost"], "priced_items": bf["gallery_items_priced"],
                            "throughput": bf["throughput"]}
    else:
        missing.append("xbt backfill plan")
    card["rollback"] = ("Switch the adapters off: the adapted model with adapters disabled is the untouched "
                        f"new model {describe(card['identities']['new'])} (checked bit for bit by `xbt eval`, "
                        "on_off). Keep serving the old index with the old model until the new index is "
                        "complete; revert the query encoder to the old model to undo the cutover.")
    card["cutover"] = cutover_gate(card, served, missing)
    return card


def cutover_gate(card: dict, served: str, missing: list[str]) -> dict:
    """"go" only with every check passed and no step missing; otherwise the reasons."""
    reasons = []
    if not (card.get("exact", {}).get("verdict") or {}).get("compatible"):
        reasons.append("exact-search verdict not compatible (or not evaluated)")
    if not ((card.get("index", {}).get("verdict") or {}).get(served) or {}).get("compatible"):
        reasons.append(f"verdict on the served {served} index not compatible (or not evaluated)")
    on_off = (card.get("exact") or {}).get("on_off")
    if on_off is not None and not on_off.get("equal"):
        reasons.append("adapters off does not reproduce the untouched new model")
    if card.get("index") and not card["index"]["matches_run"]:
        reasons.append("index built from another old model than the run was trained against")
    return {"decision": "go" if not reasons and not missing else "no-go",
            "reasons": reasons, "missing_steps": list(missing)}


def format_card(card: dict) -> str:
    ids = card["identities"]
    lines = [f"# Compatibility card: {card['run']}\n",
             f"**Cutover: {card['cutover']['decision'].upper()}**"
             + "".join(f"\n- {r}" for r in card["cutover"]["reasons"])
             + "".join(f"\n- missing step: `{s}`" for s in card["cutover"]["missing_steps"]) + "\n",
             "## Identities\n",
             f"- old model: {describe(ids['old'])}; trained against: {describe(ids['trained_against_old'])}",
             f"- new model: {describe(ids['new'])}",
             f"- adapters.pt sha256: `{ids['adapters_sha256']}`; phi.pt sha256: `{ids['phi_sha256']}`"]
    if "training" in card:
        t = card["training"]
        lines.append(f"- training: {t['method']}, {t['counts']}, inputs {t['inputs']}")
    if "exact" in card:
        lines += ["\n## Exact search (xbt eval), 95% Wilson intervals\n",
                  "| case | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 |", "|---|---|---|---|---|"]
        for case, r in card["exact"]["cases"].items():
            cells = [f"{r[d][k]['value']:.3f} [{r[d][k]['ci95'][0]:.3f}, {r[d][k]['ci95'][1]:.3f}]"
                     if k in r[d] else "-" for d in ("t2i", "i2t") for k in ("R@1", "R@5")]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        v, oo = card["exact"]["verdict"] or {}, card["exact"]["on_off"] or {}
        lines.append(f"\nVerdict ({v.get('criterion')}): compatible = {v.get('compatible')} "
                     f"(t2i {(v.get('t2i') or {}).get('compatible')}, i2t {(v.get('i2t') or {}).get('compatible')}); "
                     f"adapters off == untouched new model: {oo.get('equal')}")
    if "index" in card:
        ix = card["index"]
        lines += [f"\n## Index (served: {ix['served_type']})\n",
                  f"- built from old model {describe(ix['old_model'] or {})}; matches run: {ix['matches_run']}",
                  "- verdict per index type: " + ", ".join(f"{k}: {v.get('compatible')}" for k, v in ix["verdict"].items()),
                  f"- negative flip rate @1: {ix['negative_flip_rate@1']}"]
    if "backfill" in card:
        b = card["backfill"]
        auc = "; ".join(f"{p}: " + ", ".join(f"{k} {v:.3f}" for k, v in a.items()) for p, a in b["auc"].items())
        lines += ["\n## Partial backfill\n", f"- AUC per policy (scores merged by `{b.get('merge', 'raw')}`): {auc}",
                  f"- priced for {b['priced_items']:,} items at {b['throughput']['items_per_s']:.1f} items/s "
                  f"({b['throughput']['device']}): 100% = {b['cost'][-1]['device_hours']:.3g} device-hours"]
    lines += ["\n## Rollback\n", card["rollback"], ""]
    return "\n".join(lines)


def write_card(cfg: RunConfig) -> dict:
    card = build_card(cfg)
    out = Path(cfg.out_dir) / "card"
    atomic_write_text(out / "card.json", json.dumps(card, indent=2, default=str) + "\n")
    atomic_write_text(out / "card.md", format_card(card))
    return {"card": card, "paths": {"json": str(out / "card.json"), "md": str(out / "card.md")}}
