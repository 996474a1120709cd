"""`xbt serve`: real uvicorn on 127.0.0.1, real HTTP requests, real headless Chromium screenshot."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from upgrade_run import other_old_checkpoint, train_tiny_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body=None, ctype="application/json", method=None, timeout=60):
    """(status, headers, bytes) of one real HTTP request; 4xx/5xx are returned, not raised."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def jpeg(color=(200, 30, 30), size=32) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    from xbt_dist.index.build import build_indexes
    cfg = train_tiny_run(tiny, tmp_path_factory.mktemp("serve_run"),
                         ["serve.index_type=flat", "serve.top_k=5", "serve.max_upload_bytes=20000"])
    build_indexes(cfg)
    return cfg


@pytest.fixture(scope="module")
def server(run):
    """The app served by uvicorn in a thread, on a real socket."""
    import uvicorn

    from xbt_dist.serve.app import create_app
    from xbt_dist.serve.service import SearchService
    service = SearchService(run)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield {"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "service": service}
    srv.should_exit = True
    t.join(timeout=10)


def test_text_search_matches_exact_search(server, run):
    """Catches: wrong encoder/gallery pairing or key misalignment (XBT text query -> old image
    gallery must equal brute force over the old gallery's image rows)."""
    status, _, raw = http(server["url"] + "/search", {"text": "picture 3"})
    assert status == 200, raw
    res = json.loads(raw)
    assert (res["encoder"], res["gallery"], res["query_modality"]) == ("xbt", "old/image", "text")
    ids = [r["id"] for r in res["results"]]
    assert len(ids) == 5 and [r["rank"] for r in res["results"]] == list(range(5))
    from xbt_dist.index.build import index_dir, load_gallery
    keys, rows = load_gallery(index_dir(run) / "gallery" / "old", "old")
    q = server["service"].encoder.texts("xbt", ["picture 3"])[0]
    g = rows["image"] / np.linalg.norm(rows["image"], axis=1, keepdims=True)
    assert ids == [str(k) for k in keys[np.argsort(-(g @ q), kind="stable")[:5]]]
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)


def test_image_upload_batch_and_encoders(server):
    """Catches: raw image bodies, base64 batches, and the old/new encoders not answering."""
    status, _, raw = http(server["url"] + "/search?k=3&encoder=old", jpeg(), ctype="image/jpeg")
    res = json.loads(raw)
    assert status == 200 and (res["encoder"], res["gallery"], len(res["results"])) == ("old", "old/text", 3)
    b64 = base64.b64encode(jpeg((20, 200, 20))).decode()
    status, _, raw = http(server["url"] + "/search", {"images": [b64, b64], "encoder": "new", "k": 2})
    res = json.loads(raw)
    assert status == 200 and res["gallery"] == "new/text" and len(res["batch"]) == 2
    assert res["batch"][0] == res["batch"][1]
    status, _, raw = http(server["url"] + "/compare", {"text": "picture 1"})
    cols = json.loads(raw)["columns"]
    assert [c["encoder"] for c in cols] == ["old", "xbt", "new"] and cols[0]["results"][0]["caption"]


@pytest.mark.parametrize("body, ctype, status, message", [
    ({"text": "   "}, "application/json", 422, "text is empty"),
    ({"text": "x" * 1001}, "application/json", 422, "max_text_chars"),
    ({}, "application/json", 422, "exactly one of"),
    ({"text": "a", "k": 0}, "application/json", 422, "k=0 is invalid"),
    ({"text": "a", "encoder": "phi"}, "application/json", 422, "not served"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"this is not an image", "image/jpeg", 415, "not a readable image"),
    ({"image": base64.b64encode(b"GIF89a-broken").decode()}, "application/json", 415, "not a readable image"),
    ({"image": "%%%"}, "application/json", 422, "not valid base64"),
    (b"\xff" * 30000, "image/jpeg", 413, "max_upload_bytes"),
    (b"hello", "text/plain", 415, "not supported"),
])
def test_bad_input_gets_4xx_with_message(server, body, ctype, status, message):
    """Catches: bad input crashing the service or reaching the model (5xx, or a 200 on garbage)."""
    got, _, raw = http(server["url"] + "/search", body, ctype=ctype)
    assert got == status, raw
    assert message in json.loads(raw)["error"]


