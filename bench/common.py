"""Shared helpers of the performance benchmarks: FK-LOO texts, a real service process, a bounded
async load generator, percentiles, and JSON results.

Every benchmark measures its baseline in the same run as the thing it is compared against: this
machine is shared (other people's tests and training use the same cores), so only side-by-side
ratios mean anything here; absolute numbers count only on a dedicated GPU machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PY = sys.executable

# SIGTERM (a killed run) unwinds like Ctrl-C, so the service and redis-server children are stopped.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# -- data ------------------------------------------------------------------------------------
def shared_dir() -> Path:
    """``$CPREC_SHARED_DIR``, else ``<repo>/../shared``; the data is read in place, never copied."""
    env = os.environ.get("CPREC_SHARED_DIR")
    return Path(env).expanduser().resolve() if env else (REPO.parent / "shared").resolve()


@dataclass
class FKData:
    """FK-LOO items and test cases, with the texts the service would encode for them."""

    items: list[dict[str, Any]]  # index == item_id; item_id is a str as the service sees it
    cases: list[dict[str, Any]]  # user_id, history (list[int]), target (int), domain

    def history_entries(self, case: dict[str, Any]) -> list[dict[str, str]]:
        """A history as ``/recommend`` title entries (they resolve against any catalogue)."""
        return [
            {"domain": self.items[i]["domain"], "title": self.items[i]["title"]}
            for i in case["history"]
        ]


def load_fk(seed: int = 0) -> FKData:
    """FK-LOO items and test cases from the shared folder, via the training reader (sha-checked)."""
    from training.fkloo import fkloo_dir, load_fkloo

    os.environ.setdefault("CPREC_SHARED_DIR", str(shared_dir()))
    fk = load_fkloo(fkloo_dir())
    items = [
        {"item_id": str(it.item_id), "domain": it.domain, "title": it.title} for it in fk.items
    ]
    cases = [
        {"user_id": c.user_id, "history": c.history, "target": c.target, "domain": c.domain}
        for c in fk.test
    ]
    return FKData(items=items, cases=cases)


def subset(seq: Sequence[Any], n: int, seed: int = 0) -> list[Any]:
    """A deterministic sample of ``n`` elements, in their original order."""
    if n >= len(seq):
        return list(seq)
    pick = np.sort(np.random.default_rng(seed).choice(len(seq), size=n, replace=False))
    return [seq[i] for i in pick]


def history_texts(fk: FKData, cases: Sequence[dict[str, Any]]) -> list[str]:
    """The exact user texts the service encodes for these cases (default template)."""
    from cprec.text import Behaviour, Template

    tpl = Template()
    return [
        tpl.render_history(
            [Behaviour(fk.items[i]["domain"], fk.items[i]["title"]) for i in c["history"]]
        )
        for c in cases
    ]


def item_texts(items: Sequence[dict[str, Any]]) -> list[str]:
    from cprec.text import Template

    tpl = Template()
    return [tpl.render_item(it["domain"], it["title"]) for it in items]


def write_catalog(items: Sequence[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for it in items:
            fh.write(
                json.dumps(
                    {"item_id": it["item_id"], "domain": it["domain"], "title": it["title"]},
                    ensure_ascii=False,
                )
                + "\n"
            )
    return path


# -- stats -----------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    return (
        float(np.percentile(np.asarray(values, dtype=np.float64), q))
        if len(values)
        else float("nan")
    )


def lat_summary(lat_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in ms and the p99 spread (p99 / p50)."""
    p50, p95, p99 = (pct(lat_s, q) * 1000 for q in (50, 95, 99))
    return {
        "p50_ms": round(p50, 2),
        "p95_ms": round(p95, 2),
        "p99_ms": round(p99, 2),
        "p99_spread": round(p99 / p50, 3) if p50 > 0 else float("nan"),
    }


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "shared_machine": True,
    }
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx_bf16"] = "amx_bf16" in flags  # bf16 matrix tiles: bf16 forwards much faster
        for line in flags.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()[0]
    return info


