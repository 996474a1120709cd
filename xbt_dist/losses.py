"""Contrastive losses of XBT, with the cross-rank gather owned by the loss (open_clip style).

`info_nce` is a symmetric InfoNCE between a query batch and a gallery batch whose i-th rows are
positives. With `world_size > 1` both sides are all-gathered so every rank scores its queries
against the GLOBAL batch; the gather keeps the gradient of the local part, so a 2-worker run gives
the same loss and, after the usual gradient averaging, the same gradients as a 1-worker run.
At `world_size == 1` no process group is touched, so the math is testable anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Paper's loss terms, named by (query, gallery). phi_v / phi_w are the synthetic old embeddings
# phi(v_bar_new) / phi(w_bar_new); v_old / w_old are the actual old embeddings.
LOSS_TERMS = {
    "image_to_old_text": ("phi_v", "w_old"),   # image query vs old text gallery (cross-modal)
    "text_to_old_image": ("phi_w", "v_old"),   # text query vs old image gallery (cross-modal)
    "new_new": ("phi_v", "phi_w"),             # new-to-new alignment inside the old space
    "text_to_old_text": ("phi_w", "w_old"),    # intra-modal, off by default
    "image_to_old_image": ("phi_v", "v_old"),  # intra-modal, off by default
}


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """All-gather rows of `x` from every rank; gradients flow back to each rank's own rows."""
    if world_size == 1:
        return x
    import torch.distributed.nn as dist_nn  # imported lazily: only needed with a process group

    return torch.cat(dist_nn.all_gather(x), dim=0)


def info_nce(query: torch.Tensor, gallery: torch.Tensor, logit_scale: torch.Tensor | float,
             rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; inputs are L2-normalised local rows.

    Each rank computes the loss of its local rows against the global batch ("local loss"); the
    mean over ranks is the global-batch loss, and the optimiser's gradient averaging over ranks
    makes gradients match the single-worker run. The returned value is this rank's share; use
    `global_mean` to report the global-batch loss.
    """
    all_query = gather_with_grad(query, world_size)
    all_gallery = gather_with_grad(gallery, world_size)
    n_local = query.shape[0]
    labels = torch.arange(n_local, device=query.device) + rank * n_local
    logits_q = logit_scale * query @ all_gallery.T
    logits_g = logit_scale * gallery @ all_query.T
    return 0.5 * (F.cross_entropy(logits_q, labels) + F.cross_entropy(logits_g, labels))


def global_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean of a scalar over ranks, for reporting (no gradient)."""
    if world_size == 1:
        return value.detach()
    import torch.distributed as dist

    v = value.detach().clone()
    dist.all_reduce(v)
    return v / world_size


def xbt_loss(embeds: dict[str, torch.Tensor], weights: dict[str, float],
             logit_scale: torch.Tensor | float, rank: int = 0, world_size: int = 1
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled XBT terms; returns (total, {term: value})."""
    unknown = set(weights) - set(LOSS_TERMS)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {sorted(LOSS_TERMS)}")
    parts: dict[str, torch.Tensor] = {}
    total = None
    for term, w in weights.items():
        if not w:
            continue
        q, g = LOSS_TERMS[term]
        if q not in embeds or g not in embeds:
            raise ValueError(f"loss term {term!r} needs {q!r} and {g!r}; this batch has {sorted(embeds)}")
        value = info_nce(embeds[q], embeds[g], logit_scale, rank, world_size)
        parts[term] = value.detach()
        total = w * value if total is None else total + w * value
    if total is None:
        raise ValueError("all loss weights are 0: enable at least one term in `loss`")
    return total, parts
