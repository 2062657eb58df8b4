"""Once against a real uvicorn process: start, /ready, /recommend, SIGTERM -> exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from svc_util import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_uvicorn_process_serves_and_exits_cleanly_on_sigterm(minilm_store: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPREC_") and k != "REDIS_URL"}
    env.update(
        {
            "CPREC_STORE_DIR": str(minilm_store),
            "CPREC_DEVICE": "cpu",
            "CPREC_DTYPE": "float32",
            "CPREC_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        ready = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited early:\n{proc.stdout.read()}"  # type: ignore[union-attr]
            try:
                ready = httpx.get(f"{base}/ready", timeout=2)
                if ready.status_code == 200:
                    break
                assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, "not ready within 90 s"
        assert ready.json()["model_version"] == "base-minilm-l6"
        assert httpx.get(f"{base}/live", timeout=5).json() == {"status": "live"}
        r = httpx.post(
            f"{base}/recommend",
            timeout=30,
            json={
                "history": [{"title": "Dark Roast Whole Bean Coffee", "domain": "Groceries"}],
                "target_domains": ["Groceries"],
                "k": 3,
            },
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]["Groceries"]) == 3
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("server did not exit within 30 s of SIGTERM")
        out = proc.stdout.read()  # type: ignore[union-attr]
        assert rc == 0, f"exit code {rc}:\n{out[-3000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
