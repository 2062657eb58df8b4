"""Contract: tiny hier train -> publish into a store -> the version loads as a recommender whose
top-10 is the offline evaluator's, and the service answers /recommend with it the same way."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from cprec.recommender import HistoryVectors, Recommender
from model_store import ModelStore
from training.evaluate import rank_topk
from training.hier import load_hier_config
from training.hier_pipeline import main_hier, run_hier, stage_publish, write_catalog, write_outputs

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "hier-smoke.yaml"


def overrides(tmp_path: Path, lm: Path) -> list[str]:
    return [
        f"output_dir={tmp_path / 'run'}",
        f"lm={lm}",
        f"cache_dir={tmp_path / 'cache'}",
        "pretrain.epochs=2",
        "finetune.max_epochs=1",
        "bf16=off",
        "progress=false",
    ]


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_bert_dir):
    """(run, catalogue, store) of a smoke run published as hier-v1."""
    tmp = tmp_path_factory.mktemp("hier-contract")
    cfg = load_hier_config(SMOKE, overrides(tmp, tiny_bert_dir))
    run = run_hier(cfg)
    metrics = write_outputs(run, cfg.output_dir)
    catalog = write_catalog(run, cfg.output_dir / "catalog.jsonl")
    art = stage_publish(run, cfg.output_dir, metrics, tmp / "store", version="hier-v1")
    assert art.manifest.kind == "hier"
    return run, catalog, tmp / "store"


def cases_of(run):  # type: ignore[no-untyped-def]
    return [c for c in run.corpus.target.test if len(c.history) >= 3][:5]


def test_cli_trains_publishes_and_prints_the_serve_command(tmp_path, tiny_bert_dir, capsys):
    store = tmp_path / "store"
    assert main_hier(SMOKE, overrides(tmp_path, tiny_bert_dir), store_dir=store) == 0
    out = capsys.readouterr().out
    art = ModelStore(store).load("production")
    m = art.manifest
    assert m.kind == "hier" and m.dim == 32 and m.config["hier"]["text_dim"] == 32
    assert {"hier/hier_config.json", "hier/hier.safetensors", "hier/residual_ids.json"} <= set(
        m.files
    )
    assert "curves/hier.png" in m.files and "test" in m.metrics["eval"]
    assert f"CPREC_STORE_DIR={store} CPREC_MODEL=production" in out
    assert (tmp_path / "run" / "catalog.jsonl").is_file()
    # the training output is the same recommender folder as the published version
    for folder in (tmp_path / "run" / "model", art.path):
        rec = Recommender.from_pretrained(folder, device="cpu")
        assert (rec.scorer, rec.user_dim, rec.hier.cfg.text_dim) == ("hier", 32, 32)


def test_published_top10_equals_the_offline_ranking(published):
    """Recommender.from_pretrained of the published version ranks as the trainer did."""
    run, catalog, store = published
    rec = Recommender.from_pretrained(ModelStore(store).load("production").path, device="cpu")
    rows = [json.loads(x) for x in catalog.read_text().splitlines()]
    items = run.corpus.target.items
    lm = rec.encoder.encode([rec.lm_text(r["domain"], r["title"]) for r in rows], "item")
    index = rec.item_rows(lm, [r["item_id"] for r in rows], [r["popularity"] for r in rows])
    cases = cases_of(run)
    users = rec.users(
        [
            HistoryVectors(
                lm[c.history[-rec.history_len :]],
                [rows[i]["item_id"] for i in c.history[-rec.history_len :]],
                [items[i].domain for i in c.history[-rec.history_len :]],
            )
            for c in cases
        ]
    )
    served = rank_topk(users, index, cases, items)
    assert [r[:10] for r in served] == [r[:10] for r in run.rank(cases)]
    assert len(rows) == len(items) and np.all([r["popularity"] >= 0 for r in rows])


async def test_served_top10_equals_the_offline_ranking(published):
    from service.api import create_app
    from service.settings import Settings

    run, catalog, store = published
    cases = cases_of(run)
    offline = run.rank(cases)
    settings = Settings(
        store_dir=store,
        model="production",
        catalog_path=catalog,
        redis_url=None,
        faiss_gpu=False,
        device="cpu",
        dtype="auto",  # the dtype training encoded the items with
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            for case, want in zip(cases, offline, strict=True):
                hist = [{"item_id": run.corpus.keys[i]} for i in case.history]
                r = await c.post(
                    "/recommend",
                    json={"history": hist, "target_domains": [case.domain], "k": 10},
                )
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["model_version"] == "hier-v1"
                got = [x["item_id"] for x in body["results"][case.domain]]
                assert got == [run.corpus.keys[i] for i in want[:10]]
