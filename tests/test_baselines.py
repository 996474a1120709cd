"""xbt_dist.eval.baselines: the cheap new -> old query maps and the training-free fusion."""

import pytest
import torch
import torch.nn.functional as F

from xbt_dist.eval import baselines as B
from xbt_dist.eval.stats import per_query_ranks


def test_least_squares_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    a, b = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    m = B.fit_least_squares(x, x @ a + b, ridge=0.0)
    assert torch.allclose(m.info["W"], a, atol=1e-4) and torch.allclose(m.info["b"], b, atol=1e-4)
    assert m.trainable_params == 6 * 4 + 4
    assert torch.allclose(m(x[:3]), F.normalize(x[:3] @ a + b, dim=-1), atol=1e-4)


def test_procrustes_recovers_orthonormal_columns():
    g = torch.Generator().manual_seed(1)
    # whitened inputs (x^T x = 400 I): then Procrustes' optimum is the true map up to the noise
    x = torch.linalg.qr(torch.randn(400, 6, generator=g))[0] * 20.0
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    w_true = q[:, :4]                                 # 6 -> 4 with orthonormal columns
    m = B.fit_procrustes(x, x @ w_true + 0.01 * torch.randn(400, 4, generator=g))
    w = m.info["W"]
    assert torch.allclose(w.T @ w, torch.eye(4), atol=1e-5)
    assert torch.allclose(w, w_true, atol=0.02)
    with pytest.raises(ValueError, match="d_new >= d_old"):
        B.fit_procrustes(x[:, :3], x[:, :4])


def test_residual_adapter_learns_what_a_linear_map_cannot():
    """Targets are a nonlinear function of the new embeddings: the residual MLP, which starts at
    the least-squares map, must end with a lower loss and better cross-modal R@1 than it."""
    g = torch.Generator().manual_seed(2)
    n, d_new, d_old = 512, 12, 8
    v_new = F.normalize(torch.randn(n, d_new, generator=g), dim=-1)
    w_new = F.normalize(v_new + 0.05 * torch.randn(n, d_new, generator=g), dim=-1)
    a = torch.randn(d_new, d_old, generator=g)
    old = lambda x: F.normalize(torch.sign(x @ a) + 0.1 * (x @ a), dim=-1)   # mostly a sign pattern
    v_old, w_old = old(v_new), old(w_new)
    ls = B.fit_least_squares(torch.cat([v_new, w_new]), torch.cat([v_old, w_old]))
    res = B.train_residual_adapter(v_new, w_new, v_old, w_old, hidden=64, epochs=20, batch_size=128, seed=0)
    assert res.info["last_loss"] < res.info["first_loss"]
    assert res.trainable_params == (d_new * d_old + d_old) + (d_new * 64 + 64) + (64 * d_old + d_old)
    c2i = torch.arange(n)
    gallery = {"image": v_old, "text": w_old}

    def r1(m):
        r = per_query_ranks(m.apply({"image": v_new, "text": w_new}), gallery, c2i)
        return float((r["t2i"] < 1).float().mean()), float((r["i2t"] < 1).float().mean())
    (ls_t2i, ls_i2t), (res_t2i, res_i2t) = r1(ls), r1(res)
    assert res_t2i > ls_t2i + 0.01 and res_i2t > ls_i2t + 0.01     # measured: +0.02 / +0.06


def test_fusion_endpoints_and_bad_alpha():
    g = torch.Generator().manual_seed(3)
    old = {"text": F.normalize(torch.randn(5, 4, generator=g), dim=-1)}
    phi = {"text": F.normalize(torch.randn(5, 4, generator=g), dim=-1)}
    assert torch.allclose(B.fuse(old, phi, 0.0)["text"], old["text"], atol=1e-6)
    assert torch.allclose(B.fuse(old, phi, 1.0)["text"], phi["text"], atol=1e-6)
    mid = B.fuse(old, phi, 0.5)["text"]
    assert torch.allclose(mid, F.normalize(old["text"] + phi["text"], dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        B.fuse(old, phi, 1.5)


def test_bad_pairs_name_the_fix():
    with pytest.raises(ValueError, match="same n"):
        B.fit_least_squares(torch.randn(10, 3), torch.randn(9, 2))
    with pytest.raises(ValueError, match="at least d_new pairs"):
        B.fit_least_squares(torch.randn(2, 3), torch.randn(2, 2))
    assert B.per_query_us(lambda q: q @ torch.ones(3, 2), torch.randn(100, 3)) > 0