def test_health_metrics_thumbnails(server):
    status, _, raw = http(server["url"] + "/health")
    h = json.loads(raw)
    assert status == 200 and h["status"] == "ok" and h["galleries"]["old"]["items"] == 12
    http(server["url"] + "/search", {"text": ""})
    http(server["url"] + "/search", {"text": "picture 2"})
    status, headers, raw = http(server["url"] + "/metrics")
    text = raw.decode()
    assert 'xbt_requests_total{endpoint="search",status="422"}' in text
    assert 'xbt_queries_total{encoder="xbt"}' in text and "xbt_search_latency_seconds_count" in text
    status, headers, raw = http(server["url"] + "/thumb/0003")
    assert status == 200 and headers["content-type"] == "image/jpeg" and raw[:2] == b"\xff\xd8"
    assert http(server["url"] + "/thumb/nope")[0] == 404


def test_serve_refuses_index_of_another_old_model(run, tiny, tmp_path):
    """Catches: serving XBT queries against a gallery embedded by another old model."""
    from xbt_dist.cli import main
    from xbt_dist.config import ModelRef, dump_config
    from xbt_dist.index.build import build_indexes
    from xbt_dist.serve.service import SearchService
    other = copy.deepcopy(run)
    other.old = ModelRef(tiny["old_arch"], other_old_checkpoint(tiny, tmp_path), tiny["models_dir"])
    other.index.dir, other.index.views, other.index.types = str(tmp_path / "idx"), ("old",), ("flat",)
    build_indexes(other)                 # a consistent index of the OTHER old model's gallery
    served = copy.deepcopy(run)          # ... served with the run trained against the first one
    served.index.dir, served.serve.index_type = other.index.dir, "flat"
    with pytest.raises(ValueError, match="refusing to serve: the index's old gallery was embedded by"):
        SearchService(served)
    cfg_path = tmp_path / "served.yaml"
    cfg_path.write_text(dump_config(served))
    assert main(["serve", "--config", str(cfg_path), "--port", "0"]) == 2


@pytest.fixture(scope="module")
def cli_server(run, tmp_path_factory):
    """`xbt serve` as users start it: a subprocess of the real entry point."""
    from xbt_dist.config import dump_config
    cfg_path = tmp_path_factory.mktemp("cli_serve") / "run.yaml"
    cfg_path.write_text(dump_config(run))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "xbt_dist.cli", "serve", "--config", str(cfg_path),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if http(url + "/health", timeout=2)[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    if proc.poll() is not None:
        pytest.fail(f"xbt serve exited: {proc.stdout.read().decode()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_cli_serve_answers(cli_server):
    status, _, raw = http(cli_server + "/search", {"text": "picture 5", "k": 4})
    assert status == 200 and len(json.loads(raw)["results"]) == 4


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install -y chromium")
@pytest.mark.timeout(300)
def test_web_page_in_headless_chromium(cli_server, tmp_path):
    """Catches: a page that does not render the three result columns with their thumbnails. The
    page (GET /?q=...) runs the search on load; Chromium's DOM dump shows the result items, and its
    screenshot must contain the gallery thumbnails (saturated colours; the page chrome is grey)."""
    from PIL import Image
    url = cli_server + "/?q=picture%204"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", "--window-size=1200,900", "--virtual-time-budget=15000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'data-done="1"' in dom, dom[-2000:]
    for encoder in ("old", "xbt", "new"):
        assert f'data-encoder="{encoder}"' in dom
    assert dom.count('<div class="item">') == 15  # 3 columns x serve.top_k=5
    shot = tmp_path / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[:2] == (900, 1200)
    saturation = im.max(axis=2) - im.min(axis=2)
    thumb_pixels = int((saturation > 60).sum())
    # 15 thumbnails of 64x64 px (~61k px) of flat random colours; the page's own colours (blue
    # scores, focus ring) are a few hundred pixels.
    assert thumb_pixels > 15000, f"only {thumb_pixels} coloured pixels: thumbnails missing"
