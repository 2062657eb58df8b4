"""User-vector caches: keys, the in-process LRU, and Redis (real server, then unreachable)."""

from __future__ import annotations

import time
import uuid

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
