"""Caches of the request path: user vectors (Redis when ``REDIS_URL`` is set, else an
in-process LRU) and the ranked lists of recent requests (in process, per index snapshot).

Keys carry the model version and a hash of the normalised user text, so a model swap makes old
entries unreachable without a flush. Redis failures never fail a request: the call returns a
miss, a counter goes up, and Redis is skipped for ``retry_s`` before it is tried again (the client
reconnects by itself on that next try).

The Redis cache auto-pipelines: the gets and sets issued in one event-loop tick go out as one
pipeline (SET EX per store, then one MGET) in one round trip. A coalesced forward answers its whole
cohort in one tick, so the cohort's stores and its next requests' lookups each cost one round
trip instead of one per request (docs/decisions/003-serving-on-two-cores.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import numpy as np

from service.batcher import TickBatcher

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def cache_key(prefix: str, model_version: str, user_text: str) -> str:
    digest = hashlib.sha256(user_text.encode("utf-8")).hexdigest()[:32]
    return f"{prefix}:uv:{model_version}:{digest}"


class UserVectorCache(ABC):
    kind: str

    @abstractmethod
    async def get(self, key: str) -> np.ndarray | None: ...

    @abstractmethod
    async def set(self, key: str, vector: np.ndarray) -> None: ...

    async def close(self) -> None:
        return None


class BoundedLRU(Generic[K, V]):
    """A dict that keeps its ``size`` most recently used entries (``size=0``: keeps none)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class LRUCache(UserVectorCache):
    """Bounded in-process cache with a TTL; the embedded default (one process, no Redis)."""

    kind = "lru"

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.ttl_s = ttl_s
        self.clock = clock
        self._data: BoundedLRU[str, tuple[float, np.ndarray]] = BoundedLRU(size)

    async def get(self, key: str) -> np.ndarray | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        expires, vec = hit
        if self.clock() >= expires:
            self._data.pop(key)
            return None
        return vec

    async def set(self, key: str, vector: np.ndarray) -> None:
        self._data.put(key, (self.clock() + self.ttl_s, vector.astype(np.float32, copy=True)))

    def __len__(self) -> int:
        return len(self._data)


class RedisCache(UserVectorCache):
    """Redis with short timeouts and a back-off after failures; degrade, never fail."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: int,
        timeout_s: float = 0.05,
        retry_s: float = 2.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        import redis.asyncio as aioredis

        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.on_error = on_error or (lambda op: None)
        self._skip_until = 0.0
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        # This tick's commands go out together (auto-pipelining): ("get", key, None) or
        # ("set", key, value); a get is answered with the stored bytes or None.
        self._commands: TickBatcher[tuple[str, str, bytes | None], bytes | None] = TickBatcher(
            self._send
        )

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, op: str, exc: BaseException) -> None:
        if self.available:
            log.warning(
                "redis %s failed (%s: %s); serving without cache for %.1fs",
                op,
                type(exc).__name__,
                exc,
                self.retry_s,
            )
        self._skip_until = time.monotonic() + self.retry_s
        self.on_error(op)

    async def get(self, key: str) -> np.ndarray | None:
        if not self.available:
            return None
        raw = await self._commands(("get", key, None))  # None on a miss or any Redis fault
        if raw is None:
            return None
        return np.frombuffer(raw, dtype=np.float32).copy()

    async def set(self, key: str, vector: np.ndarray) -> None:
        if not self.available:
            return
        await self._commands(("set", key, vector.astype(np.float32, copy=False).tobytes()))

    async def _send(self, commands: list[tuple[str, str, bytes | None]]) -> list[bytes | None]:
        """One tick's commands as one pipeline: the stores, then one MGET for the lookups (so a
        lookup sees a store of the same tick). Any fault answers every lookup with a miss."""
        sets = [(key, data) for op, key, data in commands if op == "set" and data is not None]
        gets = [key for op, key, _ in commands if op == "get"]
        found: dict[str, bytes | None] = {}
        if not self.available:  # failed since these were queued
            return [None] * len(commands)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, data in sets:
                pipe.set(key, data, ex=self.ttl_s)
            if gets:
                pipe.mget(gets)
            replies = await asyncio.wait_for(pipe.execute(raise_on_error=False), self.timeout_s * 4)
            failed_sets = [r for r in replies[: len(sets)] if isinstance(r, Exception)]
            if failed_sets:
                self._failed("set", failed_sets[0])
            if gets and isinstance(replies[-1], Exception):
                self._failed("get", replies[-1])
            elif gets:
                found = dict(zip(gets, replies[-1], strict=True))
        except Exception as exc:  # noqa: BLE001 - any Redis fault is a miss, never an error
            self._failed("get" if gets else "set", exc)
        out: list[bytes | None] = []
        for op, key, _ in commands:
            raw = found.get(key) if op == "get" else None
            out.append(raw if isinstance(raw, bytes) else None)
        return out

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), self.timeout_s * 4))
        except Exception:  # noqa: BLE001
            return False

    async def close(self) -> None:
        await self._commands.drain(self.timeout_s * 4)  # this tick's stores still go out
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001
            pass


Hits = dict[str, list[tuple[int, float]]]  # domain -> [(catalogue row, score)], best first


class RankedLists(BoundedLRU[Hashable, Hits]):
    """The ranked lists of recent requests, per index snapshot: a repeated request (a page
    reload, a retry, a client polling) skips the user-vector lookup and the search, which
    dominates a cache hit once a catalogue is large.

    Keyed by the snapshot's version and everything that shapes an answer (user key, target
    domains, k, excluded rows), so an entry can only be returned for the request that made it; a
    swap empties it. ``size=0`` turns it off.
    """

    @staticmethod
    def key(
        index_version: str, user_key: str, targets: Sequence[str], k: int, exclude: set[int]
    ) -> Hashable:
        return (index_version, user_key, tuple(targets), k, frozenset(exclude))
