"""Old-gallery index bench: build time, memory and queries/s of flat / IVF-PQ / HNSW, and each
index's own recall (ANN top-10 vs exact top-10).

    nice -n 15 python -m bench.index --out bench/results/index [--n 1000000] [--d 64] [--config RUN.yaml]

Synthetic gallery: n unit vectors around 1000 Gaussian clusters (CLIP galleries are clustered,
uniform random vectors would flatter nothing and mislead everything). Two query sets:
`in-distribution` (noisy copies of gallery rows, like image->image) and `cross-modal` (the same
plus one shared offset direction, renormalised: a stand-in for the modality gap between CLIP text
queries and an image gallery, where quantised indexes are reported to lose most). With `--config`
the run's built toy-world indexes are timed too, with the gallery's own text rows as queries.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.common import current_rss_mb, row, write_result


def synthetic_gallery(n: int, d: int, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    step = 100_000
    for i in range(0, n, step):  # chunks: no n x d float64 temporaries
        m = min(step, n - i)
        x[i:i + m] = centers[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def query_sets(x: np.ndarray, nq: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = x[rng.choice(len(x), nq, replace=False)] + 0.3 / np.sqrt(x.shape[1]) * rng.standard_normal(
        (nq, x.shape[1]), dtype=np.float32)
    gap = rng.standard_normal(x.shape[1]).astype(np.float32)
    gap /= np.linalg.norm(gap)
    cross = base / np.linalg.norm(base, axis=1, keepdims=True) + 0.8 * gap
    return {"in-distribution": base, "cross-modal": cross}


def bench_gallery(name: str, x: np.ndarray, queries: dict, cfg, k: int = 10, single: int = 200,
                  on_rows=None) -> list[dict]:
    from xbt_dist.index.faiss_index import build_index, search
    rows = []
    exact, _ = build_index(x, "flat", cfg)
    truth = {qn: search(exact, q, k)[1] for qn, q in queries.items()}
    for kind in cfg.types:
        rss0 = current_rss_mb()
        index, info = build_index(x, kind, cfg)  # flat again too: its build time is a row
        case = f"{name}/{kind}"
        params = {k_: v for k_, v in info["params"].items() if k_ != "notes"}
        rows.append(row("index", case, "build time", round(info["build_s"], 3), "s", params=params))
        rows.append(row("index", case, "index size", round(info["bytes"] / 2**20, 2), "MiB",
                        rss_growth_mib=round(current_rss_mb() - rss0, 1)))
        for qn, q in queries.items():
            t0 = time.perf_counter()
            _, got = search(index, q, k)
            dt = time.perf_counter() - t0
            overlap = np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(got, truth[qn])])
            rows.append(row("index", case, f"ANN recall@{k} ({qn})", round(float(overlap), 4), "fraction"))
            rows.append(row("index", case, f"queries/s, batch {len(q)} ({qn})", round(len(q) / dt, 1), "q/s"))
        q1 = queries["cross-modal"][:single]
        lat = []
        for i in range(len(q1)):
            t0 = time.perf_counter()
            search(index, q1[i:i + 1], k)
            lat.append(time.perf_counter() - t0)
        lat = np.asarray(lat) * 1000
        rows.append(row("index", case, "latency p50, batch 1", round(float(np.percentile(lat, 50)), 3), "ms",
                        p99=round(float(np.percentile(lat, 99)), 3)))
        print(f"[bench.index] {case}: {rows[-7:]}", file=sys.stderr)
        if on_rows is not None:  # written after each index: a run cut short keeps what it measured
            on_rows(rows)
        del index
    return rows


def bench_run(config: str, cfg_overrides=None) -> list[dict]:
    """The run's built indexes over the toy-world gallery, with its text rows as queries."""
    from xbt_dist.config import load_config
    from xbt_dist.index.build import index_dir
    from xbt_dist.index.evaluate import GalleryIndexes
    run = load_config(config, cfg_overrides)
    idx = GalleryIndexes(index_dir(run))
    q = idx.rows("old", "text")
    out = []
    for kind in idx.types:
        index = idx.get("old", "image", kind)
        e = idx.entries[f"old/image.{kind}"]
        t0 = time.perf_counter()
        index.search(q, 10)
        dt = time.perf_counter() - t0
        case = f"toy/{kind}"
        out += [row("index", case, "build time", round(e["build_s"], 4), "s", n=e["n"], d=e["d"]),
                row("index", case, "index size", round(e["bytes"] / 2**20, 3), "MiB"),
                row("index", case, f"queries/s, batch {len(q)} (text rows vs image index)",
                    round(len(q) / dt, 1), "q/s")]
        del index
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/index")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64, help="dim (toy old model: 64; CLIP B/32: 512)")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--types", nargs="*", default=["flat", "ivfpq", "hnsw"])
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    p.add_argument("--single", type=int, default=200, help="batch-1 queries timed for the latency rows")
    p.add_argument("--config", help="a trained run's recipe whose `xbt index build` output to time")
    a = p.parse_args(argv)
    import faiss

    from xbt_dist.config import IndexConfig
    faiss.omp_set_num_threads(a.threads)
    cfg = IndexConfig(types=tuple(a.types), ivf_nlist=a.nlist, hnsw_m=a.hnsw_m,
                      hnsw_ef_construction=a.ef_construction, nprobe=16, hnsw_ef_search=64)
    rows = []
    if a.config:
        rows += bench_run(a.config)
    t0 = time.perf_counter()
    x = synthetic_gallery(a.n, a.d)
    print(f"[bench.index] synthetic gallery {x.shape} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def save(more):
        write_result(a.out, {"command": "nice -n 15 python -m bench.index " + " ".join(sys.argv[1:]),
                         "name": "index", "rows": rows + more,
                         "config": {"n": a.n, "d": a.d, "queries": a.queries, "threads": a.threads,
                                    "index": {"nlist": a.nlist, "pq_m": cfg.pq_m, "pq_bits": cfg.pq_bits,
                                              "nprobe": cfg.nprobe, "hnsw_m": a.hnsw_m,
                                              "ef_construction": a.ef_construction,
                                              "ef_search": cfg.hnsw_ef_search}},
                         "notes": ["ANN recall: share of the exact (flat) top-10 the index returns.",
                                   "cross-modal queries: noisy gallery rows + one shared offset "
                                   "(a modality-gap stand-in), renormalised."]})
    bench_gallery(f"synthetic-{a.n // 1000}k-d{a.d}", x, query_sets(x, a.queries), cfg,
                  single=a.single, on_rows=save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