def results_dir(mode: str) -> Path:
    """Quick-mode results (``make bench``) in bench/results, full-mode ones in bench/results/full,
    so a long full run never replaces the quick figures the docs quote, or the reverse."""
    return RESULTS / "full" if mode == "full" else RESULTS


def save_result(name: str, data: dict[str, Any]) -> Path:
    out = results_dir(str(data.get("mode", "quick")))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    data = {
        "benchmark": name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device_info(),
        **data,
    }
    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
    return path


DOCS = REPO / "docs" / "benchmarks.md"


def write_section(name: str, body: str, command: str, doc: Path = DOCS) -> None:
    """Replace the generated section ``name`` of ``doc`` (or append it), leaving the rest of the
    file alone. The section opens with a comment naming the command that writes it, so a reader
    of the file knows that edits between its markers are overwritten."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    note = f"<!-- generated by `{command}`: edits between these markers are overwritten -->"
    block = f"{start}\n{note}\n{body.strip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(doc)


def print_table(
    title: str, rows: Sequence[dict[str, Any]], cols: Sequence[str] | None = None
) -> None:
    if not rows:
        return
    cols = list(cols or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n## {title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, width, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, width, strict=True)))
    sys.stdout.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def target(
    measured: float, goal: float, met: bool, command: str, digits: int = 4, **extra: Any
) -> dict[str, Any]:
    return {
        "measured": round(float(measured), digits),
        "target": goal,
        "met": bool(met),
        "command": command,
        **extra,
    }


# -- encoders ---------------------------------------------------------------------------------
def make_encoder(
    base: str = "minilm-l6",
    dtype: str = "auto",
    quantize: str = "none",
    max_length: int = 256,
    device: str | None = None,
):  # type: ignore[no-untyped-def]
    """An HFEncoder exactly as the service builds it for a bundled base. ``device`` None: the
    service's choice for ``dtype="auto"``, the CPU for a named dtype (the CPU variants of
    bench/encoder.py); the GPU check names ``cuda`` with ``bfloat16``."""
    from cprec.encoder import HFEncoder

    store = Path(os.environ.get("CPREC_STORE_DIR", REPO / "var" / "store"))
    kwargs: dict[str, Any] = {}
    if quantize != "none":
        kwargs["quantize"] = quantize
    enc = HFEncoder.from_base(
        base,
        store,
        max_length=max_length,
        device=device or ("cpu" if dtype != "auto" else "auto"),
        dtype=dtype,
        name=base,
        **kwargs,
    )
    enc.warmup()
    return enc


def build_tiny_bert(out: Path, tokenizer_dir: Path, positions: int = 512) -> Path:
    """A 2-layer random BERT (hidden 32, seed 0) with the tokenizer found in ``tokenizer_dir``
    (the bundled MiniLM's: a real 30,522-word vocabulary on a model built in milliseconds).
    The tests' fast model, and the benchmarks' near-free encoder (``bench/serve.py`` ceiling)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
    )
    out.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def timed_core(
    enc: Any, batches: Sequence[Sequence[Sequence[int]]], min_s: float
) -> tuple[float, int, int]:
    """Run ``core`` over ``batches`` (cycling) for at least ``min_s``: (seconds, seqs, tokens)."""
    n = tok = 0
    t0 = time.perf_counter()
    i = 0
    while True:
        b = batches[i % len(batches)]
        enc.core(b)
        n += len(b)
        tok += sum(len(x) for x in b)
        i += 1
        el = time.perf_counter() - t0
        if el >= min_s and i >= len(batches) or el >= 4 * min_s:
            return el, n, tok


