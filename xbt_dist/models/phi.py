"""phi: the projection from the NEW model's embedding space to the OLD one.

The paper's phi for CLIP ViT-B/32 (old, 512-d) <- ViT-L/14 (new, 768-d) has 6.82M parameters, which is
exactly a 3-layer MLP 768 -> 2048 -> 2048 -> 512 (6,820,352 parameters). Width and depth are options.
The output is NOT normalised: callers L2-normalise where the loss or the gallery needs it, so phi can
also be used on unnormalised features.
"""

from __future__ import annotations

from torch import nn


class Phi(nn.Module):
    """MLP Linear-GELU-...-Linear mapping d_new -> d_old; `depth` counts the Linear layers."""

    def __init__(self, d_new: int, d_old: int, hidden: int = 2048, depth: int = 3):
        super().__init__()
        for name, value in (("d_new", d_new), ("d_old", d_old), ("hidden", hidden), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Phi: {name} must be a positive int, got {value!r}")
        self.d_new, self.d_old, self.hidden, self.depth = d_new, d_old, hidden, depth
        dims = [d_new] + [hidden] * (depth - 1) + [d_old]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:       # no activation after the last layer: phi's output is an embedding
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def extra_repr(self) -> str:
        return f"d_new={self.d_new}, d_old={self.d_old}, hidden={self.hidden}, depth={self.depth}"


def phi_num_params(d_new: int, d_old: int, hidden: int = 2048, depth: int = 3) -> int:
    """Parameter count of Phi(d_new, d_old, hidden, depth) without building it."""
    dims = [d_new] + [hidden] * (depth - 1) + [d_old]
    return sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(depth))
