"""Helpers shared by the service tests (imported by name; tests/service is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from testutil import free_port as free_port  # re-exported for the service tests
from testutil import wait_job as _wait_job

ADMIN_TOKEN = "test-admin-token-123"

# Titles share words inside a domain so the bag-of-words FakeEncoder ranks them meaningfully.
CATALOG: list[dict[str, Any]] = [
    {"item_id": "g1", "domain": "Groceries", "title": "Dark Roast Coffee Beans", "popularity": 50},
    {"item_id": "g2", "domain": "Groceries", "title": "Espresso Coffee Pods", "popularity": 80},
    {"item_id": "g3", "domain": "Groceries", "title": "Decaf Coffee Ground", "popularity": 10},
    {"item_id": "g4", "domain": "Groceries", "title": "Green Tea Bags", "popularity": 90},
    {"item_id": "g5", "domain": "Groceries", "title": "Organic Wildflower Honey", "popularity": 30},
    {"item_id": "g6", "domain": "Groceries", "title": "Oat Milk Barista Edition", "popularity": 20},
    {"item_id": "b1", "domain": "Books", "title": "The Coffee Lover Cookbook", "popularity": 5},
    {"item_id": "b2", "domain": "Books", "title": "A History of Tea", "popularity": 40},
    {"item_id": "b3", "domain": "Books", "title": "Space Opera Saga Volume One", "popularity": 70},
    {"item_id": "b4", "domain": "Books", "title": "Space Opera Saga Volume Two", "popularity": 60},
    {"item_id": "b5", "domain": "Books", "title": "Gardening for Beginners", "popularity": 15},
    {"item_id": "m1", "domain": "Movies", "title": "Space Battle Saga", "popularity": 25},
    {"item_id": "m2", "domain": "Movies", "title": "Coffee Shop Romance", "popularity": 35},
    {"item_id": "m3", "domain": "Movies", "title": "The Haunted Garden", "popularity": 45},
    {"item_id": "m4", "domain": "Movies", "title": "Tea Ceremony Documentary", "popularity": 55},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def wait_job(client: httpx.AsyncClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    return await _wait_job(client, job_id, admin(), timeout)


def publish_hier(
    store_dir: Path,
    lm_dir: Path,
    model: Any,
    version: str = "hier-v1",
    aliases: tuple[str, ...] = ("production",),
    **manifest: Any,
) -> Any:
    """Publish ``lm_dir`` (an HF folder) + ``model`` (a ``cprec.hier.HierRec``) as a ``hier``
    artifact: the LM at the version's root, the HierRec under ``hier/``, all under the manifest's
    checksums. Training does the same with ``ModelStore.publish(..., extra_files=...)``."""
    import tempfile

    from cprec.text import Template
    from model_store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save_pretrained(Path(tmp) / "hier")
        data: dict[str, Any] = {
            "version": version,
            "kind": "hier",
            "base_model": str(lm_dir),
            "pooling": "mean",
            "dim": model.cfg.dim,
            "max_length": 64,
            "template": Template().model_dump(),
            **manifest,
        }
        return ModelStore(store_dir).publish(
            lm_dir,
            data,
            aliases=aliases,
            extra_files={f"hier/{p.name}": p for p in sorted(saved.iterdir())},
        )
