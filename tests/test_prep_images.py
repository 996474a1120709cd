"""`xbt prep images` against a local HTTP server: good images, a 404, a slow URL past the timeout
and bytes that are not an image. Failures must be in the report; the tars hold exactly the good
samples; `validate` agrees with sizes.json."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import webdataset as wds
from PIL import Image

from xbt_dist.prep.images import ImagesConfig, download_images
from xbt_dist.prep.validate import validate_shards

SLOW_SECONDS = 4  # > the 1 s download timeout, bounded so the server thread always ends


def _image_bytes(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24 + i, 16), (40 * i % 256, 90, 200)).save(buf, format=fmt)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    images: dict[str, tuple[bytes, str]] = {}

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        if self.path == "/slow.jpg":
            time.sleep(SLOW_SECONDS)
        if self.path in self.images:
            body, ctype = self.images[self.path]
        elif self.path in ("/not_image.jpg", "/slow.jpg"):
            body, ctype = b"<html>this is not an image</html>", "image/jpeg"
        else:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


@pytest.fixture
def server():
    _Handler.images = {}
    for i in range(6):
        fmt, ext, ctype = ("PNG", "png", "image/png") if i % 2 else ("JPEG", "jpg", "image/jpeg")
        _Handler.images[f"/good{i}.{ext}"] = (_image_bytes(i, fmt), ctype)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: a free port
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.mark.timeout(120)
def test_prep_images_records_failures_and_keeps_good_samples(server, tmp_path):
    import pandas as pd

    good = sorted(_Handler.images)
    rows = [{"URL": server + p, "TEXT": f"caption of {p}"} for p in good]
    bad = {"/missing.jpg": "404", "/slow.jpg": "timed out", "/not_image.jpg": "not an image"}
    rows += [{"URL": server + p, "TEXT": f"bad {p}"} for p in bad]
    pd.DataFrame(rows).to_parquet(tmp_path / "urls.parquet")
    out = tmp_path / "shards"

    cfg = ImagesConfig(url_list=str(tmp_path / "urls.parquet"), output_folder=str(out),
                       url_col="URL", caption_col="TEXT", processes_count=1, thread_count=4,
                       number_sample_per_shard=5, timeout=1, image_size=32, compute_hash=None)
    report = download_images(cfg)

    assert report["totals"]["count"] == 9
    assert report["totals"]["successes"] == 6
    assert report["failures_total"] == 3
    failed_urls = {f["url"]: f["error_message"] for f in report["failures"]}
    assert set(failed_urls) == {server + p for p in bad}
    assert "404" in failed_urls[server + "/missing.jpg"]
    assert "timed out" in failed_urls[server + "/slow.jpg"].lower()
    assert json.loads((out / "report.json").read_text())["failures_total"] == 3

    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)
                   .decode("pil"))
    assert sorted(s["txt"] for s in samples) == sorted(f"caption of {p}" for p in good)
    assert all(s["jpg"].size[0] <= 32 for s in samples)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "image_text_shards" and manifest["counts"]["successes"] == 6

    # the CLI rebuilds the same report without downloading again
    from xbt_dist.prep.cli import main as prep_main

    (out / "report.json").unlink()
    assert prep_main(["images", cfg.url_list, str(out), "--summarize-only"]) == 0
    assert json.loads((out / "report.json").read_text())["totals"] == report["totals"]

    v = validate_shards(out)
    assert v["totals"]["good"] == 6 and v["totals"]["problems"] == 0


def test_prep_images_names_missing_column(tmp_path):
    import pandas as pd

    pd.DataFrame({"link": ["http://x/a.jpg"], "TEXT": ["a"]}).to_parquet(tmp_path / "u.parquet")
    cfg = ImagesConfig(url_list=str(tmp_path / "u.parquet"), output_folder=str(tmp_path / "o"),
                       url_col="URL", caption_col="TEXT")
    with pytest.raises(ValueError, match="--url-col"):
        download_images(cfg)
