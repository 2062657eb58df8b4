"""Batching: work issued together runs as one call.

Two batchers. ``TickBatcher``: the calls made in one event-loop tick are answered by one batched
call. A coalesced forward answers its whole cohort in one tick, and every request of the cohort
then takes the same steps in the same ticks (look its vector up, search, store it, tokenise its
next history); one at a time, each step would cost a thread-pool hop or a Redis round trip per
request, taken from the next forward on 2 cores. The Redis cache, the search and tokenisation use
it. ``Batcher``: dynamic batching of encodes, concurrent cache misses share one forward pass.

Requests are tokenised in a small thread pool (off the event loop; the requests of one tick in
one call per pool thread), queued in a bounded queue, and a single worker drains the queue
into batches capped by size and by a padded-token budget;
a batch waits for as many requests as the last one served (up to ``coalesce_ms``, or
``coalesce_share`` of the last batch's device time when that is longer) or, with coalescing off,
for ``max_wait_ms``. The forward pass runs on one dedicated "device" thread, so the
event loop keeps answering (``/live``, cache hits) while the model computes, and torch releases
the GIL inside its kernels. A full queue refuses (``Overloaded``) instead of growing the latency
without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

from cprec.encoder import Encoder
from cprec.lm import TextKind
from service.errors import Overloaded
from service.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
_Pending = tuple[list[int], asyncio.Future[np.ndarray]]
TOKENIZE_THREADS = 2  # the Rust tokenizer releases the GIL: two calls run in parallel


def split_blocks(n: int, parts: int, min_part: int) -> list[slice]:
    """Contiguous blocks for ``n`` items: as many as ``parts`` allows while each keeps
    ``min_part`` items, sizes within one of each other."""
    k = max(1, min(parts, n // max(1, min_part)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


class TickBatcher(Generic[T, R]):
    """``await batcher(item)`` from many tasks; the items queued in one tick go to ``run``
    together, which returns one result per item, in order.

    The flush is scheduled with ``call_soon`` when the first item of a tick arrives, so it runs
    after every task that was ready in that tick; nothing ever waits for company. A large tick is
    cut into up to ``parts`` blocks of at least ``min_part`` items, run concurrently. A block
    whose call raises fails its own waiters with that exception; cancelling a block's task
    (shutdown) cancels its waiters, so none is left hanging.

    ``serial``: one block in flight at a time; what arrives meanwhile waits and goes as the next
    block the moment it finishes. For a ``run`` whose cost is mostly per call (a small model's
    forward on the one device thread), the block then grows with the load instead of the
    device thread queueing a forward per tick, and an idle service still waits for nothing.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        parts: int = 1,
        min_part: int = 8,
        serial: bool = False,
    ) -> None:
        self._run_block = run
        self.parts = max(1, parts)
        self.min_part = max(1, min_part)
        self.serial = serial
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        if not self._pending and not (self.serial and self._tasks):
            loop.call_soon(self.flush)
        self._pending.append((item, fut))
        return await fut

    def split(self, n: int) -> list[slice]:
        return split_blocks(n, self.parts, self.min_part)

    def flush(self) -> None:
        """Start the blocks for everything queued so far (normally run by ``call_soon``)."""
        if self.serial and self._tasks:
            return  # the block in flight flushes when it is done
        batch, self._pending = self._pending, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        for part in self.split(len(batch)):
            task = loop.create_task(self._answer(batch[part]))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self.serial and self._pending and not self._tasks:
            self.flush()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Send what is queued and wait (up to ``timeout_s``) for the blocks in flight."""
        self.flush()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def _answer(self, block: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run_block([item for item, _ in block])
            if len(results) != len(block):  # a bug in run: fail loudly, leave nobody waiting
                raise RuntimeError(f"batched call answered {len(results)} of {len(block)} items")
        except BaseException as exc:
            for _, fut in block:
                if not fut.done():
                    if isinstance(exc, Exception):
                        fut.set_exception(exc)
                    else:
                        fut.cancel()
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, fut), r in zip(block, results, strict=True):  # lengths checked above
                if not fut.done():
                    fut.set_result(r)


def device_thread() -> ThreadPoolExecutor:
    """The one thread that runs every torch op of the service: model load, warm-up, forwards.

    torch's OpenMP runtime (libgomp) keeps a thread team for each thread that has run a parallel
    region, and once the process holds more of those threads than CPUs it stops spin-waiting
    between regions: every op then puts its team to sleep and wakes it again. Loading the weights
    on any other thread was enough for that on 2 cores (docs/decisions/003-serving-on-two-cores.md;
    tests/perf/test_perf_device_thread.py pins the placement).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cprec-device")


