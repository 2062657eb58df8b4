"""Model rollout faults (issue 19, "Reliability"): a reload that fails at any step (a version
that does not verify, a truncated or missing file, a model that does not load, an index build
error, a failed warm-up, the process killed mid-build) leaves the old model serving and says
why; under load a good switch, a rollback and a failed switch lose no request, and every answer
names a model and index that were built together; the model routes are admin-only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rel_util import TOKEN, admin
from svc_util import (
    CATALOG,
    CPU,
    built_pairs,
    publish_hier,
    publish_versions,
    serve,
    wait_model_job,
    write_jsonl,
)
from testutil import tiny_hier

from model_store import ModelStore
from service.engine import Engine
from service.rollout import Serving
from service.settings import Settings

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
MODEL_ROUTES = [
    ("GET", "/models"),
    ("POST", "/models/reload"),
    ("POST", "/models/rollback"),
    ("GET", "/models/jobs/abc"),
]


@pytest.fixture
def store(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    return publish_versions(tmp_path / "store", tiny_bert_dir, tmp_path)


@pytest.fixture
def settings(make_settings: Callable[..., Any], store: Path) -> Callable[..., Any]:
    def make(**kw: Any) -> Any:
        return make_settings(store_dir=store, admin_token=TOKEN, **{**CPU, **kw})

    return make


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _device_threads() -> int:
    return sum(t.name.startswith("cprec-device") for t in threading.enumerate())


async def _post_reload(client: Any, model: str) -> dict[str, Any]:
    r = await client.post("/models/reload", json={"model": model}, headers=admin())
    assert r.status_code == 202, r.text
    return await wait_model_job(client, r.json()["job_id"], admin())


def _break(case: str, store: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, str]:
    """Break ``hier-v2`` (or the step that loads it) as ``case`` says: (the version to reload,
    the failing step, what the job's error must name)."""
    v2 = store / "versions" / "hier-v2"
    if case == "checksum":
        _flip(v2 / "model.safetensors")
        return "hier-v2", "verify", "model.safetensors: checksum mismatch"
    if case == "truncated":
        f = v2 / "hier" / "hier.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return "hier-v2", "verify", "hier.safetensors"
    if case == "missing-file":
        (v2 / "tokenizer.json").unlink()
        return "hier-v2", "verify", "tokenizer.json"
    if case == "does-not-load":  # verifies, but its user model does not fit its manifest
        lm = store.parent / "lm-v3"
        publish_hier(store, lm, tiny_hier(seed=4), version="hier-bad", aliases=(), dim=8)
        return "hier-bad", "load", "dim 8"
    if case == "index-build":
        from service.reindex import Reindexer

        def disk_full(self: Any, *a: Any, **k: Any) -> Any:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Reindexer, "build_and_save", disk_full)
        return "hier-v3", "index", "No space left on device"
    if case == "warm-up":
        import service.rollout as rollout

        async def cold(*a: Any, **k: Any) -> None:
            raise RuntimeError("warm-up request failed")

        monkeypatch.setattr(rollout, "warm", cold)
        return "hier-v2", "warm", "warm-up request failed"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["checksum", "truncated", "missing-file", "does-not-load", "index-build", "warm-up"]
)
async def test_a_failed_reload_leaves_the_old_model_serving(
    settings: Callable[..., Any], store: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(settings()) as (client, engine):
        before = (engine.model_version, engine.index.version)
        threads = _device_threads()
        version, step, named = _break(case, store, monkeypatch)
        job = await _post_reload(client, version)
        assert job["state"] == "failed", job
        assert job["step"] == step and named in job["error"], job
        assert (engine.model_version, engine.index.version) == before
        r = await client.post("/recommend", json={"history": [{"item_id": "g1"}], "k": 3})
        assert r.status_code == 200
        assert (r.json()["model_version"], r.json()["index_version"]) == before
        assert Serving.read(store) is None  # nothing recorded for other processes to follow
        deadline = time.monotonic() + 10
        while _device_threads() != threads:  # the half-built generation was closed
            assert time.monotonic() < deadline, (_device_threads(), threads)
            await asyncio.sleep(0.02)
        assert not [
            p
            for p in (store / "indexes").rglob(".tmp-*")  # nothing half-written left behind
        ]
        view = (await client.get("/models", headers=admin())).json()
        assert view["served"]["version"] == "hier-v1" and view["job"]["state"] == "failed"
        failed = {"state": "failed"}
        assert engine.metrics.registry.get_sample_value("cprec_model_jobs_total", failed) == 1


async def test_switch_rollback_and_failed_switch_under_load_lose_nothing(
    settings: Callable[..., Any], store: Path, tiny_bert_dir: Path
) -> None:
    """Eight clients in a closed loop (histories by id and by title, so forwards and cache
    hits) while the model switches to a retrained LM, rolls back, and fails to switch to a
    corrupt version: every answer is a 200 naming a (model, index) pair built together."""
    publish_hier(store, tiny_bert_dir, tiny_hier(seed=5), version="hier-v4", aliases=())
    _flip(store / "versions" / "hier-v4" / "hier" / "hier.safetensors")
    answers: list[tuple[float, int, str, str]] = []
    stop = asyncio.Event()
    async with serve(settings()) as (client, engine):

        async def user(n: int) -> None:
            i = 0
            while not stop.is_set():
                hist: list[dict[str, str]] = [
                    {"item_id": CATALOG[(n + i) % len(CATALOG)]["item_id"]}
                ]
                if i % 2:
                    hist.append({"title": f"saga number {n}-{i % 7}", "domain": "Books"})
                r = await client.post("/recommend", json={"history": hist, "k": 5})
                body = r.json() if r.status_code == 200 else {}
                answers.append(
                    (
                        time.monotonic(),
                        r.status_code,
                        body.get("model_version", ""),
                        body.get("index_version", ""),
                    )
                )
                i += 1

        users = [asyncio.create_task(user(n)) for n in range(8)]
        marks = [time.monotonic()]
        try:
            await asyncio.sleep(0.2)
            good = await _post_reload(client, "hier-v3")
            marks.append(time.monotonic())
            r = await client.post("/models/rollback", headers=admin())
            back = await wait_model_job(client, r.json()["job_id"], admin())
            marks.append(time.monotonic())
            bad = await _post_reload(client, "hier-v4")
            marks.append(time.monotonic())
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.gather(*users)
        assert good["state"] == "succeeded", good
        assert back["state"] == "succeeded" and back["model_version"] == "hier-v1", back
        assert bad["state"] == "failed" and "hier.safetensors" in bad["error"], bad
        assert engine.model_version == "hier-v1"
    statuses = {s for _, s, _, _ in answers}
    assert statuses == {200}, statuses
    pairs = {(m, i) for _, _, m, i in answers}
    assert pairs <= built_pairs(store), pairs - built_pairs(store)
    assert {m for m, _ in pairs} == {"hier-v1", "hier-v3"}
    for a, b in zip(marks, marks[1:], strict=False):  # traffic during each job
        assert sum(a <= t < b for t, *_ in answers) > 0


async def test_a_watched_alias_on_a_bad_version_is_tried_once(
    settings: Callable[..., Any], store: Path
) -> None:
    _flip(store / "versions" / "hier-v2" / "model.safetensors")
    async with serve(settings(model_watch_s=0.05)) as (client, engine):
        ModelStore(store).set_alias("production", "hier-v2")
        deadline = time.monotonic() + 20
        while not engine.rollout.jobs or engine.rollout.active() is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.4)  # several more polls: no retry of the same version
        jobs = list(engine.rollout.jobs.values())
        assert len(jobs) == 1 and jobs[0].state == "failed" and jobs[0].action == "watch"
        assert "model.safetensors" in (jobs[0].error or "")
        assert engine.model_version == "hier-v1"
        r = await client.post("/recommend", json={"history": [{"item_id": "g1"}]})
        assert r.status_code == 200 and r.json()["model_version"] == "hier-v1"
        ModelStore(store).set_alias("production", "hier-v3")  # a fixed release: rolled out
        while engine.model_version != "hier-v3":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)


