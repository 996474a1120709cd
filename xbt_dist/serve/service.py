"""The search service behind `xbt serve`: query encoders + gallery indexes + metrics, no HTTP.

Which encoder answers against which gallery:
- `xbt` (default): the upgraded query encoder, phi(adapted new model), against the OLD gallery,
- `old`: the old model against the OLD gallery (today's system, for side-by-side comparison),
- `new`: the untouched new model (adapters off) against the NEW gallery, when one is indexed
  (the backfilled system; also the rollback target of the cutover).
A text query searches the image gallery and an image query the text gallery.

Start-up refuses a pairing that would return silently wrong results: an index whose old-gallery
embeddings were made by another old model than the one the run's phi was trained against.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from xbt_dist.artifacts import read_manifest
from xbt_dist.config import RunConfig
from xbt_dist.index.build import gallery_shards, index_dir
from xbt_dist.index.evaluate import GalleryIndexes
from xbt_dist.index.faiss_index import search
from xbt_dist.index.identity import describe, model_identity, same_model

GALLERY_OF = {"xbt": "old", "old": "old", "new": "new"}


def trained_old_identity(cfg: RunConfig) -> dict:
    """The old model the run was trained against: from the stage-2 manifest when present."""
    try:
        old = read_manifest(cfg.stage_dir("train"))["config"]["old"]
    except (FileNotFoundError, KeyError):
        old = cfg.old
    return model_identity(old)


def check_index_matches_run(cfg: RunConfig, manifest: dict) -> None:
    """Refuse an index of another old model's embeddings (phi maps into ONE old space)."""
    built = manifest.get("old_model")
    if not built:
        raise ValueError(f"index manifest in {index_dir(cfg)} does not record the old model that "
                         "embedded the gallery; rebuild it with `xbt index build`")
    trained = trained_old_identity(cfg)
    if not same_model(built, trained):
        raise ValueError(f"refusing to serve: the index's old gallery was embedded by {describe(built)}, "
                         f"but the run at {cfg.out_dir} was trained against {describe(trained)}. XBT "
                         "queries only match the old model they were trained for: rebuild the index "
                         "from that model's gallery (index.old_embeddings) or serve the matching run")
    new_ident = manifest.get("view_identities", {}).get("new", {}).get("new")
    if new_ident and not same_model(new_ident, model_identity(cfg.new)):
        raise ValueError(f"refusing to serve: the index's new gallery was embedded by {describe(new_ident)}, "
                         f"but the run's new model is {describe(model_identity(cfg.new))}; rebuild the index")


class Metrics:
    """Counters and a latency window for /metrics (Prometheus text format)."""

    def __init__(self, window: int = 2048):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()     # (endpoint, status) -> n
        self.queries: Counter = Counter()      # encoder -> queries answered
        self.latency = deque(maxlen=window)    # seconds per /search request, recent window
        self.latency_sum, self.latency_count = 0.0, 0

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def searched(self, encoder: str, n: int, seconds: float) -> None:
        with self.lock:
            self.queries[encoder] += n
            self.latency.append(seconds)
            self.latency_sum += seconds
            self.latency_count += 1

    def render(self, gallery_sizes: dict[str, int]) -> str:
        with self.lock:
            lines = ["# HELP xbt_requests_total HTTP requests by endpoint and status.",
                     "# TYPE xbt_requests_total counter"]
            lines += [f'xbt_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP xbt_queries_total Queries answered by encoder.",
                      "# TYPE xbt_queries_total counter"]
            lines += [f'xbt_queries_total{{encoder="{e}"}} {n}' for e, n in sorted(self.queries.items())]
            lines += ["# HELP xbt_search_latency_seconds Search request latency (recent window).",
                      "# TYPE xbt_search_latency_seconds summary"]
            if self.latency:
                lat = np.asarray(self.latency)
                for q in (0.5, 0.9, 0.99):
                    lines.append(f'xbt_search_latency_seconds{{quantile="{q}"}} {np.quantile(lat, q):.6f}')
            lines += [f"xbt_search_latency_seconds_sum {self.latency_sum:.6f}",
                      f"xbt_search_latency_seconds_count {self.latency_count}",
                      "# HELP xbt_gallery_items Items in each served gallery index.",
                      "# TYPE xbt_gallery_items gauge"]
            lines += [f'xbt_gallery_items{{gallery="{g}"}} {n}' for g, n in sorted(gallery_sizes.items())]
        return "\n".join(lines) + "\n"


