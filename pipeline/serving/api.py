"""The HTTP side of ``ovsam serve``: a FastAPI app over a :class:`Backend` (the model replicas).

The app owns what must be the same whichever replica answers: the image store (each image's bytes and size under
an unguessable id, bounded in bytes, with a TTL), the vocabulary specs, the limits (body size, pixels, time), the
bearer token, CORS, URL prefixes, the browser page and Label Studio's routes (:mod:`.labelstudio`). Every body
is read (:mod:`.inputs`) and checked (:mod:`.requests`) here before a replica sees it. The Ray Serve
application (:mod:`.app`) passes a backend that calls the model deployment; :class:`LocalBackend` runs a
:class:`~.service.SegmentService` in this process (build the service on the backend's worker thread: every torch
call should come from one thread).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.serving import labelstudio as LS
from pipeline.serving.cache import ByteLRU
from pipeline.serving.inputs import check_url, parse_json, read_body, read_url
from pipeline.serving.detect import detector_info
from pipeline.serving.requests import (
    DETECT_SCHEMA,
    ApiError,
    DetectParams,
    EverythingParams,
    SegmentParams,
    VocabularySpec,
    parse_detect,
    parse_everything,
    parse_segment,
    parse_url,
    parse_vocabulary,
)
from pipeline.serving.service import DEFAULT_VOCABULARY, SegmentCall, SegmentService, new_id, vocabulary_id
from pipeline.serving.settings import ServeSettings

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).with_name("static")
ISSUED_IDS_KEPT = 200_000
BUILTINS = ["coco", "lvis", "imagenet21k"]


class Backend(Protocol):
    """What the app needs from the model replicas. ``data`` is an opaque handle to an image's bytes (bytes here,
    an object reference under Ray). Failures come back as :class:`ApiError`."""

    async def embed(self, image_id: str, data: Any) -> dict[str, int]: ...

    async def segment(self, image_id: str, data: Any, params: SegmentParams,
                      vocabulary: VocabularySpec | None) -> dict[str, Any]: ...

    async def everything(self, image_id: str, data: Any, params: EverythingParams,
                         vocabulary: VocabularySpec | None) -> dict[str, Any]: ...

    async def add_vocabulary(self, vocab_id: str, spec: VocabularySpec) -> dict[str, Any]: ...

    async def detect(self, image_id: str, data: Any, params: DetectParams) -> dict[str, Any]: ...

    async def stats(self) -> list[dict[str, Any]]: ...

    def store(self, data: bytes) -> Any: ...


class LocalBackend:
    """A :class:`SegmentService` in this process, its calls on one worker thread (no micro-batching), and the
    :class:`~.detect.DetectService` beside it where the app has a detector."""

    def __init__(self, service: SegmentService, detect: Any = None) -> None:
        self.service = service
        self.detect_service = detect
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ovsam-model")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def store(self, data: bytes) -> Any:
        return data

    async def embed(self, image_id: str, data: Any) -> dict[str, int]:
        return await self._run(self.service.embed, image_id, data)

    async def segment(self, image_id, data, params, vocabulary):
        def run():
            self.service.ensure_vocabulary(params.vocabulary, vocabulary)
            out = self.service.segment([SegmentCall(image_id, params, lambda: data)])[0]
            if isinstance(out, ApiError):
                raise out
            return out
        return await self._run(run)

    async def everything(self, image_id, data, params, vocabulary):
        def run():
            self.service.ensure_vocabulary(params.vocabulary, vocabulary)
            return self.service.everything(image_id, params, lambda: data)
        return await self._run(run)

    async def add_vocabulary(self, vocab_id, spec):
        return await self._run(self.service.add_vocabulary, vocab_id, spec)

    async def detect(self, image_id, data, params):
        if self.detect_service is None:
            raise no_detector()
        return await self._run(self.detect_service.detect, image_id, params, lambda: data)

    async def stats(self):
        return [await self._run(self.service.stats)]


@dataclass
class StoredImage:
    data: Any
    width: int
    height: int
    nbytes: int


class ImageStore:
    """Each image's bytes handle and size under its id, bounded in bytes, expiring ``ttl_s`` after last use.
    Ids handed out are remembered (the latest ``ISSUED_IDS_KEPT``), so an expired id is told from an unknown one."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.entries: ByteLRU[StoredImage] = ByteLRU(max_bytes, ttl_s, sizeof=lambda e: e.nbytes)
        self.issued: OrderedDict[str, None] = OrderedDict()

    def add(self, image_id: str, entry: StoredImage) -> None:
        if not self.entries.put(image_id, entry):
            raise ApiError(413, "body_too_large", f"the image ({entry.nbytes} bytes) is larger than the whole "
                           f"image store ({self.entries.max_bytes} bytes)", "image")
        self.issued[image_id] = None
        while len(self.issued) > ISSUED_IDS_KEPT:
            self.issued.popitem(last=False)

    def get(self, image_id: str) -> StoredImage:
        entry = self.entries.get(image_id)
        if entry is not None:
            return entry
        if image_id in self.issued:
            raise ApiError(404, "image_expired", f"image {image_id} has expired (unused for more than "
                           f"{self.entries.ttl_s:g} s, or pushed out of the store); upload it again", "image_id")
        raise ApiError(404, "image_not_found", f"no image {image_id!r}; upload it with POST /v1/images"[:300],
                       "image_id")


