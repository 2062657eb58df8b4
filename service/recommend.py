"""The request path: a history in, the top-k items per target domain out.

``RequestPath.recommend`` resolves the history against the live index snapshot (item ids and
catalogue titles), answers a repeated request from the ranked lists, else gets the user vector
(cache, then the batcher and the model) and searches each target domain. It takes and returns
plain data and raises ``service.errors``, so it runs the same behind HTTP or in a library.

How the user vector is made depends on the served model's scorer (``cprec.recommender``):
``text`` encodes the history text; ``hier`` and ``mean`` read each entry's LM vector from the
snapshot when the entry is a catalogue item (by id, or a title naming one in its domain) and
encode the other titles as items.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import numpy as np
from pydantic import Field

from cprec.hier import zero_shot_query
from cprec.recommender import HistoryVectors
from cprec.text import Behaviour, normalise_title
from service.batcher import TickBatcher
from service.cache import BoundedLRU, Hits, RankedLists, UserVectorCache, cache_key
from service.errors import NotReady, PayloadTooLarge, ValidationFailed
from service.index import ItemIndex, SearchCoalescer
from service.protocol import IdEntry, RecommendRequest

if TYPE_CHECKING:
    from service.engine import Parts


@dataclass(frozen=True, slots=True)
class ScoredItem:
    item_id: str
    title: str
    score: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Recommendation:
    """The answer to one request; ``results`` maps each target domain to its top-k."""

    model_version: str
    index_version: str
    cached: Annotated[bool, Field(description="The user vector came from a cache.")]
    cold_start: Annotated[
        bool, Field(description="Empty history: each domain's most popular items.")
    ] = False
    results: dict[str, list[ScoredItem]]


@dataclass(frozen=True, slots=True)
class _History:
    """The entries a hier or mean user is made of (the most recent ones), as the LM sees them:
    ``rows`` are catalogue rows (None for a title not in the catalogue, encoded on demand)."""

    texts: list[str]
    rows: list[int | None]
    item_ids: list[str | None]
    domains: list[str]
    material: str  # what the cache key hashes: ids, domains and texts, unambiguously

    @property
    def needs_forward(self) -> bool:
        return any(r is None for r in self.rows)


class RequestPath:
    """``recommend`` and its steps; see the module docstring. Each request reads the live
    snapshot once (``snapshot``) and uses it to the end."""

    def __init__(self, parts: Parts, cache: UserVectorCache) -> None:
        self.settings = parts.settings
        self.model = parts.model
        self.batcher = parts.batcher
        self.metrics = parts.metrics
        self.live = parts.live
        self.cache = cache
        self.searches = SearchCoalescer(parts=parts.tuning.search_parallel_calls)
        self.ranked = RankedLists(parts.settings.result_cache_size)
        # LM vectors of titles that are not catalogue items, by text (the served model's LM).
        self._titles: BoundedLRU[str, np.ndarray] = BoundedLRU(parts.settings.title_cache_size)
        # Histories go through the user model together, one forward at a time on the device
        # thread: those that arrive during a forward are the next one's batch.
        self._hier_users: TickBatcher[HistoryVectors, np.ndarray] = TickBatcher(
            self._hier_block, serial=True
        )
        # Model version (+ scorer) + template hash: a model, scorer or template change makes
        # every old cache entry unreachable without a flush. text keeps the keys it always had.
        m = parts.model
        fp = m.template.fingerprint()
        self._namespace = (
            f"{m.version}:{fp}" if m.scorer == "text" else f"{m.version}:{m.scorer}:{fp}"
        )

    def share_titles(self, other: RequestPath) -> None:
        """Use ``other``'s title vectors: a model whose LM is the same (a new user model over
        a frozen LM) encodes a title as it did."""
        self._titles = other._titles

    def snapshot(self) -> ItemIndex:
        """The live snapshot, read once per request."""
        idx = self.live.current
        if idx is None:
            raise NotReady("the service is not ready (still loading)")
        return idx

    def user_key(self, material: str) -> str:
        return cache_key(self.settings.redis_prefix, self._namespace, material)

    # -- the request ------------------------------------------------------------------------
    async def recommend(self, req: RecommendRequest) -> Recommendation:
        """Top-k items per target domain for a mixed-domain history."""
        idx = self.snapshot()  # one snapshot for the whole request
        if req.k > self.settings.max_k:
            raise ValidationFailed(
                f"k={req.k} exceeds max_k={self.settings.max_k}",
                details={"field": "k", "limit": self.settings.max_k},
            )
        behaviours, rows, seen = self._resolve_history(idx, req)
        targets = self._targets(idx, req)
        exclude = seen if req.exclude_history else set()
        if not behaviours:
            return Recommendation(
                model_version=self.model.version,
                index_version=idx.version,
                cached=False,
                cold_start=True,
                results={d: _popular(idx, d, req.k) for d in targets},
            )
        hist: _History | None = None
        text = ""
        if self.model.scorer == "text":
            text = self.model.template.render_history(behaviours)
            key = self.user_key(text)
        else:
            hist = self._history(idx, behaviours, rows)
            key = self.user_key(hist.material)
        ranked_key = self.ranked.key(idx.version, key, targets, req.k, exclude)
        known = self.ranked.get(ranked_key)
        if known is not None:
            self.metrics.results.labels("hit").inc()
            hits, cached = known, True
        elif hist is not None and self.model.scorer == "mean":
            self.metrics.results.labels("miss").inc()
            hits, cached = await self._mean_hits(idx, hist, targets, req.k, exclude)
            self.ranked.put(ranked_key, hits)
        else:
            self.metrics.results.labels("miss").inc()
            if hist is None:
                vec, cached = await self._text_vector(key, text)
            else:
                vec, cached = await self._hier_vector(idx, key, hist)
            search = self.searches.search(idx, targets, vec, req.k, exclude)
            if cached:
                hits = await search
            else:
                # Stored beside the search, not before it: the requests of one forward then
                # issue their searches in the same tick and share one faiss call per domain.
                hits, _ = await asyncio.gather(search, self.cache.set(key, vec))
            self.ranked.put(ranked_key, hits)
        results = {
            d: [ScoredItem(idx.items[r].item_id, idx.items[r].title, s) for r, s in scored]
            for d, scored in hits.items()
        }
        return Recommendation(
            model_version=self.model.version,
            index_version=idx.version,
            cached=cached,
            results=results,
        )

    async def query_vectors(self, req: RecommendRequest) -> dict[str, np.ndarray]:
        """The vector each target domain of ``req`` is searched with, computed afresh (no cache,
        no search): the served side of the parity tests that hold it to the offline model."""
        idx = self.snapshot()
        behaviours, rows, _ = self._resolve_history(idx, req)
        targets = self._targets(idx, req)
        if not behaviours:
            raise ValidationFailed(
                "an empty history has no user vector (cold start)", details={"field": "history"}
            )
        if self.model.scorer == "text":
            vec = await self.batcher.embed(self.model.template.render_history(behaviours))
            return {d: vec for d in targets}
        hist = self._history(idx, behaviours, rows)
        lm = await self._history_vectors(idx, hist)  # [T, text_dim]
        if self.model.scorer == "mean":
            return {d: zero_shot_query(lm, hist.domains, d) for d in targets}
        user = await self._hier_users(HistoryVectors(lm, hist.item_ids, hist.domains))
        return {d: user for d in targets}

    # -- the history ------------------------------------------------------------------------
    def _resolve_history(
        self, idx: ItemIndex, req: RecommendRequest
    ) -> tuple[list[Behaviour], list[int | None], set[int]]:
        """The history as behaviours, the catalogue row of each entry (an id, or a title that
        names a catalogue item in its domain; None otherwise) and the rows to exclude."""
        s = self.settings
        if len(req.history) > s.max_history:
            raise PayloadTooLarge(
                f"history has {len(req.history)} entries; the limit is {s.max_history} "
                "(max_history)",
                details={"field": "history", "limit": s.max_history},
            )
        behaviours: list[Behaviour] = []
        rows: list[int | None] = []
        seen: set[int] = set()
        for n, entry in enumerate(req.history):
            if isinstance(entry, IdEntry):
                row = idx.by_id.get(entry.item_id)
                if row is None:
                    raise ValidationFailed(
                        f"history[{n}].item_id {entry.item_id!r} is not in the catalogue",
                        details={"field": f"history[{n}].item_id", "item_id": entry.item_id},
                    )
                it = idx.items[row]
                behaviours.append(Behaviour(it.domain, it.title))
                rows.append(row)
                seen.add(row)
            else:
                if len(entry.title) > s.max_title_chars:
                    raise ValidationFailed(
                        f"history[{n}].title has {len(entry.title)} characters; the limit is "
                        f"{s.max_title_chars} (max_title_chars)",
                        details={"field": f"history[{n}].title", "limit": s.max_title_chars},
                    )
                title = normalise_title(entry.title)
                if not title:
                    raise ValidationFailed(
                        f"history[{n}].title is empty after normalisation",
                        details={"field": f"history[{n}].title"},
                    )
                behaviours.append(Behaviour(entry.domain, title))
                row = idx.by_title.get((entry.domain, title.casefold()))
                rows.append(row)
                if row is not None:
                    seen.add(row)
        return behaviours, rows, seen

    def _targets(self, idx: ItemIndex, req: RecommendRequest) -> list[str]:
        if req.target_domains is None:
            return idx.domains
        if len(req.target_domains) > self.settings.max_target_domains:
            raise ValidationFailed(
                f"{len(req.target_domains)} target domains; the limit is "
                f"{self.settings.max_target_domains} (max_target_domains)",
                details={"field": "target_domains", "limit": self.settings.max_target_domains},
            )
        unknown = [d for d in req.target_domains if d not in idx.rows_by_domain]
        if unknown:
            raise ValidationFailed(
                f"unknown target domain(s) {unknown}; known: {idx.domains}",
                details={"field": "target_domains", "unknown": unknown, "known": idx.domains},
            )
        return list(req.target_domains)

    def _history(
        self, idx: ItemIndex, behaviours: list[Behaviour], rows: list[int | None]
    ) -> _History:
        """The most recent entries the model reads, a catalogue item standing for itself
        whether given by id or by title."""
        start = max(0, len(behaviours) - self.model.history_len)
        texts: list[str] = []
        ids: list[str | None] = []
        domains: list[str] = []
        for b, row in zip(behaviours[start:], rows[start:], strict=True):
            if row is not None:
                it = idx.items[row]
                texts.append(self.model.lm_text(it.domain, it.title, it.extra_text))
                ids.append(it.item_id)
                domains.append(it.domain)
            else:
                texts.append(self.model.lm_text(b.domain, b.title))
                ids.append(None)
                domains.append(b.domain)
        material = json.dumps([ids, domains, texts], ensure_ascii=False)
        return _History(texts, list(rows[start:]), ids, domains, material)

    async def _history_vectors(self, idx: ItemIndex, hist: _History) -> np.ndarray:
        """[T, text_dim] LM vectors of a history: catalogue items from the index snapshot (no
        forward), other titles through the batcher as items (batched across requests)."""
        out = np.empty((len(hist.texts), self.model.encoder.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, (row, text) in enumerate(zip(hist.rows, hist.texts, strict=True)):
            if row is not None:
                out[i] = idx.lm_vectors[row]
            elif (known := self._titles.get(text)) is not None:
                out[i] = known
            else:
                todo.setdefault(text, []).append(i)
        if todo:
            vecs = await self.batcher.embed_many(list(todo), "item")
            for (text, pos), v in zip(todo.items(), vecs, strict=True):
                out[pos] = v
                self._titles.put(text, v)
        return out

    # -- user vectors -----------------------------------------------------------------------
    def _cached(self, vec: np.ndarray | None) -> bool:
        return vec is not None and vec.shape == (self.model.user_dim,)

    async def _text_vector(self, key: str, text: str) -> tuple[np.ndarray, bool]:
        """The user vector of a history text (cached under ``key``) and whether it came from
        the cache; the caller stores a miss, beside its search."""
        vec = await self.cache.get(key)
        if self._cached(vec):
            self.metrics.cache.labels("hit").inc()
            return vec, True  # type: ignore[return-value]
        self.metrics.cache.labels("miss").inc()
        return await self.batcher.embed(text), False

    async def _hier_block(self, batch: list[HistoryVectors]) -> list[np.ndarray]:
        return list(await self.batcher.run_on_device(self.model.users, batch))

    async def _hier_vector(
        self, idx: ItemIndex, key: str, hist: _History
    ) -> tuple[np.ndarray, bool]:
        """The hier user vector (cached under ``key``) and whether it came from the cache."""
        vec = await self.cache.get(key)
        if self._cached(vec):
            self.metrics.cache.labels("hit").inc()
            return vec, True  # type: ignore[return-value]
        self.metrics.cache.labels("miss").inc()
        lm = await self._history_vectors(idx, hist)
        user = await self._hier_users(HistoryVectors(lm, hist.item_ids, hist.domains))
        return user, False

    async def _mean_hits(
        self,
        idx: ItemIndex,
        hist: _History,
        targets: list[str],
        k: int,
        exclude: set[int],
    ) -> tuple[Hits, bool]:
        """Zero-shot: one query per target domain. A history of catalogue items costs a mean,
        less than a cache round trip, so only histories with titles to encode are cached, per
        (history, domain)."""
        queries: dict[str, np.ndarray] = {}
        keys: dict[str, str] = {}
        if hist.needs_forward:
            keys = {d: self.user_key(f"{hist.material}\n{json.dumps(d)}") for d in targets}
            got = await asyncio.gather(*(self.cache.get(keys[d]) for d in targets))
            for d, v in zip(targets, got, strict=True):
                if self._cached(v):
                    queries[d] = v  # type: ignore[assignment]
            self.metrics.cache.labels("hit" if len(queries) == len(targets) else "miss").inc()
        missing = [d for d in targets if d not in queries]
        if missing:
            lm = await self._history_vectors(idx, hist)  # [T, text_dim]
            for d in missing:
                queries[d] = zero_shot_query(lm, hist.domains, d)
        searches = [self.searches.search(idx, [d], queries[d], k, exclude) for d in targets]
        stores = [self.cache.set(keys[d], queries[d]) for d in missing if d in keys]
        # Searches and stores in one tick: the searches share one faiss call per domain with
        # the other requests of this tick, the stores one Redis pipeline.
        parts, _ = await asyncio.gather(asyncio.gather(*searches), asyncio.gather(*stores))
        hits: Hits = {}
        for part in parts:
            hits.update(part)
        return hits, not missing


def _popular(idx: ItemIndex, domain: str, k: int) -> list[ScoredItem]:
    return [
        ScoredItem(idx.items[r].item_id, idx.items[r].title, float(idx.items[r].popularity))
        for r in idx.most_popular(domain, k)
    ]
