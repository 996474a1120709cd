"""Typed, validated configuration (work in progress: extended by the integrator)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelRef:
    """Which open_clip model: architecture name plus pretrained tag or local checkpoint path."""
    arch: str
    pretrained: str | None = None   # open_clip tag ("openai") or a local checkpoint path; None = random init
    config_dir: str | None = None   # directory of extra open_clip JSON architecture configs

    def __post_init__(self):
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"model.arch must be a non-empty architecture name, got {self.arch!r}")
