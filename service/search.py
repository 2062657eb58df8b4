"""Concurrent searches of one index snapshot share one faiss call per domain.

Coalesced requests get their user vectors from the same forward pass, so their searches are
issued in the same event-loop tick. One [B, D] query block reads a flat index once, where B
single-vector searches read it B times (the FK catalogue's Kitchen domain alone is 42 MB of
float32); on 2 cores that was what kept the device idle between forwards (perf, issue 5).

A search issued while the device (the encoder's thread) is idle may use every core: right after
a batch, its clients' searches are what the next batch waits for (on the FK catalogue 32
histories' searches took ~22 ms on one thread, a third of the gap between batches). Beside a
forward pass a second OpenMP team stalls both (see ``ItemIndex.search``), so such a "wide"
search only starts on an idle device, and a forward waits for the wide searches in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.cache import BoundedLRU
from service.index import ItemIndex

Hits = dict[str, list[tuple[int, float]]]  # domain -> [(row, score)], best first


@dataclass
class _Search:
    idx: ItemIndex
    targets: Sequence[str]
    vec: np.ndarray  # [D]
    k: int
    exclude: set[int]
    future: asyncio.Future[Hits] = field(repr=False)


def search_many(searches: Sequence[_Search], threads: int | None = None) -> list[Hits]:
    """Exact top-k per search and target domain, one faiss call per (snapshot, domain).

    Each query block is fetched deep enough for its most demanding member (its k plus its
    excluded rows in that domain), then every row is filtered with its own exclusions and cut
    to its own k: the same answer as searching each request alone.
    """
    out: list[Hits] = [{} for _ in searches]
    groups: dict[tuple[int, str], list[int]] = {}
    for i, s in enumerate(searches):
        for d in s.targets:
            groups.setdefault((id(s.idx), d), []).append(i)
    for (_, d), members in groups.items():
        idx = searches[members[0]].idx
        excl = [{r for r in searches[i].exclude if idx.items[r].domain == d} for i in members]
        fetch = max(searches[i].k + len(e) for i, e in zip(members, excl, strict=True))
        q = np.stack([searches[i].vec for i in members])  # [B, D]
        rows = idx.search(d, q, fetch, threads=threads)
        for i, e, hits in zip(members, excl, rows, strict=True):
            out[i][d] = [(r, s) for r, s in hits if r not in e][: searches[i].k]
    return out


class SearchCoalescer:
    """``await search(...)`` from many requests; those issued in one tick run as one batch.

    With ``idle_threads`` > 1 and ``device_idle`` telling when no forward pass runs or waits, a
    batch issued on an idle device searches with that many threads; ``wide_done`` is what the
    device awaits before its next job.
    """

    def __init__(self) -> None:
        self._pending: list[_Search] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.device_idle: Callable[[], bool] | None = None
        self.idle_threads = 0
        self._wide = 0  # wide searches in flight
        self._wide_over: asyncio.Event | None = None

    def configure(self, device_idle: Callable[[], bool] | None, idle_threads: int) -> None:
        self.device_idle = device_idle
        self.idle_threads = idle_threads if device_idle is not None else 0

    async def wide_done(self) -> None:
        """Return once no wide search is running (at once when none is)."""
        while self._wide and self._wide_over is not None:
            await self._wide_over.wait()

    async def search(
        self, idx: ItemIndex, targets: Sequence[str], vec: np.ndarray, k: int, exclude: set[int]
    ) -> Hits:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Hits] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after every search issued in this tick
        self._pending.append(_Search(idx, targets, vec, k, exclude, fut))
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        threads = None
        if self.idle_threads > 1 and self.device_idle is not None and self.device_idle():
            threads = self.idle_threads
            self._wide += 1
            if self._wide_over is None:
                self._wide_over = asyncio.Event()
            self._wide_over.clear()
        task = asyncio.get_running_loop().create_task(self._run(batch, threads))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wide_finished(self) -> None:
        self._wide -= 1
        if not self._wide and self._wide_over is not None:
            self._wide_over.set()

    async def _run(self, batch: list[_Search], threads: int | None) -> None:
        loop = asyncio.get_running_loop()

        def work() -> list[Hits]:
            try:
                return search_many(batch, threads)
            finally:  # when the thread is done, even if its awaiter was cancelled
                if threads is not None:
                    loop.call_soon_threadsafe(self._wide_finished)

        try:
            results = await asyncio.to_thread(work)
        except BaseException as exc:  # every waiter gets the error, or is cancelled with us
            for s in batch:
                if not s.future.done():
                    if isinstance(exc, Exception):
                        s.future.set_exception(exc)
                    else:
                        s.future.cancel()
            if not isinstance(exc, Exception):
                raise
        else:
            for s, r in zip(batch, results, strict=True):
                if not s.future.done():
                    s.future.set_result(r)


class RankedLists(BoundedLRU[Hashable, Hits]):
    """The ranked lists of recent requests, per index snapshot: a repeated request (a page
    reload, a retry, a client polling) skips the cache round-trip and the search, which
    dominates a cache hit once a catalogue is large (36k FK items: hit p50 10.5 ms against a
    37.6 ms miss in the first ``bench --full``; perf, issue 5).

    Keyed by the snapshot's version and everything that shapes an answer (user text key, target
    domains, k, excluded rows), so an entry can only be returned for the request that made it; a
    swap empties it. ``size=0`` turns it off.
    """

    @staticmethod
    def key(
        index_version: str, user_key: str, targets: Sequence[str], k: int, exclude: set[int]
    ) -> Hashable:
        return (index_version, user_key, tuple(targets), k, frozenset(exclude))
