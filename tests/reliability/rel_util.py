"""Helpers for the reliability tests (imported by name: pytest puts this folder on sys.path).

Kept apart from ``tests/conftest.py`` on purpose: a second ``conftest.py`` would shadow the
shared one for ``from conftest import ...`` elsewhere. The shared fixtures (``app_client``,
``make_settings``) are used as they are; only what is special to fault tests lives here.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from testutil import free_port as free_port  # re-exported
from testutil import redis_binary as redis_binary  # re-exported
from testutil import redis_server_argv
from testutil import wait_job as _wait_job

from cprec.encoder import FakeEncoder

# Its own token (passed as ``admin_token=``), so these tests never depend on another file's value.
TOKEN = "rel-admin-token-7f3a9c"


def admin(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def wait_job(client: httpx.AsyncClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    return await _wait_job(client, job_id, admin(), timeout)


class SlowEncoder(FakeEncoder):
    """FakeEncoder whose forward pass takes ``delay_s``: keeps a reindex or request in flight."""

    def __init__(self, delay_s: float = 0.2, dim: int = 64) -> None:
        super().__init__(dim=dim, name="slow-fake")
        self.delay_s = delay_s

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        time.sleep(self.delay_s)
        return super().core(batch)


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private, throw-away ``redis-server`` on a loopback port that can be stopped and started
    again on the same port (never the shared server on 6379)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server not on PATH")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        self.proc = subprocess.Popen(
            redis_server_argv(self.port, self.workdir, self.binary),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not _pong(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
