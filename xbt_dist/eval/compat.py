"""Backward-compatibility cases and verdict (paper Eqn 1).

Input is a dict of VIEWS of one eval set, each view = {"image": (N, d), "text": (M, d)}:

- `old`: the old model (the gallery the retrieval system already stores),
- `new`: the untouched new model,
- `phi`: phi applied to the untouched new model (stage-1 result: "phi-only"),
- `xbt`: phi applied to the adapted new model (stage-2 result),
- `new_adapters_off` (optional): the adapted model with adapters switched off.

A case "Q/G" retrieves with queries of view Q against the gallery of view G, in both directions:
t2i (Q's text queries vs G's image gallery) and i2t (Q's image queries vs G's text gallery).
Only `old` is required; cases needing a missing view are skipped and listed (e.g. an eval after
stage 1 only has no `xbt` view: the verdict is then `None`, "not evaluated").

`new/old` is the naive "just swap the model" upgrade. When d_new != d_old the new embedding cannot
even be compared, so we do what a drop-in swap into a fixed-width vector index would do: truncate
the new vector to d_old (d_new > d_old) or zero-pad it (d_new < d_old). The recall is then near
chance, which is the point of the case. The case's `note` records what was done.

Verdict per direction: compatible when R@K(xbt/old) >= R@K(old/old) + margin for every K in
`verdict_ks` (default (1, 5)); overall compatible when both directions are. `candidate="phi"`
judges the stage-1 phi instead (phi/old), for the phi-only row of an ablation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch

from xbt_dist.eval.metrics import (DEFAULT_KS, as_embeddings, retrieval_recalls,
                                   zero_shot_accuracy)

VIEW_NAMES = ("old", "new", "phi", "xbt", "new_adapters_off")
# (query view, gallery view), in report order.
CASES: tuple[tuple[str, str], ...] = (
    ("old", "old"), ("new", "old"), ("phi", "old"), ("xbt", "old"), ("new", "new"), ("xbt", "xbt"))
CASE_LABELS = {
    "old/old": "old query vs old gallery (reference)",
    "new/old": "untouched new query vs old gallery (naive swap)",
    "phi/old": "phi(new) query vs old gallery (text-only stage 1)",
    "xbt/old": "XBT query vs old gallery",
    "new/new": "untouched new vs new (backfilled upper bound)",
    "xbt/xbt": "XBT vs XBT (new-to-new after XBT)",
}
# Zero-shot (image view, class-text view) cases: xbt/old classifies new-model images with the
# classifier the old system already holds.
ZERO_SHOT_CASES: tuple[tuple[str, str], ...] = (
    ("old", "old"), ("new", "new"), ("phi", "old"), ("xbt", "old"), ("xbt", "xbt"))


def align_dim(x: torch.Tensor, d: int) -> torch.Tensor:
    """Naive drop-in of a d'-dim embedding into a d-dim index: truncate, or zero-pad on the right.

    Zero padding keeps the norm; truncation changes it, which does not matter because retrieval
    renormalises rows.
    """
    if x.shape[1] == d:
        return x
    if x.shape[1] > d:
        return x[:, :d]
    return torch.nn.functional.pad(x, (0, d - x.shape[1]))


def _view(views: Mapping, name: str) -> dict[str, torch.Tensor]:
    v = views[name]
    missing = {"image", "text"} - set(v)
    if missing:
        raise ValueError(f"view {name!r} lacks {sorted(missing)}: each view needs 'image' (N, d) "
                         "and 'text' (M, d) embeddings of the same eval set")
    img = as_embeddings(v["image"], f"{name}['image']")
    txt = as_embeddings(v["text"], f"{name}['text']")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"view {name!r}: image dim {img.shape[1]} != text dim {txt.shape[1]}")
    return {"image": img, "text": txt}


def _check_views(views: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    unknown = set(views) - set(VIEW_NAMES)
    if unknown:
        raise ValueError(f"unknown views {sorted(unknown)}; known views: {list(VIEW_NAMES)}")
    if "old" not in views:
        raise ValueError(f"view 'old' is required: it is the gallery every case is measured "
                         f"against (got views {sorted(views)})")
    out = {name: _view(views, name) for name in views}
    n_img, n_txt = out["old"]["image"].shape[0], out["old"]["text"].shape[0]
    for name, v in out.items():
        if v["image"].shape[0] != n_img or v["text"].shape[0] != n_txt:
            raise ValueError(f"view {name!r} has {v['image'].shape[0]} images / "
                             f"{v['text'].shape[0]} texts, 'old' has {n_img} / {n_txt}: "
                             "all views must embed the same eval set in the same order")
    return out


def on_off_check(new, new_adapters_off) -> dict:
    """The on-off property: adapters switched off must reproduce the untouched new model exactly."""
    diffs, equal = [], True
    for mod in ("image", "text"):
        a = torch.as_tensor(new[mod])
        b = torch.as_tensor(new_adapters_off[mod])
        if a.shape != b.shape:
            return {"equal": False, "max_abs_diff": float("inf"),
                    "note": f"{mod} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"}
        # Exact equality, not allclose: disabling adapters must be bit-identical, otherwise the
        # "off" model is not the untouched model and its new/new numbers would silently drift.
        equal &= bool(torch.equal(a, b))
        diffs.append(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
    return {"equal": equal, "max_abs_diff": max(diffs)}


class OnOffCheck:
    """`on_off_check` over a stream of batches, so the adapters-off view is never stored.

    `update(new, off)` takes one batch of each modality's embeddings (the same rows of the same
    batch); `result()` equals `on_off_check` of the concatenated batches.
    """

    def __init__(self):
        self.equal, self.max_abs_diff, self.note = True, 0.0, None

    def update(self, new: Mapping, off: Mapping) -> None:
        if self.note is not None:
            return
        r = on_off_check(new, off)
        self.equal &= r["equal"]
        self.max_abs_diff = max(self.max_abs_diff, r["max_abs_diff"])
        if "note" in r:
            self.note = r["note"]

    def result(self) -> dict:
        out = {"equal": self.equal, "max_abs_diff": self.max_abs_diff}
        return {**out, "note": self.note} if self.note else out


def verdict(cases: Mapping, verdict_ks: Sequence[int] = (1, 5), margin: float = 0.0,
            candidate: str = "xbt") -> dict:
    """Eqn-1 verdict from computed cases: per direction, R@K(cand/old) >= R@K(old/old) + margin.

    `compatible` is None (not evaluated) when the candidate case was not computed.
    """
    case = f"{candidate}/old"
    out = {"criterion": f"R@K({case}) >= R@K(old/old) + {margin:g} for K in "
                        f"{list(verdict_ks)}, both directions",
           "case": case, "margin": margin, "ks": list(verdict_ks)}
    if case not in cases:
        return {**out, "compatible": None, "t2i": None, "i2t": None,
                "note": f"not evaluated: no {candidate!r} view was given"}
    for direction in ("t2i", "i2t"):
        per_k = {}
        for k in verdict_ks:
            key = f"R@{k}"
            ref = cases["old/old"][direction][key]
            got = cases[case][direction][key]
            per_k[key] = {case: got, "old/old": ref, "gain": got - ref,
                          "pass": bool(got >= ref + margin)}
        out[direction] = {"compatible": all(v["pass"] for v in per_k.values()), "per_k": per_k}
    out["compatible"] = out["t2i"]["compatible"] and out["i2t"]["compatible"]
    return out


def compatibility_report(views: Mapping, caption_to_image, ks: Sequence[int] = DEFAULT_KS,
                         verdict_ks: Sequence[int] = (1, 5), margin: float = 0.0,
                         chunk_size: int | None = None, candidate: str = "xbt",
                         device: str | torch.device = "cpu", on_off: dict | None = None,
                         log: Callable[[str], None] | None = None) -> dict:
    """All compatibility cases, the verdict and the on-off check, as a JSON-able dict.

    `on_off`: a result computed elsewhere (a streamed `OnOffCheck`), used when `views` has no
    `new_adapters_off`. `log` gets one line per case (and progress lines of long rankings).

    Returns {"eval_set": {...}, "dims": {view: d}, "cases": {"Q/G": {"query", "gallery", "label",
    "t2i": {R@K..}, "i2t": {R@K..}, "note"?}}, "skipped": [...], "verdict": {...},
    "on_off": {...} | None}.
    """
    missing_k = [k for k in verdict_ks if k not in ks]
    if missing_k:
        raise ValueError(f"verdict_ks {missing_k} are not among the computed ks {list(ks)}")
    v = _check_views(views)
    d_old = v["old"]["image"].shape[1]
    cases, skipped = {}, []
    for q, g in CASES:
        name = f"{q}/{g}"
        if q not in v or g not in v:
            skipped.append({"case": name, "reason": f"view {q if q not in v else g!r} not given"})
            continue
        q_img, q_txt = v[q]["image"], v[q]["text"]
        note = None
        d_g = v[g]["image"].shape[1]
        if q_img.shape[1] != d_g:
            how = "truncated" if q_img.shape[1] > d_g else "zero-padded"
            note = (f"{q} embeddings are {q_img.shape[1]}-d, the {g} gallery {d_g}-d: "
                    f"{how} to {d_g} dims (naive drop-in swap)")
            q_img, q_txt = align_dim(q_img, d_g), align_dim(q_txt, d_g)
        t0 = time.perf_counter()
        res = retrieval_recalls(q_img, q_txt, caption_to_image, ks, chunk_size,
                                image_gallery=v[g]["image"], text_gallery=v[g]["text"],
                                device=device, log=log)
        if log is not None:
            log(f"ranked {name}: t2i R@1 {res['t2i']['R@1']:.3f}, i2t R@1 {res['i2t']['R@1']:.3f} "
                f"({time.perf_counter() - t0:.1f} s on {device})")
        cases[name] = {"query": q, "gallery": g, "label": CASE_LABELS[name], **res}
        if note:
            cases[name]["note"] = note
    if "new_adapters_off" in v:
        if "new" not in v:
            on_off = {"equal": False, "max_abs_diff": float("nan"),
                      "note": "new_adapters_off given without the untouched 'new' view"}
        else:
            on_off = on_off_check(views["new"], views["new_adapters_off"])
    return {
        "eval_set": {"n_images": int(v["old"]["image"].shape[0]),
                     "n_captions": int(v["old"]["text"].shape[0])},
        "dims": {name: int(x["image"].shape[1]) for name, x in v.items()},
        "d_old": int(d_old),
        "ks": list(ks),
        "cases": cases,
        "skipped": skipped,
        "verdict": verdict(cases, verdict_ks, margin, candidate),
        "on_off": on_off,
    }


def zero_shot_report(views: Mapping, labels, ks: Sequence[int] = (1, 5),
                     cases: Sequence[tuple[str, str]] = ZERO_SHOT_CASES,
                     chunk_size: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Zero-shot accuracy per (image view / class-text view) case.

    `views[name]` = {"image": (N, d) image embeddings, "classes": (C, d) class text embeddings or
    (C, T, d) prompt-template embeddings}. Cases whose views are missing are skipped; a dim
    mismatch is handled like `new/old` retrieval (truncate / zero-pad, noted).
    Returns {"I/C": {"image_view", "class_view", "top1", "top5", "n_images", "n_classes", "note"?}}.
    """
    out = {}
    for img_view, cls_view in cases:
        if img_view not in views or cls_view not in views:
            continue
        img = as_embeddings(views[img_view]["image"], f"{img_view}['image']")
        cls = torch.as_tensor(views[cls_view]["classes"]).float()
        note = None
        if img.shape[1] != cls.shape[-1]:
            how = "truncated" if img.shape[1] > cls.shape[-1] else "zero-padded"
            note = f"{img_view} images {how} from {img.shape[1]} to {cls.shape[-1]} dims"
            img = align_dim(img, cls.shape[-1])
        res = zero_shot_accuracy(img, cls, labels, ks, chunk_size, device)
        out[f"{img_view}/{cls_view}"] = {"image_view": img_view, "class_view": cls_view, **res}
        if note:
            out[f"{img_view}/{cls_view}"]["note"] = note
    return out