class SearchService:
    """Loads encoders and indexes once; `search(encoder, modality, items, k)` is thread-safe."""

    def __init__(self, cfg: RunConfig, encoder=None, device: str = "cpu"):
        self.cfg = cfg
        self.indexes = GalleryIndexes(index_dir(cfg))
        check_index_matches_run(cfg, self.indexes.manifest)
        self.kind = cfg.serve.index_type
        if self.kind not in self.indexes.types:
            raise ValueError(f"serve.index_type={self.kind!r} was not built (built: {self.indexes.types}); "
                             "add it to index.types and rerun `xbt index build`")
        if cfg.serve.threads:
            import torch
            torch.set_num_threads(cfg.serve.threads)
        views = ["old", "xbt"] + (["new"] if "new" in self.indexes.views else [])
        if encoder is None:
            from xbt_dist.index.encoders import QueryEncoder
            encoder = QueryEncoder(cfg, device=device, views=tuple(views), batch_size=cfg.serve.max_batch)
        self.encoder = encoder
        self.encoders = [v for v in views if v in encoder.views]
        for v in self.encoders:   # load every served index now: the first request must not pay for it
            for m in ("image", "text"):
                self.indexes.get(GALLERY_OF[v], m, self.kind)
        self.metrics = Metrics()
        self._store = None
        self._store_lock = threading.Lock()
        self.started = time.time()

    @property
    def store(self):
        """Thumbnails/captions of the gallery shards, indexed on first use."""
        with self._store_lock:
            if self._store is None:
                from xbt_dist.serve.gallery import GalleryStore
                self._store = GalleryStore(gallery_shards(self.cfg))
            return self._store

    def gallery_sizes(self) -> dict[str, int]:
        return {f"{GALLERY_OF[v]}": len(self.indexes.keys(GALLERY_OF[v])) for v in self.encoders}

    def search_gallery(self, encoder: str) -> str:
        return GALLERY_OF[encoder]

    def search(self, encoder: str, modality: str, items: list, k: int) -> list[list[dict]]:
        """Top-k gallery items per query: [{"id", "score", "rank"}], best first."""
        if encoder not in self.encoders:
            raise ValueError(f"encoder {encoder!r} is not served here (have {self.encoders}); 'new' "
                             "needs a new-model gallery index (index.views includes new)")
        t0 = time.perf_counter()
        q = self.encoder.texts(encoder, items) if modality == "text" else self.encoder.images(encoder, items)
        gallery = GALLERY_OF[encoder]
        g_mod = "image" if modality == "text" else "text"
        scores, rows = search(self.indexes.get(gallery, g_mod, self.kind), q, k)
        keys = self.indexes.keys(gallery)
        out = [[{"id": str(keys[r]), "score": round(float(s), 6), "rank": i}
                for i, (s, r) in enumerate(zip(srow, rrow)) if r >= 0]
               for srow, rrow in zip(scores, rows)]
        self.metrics.searched(encoder, len(items), time.perf_counter() - t0)
        return out

    def describe(self) -> dict:
        m = self.indexes.manifest
        return {"encoders": self.encoders, "index_type": self.kind,
                "galleries": {g: {"items": n, "gallery": f"{g} model embeddings"}
                              for g, n in self.gallery_sizes().items()},
                "old_model": describe(m["old_model"]), "run": self.cfg.out_dir,
                "index_dir": str(Path(self.indexes.root)), "uptime_s": round(time.time() - self.started, 1)}
