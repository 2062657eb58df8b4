"""Model rollout without downtime (issue 19): ``POST /models/reload`` serves another store
version with an index built for it, reusing the LM vectors when only the user model changed;
``POST /models/rollback`` returns to the previous one; ``GET /models`` says what is served; a
switch outlives a restart until the alias moves; the watcher follows an alias; several
processes over one store serve the same model.

The store holds tiny ``hier`` models over the tiny random BERT (``svc_util.publish_versions``):
``hier-v1`` (production), ``hier-v2`` (same LM files, another user model) and ``hier-v3`` (a
retrained LM).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from svc_util import (
    CATALOG,
    CPU,
    admin,
    publish_versions,
    serve,
    wait_model_job,
    worker_processes,
)

from cprec.encoder import HFEncoder
from model_store import ModelStore
from service.catalog import Item
from service.engine import Engine
from service.protocol import IdEntry, RecommendRequest
from service.rollout import ModelJob, Serving

REPO = Path(__file__).resolve().parents[2]
HIST = {
    "history": [
        {"item_id": "g1"},
        {"item_id": "b3"},
        {"title": "A Brand New Saga", "domain": "Books"},
    ],
    "k": 5,
}


@pytest.fixture
def store(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    return publish_versions(tmp_path / "store", tiny_bert_dir, tmp_path)


@pytest.fixture
def settings(make_settings: Callable[..., Any], store: Path) -> Callable[..., Any]:
    def make(**kw: Any) -> Any:
        return make_settings(store_dir=store, **{**CPU, **kw})

    return make


@pytest.fixture
def forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every LM forward (``HFEncoder.core``) from now on."""
    calls: list[int] = []
    core = HFEncoder.core

    def counted(self: HFEncoder, batch: Any) -> np.ndarray:
        calls.append(len(batch))
        return core(self, batch)

    monkeypatch.setattr(HFEncoder, "core", counted)
    return calls


async def reload(client: httpx.AsyncClient, model: str | None = None) -> dict[str, Any]:
    body = {"model": model} if model is not None else None
    r = await client.post("/models/reload", json=body, headers=admin())
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "queued" and r.json()["action"] == "reload"
    return await wait_model_job(client, r.json()["job_id"])


