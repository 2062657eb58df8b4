"""The demo page's routes in-process (FakeEncoder, test catalogue): the title search, the static
page and its switch (CPREC_DEMO_PAGE)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from service.demo import STATIC, match_class


def envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def ids(body: dict[str, Any]) -> list[str]:
    return [it["item_id"] for it in body["items"]]


@pytest.mark.parametrize(
    ("title", "q", "want"),
    [
        ("space opera saga", "space", 0),
        ("the space opera", "space", 1),
        ("the space-opera", "opera", 1),
        ("aerospace saga", "space", 2),
        ("aerospace and space", "space", 1),  # a later word start beats an earlier mid-word hit
        ("tea bags", "coffee", None),
    ],
)
def test_match_class(title: str, q: str, want: int | None) -> None:
    assert match_class(title, q) == want


async def test_search_ranks_prefix_then_word_start_then_popularity(
    app_client: Callable[..., Any],
) -> None:
    async with app_client() as (client, _, _):
        r = await client.get("/items/search", params={"q": "COFFEE"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"] == "coffee" and body["domain"] is None and body["matches"] == 5
        # No title starts with "coffee" except m2; then word starts by popularity (80, 50, 10, 5).
        assert ids(body) == ["m2", "g2", "g1", "g3", "b1"]
        assert set(body["items"][0]) == {"item_id", "domain", "title", "popularity"}

        r = await client.get("/items/search", params={"q": "  space   opera "})
        assert ids(r.json()) == ["b3", "b4"]  # normalised like catalogue titles, prefix first


async def test_search_domain_filter_and_limit(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        r = await client.get("/items/search", params={"q": "coffee", "domain": "Groceries"})
        assert r.status_code == 200 and ids(r.json()) == ["g2", "g1", "g3"]
        r = await client.get("/items/search", params={"q": "e", "limit": 2})
        body = r.json()
        assert len(body["items"]) == 2 and body["matches"] > 2
        r = await client.get("/items/search", params={"q": "zzzz"})
        assert r.status_code == 200 and r.json()["items"] == [] and r.json()["matches"] == 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "query.q"),
        ({"q": ""}, "query.q"),
        ({"q": "x" * 101}, "query.q"),
        ({"q": "tea", "limit": 0}, "query.limit"),
        ({"q": "tea", "limit": 51}, "query.limit"),
        ({"q": "tea", "limit": "ten"}, "query.limit"),
    ],
)
async def test_search_bounds_are_422_in_the_envelope(
    app_client: Callable[..., Any], params: dict[str, Any], field: str
) -> None:
    async with app_client() as (client, _, _):
        err = envelope(await client.get("/items/search", params=params), 422, "validation_error")
        assert err["details"][0]["field"] == field


async def test_search_blank_query_and_unknown_domain(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        err = envelope(
            await client.get("/items/search", params={"q": "   \t "}), 422, "validation_error"
        )
        assert err["details"]["field"] == "q"
        err = envelope(
            await client.get("/items/search", params={"q": "tea", "domain": "Garden"}),
            422,
            "validation_error",
        )
        assert err["details"]["field"] == "domain"
        assert err["details"]["known"] == ["Books", "Groceries", "Movies"]


async def test_search_follows_a_reindex_swap(app_client: Callable[..., Any]) -> None:
    """The casefolded titles are cached per snapshot: a new snapshot is searched, not the old."""
    from svc_util import admin, wait_job

    async with app_client() as (client, _, _):
        assert ids((await client.get("/items/search", params={"q": "kombucha"})).json()) == []
        item = {"item_id": "g9", "domain": "Groceries", "title": "Ginger Kombucha", "popularity": 1}
        r = await client.post(
            "/items/reindex", json={"mode": "upsert", "items": [item]}, headers=admin()
        )
        assert r.status_code == 202, r.text
        assert (await wait_job(client, r.json()["job_id"]))["state"] == "succeeded"
        assert ids((await client.get("/items/search", params={"q": "kombucha"})).json()) == ["g9"]


async def test_search_needs_no_admin_token(app_client: Callable[..., Any]) -> None:
    async with app_client(admin_token=None) as (client, _, _):
        r = await client.get("/items/search", params={"q": "tea"})
        assert r.status_code == 200 and r.json()["matches"] == 3


async def test_page_is_served_with_its_assets(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        for path in ("/", "/demo"):
            r = await client.get(path)
            assert r.status_code == 307 and r.headers["location"] == "demo/"
        r = await client.get("/demo/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert 'src="app.js"' in r.text and 'href="style.css"' in r.text
        for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = await client.get(f"/demo/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
            assert r.text == (STATIC / name).read_text(encoding="utf-8")
        for bad in ("/demo/index.html", "/demo/..%2Fapi.py", "/demo/nope.js"):
            envelope(await client.get(bad), 404, "not_found")
        # The page is not part of the API's schema; the search route is.
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert "/items/search" in paths and not any(p.startswith("/demo") for p in paths)


def test_static_files_fetch_nothing_from_elsewhere() -> None:
    """No CDN, no external URL: every src/href/url()/fetch in the shipped files is relative."""
    for path in sorted(STATIC.iterdir()):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name
        assert "innerHTML" not in text and "eval(" not in text, path.name


async def test_page_switched_off(app_client: Callable[..., Any]) -> None:
    async with app_client(demo_page=False) as (client, _, _):
        for path in ("/", "/demo", "/demo/", "/demo/app.js"):
            err = envelope(await client.get(path), 404, "not_found")
            assert "CPREC_DEMO_PAGE" in err["message"]
        r = await client.get("/items/search", params={"q": "tea"})  # the API route stays
        assert r.status_code == 200


def test_demo_page_setting_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    assert Settings().demo_page is True
    monkeypatch.setenv("CPREC_DEMO_PAGE", "false")
    assert Settings().demo_page is False
