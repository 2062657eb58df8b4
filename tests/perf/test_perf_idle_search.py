"""Searches issued while the encoder is idle use every core, and no forward pass starts while
such a "wide" search runs (two OpenMP teams on the same cores stall each other; perf, issue 5)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from service import search as search_mod
from service.batcher import Batcher
from service.encoder import FakeEncoder
from service.engine import Engine
from service.index import Item, ItemIndex
from service.search import SearchCoalescer
from service.settings import Settings


def _index(n: int = 400, dim: int = 16) -> ItemIndex:
    rng = np.random.default_rng(0)
    items = [Item(f"{d}{i}", d, f"{d} item {i}") for d in ("A", "B") for i in range(n // 2)]
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return ItemIndex.build(items, v, "m")


def _spy_threads(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    seen: list[int | None] = []
    real = ItemIndex.search

    def spy(self: ItemIndex, *a: Any, threads: int | None = None, **kw: Any) -> Any:
        seen.append(threads)
        return real(self, *a, threads=threads, **kw)

    monkeypatch.setattr(ItemIndex, "search", spy)
    return seen


async def test_threads_follow_the_device_state(monkeypatch: pytest.MonkeyPatch) -> None:
    idx = _index()
    seen = _spy_threads(monkeypatch)
    idle = {"now": True}
    co = SearchCoalescer()
    co.configure(lambda: idle["now"], 2)
    vec = idx.vectors[3]
    wide = await co.search(idx, ["A", "B"], vec, 5, set())
    assert seen == [2, 2]  # one call per domain, both wide
    idle["now"] = False
    narrow = await co.search(idx, ["A", "B"], vec, 5, set())
    assert seen[2:] == [None, None]  # the configured default (faiss_search_threads)
    assert wide == narrow  # exact either way
    seen.clear()
    co.configure(None, 2)  # no device to ask: never wide
    await co.search(idx, ["A"], vec, 5, set())
    assert seen == [None]


async def test_a_forward_waits_for_a_wide_search(monkeypatch: pytest.MonkeyPatch) -> None:
    idx = _index()
    release = threading.Event()
    started = threading.Event()
    real = search_mod.search_many

    def slow(batch: Any, threads: int | None = None) -> Any:
        started.set()
        release.wait(5)
        return real(batch, threads)

    monkeypatch.setattr(search_mod, "search_many", slow)
    batcher = Batcher(FakeEncoder(dim=16))
    await batcher.start()
    co = SearchCoalescer()
    co.configure(lambda: batcher.device_idle, 2)
    batcher.before_device = co.wide_done
    try:
        assert batcher.device_idle
        search = asyncio.ensure_future(co.search(idx, ["A"], idx.vectors[0], 3, set()))
        assert await asyncio.to_thread(started.wait, 5)
        ran: list[float] = []
        job = asyncio.ensure_future(batcher.run_on_device(lambda: ran.append(time.monotonic())))
        await asyncio.sleep(0.2)
        assert ran == [] and not job.done()  # held back while the wide search runs
        assert not batcher.device_idle  # and a second search would not go wide
        t_release = time.monotonic()
        release.set()
        await asyncio.wait_for(job, 5)
        assert len(ran) == 1 and ran[0] >= t_release
        assert len((await search)["A"]) == 3
        assert batcher.device_idle
    finally:
        release.set()
        await batcher.stop()


async def test_a_search_beside_a_running_forward_is_narrow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even when the forward's awaiter was cancelled: the device is busy until the thread is."""
    idx = _index()
    seen = _spy_threads(monkeypatch)
    batcher = Batcher(FakeEncoder(dim=16))
    await batcher.start()
    co = SearchCoalescer()
    co.configure(lambda: batcher.device_idle, 2)
    batcher.before_device = co.wide_done
    hold = threading.Event()
    try:
        job = asyncio.ensure_future(batcher.run_on_device(hold.wait, 5))
        await asyncio.sleep(0.05)
        job.cancel()
        await asyncio.sleep(0.05)
        await co.search(idx, ["A"], idx.vectors[0], 3, set())
        assert seen == [None]
        hold.set()
        for _ in range(100):
            if batcher.device_idle:
                break
            await asyncio.sleep(0.01)
        await co.search(idx, ["A"], idx.vectors[0], 3, set())
        assert seen == [None, 2]
    finally:
        hold.set()
        await batcher.stop()


def test_idle_threads_setting() -> None:
    s = Settings()
    assert s.resolved_idle_search_threads("cpu", 2) == 2
    assert s.resolved_idle_search_threads("cuda", 8) == 0  # a GPU forward never waits on it
    assert Settings(faiss_idle_search_threads=0).resolved_idle_search_threads("cpu", 2) == 0
    assert Settings(faiss_idle_search_threads=4).resolved_idle_search_threads("cuda", 2) == 4
    with pytest.raises(ValueError, match="faiss_idle_search_threads"):
        Settings(faiss_idle_search_threads=-1)


async def test_engine_wires_the_gate(make_settings: Any) -> None:
    engine = Engine(make_settings(faiss_idle_search_threads=3), encoder=FakeEncoder(dim=32))
    await engine.start()
    try:
        assert engine.searches.idle_threads == 3
        assert engine.batcher.before_device == engine.searches.wide_done
        assert engine.searches.device_idle is not None and engine.searches.device_idle()
    finally:
        await engine.stop()
    off = Engine(make_settings(faiss_idle_search_threads=0), encoder=FakeEncoder(dim=32))
    await off.start()
    try:
        assert off.searches.idle_threads == 0 and off.batcher.before_device is None
    finally:
        await off.stop()
