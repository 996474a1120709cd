"""Retrieval and zero-shot metrics computed from plain embedding tensors.

Everything here works on (n, d) arrays (torch or numpy, any float dtype) so it is testable without
models. Conventions:

- Embeddings are L2-normalised inside (fp32), so callers may pass raw or fp16 shard rows.
- Multi-caption retrieval: `caption_to_image[j]` is the image index of caption j. Text->image: a
  caption query is correct at K when its image is in the top K. Image->text: an image query is
  correct at K when ANY of its captions is in the top K (COCO/Flickr protocol).
- Ties count AGAINST the query: the rank of a query is the number of WRONG gallery items whose
  score is >= the best correct item's score. A degenerate model (constant embeddings, the zero
  vector after a bad projection) therefore scores 0, never a perfect 1. `torch.topk` would break
  ties arbitrarily and make such cases depend on the memory layout.
- Memory: ranks are counted over query chunks, so the working set is two chunk x gallery fp32
  buffers plus one bool mask (32 MB per fp32 buffer on CPU, 1 GiB on a GPU, by default), whatever
  the gallery size. Inputs keep their dtype (fp16 views stay fp16): only the gallery is copied,
  once, as normalised fp32 on `device`; each query chunk is upcast and normalised on its own, so
  a 1M-image eval never holds an fp32 copy of its queries. `device="cuda"` runs the chunked
  matmuls on the GPU. Counting "wrong items scoring above the best correct one" is exactly
  equivalent to "a correct item is in the top K" and needs no top-k buffer, which keeps a 100k
  gallery at the same cost as a matmul.
- K larger than the gallery is clipped to the gallery size (recall is then 1.0 by definition);
  results keep the requested K in their key (`R@50`) so tables line up across eval sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10, 50)
# Scores held at once per chunk (fp32): 2**23 * 4 B = 32 MB on CPU, whatever the gallery size.
# Larger chunks gain little there: the matmul is already big enough to run at full speed. A GPU
# needs far more rows per launch to be busy (at 32 MB a 5M-caption gallery would be ranked one
# query per matmul), so it gets 2**28 scores (1 GiB, ~2.3 GiB with the mask and masked copy).
SCORE_BUDGET = 1 << 23
GPU_SCORE_BUDGET = 1 << 28
# Seconds between progress lines of a long ranking (only when a `log` is given).
PROGRESS_SECONDS = 30.0


def as_float_tensor(x, name: str = "embeddings") -> torch.Tensor:
    """Torch fp32 2-D tensor on CPU from a numpy array / tensor (fp16 shard rows included)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        raise ValueError(f"{name} must be a float array, got dtype {t.dtype}")
    return t.detach().to(device="cpu", dtype=torch.float32)


