"""POST /items/reindex: auth, background jobs, inline and uploaded catalogues, persistence."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
from svc_util import ADMIN_TOKEN, CATALOG, admin, wait_job

from cprec.encoder import FakeEncoder
from cprec.recommender import Recommender
from service.api import create_app
from service.engine import Engine

NEW_ITEMS = [
    {"item_id": "t1", "domain": "Toys", "title": "Wooden Coffee Play Set", "popularity": 3},
    {"item_id": "t2", "domain": "Toys", "title": "Space Rocket Lego Kit", "popularity": 9},
    {"item_id": "g1", "domain": "Groceries", "title": "Dark Roast Coffee Beans", "popularity": 1},
]


def ids(body: dict[str, Any], domain: str) -> list[str]:
    return [r["item_id"] for r in body["results"][domain]]


async def _submit(client: httpx.AsyncClient, payload: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/items/reindex", json=payload, headers=admin())
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["mode"] == payload.get("mode", "full")
    return job


async def test_auth_401_403(app_client: Callable[..., Any]) -> None:
    payload = {"mode": "full", "items": NEW_ITEMS}
    async with app_client() as (client, engine, _):
        version = engine.index.version
        r = await client.post("/items/reindex", json=payload)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        r = await client.post(
            "/items/reindex", json=payload, headers={"Authorization": f"Basic {ADMIN_TOKEN}"}
        )
        assert r.status_code == 401
        r = await client.post(
            "/items/reindex", json=payload, headers={"Authorization": "Bearer wrong-token-xyz"}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await client.get("/items/reindex/anything")
        assert r.status_code == 401
        assert engine.jobs == {} and engine.index.version == version


async def test_admin_off_without_token(app_client: Callable[..., Any]) -> None:
    async with app_client(admin_token=None) as (client, engine, _):
        r = await client.post(
            "/items/reindex",
            json={"mode": "full", "items": NEW_ITEMS},
            headers={"Authorization": "Bearer anything-at-all"},
        )
        assert r.status_code == 403
        assert "CPREC_ADMIN_TOKEN" in r.json()["error"]["message"]
        assert engine.jobs == {}


async def test_full_reindex_replaces_catalogue(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, engine, _):
        old_version = engine.index.version
        job = await _submit(client, {"mode": "full", "items": NEW_ITEMS})
        done = await wait_job(client, job["job_id"])
        assert done["state"] == "succeeded", done
        assert done["progress"] == 1.0 and done["error"] is None
        assert done["index_version"] != old_version
        assert done["total"] == 2 and done["embedded"] == 2  # g1's text is unchanged: reused
        ready = (await client.get("/ready")).json()
        assert ready["domains"] == {"Groceries": 1, "Toys": 2}
        r = await client.post("/recommend", json={"history": [{"item_id": "g1"}]})
        body = r.json()
        assert body["index_version"] == done["index_version"]
        assert sorted(body["results"]) == ["Groceries", "Toys"]
        assert ids(body, "Toys")[0] == "t1"  # the coffee toy
        r = await client.post("/recommend", json={"history": [{"item_id": "b1"}]})
        assert r.status_code == 422  # b1 is gone
        m = (await client.get("/metrics")).text
        assert 'cprec_reindex_jobs_total{state="succeeded"} 1.0' in m
        assert 'cprec_index_items{domain="Toys"} 2.0' in m
        assert 'cprec_index_items{domain="Books"}' not in m


async def test_upsert_and_delete(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, engine, _):
        job = await _submit(
            client,
            {
                "mode": "upsert",
                "items": [
                    {"item_id": "b5", "domain": "Books", "title": "Coffee Gardening Almanac"},
                    {"item_id": "b9", "domain": "Books", "title": "Coffee Roasting at Home"},
                ],
            },
        )
        done = await wait_job(client, job["job_id"])
        assert done["state"] == "succeeded" and done["total"] == 2  # only changed items embedded
        assert engine.index.size("Books") == 6 and len(engine.index.items) == len(CATALOG) + 1
        assert engine.index.items[engine.index.by_id["b5"]].title == "Coffee Gardening Almanac"
        r = await client.post(
            "/recommend",
            json={
                "history": [{"title": "Coffee Roasting Beans", "domain": "Groceries"}],
                "target_domains": ["Books"],
                "k": 3,
            },
        )
        assert "b9" in ids(r.json(), "Books")
        job = await _submit(client, {"mode": "delete", "item_ids": ["b9", "m1"]})
        done = await wait_job(client, job["job_id"])
        assert done["state"] == "succeeded" and done["total"] == 0
        assert "b9" not in engine.index.by_id and "m1" not in engine.index.by_id
        assert engine.index.size("Movies") == 3
        r = await client.post(
            "/items/reindex", json={"mode": "delete", "item_ids": ["zz"]}, headers=admin()
        )
        assert r.status_code == 422 and "zz" in r.json()["error"]["message"]


async def test_inline_payload_validation(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, engine, _):
        for payload in (
            {"mode": "full"},
            {"mode": "delete", "items": NEW_ITEMS},
            {"mode": "rebuild", "items": NEW_ITEMS},
            {"mode": "full", "items": [{"item_id": "x", "domain": "D"}]},
        ):
            r = await client.post("/items/reindex", json=payload, headers=admin())
            assert r.status_code == 422, (payload, r.text)
            assert r.json()["error"]["code"] == "validation_error"
        dup = [NEW_ITEMS[0], NEW_ITEMS[0]]
        r = await client.post(
            "/items/reindex", json={"mode": "full", "items": dup}, headers=admin()
        )
        assert r.status_code == 422 and "duplicate" in r.json()["error"]["message"]
        assert engine.jobs == {}


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    import json

    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def test_upload_jsonl_and_csv(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, engine, _):
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            data={"mode": "full"},
            files={"file": ("cat.jsonl", _jsonl(NEW_ITEMS), "application/octet-stream")},
        )
        assert r.status_code == 202, r.text
        assert (await wait_job(client, r.json()["job_id"]))["state"] == "succeeded"
        assert sorted(engine.index.by_id) == ["g1", "t1", "t2"]
        csv_data = (
            "item_id,domain,title,popularity\n"
            'k1,Kitchen,"French Press, Glass",4\n'
            "k2,Kitchen,Coffee Grinder,\n"
        )
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            data={"mode": "upsert"},
            files={"file": ("more.csv", csv_data.encode(), "text/csv")},
        )
        assert r.status_code == 202, r.text
        assert (await wait_job(client, r.json()["job_id"]))["state"] == "succeeded"
        idx = engine.index
        assert sorted(idx.by_id) == ["g1", "k1", "k2", "t1", "t2"]
        assert idx.items[idx.by_id["k1"]].title == "French Press, Glass"
        assert idx.items[idx.by_id["k1"]].popularity == 4.0
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            files={"file": ("cat.txt", b"x", "application/octet-stream")},
        )
        assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "file"


async def test_bad_upload_row_fails_job_and_old_index_serves(
    app_client: Callable[..., Any],
) -> None:
    async with app_client() as (client, engine, _):
        version = engine.index.version
        rows = _jsonl(NEW_ITEMS[:2]) + b'{"item_id": "bad", "domain": "Toys"}\n'
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            files={"file": ("cat.jsonl", rows, "application/x-ndjson")},
        )
        assert r.status_code == 202
        done = await wait_job(client, r.json()["job_id"])
        assert done["state"] == "failed"
        assert ":3:" in done["error"] and "title" in done["error"]
        csv_bad = "item_id,domain,title\nk1,Kitchen,Kettle\nk2,Kitchen,Mug,extra\n"
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            files={"file": ("c.csv", csv_bad.encode(), "text/csv")},
        )
        done = await wait_job(client, r.json()["job_id"])
        assert done["state"] == "failed" and ":3:" in done["error"]
        assert engine.index.version == version
        r = await client.post("/recommend", json={"history": [{"item_id": "b3"}]})
        assert r.status_code == 200 and r.json()["index_version"] == version
        m = (await client.get("/metrics")).text
        assert 'cprec_reindex_jobs_total{state="failed"} 2.0' in m


class GateEncoder(FakeEncoder):
    def __init__(self) -> None:
        super().__init__(dim=512)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(20)
        return super().core(batch)


async def test_second_reindex_while_running_is_409(app_client: Callable[..., Any]) -> None:
    enc = GateEncoder()
    async with app_client(encoder=enc) as (client, engine, _):
        enc.gate.clear()
        enc.entered.clear()
        job = await _submit(client, {"mode": "full", "items": NEW_ITEMS})
        await asyncio.to_thread(enc.entered.wait, 5)
        r = await client.post(
            "/items/reindex", json={"mode": "upsert", "items": NEW_ITEMS}, headers=admin()
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        assert r.json()["error"]["details"]["job_id"] == job["job_id"]
        status = (await client.get(f"/items/reindex/{job['job_id']}", headers=admin())).json()
        assert status["state"] == "running"
        # /recommend keeps answering from the old index meanwhile (cold start: no encoder).
        r = await client.post("/recommend", json={})
        assert r.status_code == 200 and "Books" in r.json()["results"]
        enc.gate.set()
        assert (await wait_job(client, job["job_id"]))["state"] == "succeeded"
        job2 = await _submit(client, {"mode": "upsert", "items": NEW_ITEMS[:1]})
        assert (await wait_job(client, job2["job_id"]))["state"] == "succeeded"


async def test_new_index_saved_and_reloaded_without_reembedding(
    app_client: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    async with app_client() as (client, engine, _):
        job = await _submit(client, {"mode": "full", "items": NEW_ITEMS})
        done = await wait_job(client, job["job_id"])
        assert done["state"] == "succeeded"
        vectors = engine.index.vectors.copy()
    enc = FakeEncoder(dim=512)
    engine2 = Engine(make_settings(), model=Recommender(enc, "fake-v1"))
    app = create_app(engine=engine2)
    async with app.router.lifespan_context(app):
        assert enc.calls == 1 and enc.batch_sizes == [1]  # the warm-up only
        assert engine2.index.version == done["index_version"]
        assert sorted(engine2.index.by_id) == ["g1", "t1", "t2"]
        np.testing.assert_array_equal(engine2.index.vectors, vectors)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c2:
            r = await c2.post("/recommend", json={"history": [{"item_id": "t2"}]})
            assert r.status_code == 200 and r.json()["index_version"] == done["index_version"]
    # A different model version never reuses these vectors: it indexes its own catalogue.
    enc3 = FakeEncoder(dim=512)
    engine3 = Engine(make_settings(), model=Recommender(enc3, "fake-v2"))
    app3 = create_app(engine=engine3)
    async with app3.router.lifespan_context(app3):
        assert enc3.calls > 1 and len(engine3.index.items) == len(CATALOG)
