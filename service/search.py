"""Concurrent searches of one index snapshot share one faiss call per domain.

Coalesced requests get their user vectors from the same forward pass, so their searches are
issued in the same event-loop tick. One [B, D] query block reads a flat index once, where B
single-vector searches read it B times (the FK catalogue's Kitchen domain alone is 42 MB of
float32); on 2 cores that was what kept the device idle between forwards (perf, issue 5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from service.cache import BoundedLRU
from service.coalesce import TickBatcher
from service.index import ItemIndex

Hits = dict[str, list[tuple[int, float]]]  # domain -> [(row, score)], best first


@dataclass
class _Search:
    idx: ItemIndex
    targets: Sequence[str]
    vec: np.ndarray  # [D]
    k: int
    exclude: set[int]


def search_many(searches: Sequence[_Search]) -> list[Hits]:
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
        rows = idx.search(d, q, fetch)
        for i, e, hits in zip(members, excl, rows, strict=True):
            out[i][d] = [(r, s) for r, s in hits if r not in e][: searches[i].k]
    return out


class SearchCoalescer(TickBatcher[_Search, Hits]):
    """``await search(...)`` from many requests; those issued in one tick run as one batch.

    A large tick is cut into up to ``parts`` blocks of at least ``min_part`` queries, searched
    by parallel single-threaded faiss calls (faiss releases the GIL). Right after a batch its
    clients' searches are all the next batch waits for, and one call used one core of two.
    Parallel calls, not an OpenMP team: beside faiss' team the encoder's forwards left more of
    the CPU idle (perf, issue 5; the traces are in the issue notes).
    """

    def __init__(self, parts: int = 1, min_part: int = 8) -> None:
        super().__init__(self._search_block, parts, min_part)

    async def search(
        self, idx: ItemIndex, targets: Sequence[str], vec: np.ndarray, k: int, exclude: set[int]
    ) -> Hits:
        return await self(_Search(idx, targets, vec, k, exclude))

    @staticmethod
    async def _search_block(batch: list[_Search]) -> list[Hits]:
        return await asyncio.to_thread(search_many, batch)


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
