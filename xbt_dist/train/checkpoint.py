"""The run state: what a checkpoint holds, how every rank writes it through fsspec, how it is read.

Layout under a stage directory (a local path, NFS or an fsspec URL such as s3://bucket/run/phi):

    checkpoints/step_00000100/state.pt        rank 0: the trainable tensors (fp32 master, by
                                              parameter name, gathered), Adam moments by name,
                                              optimiser step, per-group LR, scheduler, engine counters
    checkpoints/step_00000100/rank_00000.pt   every rank its own: data cursor part, RNG states,
                                              loop counters
    checkpoints/step_00000100/meta.json       rank 0, after every rank's files: world size, step
    checkpoints/latest                        name of the newest COMPLETE checkpoint, written last

Never the frozen model: only tensors that train are in `state.pt` (8.6M parameters of a ViT-L/14
run, not its 0.4B frozen ones). Keyed by parameter name, not by ZeRO partition, so a checkpoint
written by N ranks loads on M ranks (and into the plain-PyTorch backend).

Atomic without renaming directories (object stores cannot): every rank writes its files straight
to their final names (each file atomic, see `xbt_dist.storage`), all ranks meet at a barrier,
then rank 0 writes `meta.json` and only then moves `latest`. A crash at any point leaves `latest`
naming a checkpoint that is whole, which is what Ray's FailureConfig restart, SLURM requeue and
`--resume` continue from; a half-written newer step directory is simply overwritten or pruned.
No rank stages files in its node's /tmp for another rank to upload: on a multi-node job each
node's files would never reach storage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from xbt_dist import storage

LATEST = "latest"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


@dataclass
class Loaded:
    """A checkpoint read back for one rank of the (possibly different-sized) new world."""
    name: str
    url: str
    world_size: int           # of the run that wrote it
    state: dict               # the backend's world-size-independent state (state.pt)
    ranks: list[dict]         # every old rank's own part, in old rank order


class Checkpointer:
    def __init__(self, stage_dir: str, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = lambda: None, keep: int = 2):
        self.root = storage.join(stage_dir, "checkpoints")
        self.rank, self.world_size = rank, world_size
        self.barrier = barrier
        self.keep = keep

    # -- reading ---------------------------------------------------------------------------
    def latest(self) -> str | None:
        """Name of the newest complete checkpoint, or None."""
        url = storage.join(self.root, LATEST)
        if not storage.exists(url):
            return None
        return storage.read_text(url).strip() or None

    def meta(self, name: str) -> dict:
        return json.loads(storage.read_text(storage.join(self.root, name, META_FILE)))

    def load(self, name: str | None = None) -> Loaded | None:
        """Checkpoint `name` (default: the latest) as every rank needs it, or None if there is none.

        Every rank reads the whole `state.pt` (ZeRO takes its own slice of each full tensor) and
        every old rank's part (the data stream splits the old cursor over the new layout).
        """
        name = name or self.latest()
        if name is None:
            return None
        url = storage.join(self.root, name)
        meta = self.meta(name)
        ranks = [storage.load_torch(storage.join(url, rank_file(r))) for r in range(meta["world_size"])]
        return Loaded(name=name, url=url, world_size=int(meta["world_size"]),
                      state=storage.load_torch(storage.join(url, STATE_FILE)), ranks=ranks)

    # -- writing ---------------------------------------------------------------------------
    def save(self, step: int, state: dict | None, rank_state: dict,
             extra_meta: dict[str, Any] | None = None) -> str:
        """Collective: every rank calls it with its own `rank_state`; rank 0's `state` is written.

        Returns the checkpoint name. Re-saving the checkpoint `latest` already names (a resumed
        run that has nothing left to do) is skipped: overwriting it would not be atomic.
        """
        name = f"step_{step:08d}"
        url = storage.join(self.root, name)
        if self.latest() == name:
            self.barrier()  # keep the collective shape identical on every rank
            return name
        storage.makedirs(url)
        storage.save_torch(rank_state, storage.join(url, rank_file(self.rank)))
        if self.rank == 0:
            storage.save_torch(state, storage.join(url, STATE_FILE))
        self.barrier()  # every rank's files are in storage
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, **(extra_meta or {})}
            storage.write_text(storage.join(url, META_FILE), json.dumps(meta, indent=1))
            # `latest` moves only after the checkpoint is complete: the atomicity guarantee.
            storage.write_text(storage.join(self.root, LATEST), name)
            self._prune(keep_name=name)
        self.barrier()
        return name

    def _prune(self, keep_name: str) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones and dead partial saves."""
        steps = [n for n in storage.listdir(self.root) if n.startswith("step_") and n <= keep_name]
        complete = [n for n in steps if storage.exists(storage.join(self.root, n, META_FILE))]
        keep = set(complete[-self.keep:]) | {keep_name}
        for old in steps:
            if old not in keep:
                storage.remove(storage.join(self.root, old), recursive=True)
