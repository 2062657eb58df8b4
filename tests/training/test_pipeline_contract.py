"""Contract: tiny train -> publish into a store -> the service loads it and answers /recommend."""

import json

import httpx
import pytest
from train_util import build_tiny_llama, tiny_config, toy_data

from model_store import ModelStore
from training.pipeline import run_pipeline, write_catalog


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-contract"))


async def test_tiny_pipeline_publishes_a_servable_model(tmp_path, llama):
    from service.app import create_app
    from service.settings import Settings

    cfg = tiny_config(
        tmp_path,
        llama,
        "publish.enabled=true",
        "publish.version=tiny-v1",
        "cpt.steps=4",
        "finetune.steps=4",
        "finetune.eval_every=2",
    )
    data = toy_data()
    res = run_pipeline(cfg, data)
    assert res.artifact_version == "tiny-v1"
    assert set(res.ranked) == {"valid", "test"} and all(len(x) == 50 for x in res.ranked["test"])
    for split in ("valid", "test"):
        assert (tmp_path / "run" / "eval" / f"{split}.jsonl.gz").is_file()
    store = ModelStore(tmp_path / "store")
    art = store.load("latest")
    m = art.manifest
    assert (m.version, m.pooling, m.is_decoder, m.dim) == ("tiny-v1", "last", True, 32)
    assert m.template == cfg.template.model_dump() and m.data_hash == "toyhash"
    assert m.config["name"] == "tiny-test" and "test" in m.metrics["eval"]
    assert {"curves/cpt.png", "curves/finetune.png", "metrics.json"} <= set(m.files)
    assert "| test | overall_micro |" in (art.path / "README.md").read_text()

    catalog = write_catalog(data, tmp_path / "catalog.jsonl")
    settings = Settings(
        store_dir=tmp_path / "store",
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
