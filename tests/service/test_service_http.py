"""The HTTP API in-process (ASGI transport, lifespan run) over a FakeEncoder."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

from cprec.encoder import FakeEncoder
from cprec.recommender import Recommender
from service.api import create_app
from service.engine import Engine


def titles(results: list[dict[str, Any]]) -> list[str]:
    return [r["title"] for r in results]


def ids(results: list[dict[str, Any]]) -> list[str]:
    return [r["item_id"] for r in results]


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


COFFEE = {"title": "Dark Roast Coffee Beans", "domain": "Groceries"}


async def test_recommend_by_title_across_domains(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, engine, _):
        r = await client.post("/recommend", json={"history": [COFFEE], "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "fake-v1" and body["index_version"] == engine.index.version
        assert body["cold_start"] is False
        res = body["results"]
        assert sorted(res) == ["Books", "Groceries", "Movies"]
        assert all(len(v) == 3 for v in res.values())
        # The history item itself is excluded; the other coffee items lead each domain.
        assert "g1" not in ids(res["Groceries"])
        assert set(ids(res["Groceries"])[:2]) == {"g2", "g3"}
        assert ids(res["Books"])[0] == "b1" and ids(res["Movies"])[0] == "m2"
        for items in res.values():
            scores = [it["score"] for it in items]
            assert scores == sorted(scores, reverse=True)


async def test_recommend_by_ids_and_mixed(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        r = await client.post(
            "/recommend",
            json={
                "history": [{"item_id": "b3"}, {"title": "Space Battle Saga", "domain": "Movies"}],
                "k": 2,
            },
        )
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert ids(res["Books"])[0] == "b4"  # volume two after volume one
        assert "b3" not in ids(res["Books"]) and "m1" not in ids(res["Movies"])


async def test_target_domains_and_k(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        r = await client.post(
            "/recommend", json={"history": [COFFEE], "target_domains": ["Books"], "k": 1}
        )
        assert r.status_code == 200
        res = r.json()["results"]
        assert list(res) == ["Books"] and ids(res["Books"]) == ["b1"]
        r = await client.post(
            "/recommend",
            json={"history": [COFFEE], "k": 200, "target_domains": ["Movies", "Groceries"]},
        )
        res = r.json()["results"]
        assert sorted(res) == ["Groceries", "Movies"]
        assert len(res["Movies"]) == 4 and len(res["Groceries"]) == 5  # all but the history item


async def test_exclude_history_ids_and_exact_titles(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        # A title that differs only in case and spacing still names catalogue item g1.
        hist = [{"title": "  dark roast   COFFEE beans ", "domain": "Groceries"}, {"item_id": "g2"}]
        r = await client.post(
            "/recommend", json={"history": hist, "k": 10, "target_domains": ["Groceries"]}
        )
        got = ids(r.json()["results"]["Groceries"])
        assert "g1" not in got and "g2" not in got and len(got) == 4
        r = await client.post(
            "/recommend",
            json={
                "history": hist,
                "k": 10,
                "target_domains": ["Groceries"],
                "exclude_history": False,
            },
        )
        got = ids(r.json()["results"]["Groceries"])
        assert {"g1", "g2"} <= set(got) and len(got) == 6
        assert got[0] in {"g1", "g2"}


async def test_cold_start_is_popularity_order(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, enc):
        calls = enc.calls
        r = await client.post("/recommend", json={"history": [], "k": 3})
        body = r.json()
        assert r.status_code == 200 and body["cold_start"] is True and body["cached"] is False
        assert ids(body["results"]["Groceries"]) == ["g4", "g2", "g1"]
        assert ids(body["results"]["Books"]) == ["b3", "b4", "b2"]
        assert [it["score"] for it in body["results"]["Movies"]] == [55.0, 45.0, 35.0]
        assert enc.calls == calls  # no forward pass for a cold-start user
        r = await client.post("/recommend", json={})
        assert r.status_code == 200 and r.json()["cold_start"] is True


async def test_cached_flag_and_no_second_forward(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, enc):
        req = {"history": [COFFEE, {"item_id": "b2"}], "k": 2}
        first = await client.post("/recommend", json=req)
        calls = enc.calls
        second = await client.post("/recommend", json=req)
        assert first.json()["cached"] is False and second.json()["cached"] is True
        assert enc.calls == calls
        assert first.json()["results"] == second.json()["results"]
        other = await client.post("/recommend", json={"history": [COFFEE], "k": 2})
        assert other.json()["cached"] is False


async def test_history_keeps_last_n_items(app_client: Callable[..., Any]) -> None:
    async with app_client(history_max_items=1) as (client, _, _):
        a = await client.post("/recommend", json={"history": [{"item_id": "b3"}, COFFEE]})
        b = await client.post("/recommend", json={"history": [COFFEE]})
        # Only the most recent item is written into the user text: same key, cache hit.
        assert b.json()["cached"] is True
        assert a.json()["results"]["Groceries"] == b.json()["results"]["Groceries"]


async def test_unknown_id_and_domain_are_named(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        r = await client.post("/recommend", json={"history": [COFFEE, {"item_id": "nope-42"}]})
        err = assert_envelope(r, 422, "validation_error")
        assert "nope-42" in err["message"]
        assert err["details"]["field"] == "history[1].item_id"
        r = await client.post(
            "/recommend", json={"history": [COFFEE], "target_domains": ["Books", "Toys"]}
        )
        err = assert_envelope(r, 422, "validation_error")
        assert "Toys" in err["message"] and err["details"]["unknown"] == ["Toys"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"history": "coffee"}, "history"),
        ({"k": 0}, "k"),
        ({"history": [{"title": "x"}]}, "history[0]"),
        ({"history": [], "surprise": 1}, "surprise"),
        ({"target_domains": []}, "body"),
        ({"target_domains": ["Books", "Books"]}, "body"),
    ],
)
async def test_422_envelope_names_field_and_reason(
    app_client: Callable[..., Any], payload: dict[str, Any], field: str
) -> None:
    async with app_client() as (client, _, _):
        r = await client.post("/recommend", json=payload)
        err = assert_envelope(r, 422, "validation_error")
        assert isinstance(err["details"], list) and err["details"]
        fields = [d["field"] for d in err["details"]]
        assert any(f.startswith(field) for f in fields), fields
        assert all(d["reason"] for d in err["details"])
        assert err["message"].startswith(err["details"][0]["field"])


async def test_k_is_bounded_by_max_k(app_client: Callable[..., Any]) -> None:
    """The limit is the setting, whatever it is (a fixed bound in the schema ignored it)."""
    async with app_client() as (client, _, _):
        r = await client.post("/recommend", json={"history": [COFFEE], "k": 201})
        err = assert_envelope(r, 422, "validation_error")
        assert err["details"] == {"field": "k", "limit": 200}
    async with app_client(max_k=300) as (client, _, _):
        r = await client.post("/recommend", json={"history": [], "k": 250})
        assert r.status_code == 200, r.text
        r = await client.post("/recommend", json={"history": [COFFEE], "k": 301})
        assert assert_envelope(r, 422, "validation_error")["details"]["limit"] == 300


async def test_request_limits(app_client: Callable[..., Any]) -> None:
    async with app_client(max_history=3, max_title_chars=20) as (client, _, _):
        r = await client.post("/recommend", json={"history": [COFFEE] * 4})
        err = assert_envelope(r, 413, "payload_too_large")
        assert err["details"]["limit"] == 3
        r = await client.post(
            "/recommend", json={"history": [{"title": "x" * 21, "domain": "Books"}]}
        )
        err = assert_envelope(r, 422, "validation_error")
        assert err["details"]["field"] == "history[0].title"


async def test_404_envelope(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        assert_envelope(await client.get("/nope"), 404, "not_found")
        err = assert_envelope(
            await client.get(
                "/items/reindex/deadbeef", headers={"Authorization": "Bearer test-admin-token-123"}
            ),
            404,
            "not_found",
        )
        assert err["details"] == {"job_id": "deadbeef"}
        assert_envelope(await client.get("/recommend"), 405, "method_not_allowed")


async def test_413_body_limit(app_client: Callable[..., Any]) -> None:
    async with app_client(max_body_bytes=2048) as (client, _, _):
        big = {"history": [{"title": "coffee " * 50, "domain": "Groceries"}] * 10}
        err = assert_envelope(await client.post("/recommend", json=big), 413, "payload_too_large")
        assert err["details"]["limit"] == 2048
        # Chunked, with no Content-Length to refuse early: counted while streaming.
        import json

        data = json.dumps(big).encode()

        async def gen():  # type: ignore[no-untyped-def]
            for i in range(0, len(data), 512):
                yield data[i : i + 512]

        r = await client.post(
            "/recommend", content=gen(), headers={"content-type": "application/json"}
        )
        assert_envelope(r, 413, "payload_too_large")
        ok = await client.post("/recommend", json={"history": [COFFEE]})
        assert ok.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'cprec_errors_total{code="payload_too_large"} 2.0' in metrics  # one handler


class GateEncoder(FakeEncoder):
    """Blocks forward passes while ``gate`` is cleared (after start-up)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(20)
        return super().core(batch)


