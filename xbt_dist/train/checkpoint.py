"""Atomic, resumable checkpoints on a local path, NFS or an fsspec URL.

Layout under a stage directory:

    checkpoints/step_00000100/trainable.pt       adapters + phi (+ temperature), rank 0
    checkpoints/step_00000100/rank_00000.pt      optimiser/scheduler, data position, counters
    checkpoints/step_00000100/backend/            engine files (DeepSpeed writes its own here)
    checkpoints/latest                            name of the newest COMPLETE checkpoint

Every rank writes into `step_X.tmp`; after a barrier rank 0 renames it to `step_X` and only then
rewrites `latest` (itself through a temp file + rename). A crash at any point therefore leaves
`latest` naming a checkpoint that is whole, which is what Ray's FailureConfig and SLURM requeue
resume from. Remote URLs are staged in a local temp dir and uploaded before `latest` moves.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import fsspec
import torch

LATEST = "latest"


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class Checkpointer:
    def __init__(self, stage_dir: str, rank: int = 0, barrier: Callable[[], None] = lambda: None,
                 keep: int = 2):
        self.root = f"{str(stage_dir).rstrip('/')}/checkpoints"
        self.rank = rank
        self.barrier = barrier
        self.keep = keep
        self.fs, self.fs_root = fsspec.core.url_to_fs(self.root)
        self.remote = is_remote(self.root)

    # -- reading ---------------------------------------------------------------------------
    def latest(self) -> str | None:
        """Name of the newest complete checkpoint, or None."""
        path = f"{self.fs_root}/{LATEST}"
        if not self.fs.exists(path):
            return None
        name = self.fs.cat_file(path).decode().strip()
        return name or None

    def local_dir(self, name: str) -> Path:
        """A local directory holding checkpoint `name` (downloaded first when remote)."""
        if not self.remote:
            return Path(self.fs_root) / name
        local = Path(tempfile.gettempdir()) / "xbt_ckpt_cache" / name
        if not local.exists():
            self.fs.get(f"{self.fs_root}/{name}", str(local), recursive=True)
        return local

    def load(self, name: str | None = None) -> tuple[Path, dict, dict] | None:
        """(dir, trainable state, this rank's trainer state) of `name` or the latest."""
        name = name or self.latest()
        if name is None:
            return None
        d = self.local_dir(name)
        trainable = torch.load(d / "trainable.pt", map_location="cpu", weights_only=False)
        rank_file = d / f"rank_{self.rank:05d}.pt"
        if not rank_file.exists():
            raise RuntimeError(
                f"checkpoint {d} has no state for rank {self.rank}: it was written by a run with "
                "fewer workers; resume with the same dist.workers or start a new out_dir")
        return d, trainable, torch.load(rank_file, map_location="cpu", weights_only=False)

    # -- writing ---------------------------------------------------------------------------
    def save(self, step: int, trainable: dict | None, trainer_state: dict,
             save_backend: Callable[[Path], None] | None = None) -> str:
        """Collective: every rank calls it. Returns the checkpoint name."""
        name = f"step_{step:08d}"
        stage = Path(tempfile.gettempdir()) / "xbt_ckpt_stage" if self.remote else Path(self.fs_root)
        tmp = stage / f"{name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        self.barrier()
        tmp.mkdir(parents=True, exist_ok=True)  # other ranks on other nodes (NFS) see it too
        torch.save(trainer_state, tmp / f"rank_{self.rank:05d}.pt")
        if save_backend is not None:
            save_backend(tmp / "backend")
        if self.rank == 0 and trainable is not None:
            torch.save(trainable, tmp / "trainable.pt")
        self.barrier()
        if self.rank == 0:
            self._publish(tmp, name)
        self.barrier()
        return name

    def _publish(self, tmp: Path, name: str) -> None:
        if self.remote:
            self.fs.put(str(tmp), f"{self.fs_root}/{name}", recursive=True)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            final = Path(self.fs_root) / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        # `latest` moves only after the checkpoint is complete: the atomicity guarantee.
        with self.fs.open(f"{self.fs_root}/{LATEST}.tmp", "w") as f:
            f.write(name)
        self.fs.mv(f"{self.fs_root}/{LATEST}.tmp", f"{self.fs_root}/{LATEST}")
        self._prune(keep_name=name)

    def _prune(self, keep_name: str) -> None:
        names = sorted(p.rstrip("/").split("/")[-1] for p in self.fs.ls(self.fs_root, detail=False))
        steps = [n for n in names if n.startswith("step_") and not n.endswith(".tmp")]
        for old in steps[:-self.keep]:
            if old != keep_name:
                self.fs.rm(f"{self.fs_root}/{old}", recursive=True)
