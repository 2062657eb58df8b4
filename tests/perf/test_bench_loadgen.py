"""The benchmarks' load generator against a real uvicorn server (the app over a FakeEncoder):
it counts what the service answered, per status, and reads the ``cached`` flag from the body."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from svc_util import free_port

from bench.common import HTTPConn, drive, probe


async def _serve(make_settings: Callable[..., Any]) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    from cprec.encoder import FakeEncoder
    from cprec.recommender import Recommender
    from service.api import create_app
    from service.engine import Engine

    engine = Engine(make_settings(), model=Recommender(FakeEncoder(dim=64), "fake-v1"))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine=engine), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            return server, task
        await asyncio.sleep(0.05)
    raise TimeoutError("uvicorn did not start")


def _body(title: str) -> dict[str, Any]:
    return {"history": [{"title": title, "domain": "Groceries"}], "k": 3}


async def test_drive_counts_statuses_and_cache_hits(make_settings: Callable[..., Any]) -> None:
    server, task = await _serve(make_settings)
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        bodies = [_body(f"Coffee Beans {i}") for i in range(12)]
        first = await drive(url, bodies, concurrency=4, max_requests=12, max_s=30)
        assert (first.ok, first.failed, first.cached) == (12, 0, 0)
        assert first.status == {"200": 12} and len(first.latencies) == 12
        again = await drive(url, bodies, concurrency=3, max_requests=24, max_s=30)  # cycles
        assert (again.ok, again.cached) == (24, 24)
        bad = await drive(url, [{"history": [], "k": 0}], concurrency=2, max_requests=5, max_s=30)
        assert (bad.ok, bad.failed, bad.status) == (0, 5, {"422": 5})

        conn = HTTPConn(url)
        code, data = await conn.request("GET", "/live")
        assert code == 200 and b"live" in data
        code, _ = await conn.request("POST", "/recommend", b"{not json")
        assert code == 422  # the same keep-alive connection carries on after an error
        code, _ = await conn.request("GET", "/live")
        assert code == 200
        await conn.close()

        stop = asyncio.Event()
        live = asyncio.create_task(probe(url, "/live", stop, interval_s=0.01))
        await asyncio.sleep(0.3)
        stop.set()
        assert len(await live) >= 5
    finally:
        server.should_exit = True
        await task


async def test_a_dead_server_is_a_failed_request_not_a_crash() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = await drive(url, [_body("tea")], concurrency=2, max_requests=4, max_s=10)
    assert (res.ok, res.failed) == (0, 4)
    assert set(res.status) == {"ConnectionRefusedError"}


def test_only_loopback_is_targeted() -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        HTTPConn("http://example.com:80")


def test_merge_keeps_the_tail_per_round() -> None:
    """Rounds run at different machine speeds: pooled, a slow round's p50 becomes the fast
    round's tail; p99_gap_ms and round_spread are taken inside each round, then the median."""
    from bench.common import LoadResult
    from bench.serve import merge

    fast = LoadResult([1.0] * 95 + [1.2] * 5, 100, 0, {"200": 100}, 10.0)
    slow = LoadResult([2.0] * 95 + [2.4] * 5, 100, 0, {"200": 100}, 20.0)
    m = merge([fast, slow])
    assert m["requests"] == 200 and m["rps"] == round(200 / 30.0, 2)
    assert m["p99_spread"] == pytest.approx(2.4 / 1.6)  # pooled: the slow round is the tail
    assert m["p99_gap_ms"] == pytest.approx((200 + 400) / 2)  # per round, then the median
    assert m["round_spread"] == pytest.approx(1.2)


def test_targets_are_medians_of_paired_rounds() -> None:
    """Each round's ratio pairs conditions measured a minute apart: a slow round slows both
    sides, so the ratio survives drift that a ratio of run-wide medians would not."""
    from bench.common import LoadResult
    from bench.serve import paired_rounds, verdict

    def rnd(rps: float, p50: float, p99: float) -> LoadResult:
        lat = [p50] * 98 + [p99] * 2
        return LoadResult(lat, 100, 0, {"200": 100}, 100 / rps)

    on = [rnd(20, 1.0, 1.2), rnd(10, 2.0, 2.4), rnd(21, 1.0, 1.1)]
    off = [rnd(16, 1.0, 1.5), rnd(8, 2.0, 3.0), rnd(20, 1.0, 1.2)]
    rows = paired_rounds("m", on, off, [21.0, 10.5, 20.0])
    assert [r["batching"] for r in rows] == [1.25, 1.25, 1.05]
    assert [r["overhead"] for r in rows] == [pytest.approx(0.952, abs=1e-3), 0.952, 1.05]
    assert [r["gap_ratio"] for r in rows] == [0.4, 0.4, 0.5]  # (p99 - p50) on / off
    v = verdict([r["gap_ratio"] for r in rows], 1.0, "<")
    assert v["met"] and v["rounds"] == 3 and v["rounds_met"] == 3 and v["median"] == 0.4
    v = verdict([0.8, 0.95, 0.91], 0.9, ">=")
    assert v["median"] == 0.91 and v["met"] and v["rounds_met"] == 2 and v["min"] == 0.8


def test_the_round_limit_is_one_configuration_not_the_max_of_each_round() -> None:
    from bench.serve import round_limits

    raw = {(1, "padded"): [40.0, 50.0, 39.0], (32, "split"): [45.0, 44.0, 46.0]}
    assert round_limits(raw) == [45.0, 44.0, 46.0]  # best by median; round 2 is not 50
