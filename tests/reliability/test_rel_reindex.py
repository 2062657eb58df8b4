"""Reindex and artifact faults: the service degrades, never corrupts. Issue 4, "Faults":
bad rows, a kill mid-reindex, changed bytes in an index or a model, two reindexes at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from rel_util import TOKEN, SlowEncoder, admin, wait_job

from cprec.encoder import FakeEncoder
from cprec.recommender import Recommender
from model_store import ArtifactError, ModelStore
from service.engine import Engine, load_model
from service.index import IndexStore, ItemIndex
from service.settings import Settings

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def _snapshots(engine: Any) -> list[str]:
    versions = engine.index_store.root / "versions"
    return sorted(p.name for p in versions.iterdir())


def _rows(n: int, domain: str = "Garden", prefix: str = "r") -> list[dict[str, Any]]:
    return [
        {"item_id": f"{prefix}{i}", "domain": domain, "title": f"{domain} thing {i}"}
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "fmt,content,line",
    [
        (
            "jsonl",
            "".join(json.dumps(r) + "\n" for r in _rows(2))
            + '{"item_id": "bad", "domain": "Garden"}\n'
            + json.dumps(_rows(1, prefix="z")[0])
            + "\n",
            3,
        ),
        ("jsonl", "".join(json.dumps(r) + "\n" for r in _rows(4)) + "{not json\n", 5),
        ("jsonl", json.dumps(_rows(1)[0]) + "\n" + json.dumps(_rows(1)[0]) + "\n", 2),  # duplicate
        ("csv", "item_id,domain,title\nc1,Garden,Rake\nc2,Garden,Hoe\nc3,Garden,Spade,extra\n", 4),
        ("csv", "item_id,domain,title,popularity\nc1,Garden,Rake,1\nc2,Garden,Hoe,-5\n", 3),
    ],
)
async def test_bad_row_fails_job_with_row_number_and_keeps_old_index(
    app_client: Any, fmt: str, content: str, line: int
) -> None:
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        before, on_disk = engine.index, _snapshots(engine)
        current = (engine.index_store.root / "CURRENT").read_text()
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            data={"mode": "full"},
            files={"file": (f"cat.{fmt}", content.encode(), "text/plain")},
        )
        assert r.status_code == 202, r.text
        job = await wait_job(client, r.json()["job_id"])
        assert job["state"] == "failed"
        assert f"upload:{line}:" in job["error"], job["error"]
        assert engine.index is before  # the old index keeps serving
        d = before.domains[0]
        ok = await client.post("/recommend", json={"history": [{"title": "tea", "domain": d}]})
        assert ok.status_code == 200 and ok.json()["index_version"] == before.version
        assert _snapshots(engine) == on_disk  # nothing half-built left on disk
        assert (engine.index_store.root / "CURRENT").read_text() == current


async def test_failure_while_saving_leaves_nothing_half_built(
    app_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import faiss

    calls = {"n": 0}
    real = faiss.write_index

    def disk_full(index: Any, path: str) -> None:
        calls["n"] += 1
        real(index, path)
        raise OSError(28, "No space left on device")

    async with app_client(admin_token=TOKEN) as (client, engine, _):
        before, on_disk = engine.index, _snapshots(engine)
        monkeypatch.setattr(faiss, "write_index", disk_full)
        r = await client.post(
            "/items/reindex", headers=admin(), json={"mode": "full", "items": _rows(3)}
        )
        job = await wait_job(client, r.json()["job_id"])
        assert calls["n"] == 1 and job["state"] == "failed"
        assert "No space left" in job["error"]
        assert engine.index is before and _snapshots(engine) == on_disk


async def test_two_reindexes_at_once_second_is_409(app_client: Any) -> None:
    enc = SlowEncoder(delay_s=0.05)
    async with app_client(encoder=enc, admin_token=TOKEN, embed_batch_size=2) as (
        client,
        engine,
        _,
    ):
        a = {"mode": "full", "items": _rows(12, "Garden", "a")}
        b = {"mode": "full", "items": _rows(12, "Kitchen", "b")}
        ra, rb = await asyncio.gather(
            client.post("/items/reindex", headers=admin(), json=a),
            client.post("/items/reindex", headers=admin(), json=b),
        )
        codes = sorted([ra.status_code, rb.status_code])
        assert codes == [202, 409], (ra.text, rb.text)
        won, lost = (ra, rb) if ra.status_code == 202 else (rb, ra)
        assert lost.json()["error"]["code"] == "conflict"
        assert lost.headers["retry-after"]
        assert lost.json()["error"]["details"]["job_id"] == won.json()["job_id"]
        # a third while the first runs is refused too; once it is done, the next is accepted
        r3 = await client.post("/items/reindex", headers=admin(), json=b)
        assert r3.status_code == 409
        job = await wait_job(client, won.json()["job_id"])
        assert job["state"] == "succeeded"
        # never interleaved: the live catalogue is exactly the accepted request's
        winner = a if won is ra else b
        assert sorted(it.item_id for it in engine.index.items) == sorted(
            r["item_id"] for r in winner["items"]
        )
        r4 = await client.post("/items/reindex", headers=admin(), json=b)
        assert r4.status_code == 202
        assert (await wait_job(client, r4.json()["job_id"]))["state"] == "succeeded"


# -- killed in the middle of a reindex ----------------------------------------------------------
_CHILD = textwrap.dedent("""
    import asyncio, json, os, signal, sys
    from pathlib import Path
    import faiss
    import service.index as index_mod
    from cprec.encoder import FakeEncoder
    from cprec.recommender import Recommender
    from service.engine import Engine
    from service.catalog import Item
    from service.settings import Settings

    store, catalog, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    async def main():
        s = Settings(store_dir=store, catalog_path=catalog, faiss_gpu=False, redis_url=None)
        eng = Engine(s, model=Recommender(FakeEncoder(), "kill-v1"))
        await eng.start()  # builds and saves the first snapshot from the catalogue
        print(json.dumps({"version": eng.index.version}), flush=True)
        if where == "mid-write":      # after the first index file is written
            real = faiss.write_index
            def write_then_die(idx, path):
                real(idx, path)
                die()
            faiss.write_index = write_then_die
        elif where == "before-current":  # new snapshot renamed in, CURRENT not yet moved
            index_mod.write_atomic = die
        elif where == "mid-embed":
            eng.model.encoder.core = die
        items = [Item(f"n{i}", "Kitchen", f"Kitchen thing {i}") for i in range(20)]
        job = eng.reindexer.submit("full", items=items)
        while job.state in ("queued", "running"):
            await asyncio.sleep(0.01)
        print("NOT KILLED", job.state, job.error, flush=True)

    asyncio.run(main())
