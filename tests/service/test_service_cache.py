"""User-vector caches: keys, the in-process LRU, and Redis (real server, then unreachable)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import pytest
from svc_util import free_port

from service.cache import LRUCache, RedisCache, cache_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _vec(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def test_cache_key_has_model_version_and_text_hash() -> None:
    k = cache_key("cprec", "model-v1", "Books: Dune")
    assert k.startswith("cprec:uv:model-v1:")
    assert k == cache_key("cprec", "model-v1", "Books: Dune")
    assert k != cache_key("cprec", "model-v2", "Books: Dune")
    assert k != cache_key("cprec", "model-v1", "Books: Dune; Movies: Alien")
    assert k != cache_key("other", "model-v1", "Books: Dune")
    assert "Dune" not in k  # the history is hashed, not stored in the key


async def test_lru_hit_miss_and_ttl_with_injected_clock() -> None:
    clock = Clock()
    c = LRUCache(size=10, ttl_s=60, clock=clock)
    assert await c.get("a") is None
    v = _vec(0)
    await c.set("a", v)
    v[:] = 0  # the cache keeps its own copy
    got = await c.get("a")
    assert got is not None and np.array_equal(got, _vec(0))
    clock.now += 59.9
    assert await c.get("a") is not None
    clock.now += 0.1
    assert await c.get("a") is None
    assert len(c) == 0  # expired entries are dropped on read


async def test_lru_evicts_least_recently_used() -> None:
    c = LRUCache(size=2, ttl_s=60, clock=Clock())
    await c.set("a", _vec(1))
    await c.set("b", _vec(2))
    assert await c.get("a") is not None  # a is now more recent than b
    await c.set("c", _vec(3))
    assert len(c) == 2
    assert await c.get("b") is None
    assert await c.get("a") is not None and await c.get("c") is not None


async def test_lru_size_zero_disables() -> None:
    c = LRUCache(size=0, ttl_s=60)
    await c.set("a", _vec(1))
    assert await c.get("a") is None and len(c) == 0


@pytest.mark.integration
async def test_redis_round_trip_and_ttl(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    errors: list[str] = []
    c = RedisCache(redis_url, ttl_s=120, timeout_s=1.0, on_error=errors.append)
    key = cache_key(redis_prefix, "m1", f"history-{uuid.uuid4().hex}")
    try:
        assert await c.ping()
        assert await c.get(key) is None
        v = _vec(5, dim=384)
        await c.set(key, v)
        got = await c.get(key)
        assert got is not None and got.dtype == np.float32
        np.testing.assert_array_equal(got, v)
        raw = aioredis.Redis.from_url(redis_url)
        try:
            ttl = await raw.ttl(key)
            assert 0 < ttl <= 120
        finally:
            await raw.aclose()
        assert errors == []
    finally:
        await c.close()


@pytest.mark.integration
async def test_redis_unreachable_is_a_miss_with_backoff() -> None:
    errors: list[str] = []
    port = free_port()  # nothing listens there
    c = RedisCache(
        f"redis://127.0.0.1:{port}/0", ttl_s=60, timeout_s=0.05, retry_s=30, on_error=errors.append
    )
    try:
        assert not await c.ping()
        t0 = time.monotonic()
        assert await c.get("k") is None
        assert errors == ["get"]
        assert not c.available
        # Backing off: further calls skip Redis entirely (fast, no new errors).
        await c.set("k", _vec(1))
        assert await c.get("k") is None
        assert errors == ["get"]
        assert time.monotonic() - t0 < 2.0
        # After the back-off window the cache tries again (and fails again, counted again).
        c._skip_until = 0.0
        await c.set("k", _vec(1))
        assert errors == ["get", "set"]
    finally:
        await c.close()


@pytest.mark.integration
async def test_redis_recovers_after_backoff(redis_url: str, redis_prefix: str) -> None:
    """A cache that failed once serves again once the back-off has passed (reconnects itself)."""
    errors: list[str] = []
    c = RedisCache(redis_url, ttl_s=60, timeout_s=1.0, retry_s=0.05, on_error=errors.append)
    key = f"{redis_prefix}:recover:{uuid.uuid4().hex}"
    try:
        c._failed("get", ConnectionError("simulated"))
        assert not c.available and await c.get(key) is None
        time.sleep(0.06)
        await c.set(key, _vec(2))
        got = await c.get(key)
        assert got is not None and np.array_equal(got, _vec(2))
        assert errors == ["get"]
    finally:
        await c.close()


class _Sends:
    """Counts the packets redis-py writes: one per round trip (a pipeline is one packet)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.asyncio.connection import Connection

        self.count = 0
        real = Connection.send_packed_command

        async def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            await real(conn, command, check_health)

        monkeypatch.setattr(Connection, "send_packed_command", counted)


