"""The engine as a library: no HTTP, plain results, domain errors that say nothing of statuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from svc_util import CATALOG

from cprec.encoder import FakeEncoder
from cprec.recommender import Recommender
from service.engine import Engine
from service.errors import NotReady, ServiceError, ValidationFailed
from service.protocol import RecommendRequest, TitleEntry
from service.recommend import Recommendation


async def test_recommend_without_http(make_settings: Callable[..., Any]) -> None:
    engine = Engine(make_settings(), model=Recommender(FakeEncoder(dim=64), "lib-v1"))
    req = RecommendRequest(history=[TitleEntry(title="Espresso Coffee Pods", domain="Groceries")])
    with pytest.raises(NotReady):
        await engine.recommend(req)  # not started: no snapshot to answer from
    await engine.start()
    try:
        rec = await engine.recommend(req)
        assert isinstance(rec, Recommendation) and rec.model_version == "lib-v1"
        groceries = [it.item_id for it in rec.results["Groceries"]]
        assert groceries[0] in {"g1", "g3"} and "g2" not in groceries  # coffee first, g2 is seen
        assert set(rec.results) == {r["domain"] for r in CATALOG}
        with pytest.raises(ValidationFailed) as err:
            await engine.recommend(RecommendRequest(target_domains=["Toys"]))
        assert err.value.details["field"] == "target_domains"
        assert not hasattr(err.value, "http_status")  # statuses are the HTTP layer's
        assert all(not hasattr(cls, "http_status") for cls in ServiceError.__subclasses__())
    finally:
        await engine.stop()


async def test_store_model_refuses_base_model_settings(
    tmp_path: Any, tiny_bert_dir: Any, make_settings: Callable[..., Any]
) -> None:
    """CPREC_MAX_LENGTH would not shape a store model (its manifest fixes it): start refuses."""
    from model_store import ModelStore
    from service.engine import load_model

    store = tmp_path / "store"
    manifest = {"version": "flat-v1", "base_model": "t", "pooling": "mean", "dim": 32}
    ModelStore(store).publish(tiny_bert_dir, manifest, aliases=("production",))
    kw = {"store_dir": store, "device": "cpu", "dtype": "float32"}
    assert load_model(make_settings(**kw)).version == "flat-v1"
    with pytest.raises(ValueError, match="CPREC_MAX_LENGTH cannot take effect"):
        load_model(make_settings(max_length=64, **kw))
