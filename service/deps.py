"""Dependency aliases: routes reach the engine and the admin check only through these."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.engine import Engine
from service.errors import Forbidden, Unauthorized


async def get_engine(request: Request) -> Engine:
    """``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    hop (and GIL handoff) per request for one attribute read. Its rps effect at concurrency 32
    on 2 cores was within noise; it is simply work the request does not need."""
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def require_admin(request: Request, engine: EngineDep) -> None:
    """Bearer token, compared in constant time; admin endpoints are off without a token.
    (``async``, like ``get_engine``: no thread pool for a header check.)"""
    token = engine.settings.admin_token
    if token is None:
        raise Forbidden("admin endpoints are disabled: set CPREC_ADMIN_TOKEN to enable them")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden("invalid admin token")


AdminDep = Annotated[None, Depends(require_admin)]