def as_embeddings(x, name: str = "embeddings") -> torch.Tensor:
    """A 2-D float CPU tensor in its own dtype (no fp32 copy: fp16 views stay half the size)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        raise ValueError(f"{name} must be a float array, got dtype {t.dtype}")
    return t.detach().cpu()


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit norm; an all-zero row stays zero (scores 0 against everything)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _as_index(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 1 or torch.is_floating_point(t):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {tuple(t.shape)} "
                         f"dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.long)


def _chunk_rows(gallery_size: int, chunk_size: int | None, device="cpu") -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    budget = GPU_SCORE_BUDGET if torch.device(device).type == "cuda" else SCORE_BUDGET
    return max(1, budget // max(1, gallery_size))


def positive_ranks(query, gallery, query_ids, gallery_ids,
                   chunk_size: int | None = None, device: str | torch.device = "cpu",
                   log: Callable[[str], None] | None = None) -> torch.Tensor:
    """0-based rank of the best positive gallery item for each query (ties count against).

    Gallery item j is a positive for query i when `gallery_ids[j] == query_ids[i]`. The rank is
    the number of non-positive gallery items whose cosine score is >= the best positive's score,
    so "correct at K" is `rank < K`. A query without any positive raises (the eval set is broken).
    `log`, when given, gets a progress line every PROGRESS_SECONDS of a long ranking.
    """
    q = as_embeddings(query, "query embeddings")
    g = as_embeddings(gallery, "gallery embeddings")
    qid = _as_index(query_ids, "query_ids")
    gid = _as_index(gallery_ids, "gallery_ids")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}: embed both in one "
                         "space (apply phi, or align dims with compat.align_dim) before retrieval")
    if len(qid) != len(q) or len(gid) != len(g):
        raise ValueError(f"ids do not match embeddings: {len(qid)} query ids for {len(q)} queries, "
                         f"{len(gid)} gallery ids for {len(g)} gallery items")
    step = _chunk_rows(len(g), chunk_size, device)
    # The gallery is the one full-size fp32 copy: moved in its own dtype, upcast there.
    g = l2_normalize(g.to(device).float())
    qid, gid = qid.to(device), gid.to(device)
    ranks = torch.empty(len(q), dtype=torch.long, device=device)
    t_last = time.perf_counter()
    for start in range(0, len(q), step):
        stop = min(start + step, len(q))
        # Row-wise normalisation: a chunk gives the same rows as normalising all queries at once.
        qc = l2_normalize(q[start:stop].to(device, non_blocking=True).float())
        scores = qc @ g.T                                      # (chunk, G): the memory peak
        positive = gid[None, :] == qid[start:stop, None]        # (chunk, G) bool, 1/4 the size
        if not bool(positive.any(dim=1).all()):
            bad = int(start + (~positive.any(dim=1)).nonzero()[0, 0])
            raise ValueError(f"query {bad} (id {int(qid[bad])}) has no positive in the gallery: "
                             "every caption needs its image and every image at least one caption")
        negative = positive.logical_not_()                    # in place: one mask, not two
        best = scores.masked_fill(negative, float("-inf")).amax(dim=1, keepdim=True)
        ranks[start:stop] = scores.ge_(best).logical_and_(negative).sum(dim=1)
        if log is not None and time.perf_counter() - t_last > PROGRESS_SECONDS:
            t_last = time.perf_counter()
            log(f"ranked {stop}/{len(q)} queries against {len(g)} gallery items")
    return ranks.cpu()


def recall_from_ranks(ranks: torch.Tensor, gallery_size: int,
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """{"R@K": fraction of queries with rank < min(K, gallery_size)} for each requested K."""
    out = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"recall K must be >= 1, got {k}")
        k_eff = min(int(k), gallery_size)
        out[f"R@{k}"] = float((ranks < k_eff).float().mean()) if len(ranks) else float("nan")
    return out


def _summary(ranks: torch.Tensor, gallery_size: int, ks: Sequence[int]) -> dict:
    res = recall_from_ranks(ranks, gallery_size, ks)
    res["median_rank"] = float(np.median(ranks.numpy()) + 1) if len(ranks) else float("nan")
    res["n_queries"] = int(len(ranks))
    res["gallery_size"] = int(gallery_size)
    return res


def text_to_image_recall(text_query, image_gallery, caption_to_image,
                         ks: Sequence[int] = DEFAULT_KS, chunk_size: int | None = None,
                         device: str | torch.device = "cpu", log=None) -> dict:
    """Recall@K of caption queries against an image gallery (correct: the caption's own image).

    Returns {"R@1": .., ..., "median_rank": 1-based, "n_queries": M, "gallery_size": N}.
    """
    c2i = _as_index(caption_to_image, "caption_to_image")
    n_images = as_embeddings(image_gallery, "image gallery").shape[0]
    _check_c2i(c2i, n_images, as_embeddings(text_query, "text queries").shape[0])
    ranks = positive_ranks(text_query, image_gallery, c2i, torch.arange(n_images), chunk_size,
                           device, log)
    return _summary(ranks, n_images, ks)


def image_to_text_recall(image_query, text_gallery, caption_to_image,
                         ks: Sequence[int] = DEFAULT_KS, chunk_size: int | None = None,
                         device: str | torch.device = "cpu", log=None) -> dict:
    """Recall@K of image queries against a caption gallery (correct: ANY of the image's captions)."""
    c2i = _as_index(caption_to_image, "caption_to_image")
    n_images = as_embeddings(image_query, "image queries").shape[0]
    n_captions = as_embeddings(text_gallery, "text gallery").shape[0]
    _check_c2i(c2i, n_images, n_captions)
    ranks = positive_ranks(image_query, text_gallery, torch.arange(n_images), c2i, chunk_size,
                           device, log)
    return _summary(ranks, n_captions, ks)


def _check_c2i(c2i: torch.Tensor, n_images: int, n_captions: int) -> None:
    if len(c2i) != n_captions:
        raise ValueError(f"caption_to_image has {len(c2i)} entries but there are {n_captions} "
                         "caption embeddings: one entry per caption, in caption order")
    if len(c2i) and (int(c2i.min()) < 0 or int(c2i.max()) >= n_images):
        raise ValueError(f"caption_to_image values must lie in [0, {n_images}) (one per image), "
                         f"got range [{int(c2i.min())}, {int(c2i.max())}]")


def retrieval_recalls(image, text, caption_to_image, ks: Sequence[int] = DEFAULT_KS,
                      chunk_size: int | None = None, image_gallery=None,
                      text_gallery=None, device: str | torch.device = "cpu", log=None) -> dict:
    """Both directions at once: {"t2i": ..., "i2t": ...}.

    Queries come from (`image`, `text`); galleries default to the same embeddings (same-model
    retrieval) or are given separately (cross-model retrieval, e.g. new query vs old gallery).
    """
    image_gallery = image if image_gallery is None else image_gallery
    text_gallery = text if text_gallery is None else text_gallery
    return {
        "t2i": text_to_image_recall(text, image_gallery, caption_to_image, ks, chunk_size, device,
                                    log),
        "i2t": image_to_text_recall(image, text_gallery, caption_to_image, ks, chunk_size, device,
                                    log),
    }


# ----------------------------------------------------------------------------------------------
# zero-shot classification


def class_text_embeddings(template_embeddings) -> torch.Tensor:
    """Class classifier weights from prompt-template text embeddings.

    `template_embeddings`: (C, T, d) array (class x template), or a list of C (T_c, d) arrays.
    Each template embedding is normalised, averaged over templates, and renormalised (CLIP's
    prompt ensembling), giving (C, d).
    """
    if isinstance(template_embeddings, (list, tuple)):
        rows = [l2_normalize(as_float_tensor(t, f"templates of class {i}")).mean(0)
                for i, t in enumerate(template_embeddings)]
        return l2_normalize(torch.stack(rows))
    t = torch.as_tensor(np.asarray(template_embeddings)
                        if not isinstance(template_embeddings, torch.Tensor)
                        else template_embeddings).float()
    if t.ndim == 2:             # one template per class
        return l2_normalize(t)
    if t.ndim != 3:
        raise ValueError(f"template embeddings must be (C, T, d) or (C, d), got {tuple(t.shape)}")
    return l2_normalize(l2_normalize(t).mean(dim=1))


def zero_shot_accuracy(image, class_embeddings, labels, ks: Sequence[int] = (1, 5),
                       chunk_size: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Top-K accuracy of images classified by nearest class text embedding.

    `class_embeddings` is (C, d), or (C, T, d) template embeddings (ensembled here). K is clipped
    to the number of classes; ties count against the image, as in retrieval.
    Returns {"top1": .., "top5": .., "n_images": N, "n_classes": C}.
    """
    cls = as_float_tensor(class_text_embeddings(class_embeddings), "class embeddings")
    y = _as_index(labels, "labels")
    n_images = as_embeddings(image, "image embeddings").shape[0]
    if len(y) != n_images:
        raise ValueError(f"{len(y)} labels for {n_images} images: one class index per image")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(cls)):
        raise ValueError(f"labels must lie in [0, {len(cls)}) for {len(cls)} classes, "
                         f"got range [{int(y.min())}, {int(y.max())}]")
    ranks = positive_ranks(image, cls, y, torch.arange(len(cls)), chunk_size, device)
    out = {f"top{k}": v for k, v in
           zip(ks, recall_from_ranks(ranks, len(cls), ks).values())}
    out["n_images"] = int(n_images)
    out["n_classes"] = int(len(cls))
    return out
