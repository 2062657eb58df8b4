"""The HTTP layer: routes over the engine, the admin check, and one error envelope.

Routes validate (pydantic), call the engine and shape the response; nothing else lives here.
Every non-2xx answer is ``{"error": {"code", "message", "details"}}`` made by :func:`error_body`
and counted per code, whether it comes from the engine (``service.errors``, mapped to a status by
``STATUS``), from request validation, from the body-size limit or from ``/ready``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.catalog import Item, resolve_catalog_path
from service.demo import router as demo_router
from service.engine import Engine
from service.errors import (
    Forbidden,
    NotReady,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    ValidationFailed,
)
from service.metrics import Metrics
from service.protocol import ERROR_RESPONSES, RecommendRequest, ReindexRequest, ReloadRequest
from service.recommend import Recommendation
from service.reindex import Job
from service.rollout import ModelJob, ModelsView
from service.settings import Settings

log = logging.getLogger(__name__)

# The one table from an error code to its HTTP status (text-embeddings-inference's habit).
STATUS: dict[str, int] = {
    "validation_error": 422,
    "payload_too_large": 413,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "overloaded": 429,
    "not_ready": 503,
    "internal_error": 500,
}
_RECOMMENDATION = TypeAdapter(Recommendation)
# Which of CPREC_WORKERS answered (0 for a single process): set by service.supervisor.
WORKER = int(os.environ.get("CPREC_WORKER", "0"))


def error_body(code: str, message: str, details: Any = None) -> bytes:
    """``{"error": {"code", "message", "details"}}``, encoded as Starlette's JSONResponse does."""
    body = {"error": {"code": code, "message": message, "details": details}}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_response(
    metrics: Metrics,
    code: str,
    message: str,
    details: Any = None,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The envelope for ``code``, counted; every error response of the API is made here."""
    metrics.errors.labels(code).inc()
    return Response(
        error_body(code, message, details),
        status_code=status or STATUS.get(code, 500),
        headers=headers,
        media_type="application/json",
    )


def _error_headers(exc: ServiceError) -> dict[str, str]:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(int(exc.retry_after_s))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


# -- dependencies ---------------------------------------------------------------------------
async def get_engine(request: Request) -> Engine:
    """``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
    request for one attribute read."""
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def require_admin(request: Request, engine: EngineDep) -> None:
    """Bearer token, compared in constant time; admin endpoints are off without a token."""
    token = engine.settings.admin_token
    if token is None:
        raise Forbidden("admin endpoints are disabled: set CPREC_ADMIN_TOKEN to enable them")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("missing bearer token")
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden("invalid admin token")


AdminDep = Annotated[None, Depends(require_admin)]

# -- routes ---------------------------------------------------------------------------------
router = APIRouter()


@router.post("/recommend", response_model=Recommendation, tags=["recommend"])
async def recommend(req: RecommendRequest, engine: EngineDep) -> Response:
    """Top-k items per target domain for a mixed-domain history (titles and/or item ids)."""
    rec = await engine.recommend(req)
    # Serialised once, by pydantic-core, instead of FastAPI validating and encoding it again.
    return Response(_RECOMMENDATION.dump_json(rec), media_type="application/json")


@router.post("/items/reindex", status_code=202, response_model=Job, tags=["admin"])
async def reindex(req: ReindexRequest, engine: EngineDep, _: AdminDep) -> Job:
    """Replace, upsert or delete catalogue items given inline; runs as a background job."""
    items = None
    if req.items is not None:
        items = [Item(i.item_id, i.domain, i.title, i.extra_text, i.popularity) for i in req.items]
    path = None
    if req.path is not None and req.mode != "delete":  # only inside CPREC_CATALOG_DIR
        s = engine.settings
        path = resolve_catalog_path(s.catalog_dir, req.path, s.max_upload_bytes)
    return engine.reindexer.submit(req.mode, items=items, item_ids=req.item_ids, path=path)


@router.post("/items/reindex/upload", status_code=202, response_model=Job, tags=["admin"])
async def reindex_upload(
    engine: EngineDep,
    _: AdminDep,
    file: Annotated[UploadFile, File(description="JSONL or CSV catalogue")],
    mode: Annotated[str, Form(pattern="^(full|upsert)$")] = "full",
) -> Job:
    """Replace or upsert the catalogue from an uploaded JSONL/CSV file (parsed as data only)."""
    limit = engine.settings.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(
            f"upload exceeds {limit} bytes (max_upload_bytes)",
            details={"field": "file", "limit": limit},
        )
    name = (file.filename or "").lower()
    ctype = (file.content_type or "").lower()
    if name.endswith(".csv") or "csv" in ctype:
        fmt = "csv"
    elif name.endswith((".jsonl", ".ndjson", ".json")) or "json" in ctype:
        fmt = "jsonl"
    else:
        raise ValidationFailed(
            "cannot tell the upload's format: name it .jsonl or .csv", details={"field": "file"}
        )
    return engine.reindexer.submit(mode, upload=(data, fmt))


@router.get("/items/reindex/{job_id}", response_model=Job, tags=["admin"])
async def reindex_status(job_id: str, engine: EngineDep, _: AdminDep) -> Job:
    return engine.job(job_id)


@router.get("/models", response_model=ModelsView, tags=["admin"])
async def models(engine: EngineDep, _: AdminDep) -> ModelsView:
    """The served model and its index, the previous model (what a rollback returns to), the
    store's versions and aliases, and the latest model job."""
    return engine.rollout.view()


@router.post("/models/reload", status_code=202, response_model=ModelJob, tags=["admin"])
async def reload_model(
    engine: EngineDep, _: AdminDep, req: ReloadRequest | None = None
) -> ModelJob:
    """Switch to a store version (default: what CPREC_MODEL names now) without downtime: a
    background job verifies, loads, indexes and warms it beside the served one, then swaps."""
    return engine.rollout.reload(req.model if req is not None else None)


@router.post("/models/rollback", status_code=202, response_model=ModelJob, tags=["admin"])
async def rollback_model(engine: EngineDep, _: AdminDep) -> ModelJob:
    """Switch back to the previous model, the same way; 409 when there is none."""
    return engine.rollout.rollback()


@router.get("/models/jobs/{job_id}", response_model=ModelJob, tags=["admin"])
async def model_job(job_id: str, engine: EngineDep, _: AdminDep) -> ModelJob:
    return engine.rollout.job(job_id)


@router.get("/live", tags=["ops"])
async def live() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "live"}