def padding_groups(
    lengths: Sequence[int], max_padding: float | None, max_tokens: int | None = None
) -> list[list[int]]:
    """Row groups for the forwards of one batch, in input order when not split.

    With ``max_padding`` set (``tuning.batch_max_padding``, on by default on CPU), rows are
    length-sorted and cut wherever the next (longer) row would push padded tokens past
    ``max_padding`` x real tokens: worth it where a forward's cost per token is flat in batch
    size, as on CPU. ``max_tokens`` (``tuning.batch_max_forward_tokens``) also cuts a group
    before its rows x width pass it: a forward of many long rows outgrows the caches and costs
    more per row, so how many long histories a cohort held would set how long its batch took
    (docs/decisions/003-serving-on-two-cores.md). ``bench/serve.py`` times the raw encoder with
    the same rule.
    """
    if max_padding is None or len(lengths) < 2:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = [[]]
    real = 0
    for i in order:
        n = lengths[i]  # the longest so far: the group's width if i joins it
        cur = groups[-1]
        wide = n * (len(cur) + 1)  # padded tokens of the group with i
        if cur and (
            wide > (1 + max_padding) * (real + n) or (max_tokens is not None and wide > max_tokens)
        ):
            groups.append([])
            cur, real = groups[-1], 0
        cur.append(i)
        real += n
    return groups


