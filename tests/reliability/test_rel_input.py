"""Bad input: every limit and every malformed request is a clear 4xx naming the field, never a 5xx.

Issue 4, "Bad input (clear 4xx, nothing lost)". Runs in-process over a FakeEncoder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from rel_util import TOKEN, admin, wait_job

from cprec.text import Behaviour, Template

JSON = {"content-type": "application/json"}


def _fields(body: dict[str, Any]) -> list[str]:
    """Every field the error envelope names (details is a dict or a list of dicts)."""
    det = body["error"]["details"]
    if isinstance(det, dict):
        return [str(det.get("field"))]
    return [str(d["field"]) for d in det or []]


def _assert_envelope(r: Any, status: set[int], field: str, reason: str) -> None:
    assert r.status_code in status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert any(f.startswith(field) for f in _fields(body)), (field, body)
    text = json.dumps(body).lower()
    assert reason.lower() in text, (reason, body)


LONG_UNICODE = "数据🚀é" * 400  # 1600 characters, 4-byte code points included

# (name, raw body or json, expected statuses, field, a word of the reason)
BAD_RECOMMEND: list[tuple[str, Any, set[int], str, str]] = [
    ("not an object", b"[1, 2, 3]", {422}, "body", "dictionary"),
    ("a bare string", b'"history"', {422}, "body", "dictionary"),
    ("truncated JSON", b'{"history": [', {422}, "body", "invalid JSON"),
    (
        "invalid UTF-8",
        b'{"history": [{"title": "\xff\xfe", "domain": "Books"}]}',
        {422},
        "body",
        "UTF-8",
    ),
    (
        "raw control character",
        b'{"history": [{"title": "a\x01b", "domain": "Books"}]}',
        {422},
        "body",
        "control character",
    ),
    ("history not a list", {"history": "coffee"}, {422}, "history", "valid list"),
    ("history entry wrong type", {"history": [42]}, {422}, "history[0]", "valid"),
    ("missing domain", {"history": [{"title": "Coffee"}]}, {422}, "history[0]", "required"),
    (
        "empty title",
        {"history": [{"title": "", "domain": "Books"}]},
        {422},
        "history[0]",
        "at least 1",
    ),
    (
        "blank title",
        {"history": [{"title": "   ", "domain": "Books"}]},
        {422},
        "history[0]",
        "at least 1",
    ),
    (
        "only control characters",
        {"history": [{"title": "\u0000\u0007\u200b\u202e", "domain": "Books"}]},
        {422},
        "history[0].title",
        "empty",
    ),
    ("empty item id", {"history": [{"item_id": ""}]}, {422}, "history[0]", "at least 1"),
    (
        "unknown item id",
        {"history": [{"item_id": "no-such-item"}]},
        {422},
        "history[0].item_id",
        "not in the catalogue",
    ),
    ("unknown domain", {"target_domains": ["Nope"]}, {422}, "target_domains", "unknown"),
    ("empty domain list", {"target_domains": []}, {422}, "body", "non-empty"),
    ("duplicated domains", {"target_domains": ["Books", "Books"]}, {422}, "body", "duplicates"),
    ("k zero", {"k": 0}, {422}, "k", "greater than or equal"),
    ("k too large", {"k": 100000}, {422}, "k", "exceeds max_k"),
    ("k not a number", {"k": "ten"}, {422}, "k", "integer"),
    ("k a float", {"k": 2.5}, {422}, "k", "integer"),
    ("exclude_history not bool", {"exclude_history": "maybe"}, {422}, "exclude_history", "bool"),
    ("unknown field", {"histroy": []}, {422}, "histroy", "extra"),
    ("user_id too long", {"user_id": "u" * 300}, {422}, "user_id", "at most 256"),
    (
        "very long unicode title",
        {"history": [{"title": LONG_UNICODE, "domain": "Books"}]},
        {422},
        "history[0].title",
        "max_title_chars",
    ),
    (
        "too many history items",
        {"history": [{"title": "tea", "domain": "Books"}] * 501},
        {413, 422},
        "history",
        "max_history",
    ),
    (
        "too many target domains",
        {"target_domains": [f"d{i}" for i in range(65)]},
        {422},
        "target_domains",
        "max_target_domains",
    ),
]


@pytest.mark.parametrize(
    "name,body,status,field,reason", BAD_RECOMMEND, ids=[c[0] for c in BAD_RECOMMEND]
)
async def test_bad_recommend_is_4xx_naming_field_and_reason(
    app_client: Any, name: str, body: Any, status: set[int], field: str, reason: str
) -> None:
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        if isinstance(body, bytes):
            r = await client.post("/recommend", content=body, headers=JSON)
        else:
            r = await client.post("/recommend", json=body)
        _assert_envelope(r, status, field, reason)
        # a validation error is counted under its code, never as an internal error
        assert engine.metrics.errors.labels("internal_error")._value.get() == 0


async def test_limits_come_from_settings_and_are_named(app_client: Any) -> None:
    """Lowered limits bite at exactly the configured value, each error naming its setting."""
    async with app_client(
        admin_token=TOKEN,
        max_k=5,
        max_history=3,
        max_title_chars=10,
        max_target_domains=1,
        max_body_bytes=2048,
    ) as (client, engine, _):
        d = engine.index.domains[0]
        ok = await client.post(
            "/recommend",
            json={"history": [{"title": "x" * 10, "domain": d}] * 3, "k": 5, "target_domains": [d]},
        )
        assert ok.status_code == 200, ok.text
        r = await client.post("/recommend", json={"k": 6})
        _assert_envelope(r, {422}, "k", "max_k")
        r = await client.post(
            "/recommend", json={"history": [{"title": "t", "domain": d}] * 4, "k": 1}
        )
        _assert_envelope(r, {413}, "history", "max_history")
        r = await client.post(
            "/recommend", json={"history": [{"title": "x" * 11, "domain": d}], "k": 1}
        )
        _assert_envelope(r, {422}, "history[0].title", "max_title_chars")
        r = await client.post(
            "/recommend", json={"target_domains": engine.index.domains[:2], "k": 1}
        )
        _assert_envelope(r, {422}, "target_domains", "max_target_domains")
        big = json.dumps({"user_id": "u", "history": [{"title": "y" * 9, "domain": d}] * 80})
        assert len(big) > 2048
        r = await client.post("/recommend", content=big, headers=JSON)
        assert r.status_code == 413 and "max_body_bytes" in r.text


async def test_chunked_body_over_limit_is_413(app_client: Any) -> None:
    """No content-length (a streamed body) is counted as it arrives."""

    async def chunks() -> Any:
        for _ in range(64):
            yield b" " * 1024

    async with app_client(admin_token=TOKEN, max_body_bytes=4096) as (client, _, _e):
        r = await client.post("/recommend", content=chunks(), headers=JSON)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_long_unicode_and_control_characters_within_limits_are_served(
    app_client: Any,
) -> None:
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        d = engine.index.domains[0]
        hist = [
            {"title": "数据🚀é" * 249, "domain": d},  # 996 characters
            {"title": "Coffee\u0000\tBeans\u202e", "domain": d},  # controls become spaces
            {"title": "e\u0301 composed", "domain": d},
        ]  # NFC-normalised
        r = await client.post("/recommend", json={"history": hist, "k": 3})
        assert r.status_code == 200, r.text


async def test_duplicated_history_entries_are_allowed(app_client: Any) -> None:
    """A repeat purchase is signal, not an error: duplicates in a *history* are served (and
    excluded from the answer once); duplicates in a *catalogue* are refused (below)."""
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        first = engine.index.items[0]
        r = await client.post(
            "/recommend",
            json={"history": [{"item_id": first.item_id}] * 2, "target_domains": [first.domain]},
        )
        assert r.status_code == 200
        assert first.item_id not in [x["item_id"] for x in r.json()["results"][first.domain]]


BAD_REINDEX: list[tuple[str, Any, str, str]] = [
    (
        "duplicated items",
        {
            "mode": "full",
            "items": [
                {"item_id": "x1", "domain": "Books", "title": "A"},
                {"item_id": "x1", "domain": "Books", "title": "B"},
            ],
        },
        "items[1]",
        "duplicate item_id",
    ),
    ("empty items", {"mode": "full", "items": []}, "body", "non-empty"),
    (
        "item missing title",
        {"mode": "upsert", "items": [{"item_id": "x", "domain": "Books"}]},
        "items[0].title",
        "required",
    ),
    (
        "negative popularity",
        {
            "mode": "upsert",
            "items": [{"item_id": "x", "domain": "Books", "title": "T", "popularity": -1}],
        },
        "items[0].popularity",
        "greater than or equal",
    ),
    ("unknown mode", {"mode": "drop-all", "items": []}, "mode", "full"),
    ("delete without ids", {"mode": "delete"}, "body", "item_ids"),
    ("delete unknown ids", {"mode": "delete", "item_ids": ["nope"]}, "item_ids", "unknown"),
    (
        "items and path",
        {
            "mode": "full",
            "path": "c.jsonl",
            "items": [{"item_id": "x", "domain": "Books", "title": "T"}],
        },
        "body",
        "either items or path",
    ),
]


@pytest.mark.parametrize("name,body,field,reason", BAD_REINDEX, ids=[c[0] for c in BAD_REINDEX])
async def test_bad_reindex_is_422_and_changes_nothing(
    app_client: Any, name: str, body: Any, field: str, reason: str
) -> None:
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        before = engine.index
        r = await client.post("/items/reindex", json=body, headers=admin())
        _assert_envelope(r, {422}, field, reason)
        assert engine.index is before and not engine.jobs


async def test_unknown_job_is_404_envelope(app_client: Any) -> None:
    async with app_client(admin_token=TOKEN) as (client, _, _e):
        r = await client.get("/items/reindex/does-not-exist", headers=admin())
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_upload_size_and_row_limits(app_client: Any) -> None:
    rows = "".join(
        json.dumps({"item_id": f"u{i}", "domain": "Books", "title": f"Book {i}"}) + "\n"
        for i in range(40)
    )
    async with app_client(admin_token=TOKEN, max_upload_bytes=1024, max_upload_rows=5) as (
        client,
        engine,
        _,
    ):
        before = engine.index
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            files={"file": ("c.jsonl", rows.encode(), "application/x-ndjson")},
        )
        assert r.status_code == 413 and "max_upload_bytes" in r.text, r.text
        small = "".join(rows.splitlines(keepends=True)[:8])
        assert len(small) < 1024
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            files={"file": ("c.jsonl", small.encode(), "application/x-ndjson")},
        )
        assert r.status_code == 202, r.text
        job = await wait_job(client, r.json()["job_id"])
        assert job["state"] == "failed" and "max_upload_rows" in job["error"]
        assert engine.index is before
        r = await client.post(
            "/items/reindex/upload",
            headers=admin(),
            files={"file": ("c.bin", b"\x80\x03}q\x00.", "application/octet")},
        )
        _assert_envelope(r, {422}, "file", ".jsonl or .csv")


def test_history_longer_than_context_keeps_most_recent(minilm_dir: Path) -> None:
    """Two cuts, both keep the newest behaviour: the template keeps the last ``max_items``
    entries, and the tokenizer cuts a query from the left when it is still too long."""
    from transformers import AutoTokenizer

    from cprec.lm import TextTokenizer

    hist = [Behaviour("Books", f"Title number {i}") for i in range(50)]
    text = Template(max_items=20).render_history(hist)
    assert "Title number 49" in text and "Title number 30" in text
    assert "Title number 29" not in text
    tt = TextTokenizer(AutoTokenizer.from_pretrained(minilm_dir), max_length=16, is_decoder=False)
    ids = tt([text], "query")[0]
    assert len(ids) == 16
    decoded = tt.tok.decode(ids, skip_special_tokens=True)
    assert decoded.rstrip().endswith("title number 49"), decoded
    item_ids = tt([text], "item")[0]  # items keep their start instead
    assert tt.tok.decode(item_ids, skip_special_tokens=True).startswith("books : title number 30")


# -- reading a catalogue by path: only inside CPREC_CATALOG_DIR ---------------------------------
@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    root = tmp_path / "catalogues"
    (root / "sub").mkdir(parents=True)
    rows = [{"item_id": f"p{i}", "domain": "Garden", "title": f"Rose bush {i}"} for i in range(5)]
    (root / "sub" / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outside = tmp_path / "secret.jsonl"
    outside.write_text(json.dumps({"item_id": "s", "domain": "Secret", "title": "Secret"}) + "\n")
    os.symlink(outside, root / "escape.jsonl")
    os.symlink(tmp_path, root / "up")
    return root


@pytest.mark.parametrize(
    "path,status,reason",
    [
        ("../secret.jsonl", 422, "'..'"),
        ("sub/../../secret.jsonl", 422, "'..'"),
        ("/etc/passwd", 422, "absolute"),
        ("escape.jsonl", 422, "outside"),
        ("up/secret.jsonl", 422, "outside"),
        ("sub/missing.jsonl", 422, "no such"),
        ("sub", 422, "no such"),
        ("a\u0000b", 422, "NUL"),
    ],
)
async def test_reindex_path_refused_outside_catalog_dir(
    app_client: Any, catalog_dir: Path, path: str, status: int, reason: str
) -> None:
    async with app_client(admin_token=TOKEN, catalog_dir=catalog_dir) as (client, engine, _):
        r = await client.post(
            "/items/reindex", json={"mode": "full", "path": path}, headers=admin()
        )
        _assert_envelope(r, {status}, "path", reason)
        assert str(catalog_dir.parent) not in r.text  # server paths are not echoed
        assert not engine.jobs


async def test_reindex_path_inside_catalog_dir(app_client: Any, catalog_dir: Path) -> None:
    async with app_client(admin_token=TOKEN) as (client, _, _e):
        r = await client.post(
            "/items/reindex", json={"mode": "full", "path": "sub/new.jsonl"}, headers=admin()
        )
        _assert_envelope(r, {403}, "path", "CPREC_CATALOG_DIR")  # off unless configured
    async with app_client(admin_token=TOKEN, catalog_dir=catalog_dir) as (client, engine, _):
        r = await client.post(
            "/items/reindex", json={"mode": "full", "path": "sub/new.jsonl"}, headers=admin()
        )
        assert r.status_code == 202, r.text
        job = await wait_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job
        assert engine.index.domains == ["Garden"] and len(engine.index.items) == 5