@router.get("/ready", tags=["ops"])
async def ready(engine: EngineDep) -> dict[str, Any]:
    """200 once the model and index are loaded and warmed; 503 while loading or draining."""
    idx = engine.index
    if engine.ready and idx is not None:
        return {
            "status": "ready",
            "model_version": engine.model_version,
            "index_version": idx.version,
            "domains": {d: idx.size(d) for d in idx.domains},
            "worker": WORKER,
        }
    reason = "draining" if engine.draining else (engine.startup_error or "loading")
    raise NotReady(f"not ready: {reason}")


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)  # declared text/plain
async def metrics(engine: EngineDep) -> Response:
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- middleware -----------------------------------------------------------------------------
class BodyLimit:
    """Refuse bodies over ``limit`` bytes (413) before they are buffered or parsed."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.upload_limit, self.metrics = app, limit, upload_limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"].endswith("/upload")
        limit = self.upload_limit if upload else self.limit
        name = "max_upload_bytes" if upload else "max_body_bytes"
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await self._refuse(scope, receive, send, limit, name)
                return
            # The server enforces the declared length, so the body cannot exceed it.
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read the body up to the limit before the app runs, so
        # the 413 never depends on how the app's layers report an error raised from receive().
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await self._refuse(scope, receive, send, limit, name)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, limit: int, name: str
    ) -> None:
        resp = error_response(
            self.metrics,
            "payload_too_large",
            f"request body exceeds {limit} bytes ({name})",
            {"limit": limit, "setting": name},
        )
        await resp(scope, receive, send)


class Observe:
    """Latency and requests per route template and status, as plain ASGI: Starlette's
    ``BaseHTTPMiddleware`` adds a task and two memory streams to every request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception that escapes the app is answered as a 500 further out

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")  # set by the router
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(name, str(status)).inc()


# -- the fast path ----------------------------------------------------------------------------
_JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")


