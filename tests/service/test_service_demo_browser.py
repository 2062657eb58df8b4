"""The demo page in a real browser: headless Chromium (Debian's package) driven over the Chrome
DevTools Protocol against a real ``python -m service`` process (bundled MiniLM, demo catalogue).

Types a title, adds matches with the keyboard, gets results for two domains, then sees the
service's error envelope for an empty history with a bad k. ``CPREC_WRITE_SCREENSHOT=1`` saves
``docs/img/demo.png`` from the results (off by default, so a test run leaves the tree clean).
Skips, saying why, where Chromium is absent (``make test`` installs it where apt can).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from svc_util import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "img" / "demo.png"
WIDTH, HEIGHT = 1280, 900


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


# -- a minimal CDP client ----------------------------------------------------------------------
class Page:
    """One page target over its DevTools websocket: commands in order, events kept in a list."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        self.last_id += 1
        mid = self.last_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} within {timeout} s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def js(self, expression: str) -> Any:
        r = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.js("document.body.innerText")
                pytest.fail(f"timed out waiting for {what}; the page shows:\n{text[:3000]}")
            time.sleep(0.1)

    def key(self, key: str, code: int, text: str = "") -> None:
        """One key press as the keyboard sends it (keydown with its character, then keyup)."""
        base = {"key": key, "code": key, "windowsVirtualKeyCode": code}
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": text, **base})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **base})

    def type(self, text: str) -> None:
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: Path) -> None:
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": size["height"], "scale": 1},
            },
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self.ws.close()


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> str:
    """The Chromium binary; module-scoped so a machine without one skips before the service
    starts."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip(
            "Chromium not found on PATH (chromium, chromium-browser): `make test` installs "
            "Debian's package where apt can (`apt-get install chromium`)"
        )
    pytest.importorskip("websockets.sync.client", reason="the CDP client needs websockets")
    return binary


@pytest.fixture(scope="module")
def service_url(browser: str, minilm_store: Path) -> Iterator[str]:
    """A real service process on a free port: bundled MiniLM zero-shot over the demo catalogue."""
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
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # the first start indexes the catalogue
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"service exited early:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "service not ready within 240 s"
            time.sleep(0.3)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def page(browser: str, tmp_path: Path) -> Iterator[Page]:
    profile = tmp_path / "profile"
    chromium_log = open(tmp_path / "chromium.log", "w")  # closed once the browser is gone
    proc = subprocess.Popen(
        [
            browser,
            "--headless=new",
            "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            f"--window-size={WIDTH},{HEIGHT}",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",  # the browser picks a port and writes it to the profile
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=chromium_log,
        start_new_session=True,  # its helper processes share a group we can end as one
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None:
                tail = (tmp_path / "chromium.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"Chromium ({browser}) exited at start ({proc.returncode}):\n{tail}")
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        p = Page(ws_url)
        try:
            for domain in ("Page", "Runtime", "Network", "Log"):
                p.send(f"{domain}.enable")
            p.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
            )
            yield p
        finally:
            p.close()
    finally:
        with contextlib.suppress(ProcessLookupError):  # helpers may outlive the main process
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        chromium_log.close()


# -- the test ----------------------------------------------------------------------------------
def count(selector: str) -> str:
    return f"document.querySelectorAll({json.dumps(selector)}).length"


def test_demo_page_in_a_browser(page: Page, service_url: str) -> None:
    ready = httpx.get(f"{service_url}/ready", timeout=5).json()
    page.send("Page.navigate", {"url": f"{service_url}/"})  # / redirects to the page
    page.wait_for("location.pathname === '/demo/' && document.readyState === 'complete'", "page")
    page.wait_for(f"{count('#target-list input')} === {len(ready['domains'])}", "the domains")
    status = page.js("document.getElementById('status').innerText")
    assert ready["model_version"] in status and ready["index_version"] in status

    # The keyboard only: "/" focuses the search box, typing searches, ArrowDown + Enter adds.
    page.js("document.activeElement.blur()")
    page.key("/", 191, "/")
    assert page.js("document.activeElement.id") == "q"
    page.type("cold brew")
    page.wait_for(count("#search-results button"), "matches for 'cold brew'")
    first = page.js("document.querySelector('#search-results button').dataset.itemId")
    page.key("ArrowDown", 40)
    assert page.js("document.activeElement.dataset.itemId") == first
    page.key("Enter", 13, "\r")
    page.wait_for(f"{count('#history li')} === 1", "the first history item")
    # Enter in the search box adds the best match of another domain.
    page.js("document.getElementById('q').value = ''; document.getElementById('q').focus()")
    page.type("burr coffee grinder")
    page.key("Enter", 13, "\r")
    page.wait_for(f"{count('#history li')} === 2", "the second history item")
    history = page.js("[...document.querySelectorAll('#history .tag')].map(e => e.textContent)")
    assert history[1] == "Kitchen", history

    # Two target domains, k = 3.
    page.js(
        "for (const b of document.querySelectorAll('#target-list input')) "
        "b.checked = ['Groceries', 'Kitchen'].includes(b.value)"
    )
    page.js("document.getElementById('k').value = ''; document.getElementById('k').focus()")
    page.type("3")
    page.js("document.getElementById('recommend').focus()")
    page.key("Enter", 13, "\r")
    page.wait_for(f"{count('#results section.domain')} === 2", "results for two domains")
    shown = page.js(
        "Object.fromEntries([...document.querySelectorAll('#results section.domain')]"
        ".map(s => [s.dataset.domain, s.querySelectorAll('tbody tr').length]))"
    )
    assert shown == {"Groceries": 3, "Kitchen": 3}
    meta = page.js("document.getElementById('meta').innerText")
    assert ready["model_version"] in meta and ready["index_version"] in meta
    assert "cache" in meta or "computed" in meta
    assert page.js("document.getElementById('error').hidden") is True
    if os.environ.get("CPREC_WRITE_SCREENSHOT") == "1":
        page.screenshot(SCREENSHOT)

    # An empty history with a bad k: the service's 422 envelope, shown as a readable message.
    page.js("document.getElementById('clear-history').click()")
    page.wait_for(f"{count('#history li')} === 0", "an empty history")
    page.js("document.getElementById('k').value = '0'")
    page.js("document.getElementById('recommend').click()")
    page.wait_for("!document.getElementById('error').hidden", "the error message")
    error = page.js("document.getElementById('error').innerText")
    assert "validation_error" in error and "422" in error and "k" in error, error
    assert page.js(count("#results section.domain")) == 0

    # A title the catalogue does not have, then a good k: the error goes, results come back.
    page.js("document.getElementById('free').open = true")
    page.js("document.getElementById('free-title').focus()")
    page.type("Pour-over coffee kettle with thermometer")
    page.js("document.getElementById('free-domain').focus()")
    page.type("Kitchen")
    page.key("Enter", 13, "\r")
    page.wait_for(f"{count('#history li')} === 1", "the text entry")
    assert page.js("document.querySelector('#history .id').textContent") == "text only"
    page.js("document.getElementById('k').value = '2'")
    page.js("document.getElementById('recommend').click()")
    page.wait_for(f"{count('#results section.domain')} === 2", "results for the text entry")
    assert page.js("document.getElementById('error').hidden") is True

    # Nothing fetched from another address; no script error.
    urls = [
        e["params"]["request"]["url"]
        for e in page.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert urls and all(u.startswith(service_url) for u in urls), urls
    thrown = [e for e in page.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not thrown, thrown
    # Errors the browser logged itself (a CSP violation, say); the 422 it logs as "network".
    logged = [
        e["params"]["entry"]
        for e in page.events
        if e.get("method") == "Log.entryAdded"
        and e["params"]["entry"]["level"] == "error"
        and e["params"]["entry"]["source"] != "network"
    ]
    assert not logged, logged