async def test_start_serves_a_version_that_loads(settings: Callable[..., Any], store: Path) -> None:
    """SERVING names a version that no longer verifies: the start serves the configured one;
    an alias moved to a corrupt version: the start keeps what SERVING names."""
    async with serve(settings()) as (client, _):
        assert (await _post_reload(client, "hier-v2"))["state"] == "succeeded"
    _flip(store / "versions" / "hier-v2" / "model.safetensors")
    async with serve(settings()) as (_, engine):
        assert engine.model_version == "hier-v1"
    async with serve(settings()) as (client, _):
        assert (await _post_reload(client, "hier-v3"))["state"] == "succeeded"
    ModelStore(store).set_alias("production", "hier-v2")  # corrupt
    async with serve(settings()) as (client, engine):
        assert engine.model_version == "hier-v3"
        r = await client.post("/recommend", json={"history": [{"item_id": "g1"}]})
        assert r.status_code == 200 and r.json()["model_version"] == "hier-v3"


# -- killed in the middle of a switch -----------------------------------------------------------
_CHILD = textwrap.dedent("""
    import asyncio, json, os, signal, sys
    from pathlib import Path
    import faiss
    import service.rollout as rollout
    from service.engine import Engine
    from service.reindex import Reindexer
    from service.settings import Settings

    store, catalog, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    async def main():
        s = Settings(store_dir=store, catalog_path=catalog, faiss_gpu=False, redis_url=None,
                     device="cpu", dtype="float32")
        eng = Engine(s)
        await eng.start()
        print(json.dumps({"model": eng.model_version, "index": eng.index.version}), flush=True)
        if where == "mid-embed":  # the retrained LM encodes the catalogue
            async def embed(*a, **k):
                die()
            Reindexer.embed_items = embed
        elif where == "mid-write":  # after the first index file of the new snapshot
            real = faiss.write_index
            def write_then_die(idx, path):
                real(idx, path)
                die()
            faiss.write_index = write_then_die
        elif where == "after-swap":  # served here, not yet recorded in SERVING
            rollout.Serving.write = die
        job = eng.rollout.reload("hier-v3")
        while job.state in ("queued", "running"):
            await asyncio.sleep(0.01)
        print("NOT KILLED", job.state, job.error, flush=True)

    asyncio.run(main())
""")