class Batcher:
    def __init__(
        self,
        encoder: Encoder,
        metrics: Metrics | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        token_budget: int = 16384,
        queue_size: int = 256,
        enabled: bool = True,
        max_padding: float | None = None,
        max_forward_tokens: int | None = None,
        device: ThreadPoolExecutor | None = None,
        coalesce_ms: float = 0.0,
        coalesce_share: float = 0.0,
    ) -> None:
        self.encoder = encoder
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.coalesce_s = coalesce_ms / 1000.0
        # Requests the last forward served plus those that queued behind it: how many clients
        # are active, so the next batch waits (up to coalesce_s) for that many, never longer.
        self._expect = 1
        # The clients of a batch come back only after their searches and responses, which grow
        # with the catalogue (36k items: a batch's search is tens of ms on 2 cores); one that
        # misses the window waits the whole next batch and then its own, and the cohort splits.
        # So the window also grows to coalesce_share of the last batch's device time: on a CPU
        # a batch of 32 histories is seconds, and a tenth of it is cheaper than that straggler.
        self.coalesce_share = coalesce_share
        self._last_batch_s = 0.0
        self.token_budget = token_budget
        self.queue_size = queue_size
        self.enabled = enabled
        self.max_padding = max_padding  # None = one forward per coalesced batch
        self.max_forward_tokens = max_forward_tokens  # only where batches are split
        # One device thread: forward passes (requests and reindex batches) never overlap, which
        # is what a single GPU or a CPU already saturated by intra-op threads wants. Pass the
        # thread the model was loaded on (see device_thread); the batcher owns it from here.
        self.device_pool = device or device_thread()
        self.pre_pool = ThreadPoolExecutor(
            max_workers=TOKENIZE_THREADS, thread_name_prefix="cprec-tokenize"
        )
        # The histories of one tick (a cohort coming back together) are tokenised by one call
        # per pool thread, not one thread-pool hop per request (service/coalesce.py).
        self._queries: TickBatcher[str, list[int]] = TickBatcher(
            self._tokenize_queries, parts=TOKENIZE_THREADS, min_part=8
        )
        # History titles that the hier and mean scorers encode as items (their own truncation).
        self._items: TickBatcher[str, list[int]] = TickBatcher(
            self._tokenize_items, parts=TOKENIZE_THREADS, min_part=8
        )
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._worker: asyncio.Task[None] | None = None
        self._inflight = 0
        # Admitted texts still being tokenised: counted in depth, so that the calls of one tick
        # (each admitted before any is queued) cannot pass queue_size together.
        self._admitted = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        if self.enabled:
            self._worker = asyncio.create_task(self._run(), name="cprec-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self.device_pool.shutdown(wait=True, cancel_futures=True)
        self.pre_pool.shutdown(wait=True, cancel_futures=True)

    @property
    def depth(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + self._inflight + self._admitted

    async def run_on_device(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the device thread (the reindex job embeds through here)."""
        return await asyncio.get_running_loop().run_in_executor(self.device_pool, fn, *args)

    async def tokenize(self, texts: list[str], kind: TextKind) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pre_pool, self.encoder.pre, texts, kind)

    async def _tokenize_queries(self, texts: list[str]) -> list[list[int]]:
        return await self.tokenize(texts, "query")

    async def _tokenize_items(self, texts: list[str]) -> list[list[int]]:
        return await self.tokenize(texts, "item")

    def _admit(self, n: int = 1) -> None:
        if self._queue is None:
            raise RuntimeError("batcher not started")
        if self.depth >= self.queue_size:
            raise Overloaded(
                "encoder queue is full; retry shortly",
                details={"queue_size": self.queue_size},
                retry_after_s=1,
            )
        self._admitted += n

    async def embed(self, text: str, kind: TextKind = "query") -> np.ndarray:
        """One text -> [D] unit vector, batched with whatever else is waiting: a user text
        (``query``) or, for the hier and mean scorers, a history title as an item (``item``)."""
        self._admit()
        return await self._embed(text, kind)

    async def embed_many(self, texts: Sequence[str], kind: TextKind = "item") -> list[np.ndarray]:
        """The texts of one request, admitted together: a history with several titles to encode
        is refused whole while the queue is full, or queued whole (``queue_size`` bounds the
        requests waiting, not how many titles each brings: at most the model's history length)."""
        self._admit(len(texts))
        return list(await asyncio.gather(*(self._embed(t, kind) for t in texts)))

    async def _embed(self, text: str, kind: TextKind) -> np.ndarray:
        assert self._queue is not None
        try:
            ids = await (self._queries if kind == "query" else self._items)(text)
        finally:
            self._admitted -= 1  # queued (or failed) from here on, with no await in between
        if not self.enabled:
            self._inflight += 1
            try:
                out = await self.run_on_device(self._forward, [ids])
            finally:
                self._inflight -= 1
            return out[0]
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((ids, fut))  # unbounded: admission is _admit's
        self._gauge()
        return await fut

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        """One forward pass on the device thread; a CPU batch is cut into these by ``_encode``."""
        t0 = time.perf_counter()
        vecs = self.encoder.core(batch)  # [len(batch), D]
        if self.metrics is not None:
            self.metrics.encode_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(batch))
        return vecs

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        batch = [first]
        width = len(first[0])
        t0 = time.monotonic()
        target = min(self._expect, self.max_batch_size)
        window = max(self.coalesce_s, self.coalesce_share * self._last_batch_s)
        while len(batch) < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if self.coalesce_s > 0:
                    # Wait (within the window) for the clients the last batch served to come
                    # back, and not at all once they are here (a lone client never waits).
                    if len(batch) >= target:
                        break
                    wait = window
                else:
                    wait = self.max_wait_s  # fixed window for company
                remaining = t0 + wait - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            new_width = max(width, len(nxt[0]))
            if new_width * (len(batch) + 1) > self.token_budget:
                self._carry = nxt  # first of the next batch
                break
            batch.append(nxt)
            width = new_width
        return batch

    def _join_late(self, live: list[_Pending]) -> None:
        """Requests queued since the batch started join its remaining forwards (up to the batch
        size and token budget), instead of waiting for all of it and then their own batch."""
        assert self._queue is not None
        width = max(len(ids) for ids, _ in live)
        while len(live) < self.max_batch_size and self._carry is None:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if nxt[1].cancelled():
                continue
            if max(width, len(nxt[0])) * (len(live) + 1) > self.token_budget:
                self._carry = nxt
                break
            live.append(nxt)
            width = max(width, len(nxt[0]))
        self._inflight = len(live)

    async def _encode(self, live: list[_Pending]) -> np.ndarray:
        """Vectors for ``live``, which may grow: with ``max_padding`` set (CPU) the batch runs
        as several length-sorted forwards, and a request that arrives meanwhile (a client that
        missed the window) joins the forwards still to come. It then finishes with its cohort
        instead of after a whole extra batch, which had set the p99 of batched closed-loop load.
        One padded forward (GPU default) has nothing to join."""
        if self.max_padding is None:
            return await self.run_on_device(self._forward, [ids for ids, _ in live])
        out: dict[int, np.ndarray] = {}
        while len(out) < len(live):
            todo = [i for i in range(len(live)) if i not in out]
            lengths = [len(live[i][0]) for i in todo]
            first = padding_groups(lengths, self.max_padding, self.max_forward_tokens)[0]
            rows = [todo[j] for j in first]
            vecs = await self.run_on_device(self._forward, [live[i][0] for i in rows])
            # Rows are answered when the whole batch is done, not per forward (continuous
            # batching): on 2 cores the early rows' searches and responses stall the encoder's
            # OpenMP team (docs/decisions/003-serving-on-two-cores.md).
            out.update(zip(rows, vecs, strict=True))
            self._join_late(live)
        return np.stack([out[i] for i in range(len(live))])

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            live = [(ids, f) for ids, f in batch if not f.cancelled()]
            if not live:
                continue
            self._inflight = len(live)
            self._gauge()
            log.debug(
                "batch of %d requests (expected %d, %d queued behind, carry %s)",
                len(live),
                self._expect,
                self._queue.qsize() if self._queue else 0,
                self._carry is not None,
            )
            t0 = time.perf_counter()
            try:
                vecs = await self._encode(live)  # live may grow: late joiners
            except asyncio.CancelledError:
                for _, f in live:
                    if not f.done():
                        f.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                log.exception("forward pass failed for a batch of %d", len(live))
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
            else:
                for (_, f), v in zip(live, vecs, strict=True):
                    if not f.done():
                        f.set_result(v)
            finally:
                if self.metrics is not None:
                    self.metrics.batch_requests.observe(len(live))
                self._last_batch_s = time.perf_counter() - t0
                self._inflight = 0
                self._expect = len(live) + self.depth + (self._carry is not None)
                self._gauge()
