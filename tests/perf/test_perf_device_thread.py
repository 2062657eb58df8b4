"""Every torch op of the service runs on one thread: the model load, the warm-up, the item
embeddings of the start-up index and the request forwards.

With the load on another thread, torch's libgomp held more OpenMP threads than the 2 CPUs and
stopped spin-waiting and every forward slowed (docs/decisions/003-serving-on-two-cores.md).
This pins the thread
placement that avoids it; the speed itself is a benchmark row, not a test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import service.engine as engine_mod
from cprec.encoder import FakeEncoder
from cprec.recommender import Recommender
from cprec.text import Template
from service.engine import Engine
from service.protocol import RecommendRequest, TitleEntry


class _ThreadRecorder(FakeEncoder):
    """A FakeEncoder that notes which thread ran each forward."""

    def __init__(self) -> None:
        super().__init__(dim=32)
        self.threads: set[int] = set()

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.threads.add(threading.get_ident())
        return super().core(batch)


@pytest.mark.parametrize("batching", [True, False])
async def test_load_and_forwards_share_one_thread(
    batching: bool, make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = _ThreadRecorder()
    load_threads: list[int] = []

    def fake_load(settings: Any) -> Recommender:
        load_threads.append(threading.get_ident())
        return Recommender(enc, "recorder-v1", Template())

    monkeypatch.setattr(engine_mod, "load_model", fake_load)
    engine = Engine(make_settings(batching=batching))  # no encoder: start() loads one
    await engine.start()
    try:
        assert engine.model_version == "recorder-v1"
        n_startup = enc.calls  # warm-up + the start-up index of the catalogue
        req = RecommendRequest(
            history=[TitleEntry(title="Espresso Coffee Pods", domain="Groceries")]
        )
        resp = await engine.recommend(req)
        assert resp.results["Groceries"] and not resp.cached
        assert enc.calls > n_startup >= 2
    finally:
        await engine.stop()
    assert len(load_threads) == 1
    assert load_threads[0] != threading.get_ident()  # off the event loop
    assert enc.threads == set(load_threads)
