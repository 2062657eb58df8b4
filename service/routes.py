"""HTTP routes: validate, call the engine, shape the response. Nothing else lives here."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.catalog import resolve_catalog_path
from service.deps import AdminDep, EngineDep
from service.errors import PayloadTooLarge, ValidationFailed
from service.index import Item
from service.protocol import JobStatus, RecommendRequest, RecommendResponse, ReindexRequest

router = APIRouter()


@router.post("/recommend", response_model=RecommendResponse, tags=["recommend"])
async def recommend(req: RecommendRequest, engine: EngineDep) -> Response:
    """Top-k items per target domain for a mixed-domain history (titles and/or item ids)."""
    resp = await engine.recommend(req)
    # Serialised once, by pydantic-core: returning the model would have FastAPI dump it,
    # validate it again and encode it again on the event loop, for every request (perf, issue 5).
    return Response(resp.model_dump_json(), media_type="application/json")


@router.post("/items/reindex", status_code=202, response_model=JobStatus, tags=["admin"])
async def reindex(req: ReindexRequest, engine: EngineDep, _: AdminDep) -> JobStatus:
    """Replace, upsert or delete catalogue items given inline; runs as a background job."""
    items = None
    if req.items is not None:
        items = [Item(i.item_id, i.domain, i.title, i.extra_text, i.popularity) for i in req.items]
    path = None
    if req.path is not None and req.mode != "delete":  # only inside CPREC_CATALOG_DIR
        s = engine.settings
        path = resolve_catalog_path(s.catalog_dir, req.path, s.max_upload_bytes)
    return engine.submit_reindex(req.mode, items=items, item_ids=req.item_ids, path=path)


@router.post("/items/reindex/upload", status_code=202, response_model=JobStatus, tags=["admin"])
async def reindex_upload(
    engine: EngineDep,
    _: AdminDep,
    file: Annotated[UploadFile, File(description="JSONL or CSV catalogue")],
    mode: Annotated[str, Form(pattern="^(full|upsert)$")] = "full",
) -> JobStatus:
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
    return engine.submit_reindex(mode, upload=(data, fmt))


@router.get("/items/reindex/{job_id}", response_model=JobStatus, tags=["admin"])
async def reindex_status(job_id: str, engine: EngineDep, _: AdminDep) -> JobStatus:
    return engine.job(job_id)


@router.get("/live", tags=["ops"])
async def live() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "live"}


@router.get("/ready", tags=["ops"])
async def ready(engine: EngineDep) -> JSONResponse:
    """200 once the model and index are loaded and warmed; 503 while loading or draining."""
    if engine.ready and engine.index is not None:
        return JSONResponse(
            {
                "status": "ready",
                "model_version": engine.model_version,
                "index_version": engine.index.version,
                "domains": {d: engine.index.size(d) for d in engine.index.domains},
            }
        )
    reason = "draining" if engine.draining else (engine.startup_error or "loading")
    return JSONResponse(
        {"error": {"code": "not_ready", "message": f"not ready: {reason}", "details": None}},
        status_code=503,
    )


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)  # declared text/plain
async def metrics(request: Request, engine: EngineDep) -> Response:
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
