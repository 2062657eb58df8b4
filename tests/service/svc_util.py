"""Helpers shared by the service tests (imported by name; tests/service is on sys.path)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
from testutil import free_port as free_port  # re-exported for the service tests
from testutil import wait_job as _wait_job

ADMIN_TOKEN = "test-admin-token-123"

# Titles share words inside a domain so the bag-of-words FakeEncoder ranks them meaningfully.
CATALOG: list[dict[str, Any]] = [
    {"item_id": "g1", "domain": "Groceries", "title": "Dark Roast Coffee Beans", "popularity": 50},
    {"item_id": "g2", "domain": "Groceries", "title": "Espresso Coffee Pods", "popularity": 80},
    {"item_id": "g3", "domain": "Groceries", "title": "Decaf Coffee Ground", "popularity": 10},
    {"item_id": "g4", "domain": "Groceries", "title": "Green Tea Bags", "popularity": 90},
    {"item_id": "g5", "domain": "Groceries", "title": "Organic Wildflower Honey", "popularity": 30},
    {"item_id": "g6", "domain": "Groceries", "title": "Oat Milk Barista Edition", "popularity": 20},
    {"item_id": "b1", "domain": "Books", "title": "The Coffee Lover Cookbook", "popularity": 5},
    {"item_id": "b2", "domain": "Books", "title": "A History of Tea", "popularity": 40},
    {"item_id": "b3", "domain": "Books", "title": "Space Opera Saga Volume One", "popularity": 70},
    {"item_id": "b4", "domain": "Books", "title": "Space Opera Saga Volume Two", "popularity": 60},
    {"item_id": "b5", "domain": "Books", "title": "Gardening for Beginners", "popularity": 15},
    {"item_id": "m1", "domain": "Movies", "title": "Space Battle Saga", "popularity": 25},
    {"item_id": "m2", "domain": "Movies", "title": "Coffee Shop Romance", "popularity": 35},
    {"item_id": "m3", "domain": "Movies", "title": "The Haunted Garden", "popularity": 45},
    {"item_id": "m4", "domain": "Movies", "title": "Tea Ceremony Documentary", "popularity": 55},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def wait_job(client: httpx.AsyncClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    return await _wait_job(client, job_id, admin(), timeout)


def publish_hier(
    store_dir: Path,
    lm_dir: Path,
    model: Any,
    version: str = "hier-v1",
    aliases: tuple[str, ...] = ("production",),
    **manifest: Any,
) -> Any:
    """Publish ``lm_dir`` (an HF folder) + ``model`` (a ``cprec.hier.HierRec``) as a ``hier``
    artifact: the LM at the version's root, the HierRec under ``hier/``, all under the manifest's
    checksums. Training does the same with ``ModelStore.publish(..., extra_files=...)``."""
    import tempfile

    from cprec.text import Template
    from model_store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save_pretrained(Path(tmp) / "hier")
        data: dict[str, Any] = {
            "version": version,
            "kind": "hier",
            "base_model": str(lm_dir),
            "pooling": "mean",
            "dim": model.cfg.dim,
            "max_length": 64,
            "template": Template().model_dump(),
            **manifest,
        }
        return ModelStore(store_dir).publish(
            lm_dir,
            data,
            aliases=aliases,
            extra_files={f"hier/{p.name}": p for p in sorted(saved.iterdir())},
        )


def retrained_lm(src: Path, out: Path, seed: int = 7) -> Path:
    """A copy of the HF folder ``src`` whose weights are all moved a little (a retrained LM:
    other files, other checksums, other vectors), tokenizer unchanged."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    state = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    moved = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous()
        if v.is_floating_point()
        else v
        for k, v in state.items()
    }
    save_file(moved, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# -- model rollout (tests/service/test_service_models.py, tests/reliability/test_rel_models.py) --
CPU = {"device": "cpu", "dtype": "float32"}


def publish_versions(store: Path, lm_dir: Path, work: Path) -> Path:
    """A store with ``hier-v1`` (alias ``production``), ``hier-v2`` (the same LM files, another
    user model: a retrain with a frozen LM) and ``hier-v3`` (a retrained LM)."""
    from testutil import tiny_hier

    publish_hier(store, lm_dir, tiny_hier(seed=1), version="hier-v1")
    publish_hier(store, lm_dir, tiny_hier(seed=2), version="hier-v2", aliases=())
    lm3 = retrained_lm(lm_dir, work / "lm-v3")
    publish_hier(store, lm3, tiny_hier(seed=3), version="hier-v3", aliases=())
    return store


def built_pairs(store: Path) -> set[tuple[str, str]]:
    """Every (model_version, index_version) a snapshot on disk was built for: the pairs a
    response may name."""
    return {
        (m.name, i.name)
        for m in (store / "indexes").iterdir()
        if (m / "versions").is_dir()
        for i in (m / "versions").iterdir()
        if not i.name.startswith(".")
    }


@asynccontextmanager
async def serve(settings: Any, **engine_kw: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """``async with serve(settings) as (client, engine)``: the app with its lifespan run, the
    model loaded by ``Engine.start`` (from the store unless ``model=`` is given)."""
    from service.api import create_app
    from service.engine import Engine

    engine = Engine(settings, **engine_kw)
    app = create_app(engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            yield c, engine


async def wait_model_job(
    client: httpx.AsyncClient,
    job_id: str,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """Poll ``GET /models/jobs/{job_id}`` until the job has succeeded or failed."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/models/jobs/{job_id}", headers=headers or admin())
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["state"] in ("succeeded", "failed"):
            return body
        assert time.monotonic() < deadline, f"model job {job_id} still {body['state']}"
        await asyncio.sleep(0.02)


@contextmanager
def worker_processes(
    tmp_path: Path,
    settings: dict[str, str],
    n: int = 2,
    timeout: float = 120,
    store: Path | None = None,
) -> Iterator[dict[int, httpx.Client]]:
    """``python -m service`` with ``CPREC_WORKERS=n`` on a free port (the demo CATALOG, the
    admin token, CPU, none of the caller's CPREC_* or REDIS_URL), yielding one keep-alive
    connection per worker by worker number (a connection stays with the worker that accepted
    it); SIGTERM at the end must stop them all with status 0."""
    import os
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPREC_") and k != "REDIS_URL"}
    env.update(
        {
            "CPREC_WORKERS": str(n),
            "CPREC_INDEX_SYNC_S": "0.2",
            "CPREC_STORE_DIR": str(store or tmp_path / "store"),
            "CPREC_CATALOG_PATH": str(write_jsonl(tmp_path / "catalog.jsonl", CATALOG)),
            "CPREC_ADMIN_TOKEN": ADMIN_TOKEN,
            "CPREC_DEVICE": "cpu",
            "CPREC_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            **settings,
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    clients: dict[int, httpx.Client] = {}
    try:
        clients = _meet_workers(proc, f"http://127.0.0.1:{port}", n, timeout)
        yield clients
        for c in clients.values():
            c.close()
        proc.send_signal(15)
        assert proc.wait(60) == 0
    finally:
        for c in clients.values():
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _meet_workers(proc: Any, base: str, n: int, timeout: float) -> dict[int, httpx.Client]:
    """A ready keep-alive connection to each of ``n`` workers (new connections land on
    whichever worker accepts first, so keep opening until each has been met)."""
    found: dict[int, httpx.Client] = {}
    deadline = time.monotonic() + timeout
    while len(found) < n:
        assert proc.poll() is None, f"service exited:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"met workers {sorted(found)} of {n}"
        c = httpx.Client(base_url=base, timeout=30)
        try:
            r = c.get("/ready")
            w = r.json().get("worker") if r.status_code == 200 else None
        except (httpx.TransportError, json.JSONDecodeError):
            w = None
        if w is not None and w not in found:
            found[w] = c
        else:
            c.close()
            time.sleep(0.05)
    return found
