"""The engine: the one object routes talk to.

It owns the encoder (behind the batcher), the scorer that turns LM vectors into index rows and
user queries (``service/scorer.py``: text, hier or mean), the live :class:`ItemIndex` snapshot,
the user-vector cache and the reindex jobs. Readers take no lock: they read ``self.index`` once
per request, so a swap in the middle of a request never mixes two catalogues. One lock
serialises writers.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cprec.hier import CONFIG_FILE, RESIDUAL_IDS_FILE, WEIGHTS_FILE, HierRec, is_hier_dir
from cprec.lm import BUNDLED, bundled_dir, detect_pooling, is_decoder_config
from cprec.text import Behaviour, Template, normalise_title
from model_store import ArtifactError, ModelStore
from model_store.store import MANIFEST, Manifest
from service.batcher import Batcher, device_thread
from service.cache import LRUCache, RedisCache, UserVectorCache, cache_key
from service.catalog import check_unique, load_catalog_file
from service.coalesce import TickBatcher
from service.encoder import Encoder, HFEncoder
from service.errors import Conflict, NotFound, NotReady, PayloadTooLarge, ValidationFailed
from service.index import IndexStore, Item, ItemIndex, configure_faiss
from service.metrics import Metrics
from service.protocol import (
    IdEntry,
    JobStatus,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
)
from service.scorer import (
    HistoryVectors,
    ScorerKind,
    hier_item_rows,
    hier_user_vectors,
    mean_item_rows,
    zero_shot_query,
)
from service.search import Hits, RankedLists, SearchCoalescer
from service.settings import Settings

log = logging.getLogger(__name__)

HIER_DIR = "hier"  # a hier artifact's HierRec folder, beside the LM at the version's root


@dataclass(frozen=True, slots=True)
class LoadedModel:
    encoder: Encoder
    version: str
    template: Template
    scorer: ScorerKind = "text"
    hier: HierRec | None = None


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


def _load_hier(path: Path, m: Manifest, encoder: HFEncoder) -> HierRec:
    """The HierRec of a ``hier`` artifact, on the encoder's device, checked against the LM and
    the manifest (its files must be under the manifest's checksums, like the LM's)."""
    folder = path / HIER_DIR
    if not is_hier_dir(folder):
        raise ArtifactError(
            f"{folder / CONFIG_FILE}: missing; a kind 'hier' model keeps its HierRec under "
            f"{HIER_DIR}/ (HierRec.save_pretrained)",
            f"{HIER_DIR}/{CONFIG_FILE}",
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE, RESIDUAL_IDS_FILE):
        if f"{HIER_DIR}/{name}" not in m.files:
            raise ArtifactError(
                f"{folder / name}: not listed in the manifest, so not checksum-verified; "
                "publish the hier folder through ModelStore.publish",
                f"{HIER_DIR}/{name}",
            )
    model = HierRec.from_pretrained(folder, device=getattr(encoder, "device", "cpu"))
    if model.cfg.text_dim != encoder.dim:
        raise ArtifactError(
            f"{folder / CONFIG_FILE}: text_dim {model.cfg.text_dim} but the LM pools "
            f"{encoder.dim}-d vectors",
            f"{HIER_DIR}/{CONFIG_FILE}",
        )
    if model.cfg.dim != m.dim:
        raise ArtifactError(
            f"{path / MANIFEST}: dim {m.dim} but the HierRec has dim {model.cfg.dim}", MANIFEST
        )
    return model


def load_model(settings: Settings) -> LoadedModel:
    """The ``settings.model`` version from the store, else the bundled/local base model, served
    with the ``settings.zero_shot`` scorer.

    A store version that exists but fails its checksums is an error (never served), not a fallback.
    """
    store = ModelStore(settings.store_dir)
    if store.resolve(settings.model) is not None:
        art = store.load(settings.model)  # raises ArtifactError naming the bad file
        m = art.manifest
        if m.kind not in ("flat", "hier"):
            raise ArtifactError(
                f"{art.path / MANIFEST}: unknown model kind {m.kind!r}; this service serves "
                "flat and hier models",
                MANIFEST,
            )
        template = Template.model_validate(m.template) if m.template else Template()
        enc = HFEncoder(
            art.path,
            pooling=m.pooling,  # type: ignore[arg-type]  # validated by the manifest writer
            is_decoder=m.is_decoder,
            max_length=m.max_length,
            device=settings.device,
            dtype=settings.dtype,
            name=f"store:{m.version}",
            quantize=settings.quantize,
        )
        if m.kind == "hier":
            return LoadedModel(enc, m.version, template, "hier", _load_hier(art.path, m, enc))
        return LoadedModel(enc, m.version, template)
    base = settings.base_model
    if base in BUNDLED:
        path = bundled_dir(base, settings.store_dir)
        spec = BUNDLED[base]
        pooling, is_dec, version = spec.pooling, spec.is_decoder, f"base-{base}"
    else:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise ArtifactError(
                f"base_model {base!r} is neither a bundled name "
                f"({sorted(BUNDLED)}) nor a local HF folder with config.json"
            )
        from transformers import AutoConfig

        is_dec = is_decoder_config(AutoConfig.from_pretrained(path))
        pooling = detect_pooling(path)
        version = f"local-{path.name}"
    enc = HFEncoder(
        path,
        pooling=pooling,
        is_decoder=is_dec,
        max_length=settings.max_length,
        device=settings.device,
        dtype=settings.dtype,
        name=version,
        quantize=settings.quantize,
    )
    return LoadedModel(
        enc, version, Template(max_items=settings.history_max_items), settings.zero_shot
    )


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim).

    A reindex allocates many differently shaped batches; glibc keeps the freed pages in its
    arenas, so RSS would stay at the job's peak. A no-op where glibc is not the allocator.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Engine:
    def __init__(
        self,
        settings: Settings,
        encoder: Encoder | None = None,
        model_version: str | None = None,
        template: Template | None = None,
        cache: UserVectorCache | None = None,
        hier: HierRec | None = None,
        scorer: ScorerKind | None = None,
    ) -> None:
        """With no ``encoder``, ``start`` loads the model (``load_model``). An injected encoder
        is served as a flat model (scorer ``text``) unless ``hier`` or ``scorer`` say otherwise."""
        self.settings = settings
        self.metrics = Metrics()
        self._encoder = encoder
        self.hier = hier
        self.scorer: ScorerKind = scorer or ("hier" if hier is not None else "text")
        if self.scorer == "hier" and hier is None:
            raise ValueError("scorer 'hier' needs a HierRec")
        # The histories of one tick go through encode_histories together, on the device thread.
        self._hier_users: TickBatcher[HistoryVectors, np.ndarray] = TickBatcher(self._hier_block)
        self.model_version = model_version or (f"injected-{encoder.name}" if encoder else "")
        self.template = template or Template(max_items=settings.history_max_items)
        self._cache_namespace = ""  # set in start(), once the model is known
        self._cache = cache
        self.index: ItemIndex | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.startup_error: str | None = None
        self.jobs: OrderedDict[str, JobStatus] = OrderedDict()
        self._write_lock = asyncio.Lock()
        self._job_tasks: set[asyncio.Task[None]] = set()
        self.searches = SearchCoalescer(parts=settings.resolved_search_parallel_calls())
        self.ranked = RankedLists(settings.result_cache_size)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            raise NotReady("model not loaded")
        return self._encoder

    @property
    def cache(self) -> UserVectorCache:
        assert self._cache is not None
        return self._cache

    @property
    def index_store(self) -> IndexStore:
        return IndexStore(Path(self.settings.store_dir) / "indexes" / self.model_version)

    async def start(self) -> None:
        """Load model and index (or build the index from the catalogue), warm up, turn ready."""
        s = self.settings
        configure_faiss(blas_threshold=4, search_threads=s.faiss_search_threads)
        device = device_thread()  # handed to the batcher, which shuts it down in stop()
        if self._encoder is None:
            # On the device thread, like every later torch op (see device_thread).
            try:
                loaded = await asyncio.get_running_loop().run_in_executor(device, load_model, s)
            except BaseException:
                device.shutdown(wait=False)
                raise
            self._encoder, self.model_version, self.template = (
                loaded.encoder,
                loaded.version,
                loaded.template,
            )
            self.scorer, self.hier = loaded.scorer, loaded.hier
        if self.hier is not None and self.hier.cfg.text_dim != self.encoder.dim:
            raise ValueError(
                f"HierRec text_dim {self.hier.cfg.text_dim} != encoder dim {self.encoder.dim}"
            )
        # Model version (+ scorer) + template hash, computed once: a model, scorer or template
        # change makes every old cache entry unreachable without a flush. text keeps the keys it
        # always had.
        fp = self.template.fingerprint()
        self._cache_namespace = (
            f"{self.model_version}:{fp}"
            if self.scorer == "text"
            else f"{self.model_version}:{self.scorer}:{fp}"
        )
        if self._cache is None:
            if s.redis_url:
                self._cache = RedisCache(
                    s.redis_url,
                    ttl_s=s.cache_ttl_s,
                    timeout_s=s.redis_timeout_s,
                    retry_s=s.redis_retry_s,
                    on_error=lambda op: self.metrics.cache.labels("error").inc(),
                )
                if not await self._cache.ping():  # type: ignore[attr-defined]
                    log.warning(
                        "redis at start-up is unreachable; serving without cache until it answers"
                    )
            else:
                log.info(
                    "REDIS_URL not set: caching user vectors in-process (LRU, %d entries)",
                    s.lru_size,
                )
                self._cache = LRUCache(s.lru_size, s.cache_ttl_s)
        self.batcher = Batcher(
            self.encoder,
            self.metrics,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            coalesce_ms=s.resolved_coalesce_ms(_device_type(self.encoder)),
            coalesce_share=s.batch_coalesce_share,
            token_budget=s.batch_token_budget,
            queue_size=s.queue_size,
            enabled=s.batching,
            max_padding=s.resolved_max_padding(_device_type(self.encoder)),
            max_forward_tokens=s.resolved_max_forward_tokens(_device_type(self.encoder)),
            device=device,
        )
        await self.batcher.start()
        await self.batcher.run_on_device(self.encoder.warmup)
        if self.hier is not None:
            await self.batcher.run_on_device(self._warm_hier)
        index = await asyncio.to_thread(
            self.index_store.load_latest, s.faiss_gpu, s.hnsw_ef_search, self.scorer
        )
        if index is not None and not self._fits(index):
            log.warning(
                "saved index %s has %d-d rows, the model needs %d: indexing again",
                index.version,
                index.dim,
                self.user_dim,
            )
            index = None
        if index is None:
            log.info("no saved index for %s: indexing %s", self.model_version, s.catalog_path)
            items = await asyncio.to_thread(load_catalog_file, Path(s.catalog_path))
            lm = await self._embed_items(items)
            rows = await self._index_rows(items, lm)
            index = await asyncio.to_thread(self._build_and_save, items, rows, lm)
            del items, lm, rows
            release_memory()
        self._install(index)
        self.ready = True
        self.metrics.ready.set(1)
        log.info(
            "ready: model %s (scorer %s), index %s (%d items in %s)",
            self.model_version,
            self.scorer,
            index.version,
            len(index.items),
            ", ".join(index.domains),
        )

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for t in list(self._job_tasks):
            t.cancel()
        if self.batcher is not None:
            await self.batcher.stop()  # shuts the device thread down too
        if self._cache is not None:
            await self._cache.close()

    def begin_drain(self) -> None:
        """SIGTERM: fail readiness first so load balancers stop sending, then finish in-flight."""
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)

    @property
    def user_dim(self) -> int:
        """Size of a user query and of an index row."""
        if self.scorer == "hier":
            assert self.hier is not None
            return self.hier.cfg.dim
        return self.encoder.dim + (1 if self.scorer == "mean" else 0)  # mean: popularity column

    def _fits(self, index: ItemIndex) -> bool:
        return index.dim == self.user_dim and index.lm_vectors.shape[1] == self.encoder.dim

    def _warm_hier(self) -> None:
        assert self.hier is not None
        one = HistoryVectors(np.zeros((1, self.encoder.dim), np.float32), [None], [""])
        hier_user_vectors(self.hier, [one])

    def _install(self, index: ItemIndex) -> None:
        self.index = index  # the one reference readers use
        self.ranked.clear()  # keyed by snapshot version too; this frees the old lists
        self.metrics.index_size.clear()
        for d in index.domains:
            self.metrics.index_size.labels(d).set(index.size(d))

    # -- recommend ---------------------------------------------------------------------------
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

    def user_key(self, text: str) -> str:
        return cache_key(self.settings.redis_prefix, self._cache_namespace, text)

    async def user_vector(self, key: str, text: str) -> tuple[np.ndarray, bool]:
        """The user vector for ``text`` (cached under ``key``) and whether it came from the
        cache; the caller stores a miss, beside its search."""
        vec = await self.cache.get(key)
        if vec is not None and vec.shape == (self.user_dim,):
            self.metrics.cache.labels("hit").inc()
            return vec, True
        self.metrics.cache.labels("miss").inc()
        assert self.batcher is not None
        return await self.batcher.embed(text), False

    # -- hier and mean users ----------------------------------------------------------------
    def _history(
        self, idx: ItemIndex, behaviours: list[Behaviour], rows: list[int | None]
    ) -> _History:
        """The most recent entries (hier: the model's max_len; mean: the template's max_items),
        a catalogue item standing for itself whether given by id or by title."""
        if self.scorer == "hier":
            assert self.hier is not None
            n = self.hier.cfg.max_len
        else:
            n = self.template.max_items
        start = max(0, len(behaviours) - n)
        texts: list[str] = []
        ids: list[str | None] = []
        domains: list[str] = []
        for b, row in zip(behaviours[start:], rows[start:], strict=True):
            if row is not None:
                it = idx.items[row]
                texts.append(self.lm_text(it))
                ids.append(it.item_id)
                domains.append(it.domain)
            else:
                texts.append(self.template.render_item(b.domain, b.title))
                ids.append(None)
                domains.append(b.domain)
        material = json.dumps([ids, domains, texts], ensure_ascii=False)
        return _History(texts, list(rows[start:]), ids, domains, material)

    async def _history_vectors(self, idx: ItemIndex, hist: _History) -> np.ndarray:
        """[T, text_dim] LM vectors of a history: catalogue items from the index snapshot (no
        forward), other titles through the batcher as items (batched across requests)."""
        out = np.empty((len(hist.texts), self.encoder.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, (row, text) in enumerate(zip(hist.rows, hist.texts, strict=True)):
            if row is not None:
                out[i] = idx.lm_vectors[row]
            else:
                todo.setdefault(text, []).append(i)
        if todo:
            assert self.batcher is not None
            vecs = await asyncio.gather(*(self.batcher.embed(t, "item") for t in todo))
            for pos, v in zip(todo.values(), vecs, strict=True):
                out[pos] = v
        return out

    async def _hier_block(self, batch: list[HistoryVectors]) -> list[np.ndarray]:
        assert self.batcher is not None and self.hier is not None
        users = await self.batcher.run_on_device(hier_user_vectors, self.hier, batch)
        return list(users)

    async def _hier_vector(
        self, idx: ItemIndex, key: str, hist: _History
    ) -> tuple[np.ndarray, bool]:
        """The hier user vector (cached under ``key``) and whether it came from the cache."""
        vec = await self.cache.get(key)
        if vec is not None and vec.shape == (self.user_dim,):
            self.metrics.cache.labels("hit").inc()
            return vec, True
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
        """Zero-shot: one query per target domain (``zero_shot_user``). A history of catalogue
        items costs a mean, less than a cache round trip, so only histories with titles to
        encode are cached, per (history, domain)."""
        queries: dict[str, np.ndarray] = {}
        keys: dict[str, str] = {}
        if hist.needs_forward:
            keys = {d: self.user_key(f"{hist.material}\n{json.dumps(d)}") for d in targets}
            got = await asyncio.gather(*(self.cache.get(keys[d]) for d in targets))
            for d, v in zip(targets, got, strict=True):
                if v is not None and v.shape == (self.user_dim,):
                    queries[d] = v
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

    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        # Only a missing index refuses: while draining (/ready already 503) requests that reached
        # us are still answered, so a SIGTERM never fails in-flight traffic.
        if self.index is None:
            raise NotReady("the service is not ready (still loading)")
        idx = self.index  # one snapshot for the whole request
        if req.k > self.settings.max_k:
            raise ValidationFailed(
                f"k={req.k} exceeds max_k={self.settings.max_k}",
                details={"field": "k", "limit": self.settings.max_k},
            )
        behaviours, rows, seen = self._resolve_history(idx, req)
        targets = self._targets(idx, req)
        exclude = seen if req.exclude_history else set()
        results: dict[str, list[ScoredItem]] = {}
        if not behaviours:
            for d in targets:
                popular = idx.most_popular(d, req.k)
                results[d] = [
                    ScoredItem(
                        item_id=idx.items[r].item_id,
                        title=idx.items[r].title,
                        score=float(idx.items[r].popularity),
                    )
                    for r in popular
                ]
            return RecommendResponse(
                model_version=self.model_version,
                index_version=idx.version,
                cached=False,
                cold_start=True,
                results=results,
            )
        hist: _History | None = None
        text = ""
        if self.scorer == "text":
            text = self.template.render_history(behaviours)
            key = self.user_key(text)
        else:
            hist = self._history(idx, behaviours, rows)
            key = self.user_key(hist.material)
        ranked_key = self.ranked.key(idx.version, key, targets, req.k, exclude)
        known = self.ranked.get(ranked_key)
        if known is not None:
            self.metrics.results.labels("hit").inc()
            hits, cached = known, True
        elif hist is not None and self.scorer == "mean":
            self.metrics.results.labels("miss").inc()
            hits, cached = await self._mean_hits(idx, hist, targets, req.k, exclude)
            self.ranked.put(ranked_key, hits)
        else:
            self.metrics.results.labels("miss").inc()
            if hist is None:
                vec, cached = await self.user_vector(key, text)
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
        for d, scored in hits.items():
            results[d] = [
                ScoredItem(item_id=idx.items[r].item_id, title=idx.items[r].title, score=s)
                for r, s in scored
            ]
        return RecommendResponse(
            model_version=self.model_version,
            index_version=idx.version,
            cached=cached,
            results=results,
        )

    async def query_vectors(self, req: RecommendRequest) -> dict[str, np.ndarray]:
        """The vector each target domain of ``req`` is searched with, computed afresh (no cache,
        no search): the served side of the parity tests that hold it to the offline model."""
        if self.index is None:
            raise NotReady("the service is not ready (still loading)")
        idx = self.index
        behaviours, rows, _ = self._resolve_history(idx, req)
        targets = self._targets(idx, req)
        if not behaviours:
            raise ValidationFailed(
                "an empty history has no user vector (cold start)", details={"field": "history"}
            )
        if self.scorer == "text":
            assert self.batcher is not None
            vec = await self.batcher.embed(self.template.render_history(behaviours))
            return {d: vec for d in targets}
        hist = self._history(idx, behaviours, rows)
        lm = await self._history_vectors(idx, hist)  # [T, text_dim]
        if self.scorer == "mean":
            return {d: zero_shot_query(lm, hist.domains, d) for d in targets}
        user = await self._hier_users(HistoryVectors(lm, hist.item_ids, hist.domains))
        return {d: user for d in targets}

    # -- reindex -----------------------------------------------------------------------------
    def item_text(self, it: Item) -> str:
        text = self.template.render_item(it.domain, it.title)
        return f"{text} {it.extra_text}" if it.extra_text else text

    def lm_text(self, it: Item) -> str:
        """The text the LM encodes for a catalogue item: the flat item text (with extra_text)
        for ``text``; for hier and mean the item as one step of a history, the text their
        history entries and training use."""
        if self.scorer == "text":
            return self.item_text(it)
        return self.template.render_item(it.domain, it.title)

    async def _embed_items(
        self,
        items: Sequence[Item],
        job: JobStatus | None = None,
        reuse: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """[N, text_dim] LM vectors of ``lm_text``, reusing unchanged ones; length-sorted
        batches on the device thread."""
        assert self.batcher is not None
        texts = [self.lm_text(it) for it in items]
        out = np.zeros((len(items), self.encoder.dim), dtype=np.float32)
        todo = []
        for i, t in enumerate(texts):
            old = reuse.get(t) if reuse else None
            if old is not None:
                out[i] = old
            else:
                todo.append(i)
        if job is not None:
            job.total, job.embedded = len(todo), 0
        if not todo:
            return out
        ids = await self.batcher.tokenize([texts[i] for i in todo], "item")
        # Sorting by length keeps padding small: ~1.5x more items/s on mixed-length titles.
        order = sorted(range(len(todo)), key=lambda j: len(ids[j]))
        bs = self.settings.embed_batch_size
        for start in range(0, len(order), bs):
            chunk = order[start : start + bs]
            vecs = await self.batcher.run_on_device(self.encoder.core, [ids[j] for j in chunk])
            out[[todo[j] for j in chunk]] = vecs
            if job is not None:
                job.embedded += len(chunk)
                job.progress = job.embedded / max(job.total, 1)
        return out

    async def _index_rows(self, items: Sequence[Item], lm: np.ndarray) -> np.ndarray:
        """[N, text_dim] LM vectors -> [N, user_dim] index rows (cheap next to the LM, so a
        reindex recomputes them all: popularity and residual rows follow the new catalogue)."""
        if self.scorer == "text":
            return lm
        assert self.batcher is not None
        if self.scorer == "hier":
            ids = [it.item_id for it in items]
            rows: np.ndarray = await self.batcher.run_on_device(hier_item_rows, self.hier, lm, ids)
            return rows
        pop = [it.popularity for it in items]
        return await self.batcher.run_on_device(mean_item_rows, lm, pop)  # type: ignore[no-any-return]

    def _build_and_save(
        self, items: Sequence[Item], vectors: np.ndarray, lm: np.ndarray | None = None
    ) -> ItemIndex:
        """``vectors`` are the index rows; ``lm`` the LM vectors they came from, kept in the
        snapshot unless they are the rows themselves (``text``)."""
        s = self.settings
        index = ItemIndex.build(
            items,
            vectors,
            self.model_version,
            kind=s.index_kind,
            hnsw_m=s.hnsw_m,
            ef_search=s.hnsw_ef_search,
            use_gpu=s.faiss_gpu,
            text_vectors=None if self.scorer == "text" else lm,
            scorer=self.scorer,
        )
        self.index_store.save(index)
        return index

    def submit_reindex(
        self,
        mode: str,
        items: list[Item] | None = None,
        item_ids: list[str] | None = None,
        upload: tuple[bytes, str] | None = None,
        path: Path | None = None,
    ) -> JobStatus:
        """Start a background reindex job; 409 while another one is queued or running.

        ``path`` is a catalogue file already resolved inside ``catalog_dir`` (see
        :func:`service.catalog.resolve_catalog_path`); it is read and parsed in the job."""
        if not self.ready or self.index is None:
            raise NotReady("the service is not ready")
        active = [j for j in self.jobs.values() if j.state in ("queued", "running")]
        if active:
            raise Conflict(
                f"reindex job {active[0].job_id} is still {active[0].state}; "
                "retry when it has finished",
                details={"job_id": active[0].job_id},
                headers={"Retry-After": "5"},
            )
        if items is not None:
            check_unique(items)
        if mode == "delete" and item_ids is not None:
            unknown = [i for i in item_ids if i not in self.index.by_id]
            if unknown:
                raise ValidationFailed(
                    f"cannot delete unknown item ids {unknown[:10]}",
                    details={"field": "item_ids", "unknown": unknown[:100]},
                )
        job = JobStatus(
            job_id=uuid.uuid4().hex[:12], mode=mode, state="queued", created_at=time.time()
        )
        self.jobs[job.job_id] = job
        while len(self.jobs) > 100:
            self.jobs.popitem(last=False)
        task = asyncio.create_task(self._run_job(job, items, item_ids, upload, path))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)
        self.metrics.reindex_jobs.labels("submitted").inc()
        return job

    def job(self, job_id: str) -> JobStatus:
        if job_id not in self.jobs:
            raise NotFound(f"no reindex job {job_id!r}", details={"job_id": job_id})
        return self.jobs[job_id]

    async def _run_job(
        self,
        job: JobStatus,
        items: list[Item] | None,
        item_ids: list[str] | None,
        upload: tuple[bytes, str] | None,
        path: Path | None = None,
    ) -> None:
        async with self._write_lock:
            job.state = "running"
            try:
                if path is not None:  # server-side file, parsed exactly like an upload
                    fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
                    upload = (await asyncio.to_thread(path.read_bytes), fmt)
                if upload is not None:
                    from service.catalog import parse_catalog

                    data, fmt = upload
                    items = await asyncio.to_thread(
                        parse_catalog, data, fmt, "upload", self.settings.max_upload_rows
                    )
                old = self.index
                assert old is not None
                new_items = self._merge(old, job.mode, items, item_ids)
                if not new_items:
                    raise ValidationFailed("the resulting catalogue would be empty")
                old_lm = old.lm_vectors
                reuse = {self.lm_text(it): old_lm[r] for r, it in enumerate(old.items)}
                lm = await self._embed_items(new_items, job, reuse)
                rows = await self._index_rows(new_items, lm)
                index = await asyncio.to_thread(self._build_and_save, new_items, rows, lm)
                self._install(index)
                job.index_version = index.version
                job.state = "succeeded"
                job.progress = 1.0
                self.metrics.reindex_jobs.labels("succeeded").inc()
                log.info(
                    "reindex %s (%s) done: index %s, %d items",
                    job.job_id,
                    job.mode,
                    index.version,
                    len(new_items),
                )
            except asyncio.CancelledError:
                job.state, job.error = "failed", "cancelled (shutdown)"
                raise
            except Exception as exc:  # noqa: BLE001 - the old index keeps serving
                job.state = "failed"
                job.error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                self.metrics.reindex_jobs.labels("failed").inc()
                log.error(
                    "reindex %s failed; the previous index keeps serving: %s", job.job_id, job.error
                )
            finally:
                job.finished_at = time.time()
                # Drop the old snapshot and the job's buffers before trimming the heap.
                old = items = upload = None  # type: ignore[assignment]
                release_memory()

    @staticmethod
    def _merge(
        old: ItemIndex, mode: str, items: list[Item] | None, item_ids: list[str] | None
    ) -> list[Item]:
        if mode == "full":
            return list(items or [])
        if mode == "upsert":
            merged = {it.item_id: it for it in old.items}
            for it in items or []:
                merged[it.item_id] = it
            return list(merged.values())
        if mode == "delete":
            drop = set(item_ids or [])
            return [it for it in old.items if it.item_id not in drop]
        raise ValidationFailed(f"unknown mode {mode!r}")


def _device_type(encoder: Encoder) -> str:
    """``cpu`` / ``cuda`` for the encoder's device (encoders without one, e.g. fakes: cpu)."""
    dev = getattr(encoder, "device", None)
    return str(getattr(dev, "type", dev or "cpu"))
