"""`xbt serve`: FastAPI app over a `SearchService`.

    POST /search    {"text": "..."} | {"texts": [...]} | {"image": "<base64>"} | {"images": [...]}
                    optional "k", "encoder" (xbt | old | new), "captions": true;
                    or a raw image body (Content-Type: image/*) with ?k=&encoder=
                    -> {"encoder", "gallery", "index", "query_modality", "results": [...]}
                       (a batch request gets "batch": [[...], ...] instead of "results")
    POST /compare   one text or image, answered by every served encoder (the web page's call)
    GET  /health    model/index identities and sizes;  GET /metrics: Prometheus text
    GET  /thumb/{id} gallery thumbnail (JPEG);  GET /: the web page

Bad input never reaches the model: empty or over-long text and unknown encoders get 422, an upload
that is not an image 415, an oversized body 413 (checked on Content-Length and again while
reading, so a lying client cannot push more), malformed JSON 400; each with a message naming the
problem and the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import time

# Module level, not inside create_app: FastAPI resolves the (string) annotation `Request` of the
# handlers in this module's globals.
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from xbt_dist.config import RunConfig
from xbt_dist.serve.page import PAGE
from xbt_dist.serve.service import SearchService


class BadInput(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _decode_image(raw: bytes, what: str = "upload"):
    from PIL import Image, UnidentifiedImageError
    if not raw:
        raise BadInput(422, f"the {what} is empty: send the bytes of a JPEG/PNG/WebP image")
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()  # decode now: a truncated file fails here, not inside the model
        return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(415, f"the {what} is not a readable image ({type(e).__name__}: {e}); "
                            "send a JPEG, PNG or WebP file") from e


def parse_query(service: SearchService, body: dict) -> tuple[str, list, bool]:
    """(modality, items, batched) of a JSON search body, or BadInput."""
    sc = service.cfg.serve
    given = [k for k in ("text", "texts", "image", "images") if k in body]
    if len(given) != 1:
        raise BadInput(422, "send exactly one of 'text', 'texts', 'image' (base64) or 'images'"
                            + (f" (got {given})" if given else ""))
    key = given[0]
    batched = key.endswith("s")
    items = body[key] if batched else [body[key]]
    if not isinstance(items, list) or not items:
        raise BadInput(422, f"'{key}' must be a non-empty list" if batched else f"'{key}' is empty")
    if len(items) > sc.max_batch:
        raise BadInput(413, f"{len(items)} queries in one request; the limit is serve.max_batch={sc.max_batch}")
    if key.startswith("text"):
        for t in items:
            if not isinstance(t, str) or not t.strip():
                raise BadInput(422, "text is empty: send a caption such as 'a red circle'")
            if len(t) > sc.max_text_chars:
                raise BadInput(422, f"text has {len(t)} characters; the limit is "
                                    f"serve.max_text_chars={sc.max_text_chars}")
        return "text", [t.strip() for t in items], batched
    images = []
    for i, b64 in enumerate(items):
        if not isinstance(b64, str):
            raise BadInput(422, "'image' must be a base64 string of the image file")
        if b64.startswith("data:"):  # a data URL from the browser's FileReader
            b64 = b64.split(",", 1)[-1]
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadInput(422, f"image {i} is not valid base64 ({e}); send base64 of the file bytes") from e
        if len(raw) > sc.max_upload_bytes:
            raise BadInput(413, f"image {i} is {len(raw)} bytes; the limit is serve.max_upload_bytes="
                                f"{sc.max_upload_bytes}")
        images.append(_decode_image(raw, f"image {i}"))
    return "image", images, batched


def _k(service: SearchService, value) -> int:
    sc = service.cfg.serve
    if value is None:
        return sc.top_k
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= sc.max_k:
        raise BadInput(422, f"k={value!r} is invalid: expected an int in [1, {sc.max_k}] (serve.max_k)")
    return value


def create_app(service: SearchService) -> FastAPI:
    app = FastAPI(title="xbt serve", description="XBT queries against the old gallery index")
    sc = service.cfg.serve

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > sc.max_upload_bytes:
            raise BadInput(413, f"request body is {declared} bytes; the limit is "
                                f"serve.max_upload_bytes={sc.max_upload_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > sc.max_upload_bytes:  # Content-Length may be absent (chunked) or wrong
                raise BadInput(413, f"request body exceeds serve.max_upload_bytes={sc.max_upload_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def query_of(request: Request) -> tuple[str, list, bool, dict]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await read_body(request)
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return "image", [_decode_image(raw)], False, dict(request.query_params)
        if ctype != "application/json":
            raise BadInput(415, f"Content-Type {ctype or 'missing'!r} is not supported: send "
                                "application/json ({\"text\": ...}) or the raw image (image/jpeg)")
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError as e:
            raise BadInput(400, f"the body is not valid JSON ({e.msg} at position {e.pos})") from e
        if not isinstance(body, dict):
            raise BadInput(400, "the JSON body must be an object such as {\"text\": \"a red circle\"}")
        modality, items, batched = parse_query(service, body)
        return modality, items, batched, body

    def run_search(encoder, modality, items, k, captions: bool) -> list[list[dict]]:
        if encoder not in service.encoders:
            raise BadInput(422, f"encoder={encoder!r} is not served (have {service.encoders})")
        results = service.search(encoder, modality, items, k)
        if captions:
            store = service.store
            for row in results:
                for r in row:
                    r["caption"] = store.caption(r["id"])
        return results

    def answer(endpoint: str, fn):
        async def handler(request: Request):
            t0 = time.perf_counter()
            try:
                payload = await fn(request)
                status = 200
            except BadInput as e:
                payload, status = {"error": e.message, "status": e.status}, e.status
            except Exception as e:  # never crash the server on one request; say what broke
                print(f"[serve] {endpoint}: {type(e).__name__}: {e}", file=sys.stderr)
                payload, status = {"error": f"internal error: {type(e).__name__}: {e}", "status": 500}, 500
            service.metrics.request(endpoint, status)
            if status == 200:
                payload["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            return JSONResponse(payload, status_code=status)
        return handler

    async def do_search(request: Request) -> dict:
        modality, items, batched, opts = await query_of(request)
        encoder = opts.get("encoder", "xbt")
        captions = opts.get("captions") in (True, "1", "true")
        # The model and index run in a worker thread: /health and /metrics stay responsive.
        results = await run_in_threadpool(run_search, encoder, modality, items,
                                          _k(service, opts.get("k")), captions)
        out = {"encoder": encoder, "gallery": f"{service.search_gallery(encoder)}/"
                                              f"{'image' if modality == 'text' else 'text'}",
               "index": service.kind, "query_modality": modality}
        out["batch" if batched else "results"] = results if batched else results[0]
        return out

    async def do_compare(request: Request) -> dict:
        modality, items, batched, opts = await query_of(request)
        if batched or len(items) != 1:
            raise BadInput(422, "/compare takes one query ('text' or 'image'); use /search for batches")
        k = _k(service, opts.get("k"))
        columns = []
        for e in service.encoders:
            results = await run_in_threadpool(run_search, e, modality, items, k, True)
            columns.append({"encoder": e, "gallery": service.search_gallery(e), "results": results[0]})
        return {"query_modality": modality, "index": service.kind, "columns": columns}

    app.post("/search")(answer("search", do_search))
    app.post("/compare")(answer("compare", do_compare))

    @app.get("/health")
    def health():
        service.metrics.request("health", 200)
        return {"status": "ok", **service.describe()}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(service.metrics.render(service.gallery_sizes()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/thumb/{key}")
    def thumb(key: str):
        data = service.store.thumbnail(key)
        if data is None:
            return JSONResponse({"error": f"no gallery image with id {key!r}", "status": 404}, 404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    return app


def serve(cfg: RunConfig, device: str = "cpu") -> None:
    """Load everything, then serve until interrupted (uvicorn)."""
    import uvicorn
    service = SearchService(cfg, device=device)
    print(f"[serve] {json.dumps(service.describe())}", file=sys.stderr)
    print(f"[serve] http://{cfg.serve.host}:{cfg.serve.port}/  (POST /search, /health, /metrics)",
          file=sys.stderr)
    uvicorn.run(create_app(service), host=cfg.serve.host, port=cfg.serve.port, log_level="warning")