class App(FastAPI):
    """FastAPI with one route answered below its stack: ``POST /recommend`` with a JSON body that
    validates goes straight from the bytes to the engine and back (the route declared on the
    router stays, for the OpenAPI schema and as the path of everything else).

    Request and response are the route's own: the same model validated (from the bytes, by
    pydantic-core), the same engine call, the same serialiser, the same error envelope and
    counters. A body that does not validate, a chunked body, another content type or CORS
    take the full stack, so every error keeps the exact answer it always had. What it skips is
    a dozen middleware and routing layers, the dependency solver and a JSON round trip through
    Python objects per request (docs/decisions/006-serving-hier.md)."""

    fast_path = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.fast_path
            and scope["type"] == "http"
            and scope["path"] == "/recommend"
            and scope["method"] == "POST"
        ):
            await self._recommend(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _recommend(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        engine: Engine = self.state.engine
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        ctype = headers.get(b"content-type")
        if not declared.isdigit() or (ctype is not None and ctype.lower() not in _JSON_TYPES):
            await super().__call__(scope, receive, send)
            return
        if int(declared) > engine.settings.max_body_bytes:
            await super().__call__(scope, receive, send)  # BodyLimit answers the 413
            return
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            req = RecommendRequest.model_validate_json(body)
        except ValidationError:
            await super().__call__(scope, _replay(body, receive), send)  # the 422 as always
            return
        try:
            rec = await engine.recommend(req)
            content = _RECOMMENDATION.dump_json(rec)
            status, raw = 200, [(b"content-type", b"application/json")]
            raw.append((b"content-length", str(len(content)).encode()))
        except ServiceError as exc:
            resp = error_response(
                engine.metrics, exc.code, exc.message, exc.details, headers=_error_headers(exc)
            )
            status, raw, content = resp.status_code, resp.raw_headers, bytes(resp.body)
        except Exception:
            log.exception("unhandled error on /recommend")
            resp = error_response(
                engine.metrics, "internal_error", "internal error; see the server log"
            )
            status, raw, content = resp.status_code, resp.raw_headers, bytes(resp.body)
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content})
        engine.metrics.latency.labels("/recommend").observe(time.perf_counter() - t0)
        engine.metrics.requests.labels("/recommend", str(status)).inc()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands ``body`` over once, then waits on the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# -- the app --------------------------------------------------------------------------------
def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Each error as {field, reason, type}; a body that is not JSON says where it breaks."""
    out = []
    for e in exc.errors():
        err = {"field": _loc(e.get("loc", ())), "reason": e.get("msg", ""), "type": e.get("type")}
        if e.get("type") == "json_invalid":  # loc is ("body", char offset): say so plainly
            pos = (list(e.get("loc", ())) + [None, None])[1]
            err["field"] = "body"
            err["reason"] = (
                f"invalid JSON at character {pos}: "
                f"{(e.get('ctx') or {}).get('error', 'decode error')}"
            )
        out.append(err)
    return out


def _unparsable_body(exc: StarletteHTTPException) -> tuple[str, str]:
    """(reason, type) of a body FastAPI/Starlette could not parse (not UTF-8, broken multipart),
    which they report as a bare 400; this API makes it a 422 like every other bad body."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, UnicodeDecodeError):
        return f"body is not valid UTF-8 (byte {cause.start})", "utf8_invalid"
    why = str(cause or "")[:200] or str(exc.detail)
    return f"body cannot be parsed ({why})", "body_invalid"


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """``engine`` may be injected (tests serve a fake encoder); otherwise built from settings."""
    settings = settings or (engine.settings if engine else Settings())
    eng = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("settings: %s", settings.redacted())
        try:
            await eng.start()
        except Exception as exc:
            eng.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("start-up failed")
            raise
        try:
            yield
        finally:
            await eng.stop()

    app = App(
        title="cprec",
        version="0.1.0",
        lifespan=lifespan,
        description="Domain-agnostic LLM recommendations over a FAISS item index.",
    )
    app.state.engine = eng
    app.include_router(router, responses=ERROR_RESPONSES)
    app.include_router(demo_router, responses=ERROR_RESPONSES)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )

    def render(code: str, message: str, details: Any = None, **kw: Any) -> Response:
        return error_response(eng.metrics, code, message, details, **kw)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return render(exc.code, exc.message, exc.details, headers=_error_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errs = _validation_errors(exc)
        first = errs[0] if errs else {"field": "body", "reason": "invalid"}
        return render("validation_error", f"{first['field']}: {first['reason']}", errs)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            reason, kind = _unparsable_body(exc)
            details = [{"field": "body", "reason": reason, "type": kind}]
            return render("validation_error", f"body: {reason}", details)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        headers = getattr(exc, "headers", None)
        return render(code, str(exc.detail), status=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return render("internal_error", "internal error; see the server log")

    app.add_middleware(Observe, metrics=eng.metrics)
    app.add_middleware(
        BodyLimit,
        limit=settings.max_body_bytes,
        upload_limit=settings.max_upload_bytes,
        metrics=eng.metrics,
    )
    return app