async def test_429_when_encoder_queue_full(app_client: Callable[..., Any]) -> None:
    enc = GateEncoder()
    async with app_client(encoder=enc, queue_size=1, max_wait_ms=0) as (client, _, _):
        enc.gate.clear()
        enc.entered.clear()
        first = asyncio.create_task(client.post("/recommend", json={"history": [COFFEE]}))
        await asyncio.to_thread(enc.entered.wait, 5)
        r = await client.post("/recommend", json={"history": [{"item_id": "b1"}]})
        err = assert_envelope(r, 429, "overloaded")
        assert r.headers["retry-after"] == "1" and err["details"] == {"queue_size": 1}
        # A cold-start user needs no encoder and is still served.
        assert (await client.post("/recommend", json={})).status_code == 200
        enc.gate.set()
        assert (await first).status_code == 200
        m = (await client.get("/metrics")).text
        assert 'cprec_errors_total{code="overloaded"} 1.0' in m


async def test_ready_503_before_start_then_200_and_live(make_settings: Callable[..., Any]) -> None:
    enc = FakeEncoder()
    app = create_app(engine=Engine(make_settings(), model=Recommender(enc, "fake-v1")))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/ready")
        assert_envelope(r, 503, "not_ready")
        assert (await client.get("/live")).json() == {"status": "live"}
        r = await client.post("/recommend", json={"history": [COFFEE]})
        assert_envelope(r, 503, "not_ready")
        async with app.router.lifespan_context(app):
            r = await client.get("/ready")
            assert r.status_code == 200
            body = r.json()
            assert body["model_version"] == "fake-v1"
            assert body["domains"] == {"Books": 5, "Groceries": 6, "Movies": 4}
        r = await client.get("/ready")
        assert r.status_code == 503  # after shutdown


