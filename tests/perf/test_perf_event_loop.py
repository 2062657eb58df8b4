"""The forward pass runs off the event loop: while it is in progress, /live answers.

A blocking encoder holds its forward until the test releases it; if the forward (or its
tokenisation) ran on the event loop, /live could not answer and the test would time out.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from cprec.encoder import FakeEncoder


class BlockingEncoder(FakeEncoder):
    def __init__(self) -> None:
        super().__init__(dim=512)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.block = False

    def core(self, batch: Any) -> np.ndarray:
        if self.block:
            self.entered.set()
            self.release.wait(30)
        return super().core(batch)


@pytest.mark.parametrize("batching", [True, False])
async def test_live_answers_during_forward(app_client: Any, batching: bool) -> None:
    enc = BlockingEncoder()
    async with app_client(encoder=enc, batching=batching) as (client, _engine, _):
        enc.block = True
        rec = asyncio.create_task(
            client.post(
                "/recommend", json={"history": [{"domain": "Books", "title": "Space Opera Saga"}]}
            )
        )
        assert await asyncio.to_thread(enc.entered.wait, 10)
        try:
            for _ in range(5):
                r = await asyncio.wait_for(client.get("/live"), 5)
                assert r.status_code == 200
            assert not rec.done()  # the forward is still held
        finally:
            enc.release.set()
        assert (await asyncio.wait_for(rec, 10)).status_code == 200


async def test_requests_take_no_thread_pool_hop(app_client: Any, monkeypatch: Any) -> None:
    """The route dependencies are ``async``: FastAPI would run a plain ``def`` dependency in its
    thread pool, one thread hop per request just to read ``app.state.engine``."""
    import fastapi.dependencies.utils as dep_utils
    from svc_util import ADMIN_TOKEN

    hops: list[Any] = []
    real = dep_utils.run_in_threadpool

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(dep_utils, "run_in_threadpool", counting)
    async with app_client() as (client, _engine, _):
        r = await client.post(
            "/recommend", json={"history": [{"domain": "Books", "title": "Space Opera Saga"}]}
        )
        assert r.status_code == 200, r.text
        r = await client.get(
            "/items/reindex/nope", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert r.status_code == 404, r.text
    assert hops == []
