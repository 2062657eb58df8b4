"""Concurrent searches share one faiss call per domain and still answer each request exactly
(its own k and its own excluded rows), as if it had searched alone (perf, issue 5)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cprec.encoder import FakeEncoder
from cprec.recommender import Recommender
from service.catalog import Item
from service.engine import Engine
from service.index import ItemIndex, SearchCoalescer, configure_faiss
from service.protocol import RecommendRequest, TitleEntry


def _index(n_per_domain: int = 60, dim: int = 16) -> ItemIndex:
    rng = np.random.default_rng(0)
    items = [
        Item(f"{d}{i}", d, f"{d} item {i}", "", i) for d in ("A", "B") for i in range(n_per_domain)
    ]
    vecs = rng.standard_normal((len(items), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return ItemIndex.build(items, vecs, "m1")


async def test_coalesced_answers_equal_single_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    idx = _index()
    rng = np.random.default_rng(1)
    calls: list[tuple[str, int]] = []
    real = ItemIndex.search

    def spy(self: ItemIndex, domain: str, q: np.ndarray, k: int, exclude: Any = ()) -> Any:
        calls.append((domain, q.reshape(-1, self.dim).shape[0]))
        return real(self, domain, q, k, exclude)

    specs = []
    for i in range(12):
        vec = rng.standard_normal(16).astype(np.float32)
        targets = ["A", "B"] if i % 3 else ["B"]
        k = 1 + i % 7
        exclude = set(rng.choice(len(idx.items), size=i % 5 * 3, replace=False).tolist())
        specs.append((targets, vec, k, exclude))
    expected = [{d: real(idx, d, v.reshape(1, -1), k, ex)[0] for d in t} for t, v, k, ex in specs]
    monkeypatch.setattr(ItemIndex, "search", spy)
    configure_faiss(blas_threshold=4)  # as the service runs: a block of queries goes to BLAS
    co = SearchCoalescer()
    got = await asyncio.gather(*(co.search(idx, t, v, k, ex) for t, v, k, ex in specs))
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        for d in e:  # the same rows in the same order; BLAS may round scores differently
            assert [r for r, _ in g[d]] == [r for r, _ in e[d]]
            np.testing.assert_allclose([s for _, s in g[d]], [s for _, s in e[d]], atol=1e-5)
    assert sorted(calls) == [("A", 8), ("B", 12)]  # one call per domain for the whole tick


async def test_a_failing_search_fails_its_waiters_only_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idx = _index()

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("faiss on fire")

    monkeypatch.setattr(ItemIndex, "search", boom)
    co = SearchCoalescer()
    vec = np.ones(16, dtype=np.float32)
    res = await asyncio.gather(
        *(co.search(idx, ["A"], vec, 3, set()) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in res)
    monkeypatch.undo()
    assert len((await co.search(idx, ["A"], vec, 3, set()))["A"]) == 3  # recovers


async def test_requests_of_one_forward_share_the_search(
    make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = ItemIndex.search

    def spy(self: ItemIndex, domain: str, q: np.ndarray, k: int, exclude: Any = ()) -> Any:
        calls.append(q.reshape(-1, self.dim).shape[0])
        return real(self, domain, q, k, exclude)

    enc = FakeEncoder(dim=32)
    settings = make_settings(max_wait_ms=200.0, batch_coalesce_ms=0, batch_max_padding="none")
    engine = Engine(settings, model=Recommender(enc, "fake-v1"))
    await engine.start()
    try:
        monkeypatch.setattr(ItemIndex, "search", spy)
        titles = ["Espresso Coffee Pods", "Green Tea Bags", "Space Opera Saga", "Honey"]
        reqs = [
            RecommendRequest(
                history=[TitleEntry(title=t, domain="Groceries")], target_domains=["Groceries"]
            )
            for t in titles
        ]
        out = await asyncio.gather(*(engine.recommend(r) for r in reqs))
    finally:
        await engine.stop()
    assert enc.batch_sizes[-1] == 4, enc.batch_sizes  # one forward for the four requests...
    assert calls == [4]  # ...and one search for them
    # k=10 over 6 Groceries items; the first two histories are catalogue items, excluded
    assert [len(r.results["Groceries"]) for r in out] == [5, 5, 6, 6]


async def test_a_cancelled_search_batch_cancels_its_waiters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    idx = _index()
    real = ItemIndex.search

    def slow(*a: Any, **k: Any) -> Any:
        threading.Event().wait(0.3)
        return real(*a, **k)

    monkeypatch.setattr(ItemIndex, "search", slow)
    co = SearchCoalescer()
    waiter = asyncio.create_task(co.search(idx, ["A"], np.ones(16, dtype=np.float32), 3, set()))
    await asyncio.sleep(0.05)  # the batch is running in its thread
    for t in list(co._tasks):
        t.cancel()  # e.g. shutdown
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 5)  # cancelled, not left hanging


def test_split_blocks() -> None:
    co = SearchCoalescer(parts=2, min_part=8)
    sizes = lambda n: [s.stop - s.start for s in co.split(n)]  # noqa: E731
    assert sizes(1) == [1] and sizes(15) == [15]  # too few for two blocks of 8
    assert sizes(16) == [8, 8] and sizes(33) == [16, 17]
    assert sum(sizes(200)) == 200 and len(sizes(200)) == 2
    assert [s.stop - s.start for s in SearchCoalescer(parts=4, min_part=8).split(24)] == [8, 8, 8]
    assert SearchCoalescer().split(64) == [slice(0, 64)]  # parts=1: one call, as before


async def test_split_tick_runs_parallel_calls_with_exact_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tick of 32 searches becomes two concurrent single-threaded calls per domain, and each
    request still gets what it would have got alone."""
    import threading
    import time

    idx = _index()
    rng = np.random.default_rng(7)
    real = ItemIndex.search
    active, peak, lock = [0], [0], threading.Lock()

    def spy(
        self: ItemIndex, domain: str, q: np.ndarray, k: int, exclude: Any = (), **kw: Any
    ) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)  # long enough for the other block's thread to arrive
        try:
            return real(self, domain, q, k, exclude, **kw)
        finally:
            with lock:
                active[0] -= 1

    specs = []
    for i in range(32):
        vec = rng.standard_normal(16).astype(np.float32)
        exclude = set(rng.choice(len(idx.items), size=i % 4, replace=False).tolist())
        specs.append((["A", "B"], vec, 1 + i % 5, exclude))
    expected = [{d: real(idx, d, v.reshape(1, -1), k, ex)[0] for d in t} for t, v, k, ex in specs]
    monkeypatch.setattr(ItemIndex, "search", spy)
    co = SearchCoalescer(parts=2, min_part=8)
    got = await asyncio.gather(*(co.search(idx, t, v, k, ex) for t, v, k, ex in specs))
    assert peak[0] == 2  # the two blocks searched at the same time
    for g, e in zip(got, expected, strict=True):
        for d in e:
            assert [r for r, _ in g[d]] == [r for r, _ in e[d]]


