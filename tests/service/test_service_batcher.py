"""Dynamic batching: coalescing, exactness, back-pressure, token budget, errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from cprec.encoder import FakeEncoder
from service.batcher import Batcher
from service.errors import Overloaded
from service.metrics import Metrics

TEXTS = [f"user {i} likes coffee number {i} and tea {i % 3}" for i in range(24)]


class BlockingEncoder(FakeEncoder):
    """Holds every forward pass until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(10)
        return super().core(batch)


class FailingEncoder(FakeEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        if self.fail:
            self.calls += 1
            raise RuntimeError("device on fire")
        return super().core(batch)


async def _batcher(enc: FakeEncoder, **kw: object) -> Batcher:
    b = Batcher(enc, **kw)  # type: ignore[arg-type]
    await b.start()
    return b


async def test_concurrent_embeds_coalesce_and_match_unbatched() -> None:
    enc = FakeEncoder()
    metrics = Metrics()
    b = await _batcher(enc, metrics=metrics, max_batch_size=64, max_wait_ms=100)
    try:
        out = await asyncio.gather(*(b.embed(t) for t in TEXTS))
    finally:
        await b.stop()
    assert sum(enc.batch_sizes) == len(TEXTS)
    assert enc.calls <= 3 and max(enc.batch_sizes) >= 8, enc.batch_sizes
    expected = FakeEncoder().encode(TEXTS, "query")
    np.testing.assert_allclose(np.stack(out), expected, atol=1e-6)
    assert metrics.batch_size._sum.get() == len(TEXTS)  # type: ignore[attr-defined]


async def test_max_batch_size_caps_batches() -> None:
    enc = FakeEncoder()
    b = await _batcher(enc, max_batch_size=4, max_wait_ms=50)
    try:
        await asyncio.gather(*(b.embed(t) for t in TEXTS))
    finally:
        await b.stop()
    assert max(enc.batch_sizes) <= 4 and sum(enc.batch_sizes) == len(TEXTS)
    assert enc.calls >= len(TEXTS) // 4


async def test_token_budget_splits_batches() -> None:
    enc = FakeEncoder()
    width = len(enc.pre([TEXTS[0]], "query")[0])
    assert all(len(enc.pre([t], "query")[0]) == width for t in TEXTS)
    budget = width * 5  # at most 5 of these texts per forward
    b = await _batcher(enc, max_batch_size=64, max_wait_ms=50, token_budget=budget)
    try:
        out = await asyncio.gather(*(b.embed(t) for t in TEXTS))
    finally:
        await b.stop()
    assert sum(enc.batch_sizes) == len(TEXTS)
    assert max(enc.batch_sizes) == 5, enc.batch_sizes
    np.testing.assert_allclose(np.stack(out), FakeEncoder().encode(TEXTS, "query"), atol=1e-6)


async def test_batching_disabled_runs_one_by_one() -> None:
    enc = FakeEncoder()
    b = await _batcher(enc, enabled=False)
    try:
        out = await asyncio.gather(*(b.embed(t) for t in TEXTS[:6]))
    finally:
        await b.stop()
    assert enc.calls == 6 and enc.batch_sizes == [1] * 6
    np.testing.assert_allclose(np.stack(out), FakeEncoder().encode(TEXTS[:6], "query"), atol=1e-6)


async def test_queue_full_is_overloaded() -> None:
    enc = BlockingEncoder()
    b = await _batcher(enc, max_batch_size=1, max_wait_ms=0, queue_size=2)
    try:
        first = asyncio.create_task(b.embed(TEXTS[0]))
        await asyncio.to_thread(enc.entered.wait, 5)  # the worker is stuck in the forward pass
        second = asyncio.create_task(b.embed(TEXTS[1]))
        for _ in range(100):
            if b.depth >= 2:
                break
            await asyncio.sleep(0.01)
        assert b.depth == 2
        with pytest.raises(Overloaded) as ei:
            await b.embed(TEXTS[2])
        assert ei.value.code == "overloaded" and ei.value.retry_after_s == 1
        enc.release.set()
        v1, v2 = await asyncio.gather(first, second)
        np.testing.assert_allclose(
            np.stack([v1, v2]), FakeEncoder().encode(TEXTS[:2], "query"), atol=1e-6
        )
        # The queue drained: new work is accepted again.
        assert (await b.embed(TEXTS[3])).shape == (enc.dim,)
    finally:
        enc.release.set()
        await b.stop()


async def test_encoder_exception_reaches_every_waiter_and_worker_survives() -> None:
    enc = FailingEncoder()
    b = await _batcher(enc, max_batch_size=64, max_wait_ms=50)
    try:
        res = await asyncio.gather(*(b.embed(t) for t in TEXTS[:8]), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "on fire" in str(r) for r in res), res
        assert enc.calls < 8  # they failed together, in shared batches
        enc.fail = False
        ok = await b.embed(TEXTS[0])
        np.testing.assert_allclose(ok, FakeEncoder().encode(TEXTS[:1], "query")[0], atol=1e-6)
        assert b.depth == 0
    finally:
        await b.stop()


async def test_embed_before_start_is_an_error() -> None:
    b = Batcher(FakeEncoder())
    try:
        with pytest.raises(RuntimeError, match="not started"):
            await b.embed("x")
    finally:
        await b.stop()


class SlowEncoder(FakeEncoder):
    """Each forward takes ``delay_s``, like a real device."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        threading.Event().wait(self.delay_s)
        return super().core(batch)


async def _closed_loop(b: Batcher, clients: int, rounds: int, think_s: float = 0.0) -> None:
    """``clients`` callers, each sending its next request once the last one is answered, with a
    few ms between them as an HTTP round trip would put there (plus ``think_s``: a search and
    a response)."""

    async def client(c: int) -> None:
        for r in range(rounds):
            await b.embed(TEXTS[(c + r) % len(TEXTS)])
            await asyncio.sleep(think_s + (0.005 if think_s else 0.001) * (1 + c % 4))

    await asyncio.gather(*(client(c) for c in range(clients)))


@pytest.mark.parametrize("coalesce_ms", [0.0, 400.0])
async def test_closed_loop_clients_share_one_forward_when_coalescing(coalesce_ms: float) -> None:
    enc = SlowEncoder(0.03)
    b = await _batcher(enc, max_batch_size=32, max_wait_ms=0.5, coalesce_ms=coalesce_ms)
    try:
        await _closed_loop(b, clients=8, rounds=6)
    finally:
        await b.stop()
    assert sum(enc.batch_sizes) == 48
    steady = enc.batch_sizes[1:-1]  # the first and last may hold the clients a round ahead
    if coalesce_ms:
        # The batcher learns there are 8 clients and waits for all of them: full batches.
        assert steady and all(n == 8 for n in steady), enc.batch_sizes
    else:
        # Without coalescing the clients that come back late miss the batch (cohorts).
        assert any(n < 8 for n in steady), enc.batch_sizes


@pytest.mark.parametrize("share", [0.0, 0.5])
async def test_the_window_grows_with_the_last_batch_time(share: float) -> None:
    """Clients that come back only after their search and response (35-50 ms here, longer than
    the 10 ms window) still share one forward when the window grows to a share of the last
    batch's device time (0.5 x 0.2 s); without it they miss the batch and the cohort splits."""
    enc = SlowEncoder(0.2)
    b = await _batcher(
        enc, max_batch_size=32, max_wait_ms=0.5, coalesce_ms=10.0, coalesce_share=share
    )
    try:
        await _closed_loop(b, clients=8, rounds=5, think_s=0.03)
    finally:
        await b.stop()
    assert sum(enc.batch_sizes) == 40
    steady = enc.batch_sizes[1:-1]
    if share:
        assert steady and all(n == 8 for n in steady), enc.batch_sizes
    else:
        assert any(n < 8 for n in steady), enc.batch_sizes


async def test_a_lone_client_is_not_held_for_the_coalesce_window() -> None:
    enc = FakeEncoder()
    b = await _batcher(enc, max_wait_ms=0.5, coalesce_ms=2000.0)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for t in TEXTS[:5]:
            await b.embed(t)  # sequential: one client
        elapsed = loop.time() - t0
    finally:
        await b.stop()
    assert enc.batch_sizes == [1] * 5
    assert elapsed < 1.0  # five requests; one coalesce wait alone would be 2 s


async def test_coalescing_forgets_clients_that_left() -> None:
    enc = SlowEncoder(0.02)
    b = await _batcher(enc, max_batch_size=32, max_wait_ms=0.5, coalesce_ms=150.0)
    try:
        await _closed_loop(b, clients=6, rounds=3)  # learns 6 clients
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for t in TEXTS[:4]:  # then one client alone: at most one coalesce wait
            await b.embed(t)
        elapsed = loop.time() - t0
    finally:
        await b.stop()
    assert enc.batch_sizes[-4:] == [1, 1, 1, 1]
    assert elapsed < 0.15 + 4 * 0.02 + 0.5


async def test_metrics_count_requests_per_batch_apart_from_forwards() -> None:
    """A coalesced batch split into length-sorted forwards is one batch of requests in
    ``cprec_batch_requests`` and several forwards in ``cprec_batch_size``."""
    enc = FakeEncoder()
    metrics = Metrics()
    texts = [" ".join(["word"] * (1 + 3 * i)) for i in range(8)]  # lengths 1..22 tokens
    b = await _batcher(enc, metrics=metrics, max_batch_size=64, max_wait_ms=200, max_padding=0.0)
    try:
        await asyncio.gather(*(b.embed(t) for t in texts))
    finally:
        await b.stop()
    sample = metrics.registry.get_sample_value
    batches, requests = sample("cprec_batch_requests_count"), sample("cprec_batch_requests_sum")
    assert requests == len(texts)
    assert batches is not None and batches < len(enc.batch_sizes)
    assert sample("cprec_batch_size_count") == len(enc.batch_sizes)


@pytest.mark.parametrize("max_padding", [0.0, None])
async def test_a_late_request_joins_the_forwards_still_to_come(max_padding: float | None) -> None:
    """On CPU a batch runs as several length-sorted forwards; a request that arrives during the
    first one joins the later ones (one batch of 4 requests) and gets the same vector as alone.
    With one padded forward (GPU default) there is nothing to join: it waits for its own batch."""
    enc = BlockingEncoder()
    metrics = Metrics()
    texts = [" ".join(["word"] * n) for n in (1, 5, 9)]  # three lengths: three forwards at 0.0
    late = " ".join(["late"] * 12)
    b = await _batcher(
        enc, metrics=metrics, max_batch_size=32, max_wait_ms=50, max_padding=max_padding
    )
    try:
        first = [asyncio.create_task(b.embed(t)) for t in texts]
        assert await asyncio.to_thread(enc.entered.wait, 10)  # the first forward is running
        second = asyncio.create_task(b.embed(late))
        while b._queue is not None and b._queue.empty():  # tokenised and queued
            await asyncio.sleep(0.005)
        enc.release.set()
        out = await asyncio.gather(*first, second)
    finally:
        await b.stop()
    np.testing.assert_allclose(
        np.stack(out), FakeEncoder().encode([*texts, late], "query"), atol=1e-6
    )
    sample = metrics.registry.get_sample_value
    if max_padding is not None:
        assert sample("cprec_batch_requests_count") == 1  # one batch, four requests
        assert sample("cprec_batch_requests_sum") == 4 and len(enc.batch_sizes) == 4
    else:
        assert sample("cprec_batch_requests_count") == 2 and enc.batch_sizes == [3, 1]


async def test_a_request_s_titles_are_admitted_together() -> None:
    """``embed_many``: a history's titles queue whole even past queue_size (it bounds waiting
    requests, not titles per request), and are refused whole while the queue is full."""
    enc = BlockingEncoder()
    b = await _batcher(enc, max_batch_size=1, max_wait_ms=0, queue_size=2)
    try:
        first = asyncio.create_task(b.embed_many(TEXTS[:3], "query"))
        await asyncio.to_thread(enc.entered.wait, 5)
        for _ in range(100):
            if b.depth >= 3:
                break
            await asyncio.sleep(0.01)
        assert b.depth == 3  # all three queued, past queue_size
        calls = enc.calls
        with pytest.raises(Overloaded):
            await b.embed_many(TEXTS[3:5], "query")
        assert enc.calls == calls and b.depth == 3  # the refused request queued nothing
        enc.release.set()
        out = await first
        np.testing.assert_allclose(
            np.stack(out), FakeEncoder().encode(TEXTS[:3], "query"), atol=1e-6
        )
    finally:
        enc.release.set()
        await b.stop()


async def test_one_tick_burst_is_bounded_by_queue_size() -> None:
    """Calls of one tick are each admitted before any is tokenised and queued: the ones past
    queue_size are refused, not all queued together."""
    enc = BlockingEncoder()
    b = await _batcher(enc, max_batch_size=1, max_wait_ms=0, queue_size=4)
    try:
        calls = [asyncio.ensure_future(b.embed(t)) for t in TEXTS[:10]]
        await asyncio.to_thread(enc.entered.wait, 5)
        refused = [c for c in calls if c.done() and isinstance(c.exception(), Overloaded)]
        assert len(refused) == 6 and b.depth == 4
        enc.release.set()
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert sum(isinstance(d, np.ndarray) for d in done) == 4
    finally:
        enc.release.set()
        await b.stop()
