"""The engine: what a running service is made of, and its start and stop.

Everything tied to one model is a ``Generation``: the recommender, its device thread and
batcher, its live index (snapshots under ``<store>/indexes/<model version>/``) and the two paths
that do the work, ``RequestPath`` (``service/recommend.py``) and ``Reindexer``
(``service/reindex.py``). The engine holds the served generation in one reference, which each
request reads once: a request is answered by one model and an index built for it, even while a
switch happens. ``Engine.start`` opens the first generation; ``Rollout`` (``service/rollout.py``)
opens the next one beside it and switches. Routes and library users call ``recommend``,
``reindexer.submit``, ``job`` and ``rollout`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cprec.encoder import Encoder
from cprec.recommender import ArtifactFormatError, Recommender
from model_store import ArtifactError, ModelStore
from service.batcher import Batcher, device_thread
from service.cache import LRUCache, RankedLists, RedisCache, UserVectorCache
from service.errors import Conflict, NotReady
from service.index import IndexStore, ItemIndex, LiveIndex, SearchCoalescer, configure_faiss
from service.metrics import Metrics
from service.protocol import RecommendRequest
from service.recommend import Recommendation, RequestPath
from service.reindex import Job, Reindexer, release_memory
from service.rollout import LOCK, ModelRef, Rollout, Serving, fits
from service.settings import Resolved, Settings
from service.storefiles import store_lock

log = logging.getLogger(__name__)

# How long a switch waits for the replaced generation's in-flight requests before leaving its
# close to a background task (it is never closed under a request).
RETIRE_WAIT_S = 30.0


@dataclass(frozen=True)
class Parts:
    """What the request path and the reindex path of one generation share."""

    settings: Settings
    tuning: Resolved  # the settings' tuning tier for the model's device
    model: Recommender
    batcher: Batcher
    live: LiveIndex
    metrics: Metrics


def load_model(settings: Settings, ref: ModelRef | None = None, verify: bool = True) -> Recommender:
    """``ref`` (a store version, or the base model), else the ``settings.model`` version from the
    store, else ``settings.base_model`` served zero-shot (``settings.zero_shot``).

    A store version that exists but fails its checksums, or whose files do not make a
    recommender, is an error (never served), not a fallback.
    """
    if ref is not None and ref.source == "base":
        model = _from_base(settings)
        if model.version != ref.version:
            raise ArtifactError(
                f"the base model is now {model.version!r}, not {ref.version!r}: set "
                "CPREC_BASE_MODEL back to serve it"
            )
        return model
    if ref is not None and ref.source == "given":
        raise ArtifactError(f"model {ref.version!r} was given in code; it cannot be loaded again")
    store = ModelStore(settings.store_dir)
    version = ref.version if ref is not None else store.resolve(settings.model)
    if version is None:
        return _from_base(settings)
    settings.check_store_model(version)  # before any weights are read
    art = store.load(version, verify=verify)  # raises ArtifactError naming the bad file
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


def _from_base(settings: Settings) -> Recommender:
    shaping = {"zero_shot", "max_length", "history_max_items", "device", "dtype", "quantize"}
    try:
        return Recommender.from_base(
            settings.base_model, settings.store_dir, **settings.model_dump(include=shaping)
        )
    except FileNotFoundError as exc:
        raise ArtifactError(f"base_model: {exc}") from exc


@dataclass(eq=False)
class Generation:
    """One served model with everything tied to it; see the module docstring. ``inflight``
    counts the requests it is answering, so that it is closed only once they are done."""

    ref: ModelRef
    parts: Parts
    requests: RequestPath
    reindexer: Reindexer
    store: IndexStore
    inflight: int = 0

    @property
    def model(self) -> Recommender:
        return self.parts.model

    @property
    def version(self) -> str:
        return self.parts.model.version

    @property
    def batcher(self) -> Batcher:
        return self.parts.batcher

    @property
    def live(self) -> LiveIndex:
        return self.parts.live

    @property
    def busy(self) -> bool:
        """Requests in flight, or a reindex job (one that waited for a switch fails at once)."""
        return self.inflight > 0 or self.reindexer.busy

    async def close(self) -> None:
        self.reindexer.cancel()
        await self.batcher.stop()  # shuts its device thread down too


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
        self.ready = False
        self.draining = False
        self.startup_error: str | None = None
        self.rollout = Rollout(self)
        self._given = model
        self._cache = cache
        self._gen: Generation | None = None
        self._retiring: set[Generation] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # the follower, the watcher, late closes
        self._idle = LiveIndex()  # ``live`` before the first generation

    # -- what routes and library users call -------------------------------------------------
    async def recommend(self, req: RecommendRequest) -> Recommendation:
        """Top-k items per target domain for a mixed-domain history (titles and/or item ids).

        While draining (``/ready`` already 503) requests that reached us are still answered, so
        a SIGTERM never fails in-flight traffic; only a service that has no index refuses."""
        gen = self._gen  # read once: one model and its index answer the whole request
        if gen is None:
            raise NotReady("the service is not ready (still loading)")
        gen.inflight += 1
        try:
            return await gen.requests.recommend(req)
        finally:
            gen.inflight -= 1

    async def query_vectors(self, req: RecommendRequest) -> dict[str, np.ndarray]:
        gen = self.generation
        gen.inflight += 1
        try:
            return await gen.requests.query_vectors(req)
        finally:
            gen.inflight -= 1

    def job(self, job_id: str) -> Job:
        """A reindex job's status (also while draining)."""
        return self.generation.reindexer.job(job_id)

    # -- parts ------------------------------------------------------------------------------
    @property
    def generation(self) -> Generation:
        if self._gen is None:
            raise NotReady("the service is not ready (still loading)")
        return self._gen

    @property
    def requests(self) -> RequestPath:
        return self.generation.requests

    @property
    def reindexer(self) -> Reindexer:
        """Submits reindex jobs (``reindexer.submit``); refused unless the service is ready, and
        while a model job runs (one job at a time)."""
        if self._gen is None or not self.ready:
            raise NotReady("the service is not ready")
        busy = self.rollout.active()
        if busy is not None:
            raise Conflict(
                f"model job {busy.job_id} is still {busy.state}; retry when it has finished",
                details={"job_id": busy.job_id},
                retry_after_s=5,
            )
        return self._gen.reindexer

    @property
    def live(self) -> LiveIndex:
        return self._gen.live if self._gen is not None else self._idle

    @property
    def index(self) -> ItemIndex | None:
        return self.live.current

    @property
    def model(self) -> Recommender | None:
        return self._gen.model if self._gen is not None else self._given

    @property
    def batcher(self) -> Batcher | None:
        return self._gen.batcher if self._gen is not None else None

    @property
    def model_version(self) -> str:
        model = self.model
        return model.version if model is not None else ""

    @property
    def scorer(self) -> str:
        model = self.model
        return model.scorer if model is not None else ""

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
        return self._gen.reindexer.jobs if self._gen is not None else {}

    @property
    def index_store(self) -> IndexStore:
        if self._gen is not None:
            return self._gen.store
        return IndexStore(Path(self.settings.store_dir) / "indexes" / self.model_version)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model and the index (or build it from the catalogue), warm up, turn ready.

        The model is what ``SERVING`` names while the alias (``CPREC_MODEL``) still points where
        it did when that was decided, so a switch or a rollback outlives a restart; else the
        configured one. If the first choice does not load, the other one is served (logged)."""
        s = self.settings
        own_cache = self._cache is None
        if self._cache is None:
            self._cache = self._new_cache()
            if isinstance(self._cache, RedisCache) and not await self._cache.ping():
                log.warning(
                    "redis at start-up is unreachable; serving without cache until it answers"
                )
        try:
            state, alias_version, plan = self._start_plan()
            gen = await self._open_first(plan)
            try:
                gen.live.swap(await self._start_index(gen))
            except BaseException:
                await gen.close()
                raise
        except BaseException:
            if own_cache:
                await self.cache.close()
            raise
        self.switch(gen)
        self.rollout.started(gen.ref, state, alias_version)
        if s.index_sync_s > 0:
            self._spawn(self._follow_store(s.index_sync_s))
        if s.model_watch_s > 0:
            self._spawn(self.rollout.watch(s.model_watch_s))
        self.ready = True
        self.metrics.ready.set(1)
        index = self.index
        assert index is not None
        log.info(
            "ready: model %s (scorer %s), index %s (%d items in %s)",
            gen.version,
            gen.model.scorer,
            index.version,
            len(index.items),
            ", ".join(index.domains),
        )

    def _start_plan(self) -> tuple[Serving | None, str | None, list[ModelRef | None]]:
        """``SERVING``, where the alias points now, and the models to try in turn (None: the
        configured one)."""
        s = self.settings
        state = Serving.read(Path(s.store_dir))
        alias_version = ModelStore(s.store_dir).resolve(s.model)
        if self._given is not None:
            return state, alias_version, [None]
        kept = state.served if state is not None and state.served.source != "given" else None
        if kept is None:
            return state, alias_version, [None]
        assert state is not None
        if state.alias == s.model and state.alias_version == alias_version:
            return state, alias_version, [kept] + ([None] if alias_version != kept.version else [])
        return state, alias_version, [None] + ([kept] if alias_version != kept.version else [])

    async def _open_first(self, plan: list[ModelRef | None]) -> Generation:
        for n, ref in enumerate(plan):
            try:
                return await self.open_generation(ref)
            except ArtifactError as exc:
                if n + 1 == len(plan):
                    raise
                nxt = plan[n + 1]
                log.error(
                    "cannot serve %s (%s); serving %s instead",
                    ref.version if ref is not None else f"{self.settings.model!r}",
                    exc,
                    nxt.version if nxt is not None else f"{self.settings.model!r}",
                )
        raise AssertionError("unreachable: the plan is never empty")

    async def _start_index(self, gen: Generation) -> ItemIndex:
        """The generation's newest saved snapshot, else one built from ``CPREC_CATALOG_PATH``.

        Under the store's writer lock: of several workers starting at once, the first builds
        and saves the index, the others wait for it and load the saved snapshot."""
        s, t, model = self.settings, gen.parts.tuning, gen.model
        async with gen.store.writer():
            index = await asyncio.to_thread(
                gen.store.load_latest, s.faiss_gpu, t.hnsw_ef_search, model.scorer
            )
            if index is not None and not fits(index, model):
                log.warning(
                    "saved index %s has %d-d rows, the model needs %d: indexing again",
                    index.version,
                    index.dim,
                    model.user_dim,
                )
                index = None
            if index is None:
                log.info("no saved index for %s: indexing %s", model.version, s.catalog_path)
                index = await gen.reindexer.build_from_file(Path(s.catalog_path))
        return index

    async def open_generation(self, ref: ModelRef | None, verify: bool = True) -> Generation:
        """A generation for ``ref`` (None: the configured model) with no index yet: the model
        loaded and warmed on its own device thread (the thread that runs all its torch ops; see
        ``device_thread``) and its batcher started. ``close`` it unless it is served."""
        s = self.settings
        device = device_thread()  # handed to the batcher, which shuts it down in stop()
        given = self._given
        try:
            if given is not None and (ref is None or ref == ModelRef(given.version, "given")):
                model = given
            elif ref is None:
                model = await asyncio.get_running_loop().run_in_executor(device, load_model, s)
            else:
                model = await asyncio.get_running_loop().run_in_executor(
                    device, load_model, s, ref, verify
                )
        except Exception:
            device.shutdown(wait=True)  # the load has returned: its thread ends at once
            raise
        except BaseException:
            device.shutdown(wait=False)  # cancelled: do not wait for a load still running
            raise
        if ref is None:
            ref = self._ref_of(model)
        t = s.tuning.for_device(_device_type(model.encoder))
        configure_faiss(blas_threshold=4, search_threads=t.faiss_search_threads)
        batcher = Batcher(
            model.encoder,
            self.metrics,
            max_batch_size=t.max_batch_size,
            max_wait_ms=t.max_wait_ms,
            coalesce_ms=t.batch_coalesce_ms,
            coalesce_share=t.batch_coalesce_share,
            token_budget=t.batch_token_budget,
            queue_size=t.queue_size,
            enabled=s.batching,
            max_padding=t.batch_max_padding,
            max_forward_tokens=t.batch_max_forward_tokens,
            device=device,
        )
        await batcher.start()
        try:
            await batcher.run_on_device(model.warmup)
        except BaseException:
            await batcher.stop()
            raise
        parts = Parts(s, t, model, batcher, LiveIndex(), self.metrics)
        store = IndexStore(Path(s.store_dir) / "indexes" / model.version)
        reindexer = Reindexer(parts, store, guard=lambda: self._reindex_guard(parts))
        if self._gen is not None:  # job statuses outlive a switch
            reindexer.jobs = self._gen.reindexer.jobs
        gen = Generation(ref, parts, RequestPath(parts, self.cache), reindexer, store)
        parts.live.on_swap(lambda index: self._on_swap(gen, index))
        return gen

    def _ref_of(self, model: Recommender) -> ModelRef:
        """How the configured model, once loaded, is loaded again."""
        if model is self._given:
            return ModelRef(model.version, "given")
        in_store = ModelStore(self.settings.store_dir).resolve(self.settings.model)
        return ModelRef(model.version, "store" if in_store == model.version else "base")

    def switch(self, gen: Generation) -> Generation | None:
        """Serve ``gen`` from the next request on (one reference); returns the one it replaced."""
        old, self._gen = self._gen, gen
        if gen.live.current is not None:
            self._index_metrics(gen.live.current)
        if old is not None:
            log.info("serving model %s (was %s)", gen.version, old.version)
        return old

    async def retire(self, old: Generation) -> None:
        """Close a generation that no longer serves, once its in-flight requests are done."""
        self._retiring.add(old)
        deadline = time.monotonic() + RETIRE_WAIT_S
        while old.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if old.busy:
            log.warning(
                "model %s: %d requests (and reindex jobs: %s) still in flight after %g s; "
                "closing it once they finish",
                old.version,
                old.inflight,
                old.reindexer.busy,
                RETIRE_WAIT_S,
            )
            self._spawn(self._close_when_idle(old))
            return
        await self._close(old)

    async def _close_when_idle(self, old: Generation) -> None:
        while old.busy:
            await asyncio.sleep(0.05)
        await self._close(old)

    async def _close(self, gen: Generation) -> None:
        self._retiring.discard(gen)
        await gen.close()
        self._spawn(self._collect())

    @staticmethod
    async def _collect() -> None:
        """Free a closed generation. Its objects were frozen with its snapshots (_on_swap), so
        only a full collection of unfrozen objects frees the model and its index; it runs once
        per switch, a moment later, when the switch's frames no longer hold the generation."""
        await asyncio.sleep(0.5)
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        release_memory()

    async def _follow_store(self, every_s: float) -> None:
        """Every ``every_s``: serve the model and the snapshot another process switched to or
        published in the shared store. One that does not load is retried (a snapshot) or waits
        for the store to name another (a model); the served one keeps serving."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.rollout.follow()
            except Exception as exc:  # noqa: BLE001 - keep following; the served model serves
                log.warning("cannot serve the store's SERVING model: %s", exc)
            if self._gen is None:
                continue
            try:
                await self._gen.reindexer.follow()
            except Exception as exc:  # noqa: BLE001 - keep following; the live index serves
                log.warning("cannot load the store's current index yet: %s", exc)

    @contextlib.asynccontextmanager
    async def _reindex_guard(self, parts: Parts) -> AsyncIterator[None]:
        """A reindex job's turn: after any model switch in any process (``models.lock``), and
        only while its model is still the one served here and in the store's ``SERVING``."""
        root = Path(self.settings.store_dir)
        async with store_lock(root / LOCK):
            state = await asyncio.to_thread(Serving.read, root)
            gen = self._gen
            now = state.served.version if state is not None else None
            if gen is None or gen.parts is not parts or now not in (None, parts.model.version):
                raise Conflict(
                    f"the served model changed from {parts.model.version} while this job "
                    "waited; submit it again"
                )
            yield

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for task in list(self._tasks):
            task.cancel()
        jobs = self.rollout.cancel()
        if jobs:  # their new generations are closed as they unwind
            await asyncio.wait(jobs, timeout=30)
        for gen in [self._gen, *self._retiring]:
            if gen is not None:
                await gen.close()
        self._retiring.clear()
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

    def _on_swap(self, gen: Generation, index: ItemIndex) -> None:
        gen.requests.ranked.clear()  # keyed by snapshot version too; this frees them
        # The snapshot's catalogue is millions of long-lived objects; frozen, the cyclic GC's
        # full collections stop walking them on the request path (they were the p99's pauses).
        gc.freeze()
        if gen is self._gen:
            self._index_metrics(index)

    def _index_metrics(self, index: ItemIndex) -> None:
        self.metrics.index_size.clear()
        for d in index.domains:
            self.metrics.index_size.labels(d).set(index.size(d))


def _device_type(encoder: Encoder) -> str:
    """``cpu`` / ``cuda`` for the encoder's device (encoders without one, e.g. fakes: cpu)."""
    dev = getattr(encoder, "device", None)
    return str(getattr(dev, "type", dev or "cpu"))
