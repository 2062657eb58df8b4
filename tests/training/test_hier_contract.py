"""Contract: tiny hier train -> publish into a store -> the service answers /recommend with it,
and its top-10 is the offline evaluator's."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np

from model_store import ModelStore
from training.hier import load_hier_config
from training.hier_pipeline import main_hier, publish_hier, run_hier, write_catalog, write_outputs

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


async def test_served_top10_equals_the_offline_ranking(tmp_path, tiny_bert_dir):
    from service.app import create_app
    from service.settings import Settings

    cfg = load_hier_config(SMOKE, overrides(tmp_path, tiny_bert_dir))
    run = run_hier(cfg)
    metrics = write_outputs(run, cfg.output_dir)
    catalog = write_catalog(run, cfg.output_dir / "catalog.jsonl")
    art = publish_hier(run, cfg.output_dir, metrics, tmp_path / "store", version="hier-v1")
    assert art.manifest.kind == "hier"

    tgt = run.corpus.target
    cases = [c for c in tgt.test if len(c.history) >= 3][:5]
    offline = run.rank(cases)
    settings = Settings(
        store_dir=tmp_path / "store",
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
    rows = [json.loads(x) for x in catalog.read_text().splitlines()]
    assert len(rows) == len(tgt.items) and np.all([r["popularity"] >= 0 for r in rows])
