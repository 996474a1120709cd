"""Statistics for compatibility claims: spread over seeds, paired bootstrap intervals, flip rates.

A compatibility verdict compares two query encoders (old and, e.g., XBT) on the SAME queries and
the same old gallery, so the honest uncertainty is that of the paired difference:

- `per_query_ranks(query_view, gallery_view, caption_to_image)`: 0-based rank of each query's best
  positive, both directions (t2i: one query per caption; i2t: one query per image).
- `paired_bootstrap(hits_new, hits_ref, groups)`: the gain mean(new) - mean(ref) in Recall@K and a
  percentile bootstrap interval from resampling queries with replacement, both encoders resampled
  together (paired). With `groups` it resamples whole groups instead (a cluster bootstrap): the
  five captions of one image are not five independent queries, so t2i resamples images.
- `flip_rates(hits_new, hits_ref)`: of the queries the reference answered correctly, the share the
  new query gets wrong (`lost`, the "negative flips" users notice), and of those it missed, the
  share the new query gets right (`gained`).
- `mean_std(values)`: mean and sample std over seeds (std 0 for a single value, marked by n).
- `compare(ranks_new, ranks_ref, ks, groups)`: all of the above per direction and K.

Pure numpy on arrays the caller passes: no model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from xbt_dist.eval.compat import align_dim
from xbt_dist.eval.metrics import positive_ranks

DEFAULT_BOOT = 2000


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample, ddof=1; 0.0 for one value), "n"}; NaN mean for no values."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    s = mean_std(values)
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _hits(x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"per-query hits must be 1-d (one entry per query), got shape {a.shape}")
    return a.astype(np.float64)


def paired_bootstrap(hits_new, hits_ref, groups=None, n_boot: int = DEFAULT_BOOT, ci: float = 0.95,
                     seed: int = 0) -> dict:
    """Gain mean(hits_new) - mean(hits_ref) with a paired percentile bootstrap interval.

    `hits_*`: per-query 0/1 (or any per-query score) of the two encoders on the same queries, in
    the same order. `groups` (optional, one int per query): resample groups, not queries, and
    weight each group by its size, so the resampled gain is always a per-query mean.
    Returns {"gain", "lo", "hi", "ci", "n_queries", "n_groups", "n_boot"}.
    """
    a, b = _hits(hits_new), _hits(hits_ref)
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs the same queries: {len(a)} vs {len(b)} hits")
    if len(a) == 0:
        raise ValueError("paired bootstrap of zero queries")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    diff = a - b
    if groups is None:
        sums, counts = diff, np.ones_like(diff)
    else:
        g = np.asarray(groups)
        if g.shape != diff.shape:
            raise ValueError(f"groups must have one entry per query: {g.shape} vs {diff.shape}")
        _, inv = np.unique(g, return_inverse=True)
        sums = np.bincount(inv, weights=diff)
        counts = np.bincount(inv).astype(np.float64)
    rng = np.random.default_rng(seed)
    n = len(sums)
    boot = np.empty(n_boot)
    # In blocks so that n_boot x n indices never need more than ~16M ints at once.
    block = max(1, (1 << 24) // n)
    for start in range(0, n_boot, block):
        idx = rng.integers(0, n, size=(min(block, n_boot - start), n))
        boot[start:start + len(idx)] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return {"gain": float(diff.mean()), "lo": float(lo), "hi": float(hi), "ci": ci,
            "n_queries": int(len(diff)), "n_groups": int(n), "n_boot": int(n_boot)}


def flip_rates(hits_new, hits_ref) -> dict:
    """{"lost": P(new wrong | ref right), "gained": P(new right | ref wrong), counts}."""
    a, b = _hits(hits_new) > 0, _hits(hits_ref) > 0
    if len(a) != len(b):
        raise ValueError(f"flip rates need the same queries: {len(a)} vs {len(b)} hits")
    ref_right, ref_wrong = int(b.sum()), int((~b).sum())
    lost, gained = int((b & ~a).sum()), int((~b & a).sum())
    return {"lost": lost / ref_right if ref_right else float("nan"),
            "gained": gained / ref_wrong if ref_wrong else float("nan"),
            "n_lost": lost, "n_gained": gained, "n_ref_right": ref_right, "n_ref_wrong": ref_wrong}


def per_query_ranks(query: Mapping, gallery: Mapping, caption_to_image, chunk_size: int | None = None,
                    device: str = "cpu") -> dict[str, torch.Tensor]:
    """{"t2i": rank per caption query, "i2t": rank per image query}; query and gallery are views
    {"image": (N, d), "text": (M, d)}. A query view of another width is aligned to the gallery's
    as compat does for the naive swap (truncate / zero-pad)."""
    c2i = torch.as_tensor(caption_to_image, dtype=torch.long)
    d = gallery["image"].shape[1]
    qi = align_dim(torch.as_tensor(query["image"]).float(), d)
    qt = align_dim(torch.as_tensor(query["text"]).float(), d)
    n = len(gallery["image"])
    ids = torch.arange(n)
    return {"t2i": positive_ranks(qt, gallery["image"], c2i, ids, chunk_size, device),
            "i2t": positive_ranks(qi, gallery["text"], ids, c2i, chunk_size, device)}


def compare(ranks_new: Mapping, ranks_ref: Mapping, caption_to_image=None, ks: Sequence[int] = (1, 5, 10),
            n_boot: int = DEFAULT_BOOT, seed: int = 0) -> dict:
    """Per direction and K: recall of both, paired bootstrap gain interval, flip rates.

    With `caption_to_image`, t2i resamples images (all captions of an image together); i2t
    queries are images already. Returns {direction: {"R@K": {...}}}."""
    out = {}
    for direction in ("t2i", "i2t"):
        rn = np.asarray(ranks_new[direction])
        rr = np.asarray(ranks_ref[direction])
        groups = (np.asarray(caption_to_image) if caption_to_image is not None and direction == "t2i"
                  else None)
        out[direction] = {}
        for k in ks:
            hn, hr = rn < k, rr < k
            boot = paired_bootstrap(hn, hr, groups=groups, n_boot=n_boot, seed=seed)
            out[direction][f"R@{k}"] = {"new": float(hn.mean()), "ref": float(hr.mean()), **boot,
                                        "flips": flip_rates(hn, hr)}
    return out


def interval_verdict(comparison: Mapping, ks: Sequence[int] = (5,)) -> dict:
    """The goal on the toy world: gain interval's lower bound > 0 in R@K for both directions.

    Returns {"pass": bool, "cells": {"t2i R@5": "margin +0.012 [+0.004, +0.020]"}, "worst_lo": ...}."""
    cells, los = {}, []
    for direction in ("t2i", "i2t"):
        for k in ks:
            c = comparison[direction][f"R@{k}"]
            cells[f"{direction} R@{k}"] = f"margin {c['gain']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"
            los.append(c["lo"])
    return {"pass": bool(min(los) > 0), "cells": cells, "worst_lo": float(min(los))}
