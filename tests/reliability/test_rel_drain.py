"""SIGTERM: ``/ready`` turns 503, in-flight requests complete, then the process exits.
Issue 4, "Faults", last bullet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from rel_util import TOKEN, free_port

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


async def test_sigterm_handler_turns_ready_503_but_keeps_answering(app_client: Any) -> None:
    """The handler python -m service installs: readiness off first, requests still answered."""
    from service.__main__ import DrainingServer

    async with app_client(admin_token=TOKEN) as (client, engine, _):
        assert (await client.get("/ready")).status_code == 200
        server = DrainingServer(uvicorn.Config(lambda *a: None), engine)
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit and engine.draining
        r = await client.get("/ready")
        assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
        d = engine.index.domains[0]
        r = await client.post("/recommend", json={"history": [{"title": "tea", "domain": d}]})
        assert r.status_code == 200  # a request that reached us while draining is answered
        assert "cprec_ready 0.0" in (await client.get("/metrics")).text


_SERVER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import uvicorn
    from service.__main__ import DrainingServer
    from service.api import create_app
    from cprec.encoder import FakeEncoder
    from service.engine import Engine
    from cprec.recommender import Recommender
    from service.settings import Settings

    class Slow(FakeEncoder):  # every forward pass takes 1.5 s: a request stays in flight
        def core(self, batch):
            if self.calls > 0:
                time.sleep(1.5)
            return super().core(batch)

    store, catalog, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = Settings(store_dir=store, catalog_path=catalog, faiss_gpu=False, redis_url=None,
                 batching=False)
    app = create_app(engine=Engine(s, model=Recommender(Slow(), "drain-v1")))
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info",
                         timeout_graceful_shutdown=30)
    DrainingServer(cfg, app.state.engine).run()
""")


def test_sigterm_real_process_finishes_in_flight_then_exits(tmp_path: Path) -> None:
    catalog = tmp_path / "c.jsonl"
    catalog.write_text(
        "".join(
            json.dumps({"item_id": f"i{i}", "domain": "Books", "title": f"Book {i}"}) + "\n"
            for i in range(8)
        )
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(tmp_path / "store"), str(catalog), str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        results: dict[int, Any] = {}

        def call(n: int) -> None:
            body = {"history": [{"title": f"in flight {n}", "domain": "Books"}], "k": 2}
            try:
                results[n] = httpx.post(f"{base}/recommend", json=body, timeout=30).status_code
            except httpx.HTTPError as exc:
                results[n] = repr(exc)

        threads = [threading.Thread(target=call, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # all three are waiting on the 1.5 s forward passes
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=30)
        rc = proc.wait(timeout=30)
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert results == {0: 200, 1: 200, 2: 200}, (results, out)
        assert rc == 0, out
        assert time.monotonic() - t_term >= 1.0  # it waited for them
        assert "Waiting for connections to close" in out or "Shutting down" in out, out
        with pytest.raises(httpx.HTTPError):  # and it is gone
            httpx.get(f"{base}/live", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