async def rollback(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.post("/models/rollback", headers=admin())
    assert r.status_code == 202, r.text
    return await wait_model_job(client, r.json()["job_id"])


async def until(check: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.02)


async def test_reload_switches_model_and_index_together_reusing_lm_vectors(
    settings: Callable[..., Any], store: Path, forwards: list[int]
) -> None:
    async with serve(settings()) as (client, engine):
        first = (await client.post("/recommend", json=HIST)).json()
        assert first["model_version"] == "hier-v1"
        assert (await client.post("/recommend", json=HIST)).json()["cached"] is True
        assert len(engine.ranked) == 1
        old_index, old_lm = engine.index.version, engine.index.lm_vectors.copy()
        old_key = engine.requests.user_key("the same history")
        before = len(forwards)

        job = await reload(client, "hier-v2")

        assert job["state"] == "succeeded", job
        assert job["steps_done"] == ["verify", "load", "index", "warm", "switch", "retire"]
        assert (job["from_version"], job["target"], job["model_version"]) == (
            "hier-v1",
            "hier-v2",
            "hier-v2",
        )
        # The LM files are unchanged: the served snapshot's LM vectors were reused as they are,
        # only the index rows were computed; the LM ran for the warm-up alone.
        assert job["reused_lm_vectors"] is True and job["embedded"] == 0
        assert job["index_source"] == "built"
        assert sum(forwards[before:]) < len(CATALOG)
        assert engine.model_version == "hier-v2" and engine.index.version == job["index_version"]
        assert job["index_version"] != old_index
        np.testing.assert_array_equal(engine.index.lm_vectors, old_lm)
        assert (store / "indexes" / "hier-v2" / "CURRENT").read_text().strip() == job[
            "index_version"
        ]
        # The ranked lists start empty; the old user vectors are out of reach (keys by version).
        assert len(engine.ranked) == 0
        assert engine.requests.user_key("the same history") != old_key
        n = len(forwards)
        body = (await client.post("/recommend", json=HIST)).json()
        assert len(forwards) == n  # the same LM: the title's vector was kept, with the items
        assert (body["model_version"], body["index_version"]) == ("hier-v2", job["index_version"])
        assert body["cached"] is False and body["results"] != first["results"]
        ready = (await client.get("/ready")).json()
        assert (ready["model_version"], ready["index_version"]) == ("hier-v2", job["index_version"])

        r = await client.get("/models", headers=admin())
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["served"] == {"version": "hier-v2", "source": "store"}
        assert view["previous"] == {"version": "hier-v1", "source": "store"}
        assert view["index_version"] == job["index_version"] and view["scorer"] == "hier"
        assert view["versions"] == ["hier-v1", "hier-v2", "hier-v3"]
        assert view["aliases"] == {"production": "hier-v1"}
        assert (view["alias"], view["alias_version"]) == ("production", "hier-v1")
        assert view["job"]["job_id"] == job["job_id"]
        state = Serving.read(store)
        assert state is not None and state.served.version == "hier-v2"
        assert state.previous is not None and state.previous.version == "hier-v1"


async def test_reload_with_a_retrained_lm_encodes_the_catalogue(
    settings: Callable[..., Any], forwards: list[int]
) -> None:
    async with serve(settings()) as (client, engine):
        old_lm = engine.index.lm_vectors.copy()
        before = len(forwards)
        job = await reload(client, "hier-v3")
        assert job["state"] == "succeeded", job
        assert job["reused_lm_vectors"] is False and job["embedded"] == len(CATALOG)
        assert sum(forwards[before:]) >= len(CATALOG)
        assert not np.allclose(engine.index.lm_vectors, old_lm)
        n = len(forwards)
        r = await client.post("/recommend", json=HIST)
        assert r.status_code == 200 and r.json()["model_version"] == "hier-v3"
        assert len(forwards) == n + 1  # another LM: the title is encoded again


async def test_rollback_returns_to_the_previous_model(settings: Callable[..., Any]) -> None:
    async with serve(settings()) as (client, engine):
        r = await client.post("/models/rollback", headers=admin())
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        assert "no previous model" in r.json()["error"]["message"]
        v1_index = engine.index.version
        to_v2 = await reload(client, "hier-v2")
        assert to_v2["state"] == "succeeded", to_v2

        back = await rollback(client)
        assert back["state"] == "succeeded", back
        assert (back["action"], back["from_version"], back["target"]) == (
            "rollback",
            "hier-v2",
            "hier-v1",
        )
        # The catalogue did not change: v1's saved snapshot of it is served again, as it was.
        assert back["index_source"] == "saved" and back["index_version"] == v1_index
        assert (engine.model_version, engine.index.version) == ("hier-v1", v1_index)
        body = (await client.post("/recommend", json=HIST)).json()
        assert (body["model_version"], body["index_version"]) == ("hier-v1", v1_index)
        view = (await client.get("/models", headers=admin())).json()
        assert view["previous"]["version"] == "hier-v2"
        # A rollback is a switch like any other: the next one returns to v2.
        again = await rollback(client)
        assert again["state"] == "succeeded" and again["model_version"] == "hier-v2"
        assert again["index_version"] == to_v2["index_version"]


async def test_a_rollback_indexes_the_catalogue_served_now(settings: Callable[..., Any]) -> None:
    """An item added while v2 served is in v1's index after the rollback (LM vectors reused)."""
    async with serve(settings()) as (client, engine):
        await reload(client, "hier-v2")
        item = {"item_id": "b9", "domain": "Books", "title": "Space Opera Saga Volume Nine"}
        r = await client.post(
            "/items/reindex", json={"mode": "upsert", "items": [item]}, headers=admin()
        )
        assert r.status_code == 202, r.text
        from svc_util import wait_job

        assert (await wait_job(client, r.json()["job_id"]))["state"] == "succeeded"
        back = await rollback(client)
        assert back["state"] == "succeeded", back
        assert back["index_source"] == "built" and back["reused_lm_vectors"] is True
        assert back["embedded"] == 0  # b9's LM vector came from v2's snapshot
        assert engine.model_version == "hier-v1" and "b9" in engine.index.by_id
        r = await client.post("/recommend", json={"history": [{"item_id": "b9"}], "k": 3})
        assert r.status_code == 200 and r.json()["model_version"] == "hier-v1"


async def test_reload_refusals(settings: Callable[..., Any]) -> None:
    async with serve(settings()) as (client, engine):
        r = await client.post("/models/reload", json={"model": "hier-v9"}, headers=admin())
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert r.json()["error"]["details"] == {"model": "hier-v9"}
        r = await client.post("/models/reload", json={"model": "../hier-v2"}, headers=admin())
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "model"
        r = await client.post("/models/reload", headers=admin())  # the alias: v1, served
        assert r.status_code == 409 and "already served" in r.json()["error"]["message"]
        # One job at a time: a second reload, a rollback or a reindex while one is queued.
        r = await client.post("/models/reload", json={"model": "hier-v2"}, headers=admin())
        assert r.status_code == 202
        job_id = r.json()["job_id"]
        for path, body in (
            ("/models/reload", {"model": "hier-v3"}),
            ("/models/rollback", None),
            ("/items/reindex", {"mode": "delete", "item_ids": ["g1"]}),
        ):
            busy = await client.post(path, json=body, headers=admin())
            assert busy.status_code == 409, (path, busy.text)
            assert busy.json()["error"]["details"]["job_id"] == job_id
            assert busy.headers["retry-after"]
        assert (await wait_model_job(client, job_id))["state"] == "succeeded"
        # ... and a reload while a reindex is queued.
        r = await client.post(
            "/items/reindex", json={"mode": "delete", "item_ids": ["g1"]}, headers=admin()
        )
        assert r.status_code == 202
        busy = await client.post("/models/reload", json={"model": "hier-v3"}, headers=admin())
        assert busy.status_code == 409 and "reindex job" in busy.json()["error"]["message"]
        r = await client.get("/models/jobs/nosuchjob123", headers=admin())
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_a_switch_outlives_a_restart_until_the_alias_moves(
    settings: Callable[..., Any], store: Path
) -> None:
    async with serve(settings()) as (client, _):
        assert (await reload(client, "hier-v2"))["state"] == "succeeded"
    async with serve(settings()) as (client, engine):
        assert engine.model_version == "hier-v2"  # SERVING, not the alias (still v1)
        view = (await client.get("/models", headers=admin())).json()
        assert view["previous"]["version"] == "hier-v1"
    ModelStore(store).set_alias("production", "hier-v3")  # a decision made after the switch
    async with serve(settings()) as (client, engine):
        assert engine.model_version == "hier-v3"
        state = Serving.read(store)  # rewritten, so that other processes follow
        assert state is not None and state.served.version == "hier-v3"
        assert state.previous is not None and state.previous.version == "hier-v2"
        assert (await rollback(client))["model_version"] == "hier-v2"


async def test_watch_mode_rolls_out_an_alias_move(
    settings: Callable[..., Any], store: Path
) -> None:
    async with serve(settings(model_watch_s=0.05)) as (client, engine):
        await asyncio.sleep(0.2)
        assert engine.model_version == "hier-v1" and not engine.rollout.jobs  # nothing moved
        ModelStore(store).set_alias("production", "hier-v2")
        await until(lambda: engine.model_version == "hier-v2", what="the watcher's switch")
        view = (await client.get("/models", headers=admin())).json()
        await until(lambda: engine.rollout.active() is None)
        view = (await client.get("/models", headers=admin())).json()
        assert view["job"]["action"] == "watch" and view["job"]["state"] == "succeeded"
        # After a rollback the watcher leaves the alias's version alone until the alias moves.
        assert (await rollback(client))["model_version"] == "hier-v1"
        await asyncio.sleep(0.4)
        assert engine.model_version == "hier-v1" and len(engine.rollout.jobs) == 2
        ModelStore(store).set_alias("production", "hier-v3")
        await until(lambda: engine.model_version == "hier-v3", what="the next alias move")


# -- several processes over one store ----------------------------------------------------------
@asynccontextmanager
async def two_workers(settings: Callable[..., Any], **kw: Any) -> AsyncIterator[list[Engine]]:
    """Two engines over one store, started one after the other as workers are."""
    engines = [Engine(settings(**kw)) for _ in range(2)]
    for e in engines:
        await e.start()
    try:
        yield engines
    finally:
        for e in engines:
            await e.stop()


async def finished(engine: Engine, job_id: str, timeout: float = 60) -> ModelJob:
    deadline = time.monotonic() + timeout
    while True:
        job = engine.rollout.job(job_id)
        if job.state in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
        await asyncio.sleep(0.02)


async def test_a_switch_through_one_worker_is_served_by_the_other(
    settings: Callable[..., Any],
) -> None:
    async with two_workers(settings, index_sync_s=0.05) as (a, b):
        job = await finished(a, a.rollout.reload("hier-v2").job_id)
        assert job.state == "succeeded", job.error
        assert b.rollout.job(job.job_id).state == "succeeded"  # its status, from the store
        await until(lambda: b.model_version == "hier-v2", what="worker B following")
        assert b.index is not None and b.index.version == job.index_version  # loaded, not built
        req = RecommendRequest(history=[IdEntry(item_id="g1")], k=3)
        rec = await b.recommend(req)
        assert (rec.model_version, rec.index_version) == ("hier-v2", job.index_version)
        # A rollback through B returns both workers to v1.
        back = await finished(b, b.rollout.rollback().job_id)
        assert back.state == "succeeded" and back.model_version == "hier-v1", back.error
        await until(lambda: a.model_version == "hier-v1", what="worker A following")
        assert a.index is not None and b.index is not None
        assert a.index.version == b.index.version


async def test_a_reindex_waiting_for_a_switch_elsewhere_fails_and_says_why(
    settings: Callable[..., Any],
) -> None:
    """A switch and a reindex never run at once across processes: B's reindex waits for A's
    switch, then fails (its model is no longer the one served) instead of indexing for it."""
    async with two_workers(settings, index_sync_s=0) as (a, b):
        switch = a.rollout.reload("hier-v3")
        reindex = b.reindexer.submit("upsert", items=[Item("b9", "Books", "Tea Saga Nine")])
        job = await finished(a, switch.job_id)
        assert job.state == "succeeded", job.error
        deadline = time.monotonic() + 30
        while b.job(reindex.job_id).state in ("queued", "running"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        failed = b.job(reindex.job_id)
        assert failed.state == "failed" and "served model changed" in (failed.error or "")
        assert await b.rollout.follow()  # B then serves v3 too, with A's index
        assert b.model_version == "hier-v3" and b.index is not None and a.index is not None
        assert b.index.version == a.index.version and "b9" not in b.index.by_id


async def test_a_switch_indexes_the_catalogue_another_worker_published(
    settings: Callable[..., Any],
) -> None:
    """A reindex through B that A has not swapped in yet (no sync) is in A's new index."""
    async with two_workers(settings, index_sync_s=0) as (a, b):
        reindex = b.reindexer.submit("upsert", items=[Item("b9", "Books", "Tea Saga Nine")])
        deadline = time.monotonic() + 30
        while b.job(reindex.job_id).state in ("queued", "running"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert b.job(reindex.job_id).state == "succeeded"
        assert a.index is not None and "b9" not in a.index.by_id
        job = await finished(a, a.rollout.reload("hier-v2").job_id)
        assert job.state == "succeeded", job.error
        assert a.model_version == "hier-v2" and "b9" in a.index.by_id


@pytest.mark.integration
def test_two_worker_processes_switch_together(tmp_path: Path, store: Path) -> None:
    """``CPREC_WORKERS=2``: a reload sent to one worker is served by both within the sync
    interval, and every answer names a model and index that were built together."""
    from svc_util import built_pairs

    settings = {"CPREC_DTYPE": "float32", "CPREC_FAISS_GPU": "false"}
    with worker_processes(tmp_path, settings, store=store) as workers:
        a, b = workers[0], workers[1]
        assert b.get("/ready").json()["model_version"] == "hier-v1"
        r = a.post("/models/reload", json={"model": "hier-v2"}, headers=admin())
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        pairs: set[tuple[str, str]] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for c in (a, b):
                r = c.post("/recommend", json={"history": [{"item_id": "g1"}], "k": 3})
                assert r.status_code == 200, r.text
                pairs.add((r.json()["model_version"], r.json()["index_version"]))
            status = b.get(f"/models/jobs/{job_id}", headers=admin()).json()
            assert status["state"] in ("queued", "running", "succeeded"), status
            if status["state"] == "succeeded" and all(
                c.get("/ready").json()["model_version"] == "hier-v2" for c in (a, b)
            ):
                break
            time.sleep(0.05)
        for c in (a, b):
            assert c.get("/ready").json()["model_version"] == "hier-v2"
        assert {m for m, _ in pairs} == {"hier-v1", "hier-v2"}
        assert pairs <= built_pairs(store), pairs
        view = b.get("/models", headers=admin()).json()
        assert view["served"]["version"] == "hier-v2" and view["previous"]["version"] == "hier-v1"
