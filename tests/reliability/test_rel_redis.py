"""Redis faults against a real ``redis-server`` this test starts, stops and starts again:
``/recommend`` keeps answering without the cache, a metric counts the failures, and the cache is
used again once Redis is back. Issue 4, "Faults", first bullet.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from rel_util import TOKEN, RedisServer, free_port, redis_binary

pytestmark = [
    pytest.mark.skipif(redis_binary() is None, reason="redis-server not installed"),
    pytest.mark.timeout(120),
]

RETRY_S = 0.3  # back-off after a failure; short so the test sees the recovery quickly


def _errors(engine: Any) -> float:
    return float(engine.metrics.cache.labels("error")._value.get())


def _history(n: int, domain: str) -> dict[str, Any]:
    return {"history": [{"title": f"user {n} likes coffee number {n}", "domain": domain}], "k": 3}


async def _until_cached(client: Any, body: dict[str, Any], timeout: float = 10) -> None:
    """Ask until the answer comes from the cache (Redis back and written to again)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        r = await client.post("/recommend", json=body)
        assert r.status_code == 200, r.text
        if r.json()["cached"]:
            return
        assert loop.time() < deadline, "the cache was not used again after Redis came back"
        await asyncio.sleep(RETRY_S / 2)


def _settings(url: str) -> dict[str, Any]:
    # The ranked-list cache is off: a repeated request would be answered without Redis, and
    # these tests are about the user-vector cache in Redis.
    return {
        "admin_token": TOKEN,
        "redis_url": url,
        "redis_retry_s": RETRY_S,
        "redis_timeout_s": 0.1,
        "redis_prefix": f"cprec-rel-{uuid.uuid4().hex[:8]}",
        "result_cache_size": 0,
    }


async def test_redis_unreachable_at_start_then_back(app_client: Any, tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet
    srv = RedisServer(tmp_path, port=port)
    try:
        async with app_client(**_settings(srv.url)) as (client, engine, _):
            assert engine.ready  # started without Redis
            d = engine.index.domains[0]
            for n in range(3):
                r = await client.post("/recommend", json=_history(n, d))
                assert r.status_code == 200 and r.json()["cached"] is False, r.text
            assert _errors(engine) >= 1
            metrics = (await client.get("/metrics")).text
            assert 'cprec_cache_total{result="error"}' in metrics
            srv.start()
            await _until_cached(client, _history(0, d))
    finally:
        srv.stop()


async def test_redis_stopped_mid_traffic_and_restarted(app_client: Any, tmp_path: Path) -> None:
    srv = RedisServer(tmp_path)
    srv.start()
    try:
        async with app_client(**_settings(srv.url)) as (client, engine, _):
            d = engine.index.domains[0]
            await _until_cached(client, _history(1, d))  # Redis in use
            assert _errors(engine) == 0
            statuses: list[int] = []
            stop = asyncio.Event()

            async def traffic(worker: int) -> None:
                n = 0
                while not stop.is_set():  # hits (same history) and misses (new ones) mixed
                    body = _history(1 if n % 2 else 1000 * worker + n, d)
                    r = await client.post("/recommend", json=body)
                    statuses.append(r.status_code)
                    n += 1
                    await asyncio.sleep(0.005)

            workers = [asyncio.create_task(traffic(w)) for w in range(8)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(srv.stop)  # Redis goes away mid-traffic
            await asyncio.sleep(1.0)
            during = len(statuses)
            assert _errors(engine) >= 1
            await asyncio.to_thread(srv.start)  # and comes back, empty, on the same port
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
            assert during > 20 and len(statuses) > during
            assert set(statuses) == {200}, sorted(set(statuses))
            await _until_cached(client, _history(2, d))  # the cache is used again
    finally:
        srv.stop()


async def test_redis_never_configured_uses_lru(app_client: Any) -> None:
    async with app_client(admin_token=TOKEN, redis_url=None, result_cache_size=0) as (
        client,
        engine,
        _,
    ):
        assert engine.cache.kind == "lru"
        body = _history(5, engine.index.domains[0])
        assert (await client.post("/recommend", json=body)).json()["cached"] is False
        assert (await client.post("/recommend", json=body)).json()["cached"] is True
