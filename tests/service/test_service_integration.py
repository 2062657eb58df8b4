"""Real bundled models through the real app, and a real Redis (marked integration)."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cprec.hier import ZS_POP_WEIGHT
from cprec.recommender import Recommender
from service.api import create_app
from service.engine import Engine
from service.settings import DEMO_CATALOG, Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
async def minilm_app(
    minilm_store: Path, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Engine]]:
    settings = Settings(
        store_dir=minilm_store,
        base_model="minilm-l6",
        model="production",
        catalog_path=DEMO_CATALOG,
        device="cpu",
        dtype="float32",
        faiss_gpu=False,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        tuning={"redis_timeout_s": 1.0},
        admin_token=None,
    )
    engine = Engine(settings)
    app = create_app(engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            yield c, engine


def _titles(body: dict[str, Any], domain: str) -> list[str]:
    return [r["title"] for r in body["results"][domain]]


async def test_minilm_coffee_history_recommends_coffee_groceries(
    minilm_app: tuple[httpx.AsyncClient, Engine],
) -> None:
    client, engine = minilm_app
    assert engine.model_version == "base-minilm-l6" and engine.encoder.dim == 384
    assert engine.scorer == "mean"  # the zero-shot default: no trained model in the store
    ready = (await client.get("/ready")).json()
    assert set(ready["domains"]) == {"Games", "Groceries", "Kitchen", "Movies", "Office"}
    hist = [
        {"title": "Colombian Medium Roast Ground Coffee, 12 oz", "domain": "Groceries"},
        {"title": "Espresso Whole Bean Coffee, Dark Roast", "domain": "Groceries"},
        {"title": "Stainless Steel Pour Over Coffee Dripper", "domain": "Kitchen"},
    ]
    r = await client.post(
        "/recommend", json={"history": hist, "k": 5, "target_domains": ["Groceries", "Kitchen"]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    groceries = _titles(body, "Groceries")
    coffeeish = [
        t
        for t in groceries
        if any(w in t.lower() for w in ("coffee", "espresso", "roast", "brew", "bean"))
    ]
    assert len(coffeeish) >= 3, groceries
    assert any("coffee" in t.lower() or "espresso" in t.lower() for t in groceries[:2]), groceries
    scores = [x["score"] for x in body["results"]["Groceries"]]
    # A cosine plus the popularity prior (cprec.hier.zero_shot_items).
    rows = [json.loads(line) for line in DEMO_CATALOG.read_text().splitlines() if line.strip()]
    top = 1.0 + ZS_POP_WEIGHT * math.log1p(max(r.get("popularity", 0) for r in rows))
    assert all(-1.0 <= s <= top for s in scores) and scores == sorted(scores, reverse=True)


async def test_minilm_by_id_and_redis_cache(
    minilm_app: tuple[httpx.AsyncClient, Engine], redis_url: str, redis_prefix: str
) -> None:
    import redis.asyncio as aioredis

    client, engine = minilm_app
    assert engine.cache.kind == "redis"
    first_id = engine.index.items[engine.index.rows_by_domain["Movies"][0]].item_id
    req = {
        "history": [
            {"item_id": first_id},
            {"title": f"unique title {uuid.uuid4().hex}", "domain": "Movies"},
        ]
    }
    a = await client.post("/recommend", json=req)
    b = await client.post("/recommend", json=req)
    assert a.status_code == b.status_code == 200
    assert a.json()["cached"] is False and b.json()["cached"] is True
    assert first_id not in [x["item_id"] for x in a.json()["results"]["Movies"]]
    raw = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in raw.scan_iter(match=f"{redis_prefix}:uv:base-minilm-l6:*")]
        assert keys
        ttl = await raw.ttl(keys[0])
        assert 0 < ttl <= engine.settings.cache_ttl_s
        # One zero-shot query per (history, target domain): a unit mean, then the prior's 1.
        vec = np.frombuffer(await raw.get(keys[0]), dtype=np.float32)
        assert vec.shape == (385,) and abs(float(np.linalg.norm(vec[:384])) - 1.0) < 1e-4
        assert vec[384] == 1.0
    finally:
        await raw.aclose()


async def test_app_serves_when_redis_is_down(make_settings: Any) -> None:
    """An unreachable Redis: requests are answered uncached and the error metric counts it."""
    from svc_util import free_port

    from cprec.encoder import FakeEncoder

    settings = make_settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_timeout_s=0.05,
        redis_retry_s=30,
        result_cache_size=0,
    )  # the repeat must reach the cache
    app = create_app(engine=Engine(settings, model=Recommender(FakeEncoder(), "fake-v1")))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            req = {"history": [{"item_id": "g1"}]}
            for _ in range(2):
                r = await c.post("/recommend", json=req)
                assert r.status_code == 200 and r.json()["cached"] is False
            m = (await c.get("/metrics")).text
            assert 'cprec_cache_total{result="error"}' in m
            assert 'cprec_cache_total{result="miss"} 2.0' in m


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cprec.lm import bundled_dir

    return bundled_dir("smollm2-135m", tmp_path_factory.mktemp("smollm-cache"))


def test_smollm2_last_token_unit_vectors(smollm_dir: Path) -> None:
    from cprec.encoder import HFEncoder
    from cprec.lm import detect_pooling

    assert (smollm_dir / "model.safetensors").is_file()
    assert detect_pooling(smollm_dir) == "last"
    enc = HFEncoder(
        smollm_dir, pooling="last", is_decoder=True, max_length=64, device="cpu", dtype="float32"
    )
    assert enc.dim == 576
    texts = ["Groceries: dark roast coffee beans", "Games: space strategy saga; Movies: alien"]
    ids = enc.pre(texts, "query")
    assert all(x[-1] == enc.tokenizer.tok.eos_token_id for x in ids)
    out = enc.encode(texts, "query")
    assert out.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    single = enc.encode(texts[:1], "query")[0]
    assert float(single @ out[0]) > 1 - 1e-4  # padding in the batch changed nothing
    assert float(out[0] @ out[1]) < 0.9999
    # A second call finds the converted folder and does not convert again.
    from cprec.lm import bundled_dir

    mtime = (smollm_dir / "model.safetensors").stat().st_mtime
    assert bundled_dir("smollm2-135m", smollm_dir.parent.parent) == smollm_dir
    assert (smollm_dir / "model.safetensors").stat().st_mtime == mtime