async def test_ready_503_while_draining(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, engine, _):
        engine.begin_drain()
        err = assert_envelope(await client.get("/ready"), 503, "not_ready")
        assert "draining" in err["message"]
        # Requests that still arrive are answered while draining.
        assert (await client.post("/recommend", json={"history": [COFFEE]})).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'cprec_errors_total{code="not_ready"} 1.0' in metrics  # counted like every error


async def test_metrics_exposes_counters(app_client: Callable[..., Any]) -> None:
    async with app_client() as (client, _, _):
        req = {"history": [COFFEE], "k": 2}
        await client.post("/recommend", json=req)
        await client.post("/recommend", json={**req, "k": 3})  # same user, new answer: vector hit
        await client.post("/recommend", json=req)  # the same answer again: ranked-list hit
        await client.post("/recommend", json={"history": [{"item_id": "zzz"}]})
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = r.text
        assert 'cprec_requests_total{route="/recommend",status="200"} 3.0' in m
        assert 'cprec_requests_total{route="/recommend",status="422"} 1.0' in m
        assert 'cprec_cache_total{result="hit"} 1.0' in m
        assert 'cprec_cache_total{result="miss"} 1.0' in m
        assert 'cprec_result_cache_total{result="hit"} 1.0' in m
        assert 'cprec_result_cache_total{result="miss"} 2.0' in m
        assert "cprec_batch_size_count" in m and "cprec_batch_size_sum" in m
        assert 'cprec_index_items{domain="Books"} 5.0' in m
        assert 'cprec_index_items{domain="Groceries"} 6.0' in m
        assert 'cprec_request_seconds_count{route="/recommend"} 4.0' in m
        assert 'cprec_errors_total{code="validation_error"} 1.0' in m
        assert "cprec_ready 1.0" in m and "cprec_queue_depth" in m
