"""The reindex path: catalogue changes become a new index snapshot, built beside the live one.

A job (full, upsert or delete; items inline, an upload, or a file inside ``catalog_dir``) runs in
the background under one writer lock: parse, merge with the live catalogue, encode only the item
texts that are new or changed (the snapshot keeps every item's LM vector), compute the index rows
with the served model, build and save the snapshot, then swap the live reference. A failure at
any step fails the job with the reason; the old snapshot keeps serving. The start-up build of a
catalogue with no saved snapshot takes the same steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from service.catalog import Item, check_unique, load_catalog_file, parse_catalog
from service.errors import Conflict, NotFound, NotReady, ValidationFailed
from service.index import IndexStore, ItemIndex
from service.storefiles import JOBS_KEPT, write_status

if TYPE_CHECKING:
    from service.engine import Parts

log = logging.getLogger(__name__)

Mode = Literal["full", "upsert", "delete"]
JOB_SHOW_S = 0.5  # how often a running job's progress is written for the other workers


@dataclass(slots=True)
class Job:
    """A reindex job's status, updated in place while it runs."""

    job_id: str
    mode: str
    state: Literal["queued", "running", "succeeded", "failed"]
    created_at: float
    total: int = 0
    embedded: int = 0
    progress: float = 0.0
    index_version: str | None = None
    error: str | None = None
    finished_at: float | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Job:
        return cls(**json.loads(raw))


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim).

    A reindex allocates many differently shaped batches; glibc keeps the freed pages in its
    arenas, so RSS would stay at the job's peak. A no-op where glibc is not the allocator.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Reindexer:
    """Builds snapshots for the served model and swaps them into ``live``."""

    def __init__(
        self,
        parts: Parts,
        store: IndexStore,
        guard: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None,
    ) -> None:
        self.parts = parts
        # Taken before the store's writer lock by every job: the engine's turn with model
        # switches (service/rollout.py); none for a reindexer on its own.
        self._guard = guard or contextlib.nullcontext
        self.model = parts.model
        self.store = store
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._shown = 0.0  # when a running job's progress was last written for other workers

    # -- building ---------------------------------------------------------------------------
    async def build_from_file(self, path: Path) -> ItemIndex:
        """The first snapshot of a model: the catalogue file encoded, built and saved."""
        items = await asyncio.to_thread(load_catalog_file, path)
        lm = await self.embed_items(items)
        rows = await self.index_rows(items, lm)
        index = await asyncio.to_thread(self.build_and_save, items, rows, lm)
        del items, lm, rows
        release_memory()
        return index

    async def embed_items(
        self,
        items: Sequence[Item],
        job: Job | None = None,
        reuse: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """[N, text_dim] LM vectors of each item's ``lm_text``, reusing unchanged ones;
        length-sorted batches on the device thread (requests interleave between them)."""
        texts = [self.model.lm_text(it.domain, it.title, it.extra_text) for it in items]
        out = np.zeros((len(items), self.model.encoder.dim), dtype=np.float32)
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
        ids = await self.parts.batcher.tokenize([texts[i] for i in todo], "item")
        order = sorted(range(len(todo)), key=lambda j: len(ids[j]))  # length-sorted: less padding
        bs = self.parts.tuning.embed_batch_size
        for start in range(0, len(order), bs):
            chunk = order[start : start + bs]
            vecs = await self.parts.batcher.run_on_device(
                self.model.encoder.core, [ids[j] for j in chunk]
            )
            out[[todo[j] for j in chunk]] = vecs
            if job is not None:
                job.embedded += len(chunk)
                job.progress = job.embedded / max(job.total, 1)
                if time.monotonic() - self._shown >= JOB_SHOW_S:
                    await self._show(job)
        return out

    async def index_rows(self, items: Sequence[Item], lm: np.ndarray) -> np.ndarray:
        """[N, text_dim] LM vectors -> [N, user_dim] index rows (cheap next to the LM, so a
        reindex recomputes them all: popularity and residual rows follow the new catalogue)."""
        rows: np.ndarray = await self.parts.batcher.run_on_device(
            self.model.item_rows,
            lm,
            [it.item_id for it in items],
            [it.popularity for it in items],
        )
        return rows

    def build_and_save(
        self, items: Sequence[Item], rows: np.ndarray, lm: np.ndarray | None = None
    ) -> ItemIndex:
        """``rows`` are the index rows; ``lm`` the LM vectors they came from, kept in the
        snapshot unless they are the rows themselves (``text``)."""
        s, t = self.parts.settings, self.parts.tuning
        index = ItemIndex.build(
            items,
            rows,
            self.model.version,
            kind=s.index_kind,
            hnsw_m=t.hnsw_m,
            ef_search=t.hnsw_ef_search,
            use_gpu=s.faiss_gpu,
            text_vectors=lm if self.model.keeps_lm_vectors else None,
            scorer=self.model.scorer,
        )
        self.store.save(index)
        return index

    # -- jobs -------------------------------------------------------------------------------
    def submit(
        self,
        mode: str,
        items: list[Item] | None = None,
        item_ids: list[str] | None = None,
        upload: tuple[bytes, str] | None = None,
        path: Path | None = None,
    ) -> Job:
        """Start a background job; Conflict while another one is queued or running.

        ``path`` is a catalogue file already resolved inside ``catalog_dir`` (see
        :func:`service.catalog.resolve_catalog_path`); it is read and parsed in the job."""
        live = self.parts.live.current
        if live is None:
            raise NotReady("the service is not ready")
        active = [j for j in self.jobs.values() if j.state in ("queued", "running")]
        if active:
            raise Conflict(
                f"reindex job {active[0].job_id} is still {active[0].state}; "
                "retry when it has finished",
                details={"job_id": active[0].job_id},
                retry_after_s=5,
            )
        if items is not None:
            check_unique(items)
        if mode == "delete" and item_ids is not None:
            unknown = [i for i in item_ids if i not in live.by_id]
            if unknown:
                raise ValidationFailed(
                    f"cannot delete unknown item ids {unknown[:10]}",
                    details={"field": "item_ids", "unknown": unknown[:100]},
                )
        job = Job(uuid.uuid4().hex[:12], mode, "queued", created_at=time.time())
        self.jobs[job.job_id] = job
        while len(self.jobs) > JOBS_KEPT:
            self.jobs.popitem(last=False)
        self._show_now(job)
        task = asyncio.create_task(self._run(job, items, item_ids, upload, path))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.parts.metrics.reindex_jobs.labels("submitted").inc()
        return job

    def job(self, job_id: str) -> Job:
        """A job of this process, else one another process sharing the store runs or ran."""
        if job_id in self.jobs:
            return self.jobs[job_id]
        path = self._job_path(job_id)
        if path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                return Job.from_json(path.read_bytes())
        raise NotFound(f"no reindex job {job_id!r}", details={"job_id": job_id})

    # -- what other processes see ------------------------------------------------------------
    def _job_path(self, job_id: str) -> Path | None:
        if not (job_id.isalnum() and len(job_id) <= 64):  # a name, never a path
            return None
        return self.store.root / "jobs" / f"{job_id}.json"

    def _show_now(self, job: Job) -> None:
        """Write ``job``'s status where every worker reads it."""
        self._shown = time.monotonic()
        path = self._job_path(job.job_id)
        assert path is not None
        write_status(path, job.to_json(), JOBS_KEPT, job.finished_at is not None)

    async def _show(self, job: Job) -> None:
        await asyncio.to_thread(self._show_now, job)

    async def follow(self) -> bool:
        """Swap in the snapshot ``CURRENT`` names when another process published it (a reindex
        through another worker or replica); False when there was nothing to do. Skipped while
        this process writes: its job catches up first, under the store's writer lock."""
        if self._write_lock.locked():
            return False
        async with self._write_lock:
            return await self._catch_up()

    async def _catch_up(self) -> bool:
        version = await asyncio.to_thread(self.store.current)
        live = self.parts.live.current
        if version is None or live is None or version == live.version:
            return False
        s, t = self.parts.settings, self.parts.tuning
        index = await asyncio.to_thread(
            self.store.load_version, version, s.faiss_gpu, t.hnsw_ef_search, self.model.scorer
        )
        self.parts.live.swap(index)
        log.info("index %s (published by another process) is live", version)
        return True

    @property
    def busy(self) -> bool:
        """A job of this reindexer is queued or running."""
        return bool(self._tasks)

    def cancel(self) -> None:
        """Shutdown: running jobs fail as cancelled; the live snapshot is untouched."""
        for t in list(self._tasks):
            t.cancel()

    async def _run(
        self,
        job: Job,
        items: list[Item] | None,
        item_ids: list[str] | None,
        upload: tuple[bytes, str] | None,
        path: Path | None,
    ) -> None:
        async with self._write_lock:
            try:
                # Queued until no other process writes this store; then start from the newest
                # snapshot, which another worker may have published since this one last looked.
                async with self._guard(), self.store.writer():
                    job.state = "running"
                    await self._show(job)
                    await self._catch_up()
                    await self._job(job, items, item_ids, upload, path)
            except asyncio.CancelledError:
                job.state, job.error = "failed", "cancelled (shutdown)"
                raise
            except Exception as exc:  # noqa: BLE001 - the old index keeps serving
                job.state = "failed"
                job.error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                self.parts.metrics.reindex_jobs.labels("failed").inc()
                log.error(
                    "reindex %s failed; the previous index keeps serving: %s", job.job_id, job.error
                )
            finally:
                job.finished_at = time.time()
                self._show_now(job)
                items = upload = None  # type: ignore[assignment]
                release_memory()

    async def _job(
        self,
        job: Job,
        items: list[Item] | None,
        item_ids: list[str] | None,
        upload: tuple[bytes, str] | None,
        path: Path | None,
    ) -> None:
        """The job's steps, under both writer locks: parse, merge, encode, build, save, swap."""
        if path is not None:  # server-side file, parsed exactly like an upload
            fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
            upload = (await asyncio.to_thread(path.read_bytes), fmt)
        if upload is not None:
            data, fmt = upload
            items = await asyncio.to_thread(
                parse_catalog, data, fmt, "upload", self.parts.settings.max_upload_rows
            )
        old = self.parts.live.current
        assert old is not None
        new_items = merge(old, job.mode, items, item_ids)
        if not new_items:
            raise ValidationFailed("the resulting catalogue would be empty")
        old_lm = old.lm_vectors
        reuse = {
            self.model.lm_text(it.domain, it.title, it.extra_text): old_lm[r]
            for r, it in enumerate(old.items)
        }
        lm = await self.embed_items(new_items, job, reuse)
        rows = await self.index_rows(new_items, lm)
        del old, old_lm, reuse  # the old snapshot goes with the swap, not at the job's end
        index = await asyncio.to_thread(self.build_and_save, new_items, rows, lm)
        self.parts.live.swap(index)
        job.index_version = index.version
        job.state = "succeeded"
        job.progress = 1.0
        self.parts.metrics.reindex_jobs.labels("succeeded").inc()
        log.info(
            "reindex %s (%s) done: index %s, %d items",
            job.job_id,
            job.mode,
            index.version,
            len(new_items),
        )


def merge(
    old: ItemIndex, mode: str, items: list[Item] | None, item_ids: list[str] | None
) -> list[Item]:
    """The catalogue after a job: ``items`` (full), the old one with ``items`` replacing or
    adding by id (upsert), or without ``item_ids`` (delete)."""
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
