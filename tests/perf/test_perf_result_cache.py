"""A repeated /recommend is answered from the ranked-list cache: no cache round-trip, no search,
the same answer; anything that shapes an answer (k, targets, exclusions, the index snapshot)
makes a new entry (perf, issue 5: the search dominated a cache hit on the 36k FK catalogue)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from svc_util import CATALOG, admin, wait_job

from service.cache import RankedLists
from service.index import ItemIndex

COFFEE = {"title": "Dark Roast Coffee Beans", "domain": "Groceries"}


class _Spy:
    """Counts faiss searches and user-vector cache lookups of one engine."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.searches = 0
        self.lookups = 0
        real_search, real_get = ItemIndex.search, engine.cache.get

        def search(idx: ItemIndex, *a: Any, **k: Any) -> Any:
            self.searches += 1
            return real_search(idx, *a, **k)

        async def get(key: str) -> Any:
            self.lookups += 1
            return await real_get(key)

        monkeypatch.setattr(ItemIndex, "search", search)
        monkeypatch.setattr(engine.cache, "get", get)


def _results(engine: Any, label: str) -> float:
    return float(engine.metrics.results.labels(label)._value.get())


async def test_a_repeated_request_skips_cache_and_search(
    app_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with app_client() as (client, engine, enc):
        spy = _Spy(engine, monkeypatch)
        req = {"history": [COFFEE, {"item_id": "b2"}], "k": 3}
        first = await client.post("/recommend", json=req)
        assert (spy.lookups, spy.searches) == (1, 3)  # one vector lookup, one search per domain
        forwards = enc.calls
        second = await client.post("/recommend", json=req)
        assert second.status_code == 200 and second.json()["cached"] is True
        assert first.json()["results"] == second.json()["results"]
        assert (spy.lookups, spy.searches, enc.calls) == (1, 3, forwards)
        assert (_results(engine, "hit"), _results(engine, "miss")) == (1.0, 1.0)
        m = (await client.get("/metrics")).text
        assert 'cprec_result_cache_total{result="hit"} 1.0' in m


@pytest.mark.parametrize(
    "change",
    [
        {"k": 2},
        {"target_domains": ["Books"]},
        {"exclude_history": False},
    ],
)
async def test_what_shapes_an_answer_makes_a_new_entry(
    app_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, change: dict[str, Any]
) -> None:
    async with app_client() as (client, engine, _):
        base = {"history": [COFFEE], "k": 3, "target_domains": ["Groceries", "Books"]}
        first = (await client.post("/recommend", json=base)).json()
        spy = _Spy(engine, monkeypatch)
        other = await client.post("/recommend", json={**base, **change})
        assert other.status_code == 200
        # The vector comes from the cache, the answer from a fresh search.
        assert other.json()["cached"] is True and spy.lookups == 1 and spy.searches >= 1
        if "exclude_history" in change:  # the history item itself may now be recommended
            assert "g1" in [x["item_id"] for x in other.json()["results"]["Groceries"]]
            assert "g1" not in [x["item_id"] for x in first["results"]["Groceries"]]
        else:
            want_k = change.get("k", 3)
            assert all(len(v) == want_k for v in other.json()["results"].values())


async def test_a_reindex_swap_empties_it(
    app_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with app_client() as (client, engine, _):
        req = {"history": [COFFEE], "k": 2, "target_domains": ["Groceries"]}
        before = (await client.post("/recommend", json=req)).json()
        assert len(engine.ranked) == 1
        # A new catalogue whose best coffee match is a new item.
        items = [
            *CATALOG,
            {
                "item_id": "g9",
                "domain": "Groceries",
                "title": "Dark Roast Coffee Beans Extra Dark",
                "popularity": 1,
            },
        ]
        r = await client.post(
            "/items/reindex", json={"mode": "full", "items": items}, headers=admin()
        )
        assert (await wait_job(client, r.json()["job_id"]))["state"] == "succeeded"
        assert len(engine.ranked) == 0
        spy = _Spy(engine, monkeypatch)
        after = (await client.post("/recommend", json=req)).json()
        assert spy.searches == 1 and after["index_version"] != before["index_version"]
        assert "g9" in [x["item_id"] for x in after["results"]["Groceries"]]


async def test_size_zero_turns_it_off(
    app_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with app_client(result_cache_size=0) as (client, engine, _):
        spy = _Spy(engine, monkeypatch)
        req = {"history": [COFFEE], "k": 2, "target_domains": ["Groceries"]}
        for _ in range(3):
            assert (await client.post("/recommend", json=req)).status_code == 200
        assert (spy.lookups, spy.searches, len(engine.ranked)) == (3, 3, 0)


def test_ranked_lists_are_a_bounded_lru() -> None:
    lists = RankedLists(2)
    keys = [RankedLists.key("v1", f"u{i}", ["A"], 10, {i}) for i in range(3)]
    for i, k in enumerate(keys[:2]):
        lists.put(k, {"A": [(i, 1.0)]})
    assert lists.get(keys[0]) == {"A": [(0, 1.0)]}  # keys[0] is now the most recent
    lists.put(keys[2], {"A": [(2, 1.0)]})
    assert lists.get(keys[1]) is None and lists.get(keys[0]) is not None and len(lists) == 2
    # exclusions are part of the key, in any order; another snapshot version is another key
    assert RankedLists.key("v1", "u", ["A"], 10, {1, 2}) == RankedLists.key(
        "v1", "u", ["A"], 10, {2, 1}
    )
    assert RankedLists.key("v2", "u", ["A"], 10, set()) != RankedLists.key(
        "v1", "u", ["A"], 10, set()
    )
