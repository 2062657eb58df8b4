"""The admin boundary and the attack surface. Issue 4, "Security".

Admin routes need a bearer token compared in constant time, are off without one, and the token
never shows in logs, errors or ``/metrics``; loopback bind and no CORS by default; uploads are
parsed as data only (no pickle anywhere); dependencies are pinned and audited.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rel_util import TOKEN, admin, wait_job

from model_store.store import sha256_file
from service.index import ItemIndex

ROOT = Path(__file__).resolve().parents[2]


# POST routes that only read (a query with a body); any other non-GET route must be admin-only.
READ_ONLY_POST = {"/recommend"}
PUBLIC_GET = {"/items/search"}  # the catalogue title search (the demo page's): a read


async def _admin_routes(client: Any) -> list[tuple[str, str]]:
    """Every route that changes state (any method but GET) plus the job-status and model reads,
    from the app's own OpenAPI schema, so a route added later is covered without editing this
    test."""
    paths = (await client.get("/openapi.json")).json()["paths"]
    out = []
    for path, ops in paths.items():
        for m in ops:
            if path in READ_ONLY_POST and m == "post":
                continue
            admin_get = path.startswith(("/items", "/models")) and path not in PUBLIC_GET
            if m.upper() != "GET" or admin_get:
                out.append((m.upper(), path.replace("{job_id}", "abc")))
    return out


async def test_every_state_changing_route_is_admin_only(app_client: Any) -> None:
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        routes = await _admin_routes(client)
        assert ("POST", "/items/reindex") in routes and ("POST", "/items/reindex/upload") in routes
        assert ("GET", "/items/reindex/abc") in routes
        for route in (("GET", "/models"), ("POST", "/models/reload"), ("GET", "/models/jobs/abc")):
            assert route in routes
        assert not [p for _, p in routes if p in ("/live", "/ready", "/metrics", "/recommend")]
        for method, path in routes:
            r = await client.request(method, path)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            for bad in (
                {"Authorization": "Bearer wrong-token-123"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": f"Bearer {TOKEN[:-1]}"},
            ):
                r = await client.request(method, path, headers=bad)
                assert r.status_code in (401, 403), (method, path, bad, r.text)
                assert r.json()["error"]["code"] in ("unauthorized", "forbidden")
        assert not engine.jobs and not engine.rollout.jobs  # nothing got through


async def test_admin_routes_disabled_without_a_token(app_client: Any) -> None:
    async with app_client(admin_token=None) as (client, engine, _):
        for method, path in await _admin_routes(client):
            for headers in ({}, admin()):
                r = await client.request(method, path, headers=headers)
                assert r.status_code == 403, (method, path, r.text)
                assert "CPREC_ADMIN_TOKEN" in r.json()["error"]["message"]


async def test_token_compared_in_constant_time(
    app_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.api as deps

    seen: list[tuple[bytes, bytes]] = []
    real = deps.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    async with app_client(admin_token=TOKEN) as (client, _, _e):
        r = await client.get("/items/reindex/nope", headers=admin("not-the-token"))
        assert r.status_code == 403
        r = await client.get("/items/reindex/nope", headers=admin())
        assert r.status_code == 404
    assert len(seen) == 2 and seen[1] == (TOKEN.encode(), TOKEN.encode())


async def test_token_never_in_logs_errors_or_metrics(
    app_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bodies: list[str] = []
    with caplog.at_level(logging.DEBUG):
        async with app_client(admin_token=TOKEN) as (client, engine, _):
            assert "settings:" in caplog.text  # the resolved config was logged...
            calls = [
                ("GET", "/items/reindex/x", {}, None),
                ("GET", "/items/reindex/x", admin("wrong-token-xyz"), None),
                ("GET", "/items/reindex/x", admin(), None),
                ("POST", "/items/reindex", admin(), {"mode": "full", "items": []}),
                (
                    "POST",
                    "/items/reindex",
                    admin(),
                    {
                        "mode": "full",
                        "items": [{"item_id": TOKEN, "domain": "D", "title": "t"}] * 2,
                    },
                ),
                ("POST", "/recommend", admin(), {"history": "x"}),
                ("POST", "/recommend", admin(), {"k": 5}),
            ]
            for method, path, headers, body in calls:
                r = await client.request(method, path, headers=headers, json=body)
                bodies.append(r.text + json.dumps(dict(r.headers)))
            # a job that fails (bad row) logs its error
            r = await client.post(
                "/items/reindex/upload",
                headers=admin(),
                files={"file": ("c.jsonl", b"{bad\n", "text/plain")},
            )
            await wait_job(client, r.json()["job_id"])
            bodies.append((await client.get("/metrics")).text)
            bodies.append((await client.get("/openapi.json")).text)
            s = engine.settings
            bodies += [repr(s), str(s), s.model_dump_json(), json.dumps(s.redacted())]
    # ...with the token redacted; the user-supplied TOKEN-as-item-id above is the one place
    # it may legitimately be echoed (it is the client's own data), so check the rest.
    everything = caplog.text + "".join(b for b in bodies if "duplicate item_id" not in b)
    assert TOKEN not in everything
    assert "'admin_token': '***'" in caplog.text


def test_settings_errors_do_not_echo_the_token() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    for kwargs, secret in (
        ({"admin_token": "zq7x"}, "zq7x"),
        ({"env": "production", "admin_token": "changeme"}, "changeme"),
    ):
        with pytest.raises(ValidationError) as err:
            Settings(**kwargs)
        assert secret not in str(err.value), str(err.value)


def test_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    for var in ("CPREC_HOST", "CPREC_CORS_ORIGINS", "CPREC_ADMIN_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.host == "127.0.0.1" and s.cors_origins == [] and s.admin_token is None
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", (ROOT / "Makefile").read_text(), re.M)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):  # published explicitly, loopback unless overridden
            assert str(port).startswith("${CPREC_BIND:-127.0.0.1}:"), (name, port)


async def test_cors_off_unless_configured(app_client: Any) -> None:
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with app_client(admin_token=TOKEN) as (client, _, _e):
        r = await client.options("/recommend", headers=pre)
        assert "access-control-allow-origin" not in r.headers
        r = await client.get("/live", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    async with app_client(admin_token=TOKEN, cors_origins=["https://ok.example"]) as (
        client,
        _,
        _e,
    ):
        r = await client.options("/recommend", headers={**pre, "Origin": "https://ok.example"})
        assert r.headers.get("access-control-allow-origin") == "https://ok.example"
        r = await client.options("/recommend", headers=pre)
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


class _Boom:
    def __reduce__(self) -> Any:
        return (open, ("/tmp/cprec-rel-pickle-ran", "w"))


async def test_uploads_are_data_only_never_unpickled(app_client: Any) -> None:
    marker = Path("/tmp/cprec-rel-pickle-ran")
    marker.unlink(missing_ok=True)
    payload = pickle.dumps(_Boom())
    async with app_client(admin_token=TOKEN) as (client, engine, _):
        before = engine.index
        for name in ("c.jsonl", "c.csv"):
            r = await client.post(
                "/items/reindex/upload",
                headers=admin(),
                files={"file": (name, payload, "application/octet-stream")},
            )
            assert r.status_code == 202, r.text
            job = await wait_job(client, r.json()["job_id"])
            assert job["state"] == "failed" and "upload:" in job["error"]
        assert engine.index is before
    assert not marker.exists()


def test_saved_vectors_never_unpickled(tmp_path: Path) -> None:
    """Even a snapshot whose checksums were forged to match an object array is refused."""
    from cprec.encoder import FakeEncoder
    from service.index import IndexStore, Item

    marker = Path("/tmp/cprec-rel-pickle-ran")
    marker.unlink(missing_ok=True)
    items = [Item("a", "D", "Alpha"), Item("b", "D", "Beta")]
    idx = ItemIndex.build(items, FakeEncoder().encode(["Alpha", "Beta"], "item"), "m")
    path = idx.save(tmp_path)
    np.save(path / "vectors.npy", np.array([_Boom()], dtype=object), allow_pickle=True)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["vectors.npy"] = sha256_file(path / "vectors.npy")
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "manifest.sha256").write_text(sha256_file(path / "manifest.json"))
    with pytest.raises(ValueError, match="allow_pickle"):
        ItemIndex.load(path)
    assert IndexStore(tmp_path).load_latest() is None
    assert not marker.exists()


def test_no_pickle_or_eval_in_service_code() -> None:
    banned = re.compile(
        r"\bimport pickle\b|\bpickle\.loads?\(|allow_pickle\s*=\s*True|"
        r"torch\.load\(|\beval\(|\bexec\(|yaml\.load\(|shell\s*=\s*True"
    )
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for d in ("service", "model_store")
        for p in (ROOT / d).rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    assert not hits, hits


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_pinned_and_audit_target() -> None:
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = list(py["project"]["dependencies"])
    for extra in ("test", "audit"):
        declared += py["project"]["optional-dependencies"][extra]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert "==" in line, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(line)] = line
    missing = [d for d in declared if _name(d) not in pins]
    assert not missing, f"declared but not pinned in constraints.txt: {missing}"
    make = (ROOT / "Makefile").read_text()
    rule = re.search(r"^audit:.*\n((?:\t.*\n)+)", make, re.M)
    assert rule and "pip-audit" in rule.group(1) and "constraints.txt" in rule.group(1)