@pytest.mark.parametrize("where", ["mid-embed", "mid-write", "after-swap"])
async def test_killed_mid_switch_restarts_on_the_old_model(
    tmp_path: Path, store: Path, where: str
) -> None:
    catalog = write_jsonl(tmp_path / "catalog.jsonl", CATALOG)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(store), str(catalog), where],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    first = json.loads(proc.stdout.splitlines()[0])
    assert first["model"] == "hier-v1"
    if where == "mid-write":
        assert list((store / "indexes" / "hier-v3" / "versions").glob(".tmp-*"))
    s = Settings(
        store_dir=store,
        catalog_path=catalog,
        faiss_gpu=False,
        redis_url=None,
        admin_token=TOKEN,
        **CPU,
    )
    async with serve(s) as (client, engine):
        assert isinstance(engine, Engine)
        assert (engine.model_version, engine.index.version) == (first["model"], first["index"])
        r = await client.post("/recommend", json={"history": [{"item_id": "g1"}]})
        assert r.status_code == 200 and r.json()["model_version"] == "hier-v1"
        job = await _post_reload(client, "hier-v3")  # and the switch can be made again
        assert job["state"] == "succeeded", job
        leftovers = list((store / "indexes" / "hier-v3" / "versions").glob(".tmp-*"))
        assert not leftovers


# -- the admin boundary ---------------------------------------------------------------------
async def test_model_routes_are_admin_only(app_client: Any) -> None:
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        for method, path in MODEL_ROUTES:
            r = await client.request(method, path)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            r = await client.request(method, path, headers=admin("wrong-token-456"))
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert not engine.rollout.jobs
    async with app_client(admin_token=None) as (client, engine, _):
        for method, path in MODEL_ROUTES:
            r = await client.request(method, path, headers=admin())
            assert r.status_code == 403, (method, path, r.text)
            assert "CPREC_ADMIN_TOKEN" in r.json()["error"]["message"]