@pytest.mark.integration
async def test_redis_commands_of_one_turn_share_one_round_trip(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cohort's 32 stores go out as one pipeline, and its 32 lookups as one MGET."""
    c = RedisCache(redis_url, ttl_s=60, timeout_s=1.0)
    keys = [f"{redis_prefix}:pipe:{uuid.uuid4().hex}" for _ in range(32)]
    try:
        assert await c.ping()  # connects before counting
        sends = _Sends(monkeypatch)
        await asyncio.gather(*(c.set(k, _vec(i, dim=16)) for i, k in enumerate(keys[:16])))
        assert sends.count == 1
        got = await asyncio.gather(*(c.get(k) for k in keys))
        assert sends.count == 2
        for i, v in enumerate(got[:16]):
            assert v is not None and np.array_equal(v, _vec(i, dim=16))
        assert got[16:] == [None] * 16
        # A store and a lookup of the same key in one turn: the lookup sees the store.
        _, same = await asyncio.gather(c.set(keys[20], _vec(99, dim=16)), c.get(keys[20]))
        assert same is not None and np.array_equal(same, _vec(99, dim=16))
        assert sends.count == 3
        # Separate turns are separate round trips (nothing waits for company).
        assert await c.get(keys[0]) is not None and await c.get(keys[1]) is not None
        assert sends.count == 5
    finally:
        await c.close()


@pytest.mark.integration
async def test_redis_cancelled_waiter_leaves_its_turn_answered(
    redis_url: str, redis_prefix: str
) -> None:
    c = RedisCache(redis_url, ttl_s=60, timeout_s=1.0)
    key = f"{redis_prefix}:cancel:{uuid.uuid4().hex}"
    try:
        await c.set(key, _vec(3, dim=16))
        first = asyncio.ensure_future(c.get(key))
        others = [asyncio.ensure_future(c.get(key)) for _ in range(3)]
        await asyncio.sleep(0)  # all four are queued in this turn
        first.cancel()
        got = await asyncio.gather(*others)
        assert all(v is not None and np.array_equal(v, _vec(3, dim=16)) for v in got)
        assert first.cancelled()
    finally:
        await c.close()


@pytest.mark.integration
async def test_redis_unreachable_answers_a_whole_turn_as_misses_once() -> None:
    """32 lookups against a dead Redis: all misses, one error, one timeout's wait at most."""
    errors: list[str] = []
    c = RedisCache(
        f"redis://127.0.0.1:{free_port()}/0",
        ttl_s=60,
        timeout_s=0.05,
        retry_s=30,
        on_error=errors.append,
    )
    try:
        t0 = time.monotonic()
        got = await asyncio.gather(*(c.get(f"k{i}") for i in range(32)))
        assert got == [None] * 32
        assert errors == ["get"]
        assert time.monotonic() - t0 < 2.0
    finally:
        await c.close()


@pytest.mark.integration
async def test_redis_close_sends_the_stores_still_queued(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    c = RedisCache(redis_url, ttl_s=60, timeout_s=1.0)
    key = f"{redis_prefix}:close:{uuid.uuid4().hex}"
    store = asyncio.ensure_future(c.set(key, _vec(4, dim=16)))
    await asyncio.sleep(0)  # queued in this tick, not yet sent
    await c.close()
    await store
    raw = aioredis.Redis.from_url(redis_url)
    try:
        assert await raw.get(key) == _vec(4, dim=16).tobytes()
    finally:
        await raw.aclose()
