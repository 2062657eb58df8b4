"""A full reindex under concurrent /recommend traffic loses no request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from svc_util import admin, wait_job

N_NEW = 3000
WORDS = (
    "coffee tea honey space saga garden mystery robot ocean mountain violin "
    "pepper candle puzzle lantern"
).split()


def _item(i: int) -> dict[str, Any]:
    title = f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} edition {i}"
    return {
        "item_id": f"new-{i}",
        "domain": ("Alpha", "Beta", "Gamma")[i % 3],
        "title": title,
        "popularity": i % 17,
    }


@pytest.mark.slow
async def test_full_reindex_during_traffic_loses_no_request(app_client: Callable[..., Any]) -> None:
    items = [_item(i) for i in range(N_NEW)]
    async with app_client(embed_batch_size=32) as (client, engine, enc):
        old_version = engine.index.version
        statuses: list[int] = []
        versions: set[str] = set()
        stop = asyncio.Event()

        async def user(n: int) -> None:
            hist = [{"title": f"{WORDS[n]} lover {n}", "domain": "Groceries"}]
            i = 0
            while not stop.is_set():
                body: dict[str, Any] = {
                    "history": hist + [{"title": f"thing {i}", "domain": "Books"}],
                    "k": 5,
                }
                r = await client.post("/recommend", json=body)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["index_version"])
                i += 1
                await asyncio.sleep(0)

        users = [asyncio.create_task(user(n)) for n in range(8)]
        await asyncio.sleep(0.1)
        r = await client.post(
            "/items/reindex", json={"mode": "full", "items": items}, headers=admin()
        )
        assert r.status_code == 202, r.text
        calls_before = enc.calls
        t0 = time.monotonic()
        done = await wait_job(client, r.json()["job_id"], timeout=120)
        took = time.monotonic() - t0
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*users)

        assert done["state"] == "succeeded", done
        assert done["total"] == N_NEW and done["embedded"] == N_NEW
        assert enc.calls - calls_before >= N_NEW // 32  # embedded in batches on the device
        assert len(statuses) >= 16 and set(statuses) == {200}, set(statuses)
        # Traffic was served by the old index during the job and by the new one after it.
        assert old_version in versions and done["index_version"] in versions, (versions, took)
        r = await client.post(
            "/recommend",
            json={"history": [{"item_id": "new-5"}], "target_domains": ["Gamma"], "k": 3},
        )
        assert r.status_code == 200
        got = [x["item_id"] for x in r.json()["results"]["Gamma"]]
        assert len(got) == 3 and all(g.startswith("new-") for g in got)
        ready = (await client.get("/ready")).json()
        assert ready["domains"] == {"Alpha": 1000, "Beta": 1000, "Gamma": 1000}
