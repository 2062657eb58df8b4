"""Contract: tiny train -> publish into a store -> the version loads as a recommender, and the
service loads it and answers /recommend."""

import json

import httpx
import pytest
from train_util import build_tiny_llama, tiny_config, toy_data

from cprec.recommender import Recommender
from model_store import ModelStore
from training.pipeline import run_pipeline, write_catalog


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(tmp folder, config, data, result) of a tiny run published as tiny-v1."""
    tmp = tmp_path_factory.mktemp("tiny-pipeline")
    llama = build_tiny_llama(tmp / "tiny-llama")
    cfg = tiny_config(
        tmp,
        llama,
        "publish.enabled=true",
        "publish.version=tiny-v1",
        "cpt.steps=4",
        "finetune.steps=4",
        "finetune.eval_every=2",
    )
    data = toy_data()
    return tmp, cfg, data, run_pipeline(cfg, data)


def test_tiny_pipeline_publishes_a_loadable_recommender(published):
    tmp, cfg, _, res = published
    assert res.artifact_version == "tiny-v1"
    assert set(res.ranked) == {"valid", "test"} and all(len(x) == 50 for x in res.ranked["test"])
    for split in ("valid", "test"):
        assert (tmp / "run" / "eval" / f"{split}.jsonl.gz").is_file()
    art = ModelStore(tmp / "store").load("latest")
    m = art.manifest
    assert (m.kind, m.version, m.pooling, m.is_decoder, m.dim) == (
        "flat",
        "tiny-v1",
        "last",
        True,
        32,
    )
    assert m.template == cfg.template.model_dump() and m.data_hash == "toyhash"
    assert m.config["name"] == "tiny-test" and "test" in m.metrics["eval"]
    assert {"curves/cpt.png", "curves/finetune.png", "metrics.json", "recommender.json"} <= set(
        m.files
    )
    assert "| test | overall_micro |" in (art.path / "README.md").read_text()
    # the training output and the published version load the same way
    for folder in (res.model_dir, art.path):
        rec = Recommender.from_pretrained(folder, device="cpu")
        assert (rec.scorer, rec.user_dim, rec.template.max_items) == ("text", 32, 8)
    assert Recommender.from_pretrained(art.path, device="cpu").version == "tiny-v1"


async def test_the_service_answers_with_the_published_version(published):
    from service.api import create_app
    from service.settings import Settings

    tmp, _, data, _ = published
    catalog = write_catalog(data, tmp / "catalog.jsonl")
    settings = Settings(
        store_dir=tmp / "store",
        model="latest",
        catalog_path=catalog,
        redis_url=None,
        faiss_gpu=False,
        device="cpu",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            first = json.loads(catalog.read_text().splitlines()[0])
            r = await c.post(
                "/recommend",
                json={
                    "history": [
                        {"item_id": first["item_id"]},
                        {"title": "green tea leaf", "domain": "Food"},
                    ],
                    "target_domains": ["Kitchen"],
                    "k": 5,
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_version"] == "tiny-v1"
            assert len(body["results"]["Kitchen"]) == 5