def make_app(backend: Backend, settings: ServeSettings, *, token: str | None = None,
             label_studio_key: str | None = None, precision: str | None = None) -> FastAPI:
    """The FastAPI app: the routes of ``docs/serve.md`` over ``backend``, with the limits and access rules of
    ``settings``. ``token`` and ``label_studio_key`` are the secrets ``settings`` names by environment variable,
    read where the app runs; ``precision`` the one the replicas resolved (default: ``settings.precision``)."""
    app = FastAPI(title="ovsam serve", version="1",
                  description="Segment and name objects interactively with Open-Vocabulary SAM.")
    store = ImageStore(settings.image_store_bytes, settings.cache_ttl)
    version = f"ovsam-{settings.model}-{precision or settings.precision}"
    detector_options = settings.detector_options()
    detector = None if detector_options is None else detector_info(settings.detector_name, detector_options)
    vocab_specs: dict[str, VocabularySpec] = {}
    counters: Counter = Counter()
    if settings.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin, allow_methods=["*"],
                           allow_headers=["*"])
    open_paths = {"/", "/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/favicon.ico"}

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(value.strip().encode(), token.encode())
        if scheme.lower() == "basic":  # Label Studio's ML backend connection sends basic auth: the token as password
            import base64
            import binascii

            try:
                _, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return hmac.compare_digest(password.encode(), token.encode())
        return False

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        root = request.scope.get("root_path", "")  # an app under a route prefix (``serve run --route-prefix``)
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = path if not path.startswith("/v1/images/") else "/v1/images/{id}/" + path.rsplit("/", 1)[-1]
        counters[("requests", request.method, route)] += 1
        if token is not None and path not in open_paths and not path.startswith("/static/") \
                and request.method != "OPTIONS" and not authorised(request):
            counters[("errors", request.method, route, 401)] += 1
            return _error(ApiError(401, "unauthorized", "missing or wrong token: send Authorization: Bearer <token>",
                                   "Authorization"))
        try:
            response = await asyncio.wait_for(call_next(request), settings.request_timeout)
        except asyncio.TimeoutError:
            response = _error(ApiError(504, "timeout", f"the request took longer than "
                                       f"{settings.request_timeout:g} s"))
        if response.status_code >= 400:
            counters[("errors", request.method, route, response.status_code)] += 1
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(ApiError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        logger.exception("ovsam serve: %s %s failed", request.method, request.url.path)
        return _error(ApiError(500, "internal", f"{type(exc).__name__}: {exc}"[:500]))

    async def add_image(data: bytes) -> dict[str, Any]:
        image_id = new_id()
        handle = backend.store(data)
        size = await backend.embed(image_id, handle)
        store.add(image_id, StoredImage(handle, size["width"], size["height"], len(data)))
        return {"image_id": image_id, **size}

    async def fetch_url(url: str, headers: dict[str, str] | None = None) -> bytes:
        options = dict(settings.storage_options)
        if headers:
            options["headers"] = headers
        return await asyncio.to_thread(read_url, url, settings.max_body_bytes, options)

    # ------------------------------------------------------------------------------------------------- page
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # --------------------------------------------------------------------------------------------------- API
    @app.post("/v1/images", summary="Upload an image (raw body, multipart file, or JSON {\"url\"}); embeds it once",
              openapi_extra=_body_doc({"type": "object", "properties": {"url": {"type": "string"}}}, raw=True))
    async def upload(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = parse_json(await read_body(request, 64 * 1024))
            url = check_url(parse_url(body), settings.allow_url_prefix)
            return await add_image(await fetch_url(url))
        if kind == "multipart/form-data":
            await read_body(request, settings.max_body_bytes)  # enforce the limit before parsing the form
            try:
                form = await request.form()
            except Exception as e:
                raise ApiError(400, "invalid_form", f"cannot parse the multipart form: {e}") from None
            files = [v for v in form.values() if hasattr(v, "read")]
            if len(files) != 1:
                raise ApiError(422, "invalid_field", f"the form needs exactly one file field, got {len(files)}",
                               "file")
            return await add_image(await files[0].read())
        if kind.startswith("image/") or kind == "application/octet-stream":
            data = await read_body(request, settings.max_body_bytes)
            if not data:
                raise ApiError(422, "invalid_image", "the body is empty", "image")
            return await add_image(data)
        raise ApiError(415, "unsupported_media_type", f"Content-Type {kind or '(none)'!r}: send the image as "
                       "image/* or application/octet-stream, a multipart form, or JSON {\"url\": ...}",
                       "Content-Type")

    def vocabulary_spec(vocab: str | None) -> VocabularySpec | None:
        if vocab is None or vocab == DEFAULT_VOCABULARY:
            return None
        spec = vocab_specs.get(vocab)
        if spec is None:
            raise ApiError(404, "vocabulary_not_found", f"unknown vocabulary {vocab!r}; create it with POST "
                           "/v1/vocabularies", "vocabulary")
        return spec

    @app.post("/v1/images/{image_id}/segment", summary="Segment and name one prompt (points and/or a box)",
              openapi_extra=_body_doc(_SEGMENT_SCHEMA))
    async def segment(image_id: str, request: Request):
        entry = store.get(image_id)
        params = parse_segment(parse_json(await read_body(request, 1024 * 1024)), entry.width, entry.height)
        spec = vocabulary_spec(params.vocabulary)
        return await backend.segment(image_id, entry.data, params, spec)

    @app.post("/v1/images/{image_id}/everything", summary="Segment and name everything (a point grid)",
              openapi_extra=_body_doc({"type": "object"}))
    async def everything(image_id: str, request: Request):
        entry = store.get(image_id)
        body = await read_body(request, 64 * 1024)
        params = parse_everything(parse_json(body) if body.strip() else {})
        spec = vocabulary_spec(params.vocabulary)
        return await backend.everything(image_id, entry.data, params, spec)

    @app.post("/v1/images/{image_id}/detect", summary="Find every instance of typed classes (the server's "
              "detector), each with its OV-SAM mask and label", openapi_extra=_body_doc(DETECT_SCHEMA))
    async def detect(image_id: str, request: Request):
        if detector is None:
            raise no_detector()
        entry = store.get(image_id)
        params = parse_detect(parse_json(await read_body(request, 256 * 1024)))
        return await backend.detect(image_id, entry.data, params)

    @app.post("/v1/vocabularies", summary="Create a vocabulary from class names or a built-in list",
              openapi_extra=_body_doc({"type": "object", "properties": {
                  "names": {"type": "array", "items": {"type": "string"}}, "builtin": {"enum": BUILTINS}}}))
    async def add_vocabulary(request: Request):
        spec = parse_vocabulary(parse_json(await read_body(request, 4 * 1024 * 1024)), BUILTINS)
        vid = vocabulary_id(spec)
        out = await backend.add_vocabulary(vid, spec)
        vocab_specs[vid] = spec
        return out

    @app.get("/v1/vocabularies", summary="The vocabularies created so far")
    async def list_vocabularies():
        rows = [{"vocabulary_id": DEFAULT_VOCABULARY, "spec": settings.vocabulary}]
        rows += [{"vocabulary_id": k, "size": len(v.names) if v.names else None, "builtin": v.builtin}
                 for k, v in vocab_specs.items()]
        return {"vocabularies": rows}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": settings.model, "precision": precision or settings.precision,
                "replicas": settings.replicas, "detector": detector}

    async def all_stats() -> dict[str, Any]:
        return {"image_store": store.entries.stats(), "replicas": await backend.stats(),
                "requests": {" ".join(str(p) for p in k[1:]): v for k, v in counters.items() if k[0] == "requests"},
                "errors": {" ".join(str(p) for p in k[1:]): v for k, v in counters.items() if k[0] == "errors"}}

    @app.get("/v1/stats")
    async def stats():
        return await all_stats()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return _prometheus(await all_stats(), counters)

    LS.add_routes(app, LS.AppContext(settings, label_studio_key, version, backend, store, vocab_specs, add_image,
                                     fetch_url))
    return app


def no_detector() -> ApiError:
    return ApiError(404, "detector_not_configured", "this server has no detector: start it with --detector NAME "
                    "--detector-weights DIR to find classes by name")


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


_SEGMENT_SCHEMA = {
    "type": "object",
    "properties": {
        "points": {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "minItems": 2,
                                              "maxItems": 3}, "description": "[[x, y, 1|0], ...]"},
        "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "previous": {"type": "string", "description": "previous_id of an earlier answer (re-click)"},
        "vocabulary": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1},
        "format": {"enum": ["rle", "polygon"]},
    },
}


