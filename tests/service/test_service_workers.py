"""Several processes on one store (``CPREC_WORKERS``, or replicas): a reindex through one is
served by all, job statuses are shared, writers take turns, and no answer mixes snapshots.

The first tests run two engines in one process over one store directory (each engine is what
one worker holds); the last starts ``python -m service`` with two real workers on one port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from svc_util import CATALOG, admin, worker_processes

from cprec.encoder import FakeEncoder
from cprec.recommender import Recommender
from service.engine import Engine
from service.errors import NotFound
from service.protocol import IdEntry, RecommendRequest
from service.reindex import Job

REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def two_workers(make_settings: Callable[..., Any], **kw: Any) -> AsyncIterator[Any]:
    """Two engines over one store, started one after the other as workers are."""
    engines = [
        Engine(make_settings(**kw), model=Recommender(FakeEncoder(dim=64), "fake-v1"))
        for _ in range(2)
    ]
    for e in engines:
        await e.start()
    try:
        yield engines
    finally:
        for e in engines:
            await e.stop()


def item(item_id: str, title: str, domain: str = "Books") -> Any:
    from service.catalog import Item

    return Item(item_id, domain, title, None, 1.0)


async def finished(engine: Engine, job_id: str, timeout: float = 30) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = engine.job(job_id)
        if job.state in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
        await asyncio.sleep(0.02)


async def test_workers_share_the_first_snapshot(make_settings: Callable[..., Any]) -> None:
    """The second worker loads the snapshot the first built (same version), not its own."""
    async with two_workers(make_settings, index_sync_s=0) as (a, b):
        assert a.index is not None and b.index is not None
        assert a.index.version == b.index.version


async def test_reindex_through_a_is_answered_by_b(make_settings: Callable[..., Any]) -> None:
    async with two_workers(make_settings, index_sync_s=0.05) as (a, b):
        job = a.reindexer.submit("upsert", items=[item("b9", "Coffee Saga Volume Nine")])
        done = await finished(a, job.job_id)
        assert done.state == "succeeded", done.error
        # B sees the job (from the store) and, within its sync interval, the snapshot.
        seen = b.job(job.job_id)
        assert seen.state == "succeeded" and seen.index_version == done.index_version
        deadline = time.monotonic() + 5
        while b.index is not None and b.index.version != done.index_version:
            assert time.monotonic() < deadline, "worker B never swapped the new snapshot in"
            await asyncio.sleep(0.02)
        rec = await b.recommend(RecommendRequest(history=[IdEntry(item_id="b9")], k=3))
        assert rec.index_version == done.index_version
        with pytest.raises(NotFound):
            b.job("nosuchjob123")


async def test_jobs_through_two_workers_take_turns(make_settings: Callable[..., Any]) -> None:
    """Two upserts submitted at once through different workers: the second starts from the
    first's snapshot, so the catalogue ends up with both items (none is lost)."""
    async with two_workers(make_settings, index_sync_s=0) as (a, b):
        ja = a.reindexer.submit("upsert", items=[item("x1", "Tea Saga One")])
        jb = b.reindexer.submit("upsert", items=[item("x2", "Tea Saga Two")])
        da, db = await asyncio.gather(finished(a, ja.job_id), finished(b, jb.job_id))
        assert da.state == db.state == "succeeded", (da.error, db.error)
        last = max((a, b), key=lambda e: e.job(ja.job_id if e is a else jb.job_id).finished_at)
        assert last.index is not None
        ids = {it.item_id for it in last.index.items}
        assert {"x1", "x2"} <= ids and len(ids) == len(CATALOG) + 2


async def test_a_snapshot_that_does_not_load_leaves_the_live_one(
    make_settings: Callable[..., Any],
) -> None:
    """CURRENT naming a snapshot that is not whole: the follower keeps serving its own."""
    async with two_workers(make_settings, index_sync_s=0) as (a, b):
        assert b.index is not None
        live = b.index.version
        store = b.index_store
        (store.root / "versions" / "broken").mkdir()
        (store.root / "CURRENT").write_text("broken\n")
        with pytest.raises(Exception):  # noqa: B017 - any load error; the point is what follows
            await b.reindexer.follow()
        assert b.index.version == live
        rec = await b.recommend(RecommendRequest(history=[IdEntry(item_id="g1")], k=2))
        assert rec.index_version == live


@pytest.mark.integration
def test_two_worker_processes_on_one_port(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """``CPREC_WORKERS=2``: both answer on one port; a reindex sent to one is served by the
    other within the sync interval; while it lands, every answer names a snapshot that was
    published whole, with items from that snapshot only; SIGTERM stops both (exit 0)."""
    with worker_processes(tmp_path, {"CPREC_BASE_MODEL": str(tiny_bert_dir)}) as workers:
        a, b = workers[0], workers[1]
        old = a.get("/ready").json()["index_version"]
        assert b.get("/ready").json()["index_version"] == old
        new_item = {"item_id": "b9", "domain": "Books", "title": "Coffee Saga Volume Nine"}
        job = a.post(
            "/items/reindex", json={"mode": "upsert", "items": [new_item]}, headers=admin()
        ).json()
        answers: list[tuple[str, set[str]]] = []
        deadline = time.monotonic() + 30
        new = None
        while time.monotonic() < deadline:
            for c in (a, b):
                r = c.post("/recommend", json={"history": [{"item_id": "g1"}], "k": 20})
                assert r.status_code == 200, r.text
                body = r.json()
                answers.append(
                    (
                        body["index_version"],
                        {x["item_id"] for v in body["results"].values() for x in v},
                    )
                )
            status = b.get(f"/items/reindex/{job['job_id']}", headers=admin()).json()
            assert status["state"] in ("queued", "running", "succeeded"), status
            if status["state"] == "succeeded":
                new = status["index_version"]
                if b.get("/ready").json()["index_version"] == new:
                    break
            time.sleep(0.02)
        assert new is not None, "the job never succeeded (as seen from worker B)"
        assert b.get("/ready").json()["index_version"] == new, "worker B never served it"
        assert {v for v, _ in answers} <= {old, new}  # no half-built or foreign snapshot
        for version, items in answers:
            assert ("b9" in items) <= (version == new)  # the new item only with its snapshot
        r = b.post("/recommend", json={"history": [{"item_id": "b9"}], "k": 3})
        assert r.status_code == 200 and r.json()["index_version"] == new
