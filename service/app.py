"""The FastAPI application: lifespan builds the engine; one error envelope for every non-2xx."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import Engine
from service.errors import ServiceError, envelope
from service.metrics import Metrics
from service.protocol import ERROR_RESPONSES
from service.routes import router
from service.settings import Settings

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuse bodies over ``limit`` bytes (413) before they are buffered or parsed."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

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
                await _send_413(send, limit, name)
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
                await _send_413(send, limit, name)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Observe:
    """Latency and requests per route template and status, as plain ASGI.

    ``@app.middleware("http")`` (Starlette's BaseHTTPMiddleware) adds a task and two memory
    streams to every request; on 2 cores that event-loop time is taken from the forward passes.
    """

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


async def _send_413(send: Send, limit: int, name: str = "max_body_bytes") -> None:
    import json

    body = json.dumps(
        envelope(
            "payload_too_large",
            f"request body exceeds {limit} bytes ({name})",
            {"limit": limit, "setting": name},
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """``engine`` may be injected (tests use a fake encoder); otherwise built from settings."""
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

    app = FastAPI(
        title="cprec",
        version="0.1.0",
        lifespan=lifespan,
        description="Domain-agnostic LLM recommendations over a FAISS item index.",
    )
    app.state.engine = eng
    app.include_router(router, responses=ERROR_RESPONSES)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )

    def _render(
        code: str,
        status: int,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        eng.metrics.errors.labels(code).inc()
        return JSONResponse(envelope(code, message, details), status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _render(exc.code, exc.http_status, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [
            {"field": _loc(e.get("loc", ())), "reason": e.get("msg", ""), "type": e.get("type")}
            for e in exc.errors()
        ]
        for e, out in zip(exc.errors(), errs, strict=True):
            if e.get("type") == "json_invalid":  # loc is ("body", char offset): say so plainly
                pos = (list(e.get("loc", ())) + [None, None])[1]
                out["field"] = "body"
                out["reason"] = (
                    f"invalid JSON at character {pos}: "
                    f"{(e.get('ctx') or {}).get('error', 'decode error')}"
                )
        first = errs[0] if errs else {"field": "body", "reason": "invalid"}
        return _render("validation_error", 422, f"{first['field']}: {first['reason']}", errs)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI/Starlette turn a body they cannot parse (not UTF-8, broken multipart) into
            # a bare 400; make it a 422 like every other bad body, naming field and reason.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, UnicodeDecodeError):
                reason, kind = f"body is not valid UTF-8 (byte {cause.start})", "utf8_invalid"
            else:
                why = str(cause or "")[:200] or str(exc.detail)
                reason, kind = f"body cannot be parsed ({why})", "body_invalid"
            return _render(
                "validation_error",
                422,
                f"body: {reason}",
                [{"field": "body", "reason": reason, "type": kind}],
            )
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return _render(code, exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _render("internal_error", 500, "internal error; see the server log")

    app.add_middleware(Observe, metrics=eng.metrics)
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes
    )
    return app
