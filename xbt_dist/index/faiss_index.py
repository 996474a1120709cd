"""FAISS indexes of one gallery matrix: flat inner product (exact), IVF-PQ and HNSW.

All three use inner product on L2-normalised rows (= cosine, what CLIP retrieval ranks by). Row i
of the index is row i of the gallery; the gallery's keys are stored beside it, so ids never depend
on FAISS id maps.

Parameters come from `IndexConfig`; the ones that cannot hold on a small gallery are lowered and
the EFFECTIVE values are returned and recorded (a 1k-item toy gallery cannot train 256 PQ
centroids per sub-quantiser on 39 points each): IVF lists are clipped to n/39 (FAISS's
points-per-centroid floor), PQ bits to log2(n), and PQ sub-quantisers to a divisor of d.
Search-time knobs (nprobe, efSearch) are not stored in the FAISS file by all index types, so
`load_index` sets them again from the recorded parameters.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this: k-means centroids are then noise


def _faiss():
    try:
        import faiss
    except ImportError as e:  # a clear fix instead of a bare ModuleNotFoundError
        raise ImportError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu-cu12 on a "
                          "GPU machine); it is a dependency of xbt_dist") from e
    return faiss


def as_gallery(x) -> np.ndarray:
    """Contiguous float32 rows, L2-normalised (fp16 shard rows are normalised only to ~1e-3)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"gallery must be a 2-D (n, d) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def effective_params(kind: str, n: int, d: int, cfg) -> dict:
    """The parameters an index of `kind` over n x d rows gets from `cfg` (an IndexConfig)."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction,
                "efSearch": cfg.hnsw_ef_search}
    if kind != "ivfpq":
        raise ValueError(f"unknown index type {kind!r}: expected flat, ivfpq or hnsw")
    notes = []
    nlist = cfg.ivf_nlist or max(1, int(4 * math.sqrt(n)))
    cap = max(1, n // MIN_POINTS_PER_CENTROID)
    if nlist > cap:
        notes.append(f"nlist {nlist} -> {cap} (n={n} trains at most n/{MIN_POINTS_PER_CENTROID} lists)")
        nlist = cap
    m = cfg.pq_m
    if d % m:
        m2 = max(k for k in range(1, m + 1) if d % k == 0)
        notes.append(f"pq_m {m} -> {m2} (must divide d={d})")
        m = m2
    bits = cfg.pq_bits
    cap_bits = max(1, int(math.log2(max(n, 2))))
    if bits > cap_bits:
        notes.append(f"pq_bits {bits} -> {cap_bits} (n={n} cannot train 2**{bits} codes)")
        bits = cap_bits
    return {"nlist": nlist, "m": m, "nbits": bits, "nprobe": min(cfg.nprobe, nlist),
            "bytes_per_vector": math.ceil(m * bits / 8), "notes": notes}


def build_index(x, kind: str, cfg, seed: int = 0):
    """(index, info) over gallery rows `x`; info = effective params, build seconds, bytes."""
    faiss = _faiss()
    x = as_gallery(x)
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot index an empty gallery: the embedding set has no rows")
    params = effective_params(kind, n, d, cfg)
    t0 = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["m"], params["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)
        if params["notes"]:  # lowered for a small gallery, and recorded: FAISS need not warn again
            index.cp.min_points_per_centroid = 1
            index.pq.cp.min_points_per_centroid = 1
        # k-means on a sample of 64 points per centroid (IVF lists or PQ codes, whichever needs
        # more): training cost then grows with nlist, not with the gallery (1M rows: 65k points).
        train_n = max(64 * params["nlist"], 64 * 2 ** params["nbits"])
        rng = np.random.default_rng(seed)
        sample = x if n <= train_n else x[np.sort(rng.choice(n, train_n, replace=False))]
        params["train_points"] = int(len(sample))
        index.train(sample)
    index.add(x)
    set_search_params(index, kind, params)
    info = {"type": kind, "n": int(n), "d": int(d), "params": params,
            "build_s": round(time.perf_counter() - t0, 4), "bytes": index_bytes(index)}
    return index, info


def set_search_params(index, kind: str, params: dict) -> None:
    faiss = _faiss()
    if kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params["efSearch"])


def index_bytes(index) -> int:
    """Serialised size: what the index costs on disk and (within a few %) in RAM."""
    return int(_faiss().serialize_index(index).nbytes)


def to_gpu(index, kind: str):
    """The index on GPU 0 where FAISS has GPU support; HNSW has no GPU version and stays on CPU."""
    faiss = _faiss()
    if kind == "hnsw":
        return index
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        raise RuntimeError("index.use_gpu=true but this FAISS build sees no GPU: install faiss-gpu-cu12 "
                           "on a GPU machine, or set index.use_gpu=false")
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def save_index(index, path: str | os.PathLike) -> None:
    faiss = _faiss()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    faiss.write_index(index, str(tmp))  # written then renamed: a reader never sees half an index
    os.replace(tmp, path)


def load_index(path: str | os.PathLike, kind: str, params: dict):
    index = _faiss().read_index(str(path))
    set_search_params(index, kind, params)
    return index


def search(index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (n_queries, k); rows are -1 where the index found fewer than k items."""
    q = as_gallery(queries)
    if q.shape[1] != index.d:
        raise ValueError(f"query dim {q.shape[1]} != index dim {index.d}: queries must be in the "
                         "gallery's space (apply phi for XBT queries against the old gallery)")
    k = min(int(k), int(index.ntotal))
    return index.search(q, k)