""")


@pytest.mark.parametrize("where", ["mid-embed", "mid-write", "before-current"])
async def test_kill_mid_reindex_then_restart_loads_last_complete_index(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    store, catalog = tmp_path / "store", tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in _rows(6, "Garden", "g")))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(store), str(catalog), where],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    first = json.loads(proc.stdout.splitlines()[0])["version"]
    versions = store / "indexes" / "kill-v1" / "versions"
    leftovers = [p.name for p in versions.iterdir() if p.name.startswith(".tmp-")]
    if where == "mid-write":
        assert leftovers, "the kill should have left a half-written .tmp- directory"
    # restart: the last complete snapshot loads; the half-written one is cleaned up
    s = Settings(store_dir=store, catalog_path=catalog, faiss_gpu=False, redis_url=None)
    eng = Engine(s, model=Recommender(FakeEncoder(), "kill-v1"))
    await eng.start()
    try:
        assert eng.ready and eng.index is not None
        if where == "before-current":
            # both snapshots are complete; CURRENT still names the first, which is served
            assert len([p for p in versions.iterdir() if not p.name.startswith(".")]) == 2
        assert eng.index.version == first
        assert sorted(it.item_id for it in eng.index.items) == [f"g{i}" for i in range(6)]
        assert not [p for p in versions.iterdir() if p.name.startswith(".tmp-")]
        for p in versions.iterdir():  # whatever is left verifies
            ItemIndex.load(p)
    finally:
        await eng.stop()


# -- changed bytes ----------------------------------------------------------------------------
def _flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _build(store: Path, rows: list[dict[str, Any]], model_version: str = "fake-v1") -> ItemIndex:
    from service.catalog import Item

    items = [Item(r["item_id"], r["domain"], r["title"]) for r in rows]
    vecs = FakeEncoder().encode([f"{it.domain}: {it.title}" for it in items], "item")
    idx = ItemIndex.build(items, vecs, model_version)
    IndexStore(store / "indexes" / model_version).save(idx)
    return idx


@pytest.mark.parametrize(
    "victim", ["domain-0.faiss", "vectors.npy", "items.jsonl", "manifest.json"]
)
def test_changed_byte_in_index_is_refused_naming_the_file(
    tmp_path: Path, victim: str, caplog: pytest.LogCaptureFixture
) -> None:
    old = _build(tmp_path, _rows(4, "Garden", "o"))
    new = _build(tmp_path, _rows(4, "Kitchen", "n"))
    root = tmp_path / "indexes" / "fake-v1"
    if victim == "manifest.json":
        (root / "versions" / new.version / victim).write_text('{"version": ')  # torn
    else:
        _flip(
            root / "versions" / new.version / victim,
            offset=len((root / "versions" / new.version / victim).read_bytes()) // 2,
        )
        with pytest.raises(ArtifactError) as err:
            ItemIndex.load(root / "versions" / new.version)
        assert victim in str(err.value) and "checksum mismatch" in str(err.value)
        assert err.value.file == victim
    with caplog.at_level(logging.ERROR):
        loaded = IndexStore(root).load_latest()
    assert loaded is not None and loaded.version == old.version  # previous good one
    assert victim in caplog.text and new.version in caplog.text


async def test_only_index_corrupt_is_rebuilt_never_served(app_client: Any, tmp_path: Path) -> None:
    async with app_client(admin_token=TOKEN) as (_, engine, _e):
        first = engine.index.version
        store = engine.settings.store_dir
    vdir = store / "indexes" / "fake-v1" / "versions" / first
    _flip(vdir / "domain-0.faiss", offset=100)
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        assert engine.index.version != first  # rebuilt from the catalogue, not the corrupt one
        r = await client.get("/ready")
        assert r.status_code == 200 and r.json()["index_version"] == engine.index.version


@pytest.fixture
def corrupt_model_store(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (src / "model.safetensors").write_bytes(os.urandom(4096))
    store = ModelStore(tmp_path / "store")
    art = store.publish(
        src, {"base_model": "test", "pooling": "mean", "dim": 8}, aliases=("production",)
    )
    _flip(art.path / "model.safetensors", offset=2000)
    return tmp_path / "store"


def test_changed_byte_in_model_is_refused_naming_the_file(corrupt_model_store: Path) -> None:
    with pytest.raises(ArtifactError) as err:
        ModelStore(corrupt_model_store).load("production")
    assert err.value.file == "model.safetensors" and "checksum mismatch" in str(err.value)
    s = Settings(store_dir=corrupt_model_store, model="production", faiss_gpu=False)
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_model(s)  # refused before any weights are read


async def test_service_refuses_to_start_on_a_corrupt_model(
    corrupt_model_store: Path, tmp_path: Path
) -> None:
    from service.api import create_app

    catalog = tmp_path / "c.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in _rows(3)))
    s = Settings(
        store_dir=corrupt_model_store,
        model="production",
        faiss_gpu=False,
        catalog_path=catalog,
        redis_url=None,
    )
    app = create_app(s)
    engine: Engine = app.state.engine
    with pytest.raises(ArtifactError, match="model.safetensors"):
        async with app.router.lifespan_context(app):
            pass
    assert not engine.ready and engine.index is None
    assert engine.startup_error and "model.safetensors" in engine.startup_error