async def test_a_failing_block_fails_only_its_own_waiters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idx = _index()
    real = ItemIndex.search
    poison = np.full(16, 7.0, dtype=np.float32)

    def flaky(self: ItemIndex, domain: str, q: np.ndarray, k: int, *a: Any, **kw: Any) -> Any:
        if np.any(np.all(q == 7.0, axis=1)):
            raise RuntimeError("faiss on fire")
        return real(self, domain, q, k, *a, **kw)

    monkeypatch.setattr(ItemIndex, "search", flaky)
    co = SearchCoalescer(parts=2, min_part=8)
    vecs = [np.ones(16, dtype=np.float32)] * 15 + [poison]  # the poison lands in block 2
    res = await asyncio.gather(
        *(co.search(idx, ["A"], v, 3, set()) for v in vecs), return_exceptions=True
    )
    assert all(isinstance(r, dict) for r in res[:8])
    assert all(isinstance(r, RuntimeError) for r in res[8:])


async def test_parallel_calls_setting(make_settings: Callable[..., Any]) -> None:
    import os

    from service.settings import Settings

    def parts(**tuning: Any) -> int:
        return Settings(tuning=tuning).tuning.for_device("cpu").search_parallel_calls

    assert parts() == len(os.sched_getaffinity(0))
    assert parts(search_parallel_calls=1) == 1
    with pytest.raises(ValueError, match="search_parallel_calls"):
        parts(search_parallel_calls=0)
    engine = Engine(make_settings(search_parallel_calls=3), model=Recommender(FakeEncoder(8), "v"))
    await engine.start()
    try:
        assert engine.searches.parts == 3
    finally:
        await engine.stop()
