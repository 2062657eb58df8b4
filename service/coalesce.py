"""Calls made in one event-loop tick, answered by one batched call.

A coalesced forward answers its whole cohort in one tick, and every request of the cohort then
takes the same steps in the same ticks: look its vector up, search, store it, tokenise its next
history. Done one request at a time, each step costs the event loop a thread-pool hop or a Redis
round trip per request, and on 2 cores that time is taken from the next forward. ``TickBatcher``
hands the items of one tick to a single batched call instead (perf, issue 5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        parts: int = 1,
        min_part: int = 8,
    ) -> None:
        self._run_block = run
        self.parts = max(1, parts)
        self.min_part = max(1, min_part)
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append((item, fut))
        return await fut

    def split(self, n: int) -> list[slice]:
        return split_blocks(n, self.parts, self.min_part)

    def flush(self) -> None:
        """Start the blocks for everything queued so far (normally run by ``call_soon``)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        for part in self.split(len(batch)):
            task = loop.create_task(self._answer(batch[part]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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
