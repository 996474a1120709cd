"""The cheap baselines users compare XBT with: query-time maps from new to old, and a fusion.

All of them leave the new model untouched and act on its QUERY embeddings only, fitted on the
paired embeddings of the training pairs (`x_new` = new-model embeddings of the training images
and captions, `y_old` = the old embeddings the retrieval system already stores for them; rows
paired, images and captions stacked so one map serves both query directions):

- `fit_least_squares`: ridge regression new -> old with a bias (closed form).
- `fit_procrustes`: orthogonal Procrustes, W with orthonormal columns (W^T W = I), no bias: the
  rotation (plus projection, d_new > d_old) that best aligns the two spaces.
- `train_residual_adapter`: x -> x W_ls + MLP(x), the MLP's last layer zero-initialised so it
  starts at the least-squares map, trained with the XBT cross-modal + intra-modal InfoNCE on the
  pairs (query-time only; microseconds per query).
- `fuse`: training-free score fusion that NEEDS THE OLD ENCODER AT QUERY TIME: the query is
  normalize((1 - alpha) * old(q) + alpha * phi(new(q))), alpha picked on the validation gallery.
  Both parts live in the old space, so this is the interpolation scheme of the literature; it
  costs a second encoder per query, which is what XBT avoids.

Each `QueryMap` knows its trainable parameter count and fit time; `apply` maps a view
{"image": (N, d_new), "text": (M, d_new)} to old-space queries. Pure torch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xbt_dist.losses import info_nce


@dataclass
class QueryMap:
    """A fitted new -> old query map: `fn(x_new) -> y` (then L2-normalised)."""
    name: str
    fn: object
    trainable_params: int
    fit_s: float
    info: dict = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fn(x.float()), dim=-1)

    def apply(self, view: dict) -> dict:
        return {mod: self(x) for mod, x in view.items()}


def _check_pairs(x_new: torch.Tensor, y_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.as_tensor(x_new).float(), torch.as_tensor(y_old).float()
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"paired embeddings needed: x_new {tuple(x.shape)} and y_old {tuple(y.shape)} "
                         "must be (n, d_new) and (n, d_old) with the same n (row i of both = one sample)")
    if len(x) < x.shape[1]:
        raise ValueError(f"{len(x)} pairs for a {x.shape[1]}-dim map: fit on at least d_new pairs "
                         "(use the training pairs' embeddings)")
    return x, y


def fit_least_squares(x_new, y_old, ridge: float = 1e-3) -> QueryMap:
    """argmin_W,b ||[x 1] [W; b] - y||^2 + ridge ||W||^2 (bias not penalised)."""
    t0 = time.perf_counter()
    x, y = _check_pairs(x_new, y_old)
    xa = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    reg = torch.eye(xa.shape[1], dtype=torch.float64) * ridge * len(x)
    reg[-1, -1] = 0.0
    wb = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y.double()).float()
    w, b = wb[:-1], wb[-1]
    return QueryMap("least-squares map", lambda q: q @ w + b, int(wb.numel()), time.perf_counter() - t0,
                    {"W": w, "b": b})


def fit_procrustes(x_new, y_old) -> QueryMap:
    """W = U V^T from the SVD of x^T y: the W with orthonormal columns minimising ||x W - y||."""
    t0 = time.perf_counter()
    x, y = _check_pairs(x_new, y_old)
    if x.shape[1] < y.shape[1]:
        raise ValueError(f"Procrustes needs d_new >= d_old, got {x.shape[1]} < {y.shape[1]}")
    u, _, vh = torch.linalg.svd((x.T @ y).double(), full_matrices=False)
    w = (u @ vh).float()
    return QueryMap("orthogonal Procrustes map", lambda q: q @ w, int(w.numel()), time.perf_counter() - t0,
                    {"W": w})


class ResidualAdapter(nn.Module):
    """x W + MLP(x): a linear map (initialised from least squares) plus a residual MLP."""

    def __init__(self, d_new: int, d_old: int, hidden: int = 256):
        super().__init__()
        self.linear = nn.Linear(d_new, d_old)
        self.mlp = nn.Sequential(nn.Linear(d_new, hidden), nn.GELU(), nn.Linear(hidden, d_old))
        nn.init.zeros_(self.mlp[2].weight)    # starts at the linear map: the MLP only adds
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


def train_residual_adapter(v_new, w_new, v_old, w_old, hidden: int = 256, epochs: int = 10,
                           batch_size: int = 256, lr: float = 1e-3, temperature: float = 0.05,
                           seed: int = 0) -> QueryMap:
    """Train a ResidualAdapter on paired (image, caption) embeddings with the XBT losses on the
    map's outputs: f(w_new) vs v_old, f(v_new) vs w_old (cross-modal), and f(v_new) vs v_old,
    f(w_new) vs w_old (intra-modal: the map is also what the old space's own neighbours see)."""
    t0 = time.perf_counter()
    v_new, w_new = torch.as_tensor(v_new).float(), torch.as_tensor(w_new).float()
    v_old, w_old = F.normalize(torch.as_tensor(v_old).float(), dim=-1), F.normalize(torch.as_tensor(w_old).float(), dim=-1)
    x, y = _check_pairs(torch.cat([v_new, w_new]), torch.cat([v_old, w_old]))
    ls = fit_least_squares(x, y)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResidualAdapter(x.shape[1], y.shape[1], hidden)
    with torch.no_grad():
        model.linear.weight.copy_(ls.info["W"].T)
        model.linear.bias.copy_(ls.info["b"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n = len(v_new)
    scale = 1.0 / temperature
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            fv = F.normalize(model(v_new[idx]), dim=-1)
            fw = F.normalize(model(w_new[idx]), dim=-1)
            loss = (info_nce(fw, v_old[idx], scale) + info_nce(fv, w_old[idx], scale)
                    + info_nce(fv, v_old[idx], scale) + info_nce(fw, w_old[idx], scale)) / 4
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return QueryMap("residual MLP query adapter", model, params, time.perf_counter() - t0,
                    {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                     "steps": len(losses)})


def fuse(old_view: dict, phi_view: dict, alpha: float) -> dict:
    """Training-free query fusion in the old space (needs the OLD encoder at query time)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fusion alpha must be in [0, 1], got {alpha}")
    return {mod: F.normalize((1 - alpha) * F.normalize(old_view[mod].float(), dim=-1)
                             + alpha * F.normalize(phi_view[mod].float(), dim=-1), dim=-1)
            for mod in old_view}


@contextlib.contextmanager
def one_thread():
    """Costs are measured on one intra-op thread: on a shared, loaded machine two threads made a
    tiny MLP ~400x slower per row (thread hand-offs, not work), and a query server runs one query
    stream per core anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def per_query_us(fn, x: torch.Tensor, repeats: int = 5) -> float:
    """Median wall microseconds per query row of `fn(x)` (batched, CPU, one thread, no grad)."""
    times = []
    with torch.no_grad(), one_thread():
        fn(x)   # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1e6 * times[len(times) // 2] / len(x)


def added_us(base_fn, fn, x_base: torch.Tensor, x: torch.Tensor | None = None, repeats: int = 7) -> float:
    """Median over interleaved runs of (fn(x) - base_fn(x_base)) wall microseconds per query row:
    alternating the two keeps drifting machine load out of the difference (may still be < 0
    within noise when the added work is tiny)."""
    x = x_base if x is None else x
    diffs = []
    with torch.no_grad(), one_thread():
        base_fn(x_base), fn(x)   # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            base_fn(x_base)
            t1 = time.perf_counter()
            fn(x)
            diffs.append((time.perf_counter() - t1) - (t1 - t0))
    diffs.sort()
    return 1e6 * diffs[len(diffs) // 2] / len(x)
