"""`xbt serve` bench on CPU: end-to-end HTTP latency at batch 1 (p50/p99) and queries/s at batch 64,
for text and image queries through the XBT encoder, plus where the time goes (encoder vs index).

    nice -n 15 python -m bench.serve --config RUN.yaml --out bench/results/serve [--n 200]

RUN.yaml is a trained run whose index was built (`xbt index build`); the server is the real app
on uvicorn, on 127.0.0.1, requests are real HTTP (urllib, one connection per request, sequential:
this is latency, not a load test).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import sys
import threading
import time
import urllib.request

import numpy as np

from bench.common import row, setup_torch, write_result


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _serve(app):
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return srv, f"http://127.0.0.1:{sock.getsockname()[1]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--out", default="bench/results/serve")
    p.add_argument("--n", type=int, default=200, help="batch-1 requests per query kind")
    p.add_argument("--batches", type=int, default=8, help="batch-64 requests per query kind")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    setup_torch(a.threads)
    from xbt_dist.config import load_config
    from xbt_dist.index.evaluate import load_queries
    from xbt_dist.serve.app import create_app
    from xbt_dist.serve.service import SearchService
    cfg = load_config(a.config, a.set)
    t0 = time.perf_counter()
    service = SearchService(cfg)
    load_s = time.perf_counter() - t0
    srv, url = _serve(create_app(service))
    qs = load_queries(cfg.index.query_shards or cfg.eval.eval_shards)
    captions = qs["captions"]
    images = []
    for im in qs["images"][:64]:
        buf = io.BytesIO()
        im.save(buf, format="JPEG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    rows = [row("serve", "startup", "load models + indexes", round(load_s, 2), "s")]
    for kind, items, key in (("text", captions, "text"), ("image", images, "image")):
        for i in range(5):  # warm-up: first calls pay allocator / thread-pool start
            _post(url + "/search", {key: items[i % len(items)]})
        lat = []
        for i in range(a.n):
            t = time.perf_counter()
            _post(url + "/search", {key: items[i % len(items)]})
            lat.append((time.perf_counter() - t) * 1000)
        lat = np.asarray(lat)
        case = f"{cfg.serve.index_type}/{kind}"
        rows += [row("serve", case, "latency p50, batch 1 (HTTP)", round(float(np.percentile(lat, 50)), 2), "ms"),
                 row("serve", case, "latency p99, batch 1 (HTTP)", round(float(np.percentile(lat, 99)), 2), "ms")]
        batch = [items[i % len(items)] for i in range(64)]
        t = time.perf_counter()
        for _ in range(a.batches):
            _post(url + "/search", {key + "s": batch})
        rows.append(row("serve", case, "queries/s, batch 64 (HTTP)", round(64 * a.batches / (time.perf_counter() - t), 1), "q/s"))
        # where the time goes: the encoder alone vs the index alone, in-process
        raw = batch if kind == "text" else [qs["images"][i % len(qs["images"])] for i in range(64)]
        t = time.perf_counter()
        q = service.encoder.texts("xbt", raw) if kind == "text" else service.encoder.images("xbt", raw)
        enc = time.perf_counter() - t
        from xbt_dist.index.faiss_index import search
        g_mod = "image" if kind == "text" else "text"
        t = time.perf_counter()
        search(service.indexes.get("old", g_mod, service.kind), q, cfg.serve.top_k)
        idx = time.perf_counter() - t
        rows += [row("serve", case, "XBT encoder, batch 64", round(enc * 1000, 2), "ms"),
                 row("serve", case, "index search, batch 64", round(idx * 1000, 3), "ms")]
        print(f"[bench.serve] {rows[-5:]}", file=sys.stderr)
    srv.should_exit = True
    n = {g: s for g, s in service.gallery_sizes().items()}
    write_result(a.out, {"command": "nice -n 15 python -m bench.serve " + " ".join(sys.argv[1:]),
                         "name": "serve", "rows": rows,
                         "config": {"run": a.config, "index_type": cfg.serve.index_type, "gallery": n,
                                    "old": cfg.old.arch, "new": cfg.new.arch, "threads": a.threads},
                         "notes": ["batch 1: sequential single-query requests, one TCP connection each",
                                   "batch 64: one request carrying 64 queries ('texts'/'images')"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
