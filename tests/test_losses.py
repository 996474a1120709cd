"""InfoNCE math at world size 1 (no process group), and the XBT loss terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xbt_dist.losses import LOSS_TERMS, info_nce, xbt_loss


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_info_nce_matches_reference():
    q, g = _unit(6, 8, 0), _unit(6, 8, 1)
    logits = 10.0 * q @ g.T
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    assert torch.allclose(info_nce(q, g, 10.0), ref)


def test_info_nce_prefers_aligned_pairs():
    q = _unit(8, 16, 0)
    aligned = info_nce(q, q, 20.0)
    shuffled = info_nce(q, q[torch.randperm(8, generator=torch.Generator().manual_seed(0))], 20.0)
    assert aligned < 0.1 < shuffled


def test_xbt_loss_weights_and_terms():
    e = {k: _unit(5, 4, i) for i, k in enumerate(("phi_v", "phi_w", "v_old", "w_old"))}
    w = {"image_to_old_text": 1.0, "text_to_old_image": 0.5, "new_new": 0.0}
    total, parts = xbt_loss(e, w, 10.0)
    assert set(parts) == {"image_to_old_text", "text_to_old_image"}
    expected = info_nce(e["phi_v"], e["w_old"], 10.0) + 0.5 * info_nce(e["phi_w"], e["v_old"], 10.0)
    assert torch.allclose(total, expected)
    assert set(LOSS_TERMS) == {"image_to_old_text", "text_to_old_image", "new_new",
                               "text_to_old_text", "image_to_old_image"}


def test_xbt_loss_errors():
    e = {"phi_v": _unit(3, 4, 0), "phi_w": _unit(3, 4, 1)}
    with pytest.raises(ValueError, match="needs 'phi_v' and 'w_old'"):
        xbt_loss(e, {"image_to_old_text": 1.0}, 10.0)
    with pytest.raises(ValueError, match="all loss weights are 0"):
        xbt_loss(e, {"new_new": 0.0}, 10.0)
    with pytest.raises(ValueError, match="unknown loss terms"):
        xbt_loss(e, {"cross": 1.0}, 10.0)
