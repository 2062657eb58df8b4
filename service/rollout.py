"""The model path: switch the served model without downtime, roll back, refuse a bad one.

A *generation* (``service/engine.py``) is everything tied to one model: the recommender, its
device thread and batcher, its live index and saved snapshots (``<store>/indexes/<version>/``),
its request and reindex paths. A switch builds a new generation beside the served one: verify
the artifact's checksums, load it on its own device thread, index the current catalogue for it
(its saved snapshot of that catalogue if it has one; else the served snapshot's LM vectors when
the LM files are unchanged, so only the index rows are computed; else the LM encodes the
catalogue), warm it with a few requests, then the engine replaces its one reference. The old
generation is closed once its in-flight requests are done. A failure at any step before the swap
fails the job with the reason and leaves the served generation untouched.

Processes sharing a store (workers, replicas) agree through two files beside the versions:
``models.lock`` (one switch or reindex at a time across processes: an flock, released by the
kernel if its holder dies) and ``SERVING`` (the version served, the one a rollback returns to,
and what the alias pointed at), written after each switch. Every process follows ``SERVING`` as
it follows an index's ``CURRENT``, loading the snapshot the switching process saved. Job statuses
are written under ``<store>/model-jobs/`` so that any worker answers for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cprec.recommender import CONFIG, HIER_DIR, Recommender
from model_store import ModelStore, write_atomic
from model_store.store import CARD, MANIFEST, MANIFEST_SUM, sha256_file
from service.errors import Conflict, NotFound, NotReady
from service.index import ItemIndex
from service.protocol import IdEntry, RecommendRequest, TitleEntry
from service.reindex import release_memory
from service.storefiles import JOBS_KEPT, store_lock, write_status

if TYPE_CHECKING:
    from service.engine import Engine, Generation

log = logging.getLogger(__name__)

Source = Literal["store", "base", "given"]
Action = Literal["reload", "rollback", "watch", "follow"]
SERVING = "SERVING"
LOCK = "models.lock"
JOBS_DIR = "model-jobs"
# Files of an artifact that are not the LM's: the user model, the recommender's config (compared
# field by field instead), the store's manifest and model card.
_NOT_LM = {CONFIG, CARD, MANIFEST, MANIFEST_SUM}
_WARM_TITLE = "cprec warm-up: a title that is not in the catalogue"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """How to load a served model again: a store version, the settings' base model served
    zero-shot, or the model object given to the engine in code (tests, library use)."""

    version: str
    source: Source = "store"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelRef:
        source = d.get("source", "store")
        if source not in ("store", "base", "given"):
            raise ValueError(f"unknown model source {source!r}")
        return cls(str(d["version"]), source)


@dataclass(slots=True)
class ModelJob:
    """A reload, rollback or watch job's status, updated in place while it runs."""

    job_id: str
    action: Action
    state: Literal["queued", "running", "succeeded", "failed"]
    created_at: float
    target: str | None = None  # the version to serve (a rollback's is settled when it runs)
    from_version: str | None = None
    step: str | None = None  # verify | load | index | warm | switch | retire
    steps_done: list[str] = field(default_factory=list)
    # The served snapshot's LM vectors were reused (the LM files and config are unchanged), so
    # only the index rows were computed; ``embedded`` counts the item texts the LM encoded.
    reused_lm_vectors: bool | None = None
    index_source: Literal["saved", "built"] | None = None
    embedded: int = 0
    model_version: str | None = None
    index_version: str | None = None
    note: str | None = None
    error: str | None = None
    finished_at: float | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> ModelJob:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class Serving:
    """``<store>/SERVING``: what the processes sharing the store serve, what a rollback returns
    to, and where the alias (``CPREC_MODEL``) pointed when it was decided: a start or the
    watcher acts on the alias only once it has moved since."""

    served: ModelRef
    previous: ModelRef | None
    alias: str
    alias_version: str | None
    job_id: str | None = None
    written_at: float = 0.0

    def write(self, root: Path) -> None:
        data = asdict(self)
        write_atomic(root / SERVING, (json.dumps(data, indent=2) + "\n").encode())

    @classmethod
    def read(cls, root: Path) -> Serving | None:
        """None when there is none (no switch yet) or it does not parse (logged)."""
        try:
            d = json.loads((root / SERVING).read_bytes())
            prev = d.get("previous")
            return cls(
                ModelRef.from_dict(d["served"]),
                ModelRef.from_dict(prev) if prev else None,
                str(d["alias"]),
                d.get("alias_version"),
                d.get("job_id"),
                float(d.get("written_at", 0.0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring %s: %s", root / SERVING, exc)
            return None


@dataclass(slots=True)
class ModelsView:
    """``GET /models``: the served model and index, the previous model, the store."""

    served: ModelRef
    scorer: str
    index_version: str | None
    previous: ModelRef | None
    alias: str
    alias_version: str | None
    versions: list[str]
    aliases: dict[str, str]
    watch_s: float
    job: ModelJob | None


def lm_files(files: Mapping[str, str]) -> dict[str, str]:
    """The LM's share of an artifact's ``{path: sha256}``: everything but ``hier/``, the
    recommender config, the manifest and the model card."""
    return {
        p: h
        for p, h in files.items()
        if not p.startswith(f"{HIER_DIR}/") and p.rsplit("/", 1)[-1] not in _NOT_LM
    }


def vectors_by_text(model: Recommender, index: ItemIndex) -> dict[str, np.ndarray]:
    """The snapshot's LM vectors keyed by the text ``model`` (the one that made them) encoded."""
    lm = index.lm_vectors
    return {
        model.lm_text(it.domain, it.title, it.extra_text): lm[r] for r, it in enumerate(index.items)
    }


def fits(index: ItemIndex, model: Recommender) -> bool:
    """The snapshot's rows and LM vectors have the sizes ``model`` makes."""
    return index.dim == model.user_dim and index.lm_vectors.shape[1] == model.encoder.dim


async def warm(gen: Generation, max_k: int) -> None:
    """A few requests through a generation's request path before it serves (a history of
    catalogue items, one title the LM encodes), so its first users pay for no lazy set-up; the
    ranked lists they leave are emptied."""
    idx = gen.live.current
    if idx is None or not idx.items:
        return
    firsts = [idx.items[rows[0]].item_id for rows in idx.popular.values() if rows][:3]
    k = min(5, max_k)
    await gen.requests.recommend(
        RecommendRequest(history=[IdEntry(item_id=i) for i in firsts], k=k)
    )
    title = TitleEntry(title=_WARM_TITLE, domain=idx.domains[0])
    await gen.requests.recommend(RecommendRequest(history=[title], k=k))
    gen.requests.ranked.clear()


def _reason(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


class Rollout:
    """Reload, rollback, follow and watch for one engine; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.root = Path(self.settings.store_dir)
        self.store = ModelStore(self.root)
        self.jobs: OrderedDict[str, ModelJob] = OrderedDict()
        self.previous: ModelRef | None = None
        # Where the alias pointed at the last decision (a start, a switch, a rollback, a failed
        # watch reload): the watcher rolls out only once it points somewhere else.
        self.alias_seen: str | None = None
        self._lock = asyncio.Lock()  # one switch at a time in this process
        self._tasks: set[asyncio.Task[None]] = set()
        self._lm_ids: dict[ModelRef, tuple[Any, ...] | None] = {}
        self._follow_failed: tuple[str, float] | None = None

    # -- what routes call ---------------------------------------------------------------------
    def reload(self, model: str | None = None) -> ModelJob:
        """Start switching to ``model`` (an alias or version; default ``CPREC_MODEL``): 404 when
        the store has no such name, 409 when it is served already or another job runs."""
        gen = self._ready()
        self._refuse_while_busy(gen)
        name = model or self.settings.model
        version = self.store.resolve(name)
        if version is None:
            raise NotFound(
                f"no model version or alias {name!r} in the store; GET /models lists them",
                details={"model": name},
            )
        if version == gen.version:
            raise Conflict(
                f"model {version!r} is already served", details={"model_version": version}
            )
        return self._submit("reload", ModelRef(version, "store"))

    def rollback(self) -> ModelJob:
        """Start switching back to the previous model; 409 when there is none."""
        gen = self._ready()
        self._refuse_while_busy(gen)
        prev = self._previous()
        if prev is None or prev.version == gen.version:
            raise Conflict(
                "no previous model to roll back to", details={"model_version": gen.version}
            )
        return self._submit("rollback", prev)

    def job(self, job_id: str) -> ModelJob:
        """A job of this process, else one another process sharing the store runs or ran."""
        if job_id in self.jobs:
            return self.jobs[job_id]
        path = self._job_path(job_id)
        if path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                return ModelJob.from_json(path.read_bytes())
        raise NotFound(f"no model job {job_id!r}", details={"job_id": job_id})

    def active(self) -> ModelJob | None:
        return next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)

    def view(self) -> ModelsView:
        gen = self._ready()
        idx = gen.live.current
        return ModelsView(
            served=gen.ref,
            scorer=gen.model.scorer,
            index_version=idx.version if idx is not None else None,
            previous=self._previous(),
            alias=self.settings.model,
            alias_version=self.store.resolve(self.settings.model),
            versions=self.store.versions(),
            aliases=self.store.aliases(),
            watch_s=self.settings.model_watch_s,
            job=next(reversed(self.jobs.values()), None),
        )

    # -- what the engine calls ----------------------------------------------------------------
    def started(self, served: ModelRef, state: Serving | None, alias_version: str | None) -> None:
        """Record the start's decision; when it is not what ``SERVING`` says (the alias moved
        since, or that version did not load), write it so the other processes follow."""
        self.alias_seen = alias_version
        if state is None:
            return
        if state.served == served:
            self.previous = state.previous
            return
        self.previous = state.served
        if served.source != "given":  # a model given in code is this process's own
            written = Serving(
                served, state.served, self.settings.model, alias_version, None, time.time()
            )
            written.write(self.root)

    async def follow(self) -> bool:
        """Switch to the model ``SERVING`` names when another process switched to it; False when
        there was nothing to do. A version that failed here is not tried again until ``SERVING``
        is written anew; the served generation keeps serving meanwhile."""
        if self._lock.locked() or not self.engine.ready:
            return False
        async with self._lock:
            state = await asyncio.to_thread(Serving.read, self.root)
            if state is None or state.served.version == self.engine.generation.version:
                return False
            key = (state.served.version, state.written_at)
            if self._follow_failed == key:
                return False
            try:
                await self._catch_up(state)
            except Exception:
                self._follow_failed = key
                raise
            return True

    async def watch(self, every_s: float) -> None:
        """Every ``every_s``: roll out the alias's version when the alias has moved."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.watch_once()
            except Exception as exc:  # noqa: BLE001 - keep watching; the served model serves
                log.warning("model watch: %s", exc)

    async def watch_once(self) -> ModelJob | None:
        """A watch job when the alias points at a version not decided on yet (not after a
        rollback, nor a version that failed, until the alias moves again); else None."""
        if not self.engine.ready:
            return None
        s = self.settings
        target = await asyncio.to_thread(self.store.resolve, s.model)
        if target is None or target == self.alias_seen:
            return None
        gen = self.engine.generation
        if self._lock.locked() or self.active() is not None or _reindexing(gen):
            return None  # next time
        state = await asyncio.to_thread(Serving.read, self.root)
        if target == gen.version or (
            state is not None and state.alias == s.model and state.alias_version == target
        ):
            self.alias_seen = target  # served already, or another process decided on it
            return None
        log.info("alias %r moved to %s: rolling it out", s.model, target)
        return self._submit("watch", ModelRef(target, "store"))

    def cancel(self) -> list[asyncio.Task[None]]:
        """Shutdown: running jobs fail as cancelled (their new generation is closed); the
        served one is untouched. Returns the tasks, to await their clean-up."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        return tasks

    # -- the job --------------------------------------------------------------------------------
    def _ready(self) -> Generation:
        if not self.engine.ready:
            raise NotReady("the service is not ready")
        return self.engine.generation

    def _refuse_while_busy(self, gen: Generation) -> None:
        """One job at a time: a model job or a reindex job of the served generation."""
        busy = self.active() or _reindexing(gen)
        if busy is not None:
            kind = "model" if isinstance(busy, ModelJob) else "reindex"
            raise Conflict(
                f"{kind} job {busy.job_id} is still {busy.state}; retry when it has finished",
                details={"job_id": busy.job_id},
                retry_after_s=5,
            )

    def _previous(self) -> ModelRef | None:
        state = Serving.read(self.root)
        return state.previous if state is not None else self.previous

    def _submit(self, action: Action, target: ModelRef) -> ModelJob:
        gen = self.engine.generation
        job = ModelJob(
            uuid.uuid4().hex[:12],
            action,
            "queued",
            time.time(),
            target=target.version,
            from_version=gen.version,
        )
        self.jobs[job.job_id] = job
        while len(self.jobs) > JOBS_KEPT:
            self.jobs.popitem(last=False)
        self._show(job)
        task = asyncio.create_task(self._run(job, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.engine.metrics.model_jobs.labels("submitted").inc()
        return job

    async def _run(self, job: ModelJob, target: ModelRef) -> None:
        async with self._lock:
            try:
                # Queued until no other process switches or reindexes; then start from what the
                # store serves now (another worker may have switched since this one looked).
                async with store_lock(self.root / LOCK):
                    job.state = "running"
                    await asyncio.to_thread(self._show, job)
                    state = await asyncio.to_thread(Serving.read, self.root)
                    if state is not None:
                        await self._catch_up(state)
                    # The catalogue as the store has it: a reindex through another process
                    # may not have reached this one yet, and the new index is built from it.
                    await self.engine.generation.reindexer.follow()
                    await self._job(job, target)
                self.engine.metrics.model_jobs.labels("succeeded").inc()
            except asyncio.CancelledError:
                job.state, job.error = "failed", "cancelled (shutdown)"
                raise
            except Exception as exc:  # noqa: BLE001 - the served model keeps serving
                job.state, job.error = "failed", _reason(exc)
                self.engine.metrics.model_jobs.labels("failed").inc()
                log.error(
                    "model %s %s failed at %s; %s keeps serving: %s",
                    job.action,
                    job.job_id,
                    job.step,
                    self.engine.model_version,
                    job.error,
                )
            finally:
                job.finished_at = time.time()
                self._show(job)
                release_memory()

    async def _job(self, job: ModelJob, target: ModelRef) -> None:
        """The job's steps under both locks, after catching up with ``SERVING``."""
        s = self.settings
        gen = self.engine.generation
        state = await asyncio.to_thread(Serving.read, self.root)
        if job.action == "rollback":  # the previous model as the store records it now
            prev = state.previous if state is not None else self.previous
            if prev is None or prev.version == gen.version:
                raise Conflict("no previous model to roll back to")
            target = prev
            job.target = prev.version
        job.from_version = gen.version
        if job.action == "watch" and state is not None and state.alias == s.model:
            if state.alias_version == target.version and gen.version != target.version:
                self.alias_seen = target.version
                self._done(job, gen, "another process already tried this alias move")
                return
        if target.version == gen.version:
            self._done(job, gen, "already served (another process switched to it)")
            return
        if job.action == "watch":
            alias_version: str | None = target.version
        else:
            alias_version = await asyncio.to_thread(self.store.resolve, s.model)
        try:
            old = await self._switch(job, target)
        except Exception:
            if job.action == "watch":  # tried: not again until the alias moves
                self.alias_seen = target.version
                self._record(gen.ref, self.previous, target.version, job)
            raise
        self.previous, self.alias_seen = old.ref, alias_version
        self._record(target, old.ref, alias_version, job)
        await self._step(job, "retire")
        await self.engine.retire(old)
        self._done(job, self.engine.generation)
        log.info(
            "model %s %s done: %s -> %s (index %s, %s%s)",
            job.action,
            job.job_id,
            job.from_version,
            job.model_version,
            job.index_version,
            job.index_source,
            ", LM vectors reused" if job.reused_lm_vectors else "",
        )

    def _done(self, job: ModelJob, gen: Generation, note: str | None = None) -> None:
        if job.step is not None:
            job.steps_done.append(job.step)
        idx = gen.live.current
        job.step, job.note, job.state = None, note, "succeeded"
        job.model_version = gen.version
        job.index_version = idx.version if idx is not None else None

    def _record(
        self, served: ModelRef, previous: ModelRef | None, alias_version: str | None, job: ModelJob
    ) -> None:
        Serving(
            served, previous, self.settings.model, alias_version, job.job_id, time.time()
        ).write(self.root)

    async def _catch_up(self, state: Serving) -> None:
        """Serve what ``SERVING`` names when it is not what this process serves."""
        if state.served.version == self.engine.generation.version:
            return
        job = ModelJob(uuid.uuid4().hex[:12], "follow", "running", time.time())
        try:
            old = await self._switch(job, state.served)
        except Exception as exc:
            raise RuntimeError(
                f"cannot serve {state.served.version} as the store's SERVING says "
                f"(at {job.step}): {_reason(exc)}"
            ) from exc
        self.previous, self.alias_seen = state.previous, state.alias_version
        await self.engine.retire(old)
        log.info("model %s (switched to by another process) is served here", state.served.version)

    async def _step(self, job: ModelJob, name: str) -> None:
        if job.step is not None:
            job.steps_done.append(job.step)
        job.step = name
        await asyncio.to_thread(self._show, job)

    async def _switch(self, job: ModelJob, target: ModelRef) -> Generation:
        """Verify, load, index, warm and serve ``target``; returns the generation it replaced.
        Until the swap the served generation is untouched; a failure closes the new one."""
        old = self.engine.generation
        live = old.live.current
        assert live is not None
        await self._step(job, "verify")
        if target.source == "store":  # every file against the manifest, naming a bad one
            await asyncio.to_thread(self.store.load, target.version)
        await self._step(job, "load")
        gen = await self.engine.open_generation(target, verify=False)
        try:
            await self._step(job, "index")
            same_lm = await self._same_lm(old, gen)
            index = await self._index(job, gen, old, live, same_lm)
            gen.live.swap(index)
            if same_lm:  # titles outside the catalogue keep their LM vectors too
                gen.requests.share_titles(old.requests)
            await self._step(job, "warm")
            await warm(gen, self.settings.max_k)
            await self._step(job, "switch")
            self.engine.switch(gen)
        except BaseException:
            await gen.close()
            raise
        job.model_version, job.index_version = gen.version, index.version
        return old

    async def _index(
        self, job: ModelJob, gen: Generation, old: Generation, live: ItemIndex, same_lm: bool
    ) -> ItemIndex:
        """The new model's index of the served catalogue: its saved snapshot of that catalogue
        (for a follower: the one the switching process saved), else built and saved."""
        s, t = self.settings, gen.parts.tuning
        model = gen.model
        async with gen.store.writer():
            saved = await asyncio.to_thread(
                gen.store.load_latest, s.faiss_gpu, t.hnsw_ef_search, model.scorer
            )
            if saved is not None and not fits(saved, model):
                saved = None
            if saved is not None and (
                saved.items == live.items
                or (job.action == "follow" and saved.version == gen.store.current())
            ):
                job.index_source, job.reused_lm_vectors = "saved", False
                if gen.store.current() != saved.version:  # what the other processes load
                    await asyncio.to_thread(
                        write_atomic, gen.store.root / "CURRENT", f"{saved.version}\n".encode()
                    )
                return saved
            reuse: dict[str, np.ndarray] = {}
            if saved is not None:  # this model's vectors of an older catalogue
                reuse.update(vectors_by_text(model, saved))
            if same_lm:
                reuse.update(vectors_by_text(old.model, live))
            items = live.items
            job.reused_lm_vectors = same_lm
            job.embedded = sum(
                model.lm_text(it.domain, it.title, it.extra_text) not in reuse for it in items
            )
            lm = await gen.reindexer.embed_items(items, None, reuse)
            del reuse, saved
            rows = await gen.reindexer.index_rows(items, lm)
            index = await asyncio.to_thread(gen.reindexer.build_and_save, items, rows, lm)
            job.index_source = "built"
            return index

    async def _same_lm(self, old: Generation, new: Generation) -> bool:
        """The two models' LMs make the same vectors: the same files (by checksum) and the same
        pooling, decoder flag and length. Unknown (a model given in code) is not the same."""
        a = await self._lm_id(old)
        b = await self._lm_id(new)
        return a is not None and a == b

    async def _lm_id(self, gen: Generation) -> tuple[Any, ...] | None:
        if gen.ref not in self._lm_ids:
            self._lm_ids[gen.ref] = await asyncio.to_thread(self._lm_identity, gen)
        return self._lm_ids[gen.ref]

    def _lm_identity(self, gen: Generation) -> tuple[Any, ...] | None:
        cfg, ref = gen.model.config, gen.ref
        if cfg is None or ref.source == "given":
            return None
        if ref.source == "store":  # the manifest's checksums, verified when it was loaded
            files = self.store.load(ref.version, verify=False).manifest.files
        else:
            folder = gen.model.lm_dir
            if folder is None:
                return None
            files = {
                p.relative_to(folder).as_posix(): sha256_file(p)
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            }
        return (tuple(sorted(lm_files(files).items())), cfg.pooling, cfg.is_decoder, cfg.max_length)

    # -- what other processes see --------------------------------------------------------------
    def _job_path(self, job_id: str) -> Path | None:
        if not (job_id.isalnum() and len(job_id) <= 64):  # a name, never a path
            return None
        return self.root / JOBS_DIR / f"{job_id}.json"

    def _show(self, job: ModelJob) -> None:
        """Write ``job``'s status where every worker reads it."""
        if job.action == "follow":
            return
        path = self._job_path(job.job_id)
        assert path is not None
        write_status(path, job.to_json(), JOBS_KEPT, job.finished_at is not None)


def _reindexing(gen: Generation) -> Any:
    """The served generation's queued or running reindex job, if any."""
    return next((j for j in gen.reindexer.jobs.values() if j.state in ("queued", "running")), None)
