"""The hier and mean scorers, held to their offline definitions in ``cprec.hier``.

A tiny random HierRec over the tiny random BERT is published as a ``hier`` artifact and served;
its user vectors and rankings must be what ``HierRec.encode_histories`` / ``item_vectors`` give
over LM vectors computed offline with the same encoder. Without an artifact, a base model is
served zero-shot with ``zero_shot_query`` / ``zero_shot_items``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import testutil
import torch
from svc_util import CATALOG, admin, publish_hier, wait_job

from cprec.encoder import HFEncoder
from cprec.hier import HierRec, zero_shot_items, zero_shot_query
from cprec.text import Behaviour, Template
from model_store import ArtifactError, ModelStore
from service.api import create_app
from service.engine import Engine, load_model
from service.protocol import RecommendRequest

DOMAINS = ["Books", "Groceries", "Movies"]
# g1..m1 are in the catalogue; zz-9 is not yet (a reindex adds it); the rest were never trained.
RESIDUAL_IDS = ["g1", "g2", "b3", "m1", "zz-9"]
MAX_LEN = 4
TEMPLATE = Template()
CPU = {"device": "cpu", "dtype": "float32"}


def tiny_hier(seed: int = 1) -> HierRec:
    return testutil.tiny_hier(
        max_len=MAX_LEN, domains=tuple(DOMAINS), residual_ids=tuple(RESIDUAL_IDS), seed=seed
    )  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def offline_encoder(tiny_bert_dir: Path) -> HFEncoder:
    return HFEncoder(tiny_bert_dir, "mean", False, max_length=64, device="cpu", dtype="float32")


def lm_of(enc: HFEncoder, pairs: list[tuple[str, str]]) -> np.ndarray:
    """[N, 32] LM vectors of (domain, title) pairs as item texts, encoded one by one."""
    texts = [TEMPLATE.render_item(d, t) for d, t in pairs]
    return np.stack([enc.encode([t], "item")[0] for t in texts])


def catalogue_item(item_id: str) -> dict[str, Any]:
    return next(r for r in CATALOG if r["item_id"] == item_id)


def offline_user(model: HierRec, lm: np.ndarray, ids: list[str | None], domains: list[str]):  # type: ignore[no-untyped-def]
    lm, ids, domains = lm[-MAX_LEN:], ids[-MAX_LEN:], domains[-MAX_LEN:]  # the most recent
    rows = torch.tensor([model.residual_row.get(i, 0) if i else 0 for i in ids])
    with torch.inference_mode():
        return (
            model.encode_histories(
                torch.from_numpy(lm)[None],
                rows[None],
                model.domain_ids(domains)[None],
                torch.tensor([len(ids)]),
            )[0]
            .numpy()
            .astype(np.float32)
        )


def offline_rows(model: HierRec, enc: HFEncoder, item_ids: list[str]) -> np.ndarray:
    items = [catalogue_item(i) for i in item_ids]
    lm = lm_of(enc, [(r["domain"], r["title"]) for r in items])
    with torch.inference_mode():
        v = model.item_vectors(torch.from_numpy(lm), model.residual_rows_for(item_ids))
    return v.numpy()


def ranking(u: np.ndarray, rows: np.ndarray, ids: list[str], drop: set[str]) -> list[str]:
    scores = rows @ u
    order = sorted(range(len(ids)), key=lambda i: -scores[i])
    return [ids[i] for i in order if ids[i] not in drop][:10]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
def hier_store(tmp_path: Path, tiny_bert_dir: Path) -> tuple[Path, HierRec]:
    model = tiny_hier()
    store = tmp_path / "store"
    publish_hier(store, tiny_bert_dir, model)
    return store, model


@pytest.fixture
def served(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    """``async with served(**settings) as (client, engine)``: the app with ``start`` loading
    the model from the store (no injected encoder)."""

    @asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Engine]]:
        engine = Engine(make_settings(**{**CPU, **overrides}))
        app = create_app(engine=engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                yield c, engine

    return make


def _ids(body: dict[str, Any], domain: str) -> list[str]:
    return [r["item_id"] for r in body["results"][domain]]


async def test_hier_user_vector_and_ranking_match_the_offline_model(
    hier_store: tuple[Path, HierRec], served: Callable[..., Any], offline_encoder: HFEncoder
) -> None:
    store, model = hier_store
    async with served(store_dir=store, result_cache_size=0) as (client, engine):
        assert engine.scorer == "hier" and engine.model_version == "hier-v1"
        idx = engine.index
        assert idx.dim == 16 and idx.lm_vectors.shape == (len(CATALOG), 32)
        # Index rows: item_vectors over the items' LM vectors, residual by id.
        all_ids = [r["item_id"] for r in CATALOG]
        want_rows = offline_rows(model, offline_encoder, all_ids)
        np.testing.assert_allclose(idx.vectors, want_rows, atol=1e-4)

        # A history by item_id (longer than max_len: the last MAX_LEN entries count).
        hist_ids = ["g3", "g1", "b3", "m2", "g4", "b5"]
        items = [catalogue_item(i) for i in hist_ids]
        lm = lm_of(offline_encoder, [(r["domain"], r["title"]) for r in items])
        want = offline_user(model, lm, list(hist_ids), [r["domain"] for r in items])
        req = {"history": [{"item_id": i} for i in hist_ids], "k": 10}
        got = await engine.query_vectors(RecommendRequest.model_validate(req))
        assert cosine(got["Books"], want) >= 0.9999

        # The served ranking: inner product over that domain's rows, history masked.
        r = await client.post("/recommend", json=req)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "hier-v1" and body["cached"] is False
        for d in DOMAINS:
            rows = [i for i, row in enumerate(CATALOG) if row["domain"] == d]
            ids = [all_ids[i] for i in rows]
            assert _ids(body, d) == ranking(want, want_rows[rows], ids, set(hist_ids))
            scores = [x["score"] for x in body["results"][d]]
            want_scores = [float(want_rows[all_ids.index(i)] @ want) for i in _ids(body, d)]
            np.testing.assert_allclose(scores, want_scores, rtol=1e-3, atol=1e-4)
        again = await client.post("/recommend", json=req)
        assert again.json()["cached"] is True and again.json()["results"] == body["results"]

        # By title: catalogue titles (any case) stand for their items; the rest are encoded.
        titles = [
            {"title": "dark roast COFFEE beans", "domain": "Groceries"},  # g1, residual
            {"title": "Space Opera Saga Volume Three", "domain": "Books"},  # not in catalogue
            {"title": "Coffee Shop Romance", "domain": "Movies"},  # m2, no residual
        ]
        pairs = [
            ("Groceries", "Dark Roast Coffee Beans"),
            ("Books", "Space Opera Saga Volume Three"),
            ("Movies", "Coffee Shop Romance"),
        ]
        want_t = offline_user(
            model, lm_of(offline_encoder, pairs), ["g1", None, "m2"], [p[0] for p in pairs]
        )
        req_t = {"history": titles, "target_domains": ["Books"], "k": 10}
        got_t = await engine.query_vectors(RecommendRequest.model_validate(req_t))
        assert cosine(got_t["Books"], want_t) >= 0.9999
        r = await client.post("/recommend", json=req_t)
        assert r.status_code == 200, r.text
        rows = [i for i, row in enumerate(CATALOG) if row["domain"] == "Books"]
        want_books = ranking(want_t, want_rows[rows], [all_ids[i] for i in rows], set())
        assert _ids(r.json(), "Books") == want_books


async def test_hier_history_by_id_runs_no_lm_forward(
    hier_store: tuple[Path, HierRec], served: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    core = HFEncoder.core

    def counted(self: HFEncoder, batch: Any) -> np.ndarray:
        calls.append(len(batch))
        return core(self, batch)

    monkeypatch.setattr(HFEncoder, "core", counted)
    store, _ = hier_store
    async with served(store_dir=store) as (client, engine):
        before = len(calls)
        r = await client.post(
            "/recommend", json={"history": [{"item_id": "g1"}, {"item_id": "b3"}]}
        )
        assert r.status_code == 200 and len(calls) == before
        r = await client.post(
            "/recommend", json={"history": [{"title": "brand new title", "domain": "Books"}]}
        )
        assert r.status_code == 200 and len(calls) == before + 1
        # Another user naming the same title: its LM vector comes from the title cache, and
        # the user vector is the same as if it had been encoded again.
        first = r.json()
        r = await client.post(
            "/recommend",
            json={"history": [{"title": "brand new title", "domain": "Books"}], "k": 7},
        )
        assert r.status_code == 200 and len(calls) == before + 1
        assert [x["item_id"] for x in r.json()["results"]["Books"][:3]] == [
            x["item_id"] for x in first["results"]["Books"][:3]
        ]
    async with served(store_dir=store, title_cache_size=0) as (client, engine):
        before = len(calls)
        for _ in range(2):
            body = {"history": [{"title": "brand new title", "domain": "Books"}], "k": 3}
            r = await client.post("/recommend", json={**body, "k": 3 + _})
            assert r.status_code == 200
        assert len(calls) == before + 1  # the second is a user-vector cache hit, no forward


async def test_hier_unseen_items_get_the_text_vector_and_reindex_encodes_only_new_items(
    hier_store: tuple[Path, HierRec], served: Callable[..., Any], offline_encoder: HFEncoder
) -> None:
    store, model = hier_store
    new = [
        {"item_id": "b9", "domain": "Books", "title": "Space Opera Saga Volume Three"},
        {"item_id": "zz-9", "domain": "Movies", "title": "Space Battle Saga Returns"},
        {**catalogue_item("g4"), "popularity": 999},  # unchanged text: its LM vector is reused
    ]
    async with served(store_dir=store) as (client, engine):
        old = engine.index
        r = await client.post(
            "/items/reindex", json={"mode": "upsert", "items": new}, headers=admin()
        )
        assert r.status_code == 202, r.text
        done = await wait_job(client, r.json()["job_id"])
        assert done["state"] == "succeeded" and done["total"] == 2 and done["embedded"] == 2
        idx = engine.index
        assert idx.version == done["index_version"] and len(idx.items) == len(CATALOG) + 2
        for it in CATALOG:  # the old items' LM vectors were reused, not re-encoded
            np.testing.assert_array_equal(
                idx.lm_vectors[idx.by_id[it["item_id"]]], old.lm_vectors[old.by_id[it["item_id"]]]
            )
        lm = lm_of(offline_encoder, [(x["domain"], x["title"]) for x in new[:2]])
        with torch.inference_mode():
            text_only = model.item_vectors(torch.from_numpy(lm)).numpy()  # no residual
            with_res = model.item_vectors(
                torch.from_numpy(lm), model.residual_rows_for(["b9", "zz-9"])
            ).numpy()
        np.testing.assert_allclose(idx.vectors[idx.by_id["b9"]], text_only[0], atol=1e-4)
        np.testing.assert_allclose(idx.vectors[idx.by_id["zz-9"]], with_res[1], atol=1e-4)
        assert not np.allclose(with_res[1], text_only[1], atol=1e-3)  # zz-9 has a residual
        # Catalogue items never trained (g3) are the text vector alone too.
        np.testing.assert_allclose(
            idx.vectors[idx.by_id["g3"]], offline_rows(model, offline_encoder, ["g3"])[0], atol=1e-4
        )
        r = await client.post(
            "/recommend",
            json={"history": [{"item_id": "zz-9"}], "target_domains": ["Books"], "k": 3},
        )
        assert r.status_code == 200 and len(r.json()["results"]["Books"]) == 3
        saved = idx.version
    # A restart reloads the snapshot, LM vectors included: nothing is indexed again.
    async with served(store_dir=store) as (_, engine2):
        assert engine2.index.version == saved and engine2.index.scorer == "hier"
        np.testing.assert_array_equal(engine2.index.lm_vectors, idx.lm_vectors)
        np.testing.assert_array_equal(engine2.index.vectors, idx.vectors)


async def test_zero_shot_default_is_the_mean_scorer(
    tmp_path: Path,
    tiny_bert_dir: Path,
    served: Callable[..., Any],
    offline_encoder: HFEncoder,
) -> None:
    base = str(tiny_bert_dir)
    async with served(base_model=base) as (client, engine):
        assert engine.scorer == "mean" and engine.model_version == f"local-{tiny_bert_dir.name}"
        idx = engine.index
        all_ids = [r["item_id"] for r in CATALOG]
        lm = lm_of(offline_encoder, [(r["domain"], r["title"]) for r in CATALOG])
        pop = [float(r["popularity"]) for r in CATALOG]
        rows = zero_shot_items(lm, pop)
        assert idx.dim == 33
        np.testing.assert_allclose(idx.vectors, rows, atol=1e-4)
        hist = [
            {"item_id": "g1"},
            {"title": "space opera saga volume one", "domain": "Books"},  # b3
            {"title": "An Unknown Movie Night", "domain": "Movies"},  # encoded
            {"item_id": "g5"},
        ]
        used = [
            ("Groceries", "Dark Roast Coffee Beans"),
            ("Books", "Space Opera Saga Volume One"),
            ("Movies", "An Unknown Movie Night"),
            ("Groceries", "Organic Wildflower Honey"),
        ]
        hist_lm = lm_of(offline_encoder, used)
        doms = [d for d, _ in used]
        req = {"history": hist, "k": 10}
        got = await engine.query_vectors(RecommendRequest.model_validate(req))
        r = await client.post("/recommend", json=req)
        assert r.status_code == 200, r.text
        body = r.json()
        for d in DOMAINS:
            q = zero_shot_query(hist_lm, doms, d)
            assert cosine(got[d], q) >= 0.9999
            rr = [i for i, row in enumerate(CATALOG) if row["domain"] == d]
            want = ranking(q, rows[rr], [all_ids[i] for i in rr], {"g1", "b3", "g5"})
            assert _ids(body, d) == want, d
        assert cosine(got["Books"], got["Groceries"]) < 0.9999  # the query follows the domain
        again = await client.post("/recommend", json={**req, "k": 9})  # past the ranked lists
        assert again.json()["cached"] is True
    async with served(base_model=base, zero_shot="text") as (_, engine):
        assert engine.scorer == "text" and engine.index.dim == 32
        assert engine.index.text_vectors is None


async def test_flat_artifact_is_served_as_before(
    tmp_path: Path, tiny_bert_dir: Path, served: Callable[..., Any], offline_encoder: HFEncoder
) -> None:
    store = tmp_path / "store"
    ModelStore(store).publish(
        tiny_bert_dir,
        {
            "version": "flat-v1",
            "base_model": "tiny",
            "pooling": "mean",
            "dim": 32,
            "max_length": 64,
        },
        aliases=("production",),
    )
    async with served(store_dir=store) as (client, engine):
        assert engine.scorer == "text" and engine.index.text_vectors is None
        req = {"history": [{"item_id": "g1"}, {"title": "Tea", "domain": "Books"}]}
        got = await engine.query_vectors(RecommendRequest.model_validate(req))
        text = TEMPLATE.render_history(
            [Behaviour("Groceries", "Dark Roast Coffee Beans"), Behaviour("Books", "Tea")]
        )
        want = offline_encoder.encode([text], "query")[0]
        assert cosine(got["Books"], want) >= 0.9999
        r = await client.post("/recommend", json=req)
        assert r.status_code == 200 and r.json()["model_version"] == "flat-v1"


def test_hier_artifact_that_does_not_fit_is_refused(
    tmp_path: Path, tiny_bert_dir: Path, make_settings: Callable[..., Any]
) -> None:
    store = tmp_path / "store"
    publish_hier(store, tiny_bert_dir, tiny_hier(), dim=8)  # the HierRec has dim 16
    with pytest.raises(ArtifactError, match="dim 8"):
        load_model(make_settings(store_dir=store, **CPU))
    # A hier manifest whose folder lacks the HierRec names the missing file.
    lm_only = tmp_path / "lm"
    shutil.copytree(tiny_bert_dir, lm_only)
    ModelStore(store).publish(
        lm_only,
        {"version": "v2", "kind": "hier", "base_model": "t", "pooling": "mean", "dim": 16},
        aliases=("production",),
    )
    with pytest.raises(ArtifactError) as err:
        load_model(make_settings(store_dir=store, **CPU))
    assert err.value.file == "hier/hier_config.json"
    assert json.loads((store / "versions" / "v2" / "manifest.json").read_text())["kind"] == "hier"
