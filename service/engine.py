"""The engine: what a running service is made of, and its start and stop.

``Engine.start`` loads the model (a store version, else a base model served zero-shot), builds
the parts around it (the batcher and its device thread, the user-vector cache, the live index
with its saved or newly built snapshot) and hands them to the two paths that do the work:
``RequestPath`` (``service/recommend.py``) and ``Reindexer`` (``service/reindex.py``). Routes
and library users call ``recommend``, ``reindexer.submit`` and ``job`` here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cprec.encoder import Encoder
from cprec.recommender import ArtifactFormatError, Recommender
from model_store import ArtifactError, ModelStore
from service.batcher import Batcher, device_thread
from service.cache import LRUCache, RankedLists, RedisCache, UserVectorCache
from service.errors import NotReady
from service.index import IndexStore, ItemIndex, LiveIndex, SearchCoalescer, configure_faiss
from service.metrics import Metrics
from service.protocol import RecommendRequest
from service.recommend import Recommendation, RequestPath
from service.reindex import Job, Reindexer
from service.settings import Resolved, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """What the request path and the reindex path share, wired once by ``Engine.start``."""

    settings: Settings
    tuning: Resolved  # the settings' tuning tier for the model's device
    model: Recommender
    batcher: Batcher
    live: LiveIndex
    metrics: Metrics


def load_model(settings: Settings) -> Recommender:
    """The ``settings.model`` version from the store, else ``settings.base_model`` served
    zero-shot (``settings.zero_shot``).

    A store version that exists but fails its checksums, or whose files do not make a
    recommender, is an error (never served), not a fallback.
    """
    store = ModelStore(settings.store_dir)
    version = store.resolve(settings.model)
    if version is not None:
        settings.check_store_model(version)  # before any weights are read
        art = store.load(settings.model)  # raises ArtifactError naming the bad file
        try:
            model = Recommender.from_pretrained(
                art.path,
                version=art.version,
                device=settings.device,
                dtype=settings.dtype,
                quantize=settings.quantize,
            )
        except ArtifactFormatError as exc:
            raise ArtifactError(str(exc), exc.file) from exc
        art.require(model.files(art.path))
        return model
    shaping = {"zero_shot", "max_length", "history_max_items", "device", "dtype", "quantize"}
    try:
        return Recommender.from_base(
            settings.base_model, settings.store_dir, **settings.model_dump(include=shaping)
        )
    except FileNotFoundError as exc:
        raise ArtifactError(f"base_model: {exc}") from exc


class Engine:
    """One object per service; ``model`` may be injected (tests serve a fake encoder), else
    ``start`` loads it."""

    def __init__(
        self,
        settings: Settings,
        model: Recommender | None = None,
        cache: UserVectorCache | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.model = model
        self.live = LiveIndex()
        self.live.on_swap(self._on_swap)
        self.ready = False
        self.draining = False
        self.startup_error: str | None = None
        self.batcher: Batcher | None = None
        self._cache = cache
        self._requests: RequestPath | None = None
        self._reindexer: Reindexer | None = None
        self._follower: asyncio.Task[None] | None = None

    # -- what routes and library users call -------------------------------------------------
    async def recommend(self, req: RecommendRequest) -> Recommendation:
        """Top-k items per target domain for a mixed-domain history (titles and/or item ids).

        While draining (``/ready`` already 503) requests that reached us are still answered, so
        a SIGTERM never fails in-flight traffic; only a service that has no index refuses."""
        return await self.requests.recommend(req)

    async def query_vectors(self, req: RecommendRequest) -> dict[str, np.ndarray]:
        return await self.requests.query_vectors(req)

    def job(self, job_id: str) -> Job:
        """A reindex job's status (also while draining)."""
        if self._reindexer is None:
            raise NotReady("the service is not ready (still loading)")
        return self._reindexer.job(job_id)

    # -- parts ------------------------------------------------------------------------------
    @property
    def requests(self) -> RequestPath:
        if self._requests is None:
            raise NotReady("the service is not ready (still loading)")
        return self._requests

    @property
    def reindexer(self) -> Reindexer:
        """Submits reindex jobs (``reindexer.submit``); refused unless the service is ready."""
        if self._reindexer is None or not self.ready:
            raise NotReady("the service is not ready")
        return self._reindexer

    @property
    def index(self) -> ItemIndex | None:
        return self.live.current

    @property
    def model_version(self) -> str:
        return self.model.version if self.model is not None else ""

    @property
    def scorer(self) -> str:
        return self.model.scorer if self.model is not None else ""

    @property
    def encoder(self) -> Encoder:
        if self.model is None:
            raise NotReady("model not loaded")
        return self.model.encoder

    @property
    def cache(self) -> UserVectorCache:
        assert self._cache is not None
        return self._cache

    @property
    def ranked(self) -> RankedLists:
        return self.requests.ranked

    @property
    def searches(self) -> SearchCoalescer:
        return self.requests.searches

    @property
    def jobs(self) -> dict[str, Job]:
        return self._reindexer.jobs if self._reindexer is not None else {}

    @property
    def index_store(self) -> IndexStore:
        return IndexStore(Path(self.settings.store_dir) / "indexes" / self.model_version)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model and the index (or build it from the catalogue), warm up, turn ready."""
        s = self.settings
        device = device_thread()  # handed to the batcher, which shuts it down in stop()
        if self.model is None:
            # On the device thread, like every later torch op (see device_thread).
            try:
                self.model = await asyncio.get_running_loop().run_in_executor(device, load_model, s)
            except BaseException:
                device.shutdown(wait=False)
                raise
        model = self.model
        if self._cache is None:
            self._cache = self._new_cache()
            if isinstance(self._cache, RedisCache) and not await self._cache.ping():
                log.warning(
                    "redis at start-up is unreachable; serving without cache until it answers"
                )
        t = s.tuning.for_device(_device_type(model.encoder))
        configure_faiss(blas_threshold=4, search_threads=t.faiss_search_threads)
        self.batcher = Batcher(
            model.encoder,
            self.metrics,
            max_batch_size=t.max_batch_size,
            max_wait_ms=t.max_wait_ms,
            coalesce_ms=t.batch_coalesce_ms,
            coalesce_share=t.batch_coalesce_share,
            token_budget=t.batch_token_budget,
            queue_size=t.queue_size,
            enabled=s.batching,
            # The hier and mean scorers encode history titles only: short rows, where a
            # batch split into forwards costs more per forward than the padding it saves
            # (docs/decisions/006-serving-hier.md); the split is for history texts.
            max_padding=t.batch_max_padding if model.scorer == "text" else None,
            max_forward_tokens=t.batch_max_forward_tokens,
            device=device,
        )
        await self.batcher.start()
        await self.batcher.run_on_device(model.warmup)
        parts = Parts(s, t, model, self.batcher, self.live, self.metrics)
        self._requests = RequestPath(parts, self.cache)
        self._reindexer = Reindexer(parts, self.index_store)
        # Under the store's writer lock: of several workers starting at once, the first builds
        # and saves the index, the others wait for it and load the saved snapshot.
        async with self.index_store.writer():
            index = await asyncio.to_thread(
                self.index_store.load_latest, s.faiss_gpu, t.hnsw_ef_search, model.scorer
            )
            if index is not None and not self._fits(index):
                log.warning(
                    "saved index %s has %d-d rows, the model needs %d: indexing again",
                    index.version,
                    index.dim,
                    model.user_dim,
                )
                index = None
            if index is None:
                log.info("no saved index for %s: indexing %s", model.version, s.catalog_path)
                index = await self._reindexer.build_from_file(Path(s.catalog_path))
        self.live.swap(index)
        if s.index_sync_s > 0:
            self._follower = asyncio.create_task(self._follow_store(s.index_sync_s))
        self.ready = True
        self.metrics.ready.set(1)
        log.info(
            "ready: model %s (scorer %s), index %s (%d items in %s)",
            model.version,
            model.scorer,
            index.version,
            len(index.items),
            ", ".join(index.domains),
        )

    async def _follow_store(self, every_s: float) -> None:
        """Every ``every_s``: swap in a snapshot another process published to the shared store.
        A snapshot that does not load (pruned meanwhile, not whole) is retried next time; the
        live one keeps serving."""
        assert self._reindexer is not None
        while True:
            await asyncio.sleep(every_s)
            try:
                await self._reindexer.follow()
            except Exception as exc:  # noqa: BLE001 - keep following; the live index serves
                log.warning("cannot load the store's current index yet: %s", exc)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._follower is not None:
            self._follower.cancel()
        if self._reindexer is not None:
            self._reindexer.cancel()
        if self.batcher is not None:
            await self.batcher.stop()  # shuts the device thread down too
        if self._cache is not None:
            await self._cache.close()

    def begin_drain(self) -> None:
        """SIGTERM: fail readiness first so load balancers stop sending, then finish in-flight."""
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)

    def _new_cache(self) -> UserVectorCache:
        s = self.settings
        if s.redis_url:
            return RedisCache(
                s.redis_url,
                ttl_s=s.cache_ttl_s,
                timeout_s=s.tuning.redis_timeout_s,
                retry_s=s.tuning.redis_retry_s,
                on_error=lambda op: self.metrics.cache.labels("error").inc(),
            )
        log.info("REDIS_URL not set: caching user vectors in-process (LRU, %d entries)", s.lru_size)
        return LRUCache(s.lru_size, s.cache_ttl_s)

    def _fits(self, index: ItemIndex) -> bool:
        assert self.model is not None
        return (
            index.dim == self.model.user_dim and index.lm_vectors.shape[1] == self.model.encoder.dim
        )

    def _on_swap(self, index: ItemIndex) -> None:
        if self._requests is not None:
            self._requests.ranked.clear()  # keyed by snapshot version too; this frees them
        # The snapshot's catalogue is millions of long-lived objects; frozen, the cyclic GC's
        # full collections stop walking them on the request path (they were the p99's pauses).
        gc.freeze()
        self.metrics.index_size.clear()
        for d in index.domains:
            self.metrics.index_size.labels(d).set(index.size(d))


def _device_type(encoder: Encoder) -> str:
    """``cpu`` / ``cuda`` for the encoder's device (encoders without one, e.g. fakes: cpu)."""
    dev = getattr(encoder, "device", None)
    return str(getattr(dev, "type", dev or "cpu"))