def _body_doc(schema: dict[str, Any], raw: bool = False) -> dict[str, Any]:
    content = {"application/json": {"schema": schema}}
    if raw:
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}}}
    return {"requestBody": {"required": True, "content": content}}


def _prometheus(stats: dict[str, Any], counters: Counter) -> str:
    lines = ["# TYPE ovsam_serve_requests_total counter"]
    for key, value in sorted(counters.items(), key=str):
        if key[0] == "requests":
            lines.append(f'ovsam_serve_requests_total{{method="{key[1]}",route="{key[2]}"}} {value}')
    lines.append("# TYPE ovsam_serve_errors_total counter")
    for key, value in sorted(counters.items(), key=str):
        if key[0] == "errors":
            lines.append(f'ovsam_serve_errors_total{{method="{key[1]}",route="{key[2]}",status="{key[3]}"}} {value}')
    for name, value in stats["image_store"].items():
        lines.append(f"ovsam_serve_image_store_{name} {value}")
    for i, rep in enumerate(stats["replicas"]):
        for name, value in rep["cache"].items():
            lines.append(f'ovsam_serve_feature_cache_{name}{{replica="{rep.get("replica", i)}"}} {value}')
        if "rss_bytes" in rep:
            lines.append(f'ovsam_serve_replica_rss_bytes{{replica="{rep.get("replica", i)}"}} {rep["rss_bytes"]}')
    return "\n".join(lines) + "\n"


__all__ = ["Backend", "ImageStore", "LocalBackend", "make_app"]
