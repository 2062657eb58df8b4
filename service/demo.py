"""The demo page and the catalogue title search it uses.

``GET /items/search`` is part of the API and always on. The page is three static files in
``service/static/`` (no build step, nothing fetched from another origin) served at ``/demo/``;
``/`` redirects there. With ``CPREC_DEMO_PAGE=false`` the page routes answer 404 through the
error envelope. The page talks to the public routes only (``/ready``, ``/items/search``,
``/recommend``), so it works without the admin token.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, Field

from cprec.text import normalise_title
from service.catalog import Item
from service.engine import Engine
from service.errors import NotFound, NotReady, ValidationFailed
from service.index import ItemIndex

STATIC = Path(__file__).resolve().parent / "static"
# An allow-list, not a directory mount: no path from the URL ever reaches the file system.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The browser holds the page to its own origin, so "no CDN" is enforced, not only intended.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_QUERY_CHARS = 100
MAX_LIMIT = 50

router = APIRouter()


async def _engine(request: Request) -> Engine:
    """Local twin of ``service.api.get_engine``: importing that module here would be circular."""
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(_engine)]


# -- search ---------------------------------------------------------------------------------
class SearchHit(BaseModel):
    item_id: str
    domain: str
    title: str
    popularity: float


class SearchResult(BaseModel):
    query: str = Field(description="The query as matched: normalised, casefolded.")
    domain: str | None = Field(description="The domain searched; null = every domain.")
    matches: int = Field(description="Titles that contain the query; items holds the best.")
    items: list[SearchHit] = Field(
        description="Title starts with the query first, then a word does, then any substring; "
        "more popular first within each."
    )


def match_class(title: str, q: str) -> int | None:
    """0: ``title`` starts with ``q``; 1: a word of it does; 2: ``q`` is inside a word; None:
    no match. Both already casefolded."""
    pos = title.find(q)
    if pos < 0:
        return None
    if pos == 0:
        return 0
    while pos >= 0:
        if not title[pos - 1].isalnum():
            return 1
        pos = title.find(q, pos + 1)
    return 2


def search_titles(
    index: ItemIndex, folded: list[str], q: str, domain: str | None, limit: int
) -> tuple[int, list[Item]]:
    """(number of matches, the best ``limit`` items): one pass over the titles (of ``domain``),
    a heap of ``limit`` entries, so the cost is bounded by the catalogue, not the query."""
    rows = range(len(index.items)) if domain is None else index.rows_by_domain[domain].tolist()
    keys = []
    for r in rows:
        cls = match_class(folded[r], q)
        if cls is not None:
            keys.append((cls, -index.items[r].popularity, len(folded[r]), r))
    best = heapq.nsmallest(limit, keys)
    return len(keys), [index.items[k[-1]] for k in best]


def _fold(items: list[Item]) -> list[str]:
    return [normalise_title(it.title).casefold() for it in items]


async def folded_titles(request: Request, index: ItemIndex) -> list[str]:
    """The snapshot's titles, casefolded once per snapshot rather than per request. A swap
    replaces the item list, so its identity says when to fold again; one tuple on app.state,
    replaced whole, so a reader never sees one snapshot's items with another's titles."""
    cached = getattr(request.app.state, "demo_titles", None)
    if cached is not None and cached[0] is index.items:
        titles: list[str] = cached[1]
        return titles
    titles = await run_in_threadpool(_fold, index.items)  # a whole catalogue: off the loop
    request.app.state.demo_titles = (index.items, titles)
    return titles


@router.get("/items/search", response_model=SearchResult, tags=["items"])
async def search(
    request: Request,
    engine: EngineDep,
    q: Annotated[
        str,
        Query(
            min_length=1,
            max_length=MAX_QUERY_CHARS,
            description="Text to find in item titles (case-insensitive).",
        ),
    ],
    domain: Annotated[
        str | None, Query(max_length=128, description="Only this domain; default: all.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items to return.")] = 10,
) -> SearchResult:
    """Catalogue items whose title contains ``q``: what a client needs to build a history of
    catalogue ids (the demo page's search box)."""
    index = engine.index
    if index is None:
        raise NotReady("not ready: the catalogue is still loading")
    needle = normalise_title(q).casefold()
    if not needle:
        raise ValidationFailed(
            "q: give at least one visible character to search for",
            details={"field": "q", "reason": "empty after normalisation"},
        )
    if domain is not None and domain not in index.rows_by_domain:
        raise ValidationFailed(
            f"unknown domain {domain!r}; known: {index.domains}",
            details={"field": "domain", "unknown": domain, "known": index.domains},
        )
    folded = await folded_titles(request, index)
    matches, items = search_titles(index, folded, needle, domain, limit)
    return SearchResult(
        query=needle,
        domain=domain,
        matches=matches,
        items=[
            SearchHit(
                item_id=it.item_id, domain=it.domain, title=it.title, popularity=it.popularity
            )
            for it in items
        ],
    )


# -- the page -------------------------------------------------------------------------------
def _page_on(engine: Engine) -> None:
    if not engine.settings.demo_page:
        raise NotFound("the demo page is switched off (CPREC_DEMO_PAGE=false)")


@router.get("/", include_in_schema=False)
async def root(engine: EngineDep) -> Response:
    _page_on(engine)
    return RedirectResponse("demo/", status_code=307)  # relative: works under a path prefix


@router.get("/demo", include_in_schema=False)
async def demo_no_slash(engine: EngineDep) -> Response:
    _page_on(engine)
    return RedirectResponse("demo/", status_code=307)  # the page's relative URLs need the slash


@router.get("/demo/", include_in_schema=False)
async def page(engine: EngineDep) -> Response:
    _page_on(engine)
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/demo/{name}", include_in_schema=False)
async def asset(name: str, engine: EngineDep) -> Response:
    _page_on(engine)
    if name not in ASSETS:
        raise NotFound(f"no demo asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=PAGE_HEADERS)