# -- the real service --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_argv(
    port: int, workdir: Path | None = None, binary: str = "redis-server"
) -> list[str]:
    """The command line of the benchmarks' own redis-server: loopback only, nothing persisted."""
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--protected-mode", "yes"]
    return argv + (["--dir", str(workdir)] if workdir is not None else [])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free loopback port (no persistence), stopped at exit.

    A private server means the benchmark never touches anybody else's keys; ``REDIS_URL`` from
    the environment is used instead when ``CPREC_BENCH_REDIS_URL`` is set.
    """
    url = os.environ.get("CPREC_BENCH_REDIS_URL")
    if url:
        yield url
        return
    port = free_port()
    proc = subprocess.Popen(
        redis_server_argv(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


ADMIN_TOKEN = "bench-admin-token-" + os.urandom(4).hex()


@dataclass
class Service:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def run_service(
    catalog: Path,
    redis_url: str | None,
    settings: dict[str, str] | None = None,
    startup_timeout_s: float = 600,
    store_dir: Path | None = None,
    code: Path = REPO,
    workers: int = 1,
) -> Iterator[Service]:
    """``python -m service`` as a uvicorn subprocess on a free loopback port; stopped at exit.

    ``store_dir`` may be shared by several services (the first saves the index, the next load
    it); by default each gets a temporary one. ``code``: the source tree to run (another
    checkout, for an A/B between commits). ``workers``: ``CPREC_WORKERS``; ready once every
    worker has answered ``/ready``.
    """
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="cprec-bench-"))
    store = store_dir or tmp / "store"
    env = {
        **os.environ,
        "CPREC_STORE_DIR": str(store),
        "CPREC_CATALOG_PATH": str(catalog),
        "CPREC_ADMIN_TOKEN": ADMIN_TOKEN,
        "CPREC_LOG_LEVEL": "WARNING",
        "CPREC_REDIS_PREFIX": f"cprec-bench-{os.getpid()}-{port}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    # The bundled SmolLM2 conversion is cached under the store; reuse the repo's to skip it.
    bases = REPO / "var" / "store" / "bases"
    store.mkdir(parents=True, exist_ok=True)
    if bases.is_dir() and not (store / "bases").exists():
        (store / "bases").symlink_to(bases)
    # The service's 50 ms Redis timeout is tuned to degrade fast on a dedicated host; on this
    # shared, oversubscribed machine a healthy local Redis can take longer than that to be
    # scheduled, which would turn cache hits into misses. 0.5 s keeps the cache measurable.
    env.setdefault("CPREC_TUNING__REDIS_TIMEOUT_S", "0.5")
    # The serving benchmarks measure the LM-over-history-text path (the flat kind), which the
    # base model's default zero-shot scorer (mean of item vectors) would skip.
    env.setdefault("CPREC_ZERO_SHOT", "text")
    # One process unless a benchmark asks for more: the batching and device rows read one
    # process's /metrics, and a worker count is a condition a benchmark names.
    env["CPREC_WORKERS"] = str(workers)
    env.pop("REDIS_URL", None)
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(settings or {})
    log_path = tmp / "service.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [PY, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=code,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    svc = Service(f"http://127.0.0.1:{port}", proc, log_path, env)
    try:
        _wait_ready(svc, startup_timeout_s)
        if workers > 1:
            wait_workers(svc, workers, startup_timeout_s)
        yield svc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _wait_ready(svc: Service, timeout_s: float) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if svc.proc.poll() is not None:
            raise RuntimeError(
                f"service exited with {svc.proc.returncode}:\n"
                + svc.log_path.read_text(errors="replace")[-3000:]
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(svc.url + "/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(
        f"service not ready after {timeout_s}s:\n"
        + svc.log_path.read_text(errors="replace")[-3000:]
    )


def wait_workers(svc: Service, n: int, timeout_s: float) -> None:
    """Until each of ``n`` workers has answered ``/ready`` (a new connection goes to whichever
    worker accepts first, so the first ready one would answer alone while others load)."""
    import httpx

    seen: set[int] = set()
    deadline = time.time() + timeout_s
    while len(seen) < n:
        if svc.proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(
                f"workers {sorted(seen)} of {n} ready:\n"
                + svc.log_path.read_text(errors="replace")[-3000:]
            )
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(svc.url + "/ready", timeout=2)
            if r.status_code == 200:
                seen.add(int(r.json().get("worker", 0)))
        time.sleep(0.05)


# -- load generator ---------------------------------------------------------------------------
@dataclass
class LoadResult:
    latencies: list[float]
    ok: int
    failed: int
    status: dict[str, int]
    elapsed_s: float
    cached: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.ok + self.failed,
            "ok": self.ok,
            "failed": self.failed,
            "rps": round(self.ok / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "cached_share": round(self.cached / max(self.ok, 1), 3),
            **lat_summary(self.latencies),
            "status": self.status,
        }


# A closed, reset, timed-out or garbled connection: counted as a failed request, then reopened.
_HTTP_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError)


class HTTPConn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 for the load generator.

    Requests are written as pre-encoded bytes and responses read by Content-Length (or chunks):
    the generator shares the 2 cores with the service it measures, and httpx spent ~2.8 ms of
    CPU per /recommend call there (8% of the machine at 50 requests/s) against ~0.3 ms here.
    """

    def __init__(self, url: str, timeout_s: float = 120.0) -> None:
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError("the load generator only targets 127.0.0.1")
        self.host, _, port = url.removeprefix("http://").partition(":")
        self.port = int(port.rstrip("/"))
        self.timeout_s = timeout_s
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def connect(self) -> None:
        """Open the connection now (a refused one is left for ``request`` to count)."""
        if self._rw is None:
            with contextlib.suppress(*_HTTP_ERRORS):
                async with asyncio.timeout(self.timeout_s):
                    self._rw = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """(status, body); a broken connection raises OSError and is reopened next time."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._rw is None:
                    self._rw = await asyncio.open_connection(self.host, self.port)
                reader, writer = self._rw
                writer.write(head + body)
                return await self._response(reader)
        except _HTTP_ERRORS:
            await self.close()
            raise

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        status = int((await reader.readline()).split()[1])
        length, chunked, close = 0, False, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value == b"close"
        if chunked:
            parts = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readline()
            await reader.readline()
            data = b"".join(parts)
        else:
            data = await reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self._rw is not None:
            writer = self._rw[1]
            self._rw = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def drive(
    url: str,
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    max_requests: int,
    max_s: float,
    path: str = "/recommend",
) -> LoadResult:
    """Closed-loop load: ``concurrency`` workers (one keep-alive connection each) send ``bodies``
    in order (cycling when there are fewer bodies than requests), bounded by ``max_requests``
    and ``max_s``; loopback only.

    The connections are opened before the clock starts: connection set-up is a cost of the
    harness, not the service, and 32 connects at once can leave part of a round's first cohort
    late for the service's first batch, to wait two (it would set a batched round's p99).
    """
    lat: list[float] = []
    status: dict[str, int] = {}
    counters = {"next": 0, "ok": 0, "failed": 0, "cached": 0}
    payloads = [json.dumps(b).encode() for b in bodies]
    conns = [HTTPConn(url) for _ in range(concurrency)]
    await asyncio.gather(*(c.connect() for c in conns))
    deadline = time.perf_counter() + max_s

    async def worker(conn: HTTPConn) -> None:
        while time.perf_counter() < deadline and counters["next"] < max_requests:
            payload = payloads[counters["next"] % len(payloads)]
            counters["next"] += 1
            t0 = time.perf_counter()
            try:
                code, data = await conn.request("POST", path, payload)
                good = code == 200
                cached = good and bool(json.loads(data).get("cached"))
                key = str(code)
            except _HTTP_ERRORS as exc:
                key, good, cached = type(exc).__name__, False, False
            status[key] = status.get(key, 0) + 1
            if good:
                counters["ok"] += 1
                counters["cached"] += cached
                lat.append(time.perf_counter() - t0)
            else:
                counters["failed"] += 1

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        elapsed = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.close()
    return LoadResult(lat, counters["ok"], counters["failed"], status, elapsed, counters["cached"])


async def probe(url: str, path: str, stop: asyncio.Event, interval_s: float = 0.02) -> list[float]:
    """GET ``path`` every ``interval_s`` until ``stop``: how responsive the event loop stays."""
    lat: list[float] = []
    conn = HTTPConn(url, timeout_s=30)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            with contextlib.suppress(*_HTTP_ERRORS):
                code, _ = await conn.request("GET", path)
                if code == 200:
                    lat.append(time.perf_counter() - t0)
            await asyncio.sleep(interval_s)
    finally:
        await conn.close()
    return lat
