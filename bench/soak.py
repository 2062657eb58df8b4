"""Soak: the real service for two minutes at concurrency 32, with a full reindex and a Redis
restart in the middle. Issue 4, "Load".

One ``python -m service`` process (the bundled MiniLM on CPU, the shipped demo catalogue, a
private ``redis-server`` on a free loopback port) takes a closed loop of ``/recommend`` calls from
32 workers: half re-send a history from a warm pool (cache hits), half send a history never seen
before (cache misses, each one a forward pass). At about 25% of the run every catalogue title is
changed and a full reindex is posted (all items are re-embedded on the same device thread the
requests use); at about 40% the served model is switched (``POST /models/reload``) to a ``hier``
version over the same LM files, published into the soak's store before the start (a random user
model: the soak measures the switch, not its quality), and at about 50% rolled back
(``POST /models/rollback``); at about 60% Redis is stopped for a few seconds and started again,
empty. Each event waits for the one before it, and the load runs on until a few seconds after
the last.

Reported per phase (before / during / after each event): requests, p50 / p99, cache-hit share,
5xx and lost requests (no response: a connection error or a 60 s timeout), and the server's
RSS over the run (all its workers'). Passes when there is no 5xx, nothing is lost, the reindex,
the switch and the rollback succeed, every answer names a (model, index) pair that was built
together, the cache serves hits again after Redis returns, the RSS grows by less than
``--rss-bound-mib`` from the end of warm-up to the end, and SIGTERM ends the process cleanly
(exit 0). Traffic goes to 127.0.0.1 only and every loop is bounded in time.

    python -m bench.soak              # 120 s, concurrency 32; writes bench/results/soak.json
    python -m bench.soak --quick      # 30 s smoke run (not recorded in docs/benchmarks.md)

Both write the model-rollout figures into docs/reliability.md (its ``soak-rollout`` section,
which names the run's duration).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from bench.common import DOCS, free_port, redis_server_argv, write_section

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "soak.json"
DOC = DOCS
RELIABILITY = REPO / "docs" / "reliability.md"
TOKEN = "soak-admin-token-5b1d"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
REDIS_RETRY_S = 2.0
ROLLOUT_VERSION = "soak-hier"
TAIL_S = 8.0  # the load runs at least this long after the last event
GAP_S = 3.0  # and at least this long between two events


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            sys.exit("redis-server is not installed (apt-get install redis-server)")
        self.port, self.workdir = free_port(), workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            redis_server_argv(self.port, self.workdir, str(self.binary)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Sample:
    t: float  # start, seconds since the load began
    latency: float
    status: int  # 0 = lost (no response)
    cached: bool
    kind: str  # hit | miss
    pair: tuple[str, str] = ("", "")  # (model_version, index_version) of a 200


def publish_rollout_model(store_dir: Path, base: str) -> str:
    """A ``hier`` version over ``base``'s LM files (so a switch to it reuses the served LM
    vectors) with a random user model, published without an alias: the base model stays the
    one served at start."""
    import torch

    from cprec.hier import HierConfig, HierRec
    from cprec.lm import resolve_base_model
    from cprec.text import Template
    from model_store import ModelStore

    src = resolve_base_model(base, store_dir)
    text_dim = int(json.loads((src.path / "config.json").read_text())["hidden_size"])
    domains = sorted({it["domain"] for it in load_catalog()})
    torch.manual_seed(0)
    cfg = HierConfig(text_dim=text_dim, dim=64, layers=1, heads=2, ffn=128, max_len=20)
    cfg.domains = domains
    with tempfile.TemporaryDirectory() as tmp:
        saved = HierRec(cfg).eval().save_pretrained(Path(tmp) / "hier")
        ModelStore(store_dir).publish(
            src.path,
            {
                "version": ROLLOUT_VERSION,
                "kind": "hier",
                "base_model": base,
                "pooling": src.pooling,
                "is_decoder": src.is_decoder,
                "dim": cfg.dim,
                "max_length": 256,
                "template": Template().model_dump(),
            },
            aliases=(),
            extra_files={f"hier/{p.name}": p for p in sorted(saved.iterdir())},
        )
    return ROLLOUT_VERSION


def tree_rss_mib(ps: psutil.Process) -> float:
    """RSS of the service: its process and, with several workers (``CPREC_WORKERS``, one per
    core by default on a CPU), every worker under it."""
    total = ps.memory_info().rss
    for child in ps.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a worker restarting
            pass
    return total / 2**20


def worker_count(ps: psutil.Process) -> int:
    """The service's workers: the processes it spawned (else it is the one worker)."""
    spawned = 0
    for child in ps.children():
        try:
            spawned += "spawn_main" in " ".join(child.cmdline())
        except psutil.Error:
            pass
    return max(1, spawned)


def built_pairs(store_dir: Path) -> set[tuple[str, str]]:
    """Every (model_version, index_version) a snapshot in the store was built for."""
    root = store_dir / "indexes"
    return {
        (m.name, i.name)
        for m in root.iterdir()
        if (m / "versions").is_dir()
        for i in (m / "versions").iterdir()
        if not i.name.startswith(".")
    }


def load_catalog() -> list[dict[str, Any]]:
    from service.settings import DEMO_CATALOG

    return [json.loads(line) for line in DEMO_CATALOG.read_text().splitlines() if line.strip()]


async def wait_ready(
    client: httpx.AsyncClient, proc: subprocess.Popen[bytes], timeout: float = 600
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode} before it was ready")
        try:
            r = await client.get("/ready", timeout=2)
            if r.status_code == 200:
                body: dict[str, Any] = r.json()
                return body
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    raise RuntimeError("service not ready in time")


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 1) if xs else None


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    catalog = load_catalog()
    work = Path(tempfile.mkdtemp(prefix="cprec-soak-"))
    rollout_version = publish_rollout_model(work / "store", args.model)
    redis = Redis(work)
    redis.start()
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CPREC_STORE_DIR": str(work / "store"),
        "CPREC_ADMIN_TOKEN": TOKEN,
        "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
        "CPREC_TUNING__REDIS_RETRY_S": str(REDIS_RETRY_S),
        "CPREC_BASE_MODEL": args.model,
        "CPREC_LOG_LEVEL": "WARNING",
        "CPREC_FAISS_GPU": "false",
        # Repeats must reach Redis: the ranked-list cache would answer them in process, and the
        # soak is about the user-vector cache failing and coming back.
        "CPREC_RESULT_CACHE_SIZE": "0",
    }
    log = open(work / "service.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ps = psutil.Process(proc.pid)
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(
        max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8
    )
    result: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
            ready = await wait_ready(client, proc)
            by_domain: dict[str, list[dict[str, Any]]] = {}
            for it in catalog:
                by_domain.setdefault(it["domain"], []).append(it)
            domains = sorted(by_domain)

            def history(n: int) -> list[dict[str, str]]:
                r = random.Random(n)
                picks = [r.choice(catalog) for _ in range(r.randint(2, 8))]
                return [{"domain": p["domain"], "title": p["title"]} for p in picks]

            warm = [history(i) for i in range(args.warm_pool)]
            for i in range(0, len(warm), 16):  # warm the cache (and the allocator)
                await asyncio.gather(
                    *[
                        client.post("/recommend", json={"history": h, "k": 10})
                        for h in warm[i : i + 16]
                    ]
                )
            samples: list[Sample] = []
            rss: list[tuple[float, float]] = []
            events: dict[str, float] = {}
            t0 = time.monotonic()
            # The load runs until both the duration is over and the events are done (then
            # TAIL_S more), so that each phase gets its traffic when the events run late.
            stop = {"at": t0 + args.duration}
            events_done = asyncio.Event()

            def loading() -> bool:
                return not events_done.is_set() or time.monotonic() < stop["at"]

            counter = iter(range(10**6, 10**9))

            async def worker(w: int) -> None:
                wrng = random.Random(w)
                while loading():
                    kind = "hit" if wrng.random() < 0.5 else "miss"
                    h = wrng.choice(warm) if kind == "hit" else history(next(counter))
                    body = {
                        "history": h,
                        "k": 10,
                        "target_domains": wrng.sample(domains, k=min(2, len(domains))),
                    }
                    ts = time.monotonic()
                    pair = ("", "")
                    try:
                        r = await client.post("/recommend", json=body)
                        status = r.status_code
                        cached = False
                        if status == 200:
                            answer = r.json()
                            cached = bool(answer.get("cached"))
                            pair = (answer["model_version"], answer["index_version"])
                    except (httpx.HTTPError, ValueError, KeyError):
                        status, cached = 0, False
                    samples.append(
                        Sample(ts - t0, time.monotonic() - ts, status, cached, kind, pair)
                    )

            async def sample_rss() -> None:
                while loading():
                    rss.append((time.monotonic() - t0, tree_rss_mib(ps)))
                    await asyncio.sleep(1.0)

            async def model_job(name: str, path: str, body: Any) -> dict[str, Any]:
                """Submit a model job, wait for it; its outcome and timings."""
                events[f"{name}_start"] = time.monotonic() - t0
                r = await client.post(path, json=body, headers=ADMIN)
                job = r.json()
                out: dict[str, Any] = {"submit_status": r.status_code}
                while job.get("state") in ("queued", "running"):
                    await asyncio.sleep(0.1)
                    job = (await client.get(f"/models/jobs/{job['job_id']}", headers=ADMIN)).json()
                events[f"{name}_end"] = time.monotonic() - t0
                took = (job.get("finished_at") or 0) - (job.get("created_at") or 0)
                out.update(
                    {
                        k: job.get(k)
                        for k in (
                            "state",
                            "from_version",
                            "model_version",
                            "index_version",
                            "reused_lm_vectors",
                            "index_source",
                            "embedded",
                            "steps_done",
                            "error",
                        )
                    }
                )
                out["job_s"] = round(took, 2)
                return out

            async def at(fraction: float) -> None:
                """Wait until ``fraction`` of the run, or ``GAP_S`` after the last event."""
                last = max(events.values(), default=0.0)
                when = max(args.duration * fraction, last + GAP_S)
                await asyncio.sleep(max(0.0, when - (time.monotonic() - t0)))

            async def events_task() -> dict[str, Any]:
                try:
                    return await run_events()
                finally:
                    events_done.set()

            async def run_events() -> dict[str, Any]:
                out: dict[str, Any] = {}
                await asyncio.sleep(args.duration * 0.25)
                items = [{**it, "title": f"{it['title']} (2nd edition)"} for it in catalog]
                events["reindex_start"] = time.monotonic() - t0
                r = await client.post(
                    "/items/reindex",
                    json={"mode": "full", "items": items},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                out["reindex_submit_status"] = r.status_code
                job = r.json()
                while job.get("state") in ("queued", "running"):
                    await asyncio.sleep(0.25)
                    job = (
                        await client.get(
                            f"/items/reindex/{job['job_id']}",
                            headers={"Authorization": f"Bearer {TOKEN}"},
                        )
                    ).json()
                events["reindex_end"] = time.monotonic() - t0
                out["reindex_state"], out["reindex_items"] = job.get("state"), len(items)
                out["reindex_error"] = job.get("error")
                await at(0.4)
                out["switch"] = await model_job(
                    "switch", "/models/reload", {"model": rollout_version}
                )
                await at(0.5)
                out["rollback"] = await model_job("rollback", "/models/rollback", None)
                await at(0.6)
                events["redis_stop"] = time.monotonic() - t0
                await asyncio.to_thread(redis.stop)
                await asyncio.sleep(args.redis_down_s)
                await asyncio.to_thread(redis.start)
                events["redis_start"] = time.monotonic() - t0
                back = events["redis_start"] + REDIS_RETRY_S
                stop["at"] = max(stop["at"], t0 + back + TAIL_S)
                return out

            tasks = [asyncio.create_task(worker(w)) for w in range(args.concurrency)]
            ev = asyncio.create_task(events_task())
            await asyncio.gather(sample_rss(), *tasks)
            ev_out = await ev
            metrics = (await client.get("/metrics")).text
            final_ready = (await client.get("/ready")).json()
            duration = stop["at"] - t0
            pairs = built_pairs(work / "store")
            workers = worker_count(ps)
    finally:
        # SIGTERM: the process drains and must exit 0 on its own.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        redis.stop()
    exit_code = proc.returncode

    # -- phases ---------------------------------------------------------------------------------
    # A cache outage lasts from the stop until the back-off after the last failure has run out.
    back = events["redis_start"] + REDIS_RETRY_S
    phases = [
        ("before reindex", 0.0, events["reindex_start"]),
        ("during reindex", events["reindex_start"], events["reindex_end"]),
        ("after reindex", events["reindex_end"], events["switch_start"]),
        ("during model switch", events["switch_start"], events["switch_end"]),
        ("on the new model", events["switch_end"], events["rollback_start"]),
        ("during rollback", events["rollback_start"], events["rollback_end"]),
        ("after rollback", events["rollback_end"], events["redis_stop"]),
        ("Redis down", events["redis_stop"], back),
        ("after Redis restart", back, duration + 60),
    ]
    rows = []
    for name, a, b in phases:
        ss = [s for s in samples if a <= s.t < b]
        ok = [s.latency for s in ss if s.status == 200]
        hits = [s for s in ss if s.kind == "hit" and s.status == 200]
        rows.append(
            {
                "phase": name,
                "from_s": round(a, 1),
                "to_s": round(min(b, duration), 1),
                "requests": len(ss),
                "rps": round(len(ss) / max(min(b, duration) - a, 1e-9), 1),
                "p50_ms": pct(ok, 50),
                "p99_ms": pct(ok, 99),
                "p99_miss_ms": pct(
                    [s.latency for s in ss if s.status == 200 and s.kind == "miss"], 99
                ),
                "cache_hit_share_of_repeats": round(sum(s.cached for s in hits) / len(hits), 3)
                if hits
                else None,
                "status_5xx": sum(500 <= s.status < 600 for s in ss),
                "status_429": sum(s.status == 429 for s in ss),
                "lost": sum(s.status == 0 for s in ss),
            }
        )
    warm_end = [m for t, m in rss if t >= 10.0] or [m for _, m in rss]
    mem = {
        "rss_start_mib": round(rss[0][1], 1),
        "rss_after_warmup_mib": round(warm_end[0], 1),
        "rss_max_mib": round(max(m for _, m in rss), 1),
        "rss_end_mib": round(rss[-1][1], 1),
        "growth_after_warmup_mib": round(rss[-1][1] - warm_end[0], 1),
        "bound_mib": args.rss_bound_mib,
    }
    cache_errors = sum(
        float(m.group(1))
        for m in re.finditer(r'^cprec_cache_total\{result="error"\} (\S+)', metrics, re.M)
    )
    total = len(samples)
    answered = {s.pair for s in samples if s.status == 200}
    switch, rollback = ev_out.get("switch", {}), ev_out.get("rollback", {})
    firsts = [s.t for s in samples if s.pair[0] == rollout_version]
    switch["first_answer_s"] = round(min(firsts) - events["switch_start"], 2) if firsts else None

    def ok_between(a: str, b: str) -> list[float]:
        return [x.latency for x in samples if x.status == 200 and events[a] <= x.t < events[b]]

    outside = ok_between("reindex_end", "switch_start") + ok_between("rollback_end", "redis_stop")
    rollout = {
        "version": rollout_version,
        "switch": switch,
        "rollback": rollback,
        "answered_pairs": sorted(answered),
        "foreign_pairs": sorted(answered - pairs),
        "p99_outside_ms": pct(outside, 99),
        "p50_outside_ms": pct(outside, 50),
    }
    checks = {
        "zero_5xx": sum(r["status_5xx"] for r in rows) == 0,
        "zero_lost": sum(r["lost"] for r in rows) == 0,
        "reindex_succeeded": ev_out.get("reindex_state") == "succeeded",
        "model_switch_succeeded": switch.get("state") == "succeeded" and bool(firsts),
        "rollback_succeeded": rollback.get("state") == "succeeded"
        and final_ready.get("model_version") == ready.get("model_version"),
        "pairs_built_together": not rollout["foreign_pairs"],
        "new_index_served": final_ready.get("index_version") != ready.get("index_version"),
        "cache_errors_counted": cache_errors > 0,
        # Redis comes back empty: a repeat first misses (and is written), then hits. Any hit
        # after the restart shows the cache is read and written again.
        "cache_used_after_restart": (rows[-1]["cache_hit_share_of_repeats"] or 0) > 0,
        "memory_bound": mem["growth_after_warmup_mib"] < args.rss_bound_mib,
        "sigterm_exit_0": exit_code == 0,
    }
    result = {
        "benchmark": "soak",
        "model": args.model,
        "duration_s": round(duration, 1),
        "concurrency": args.concurrency,
        "workers": workers,
        "catalogue_items": len(catalog),
        "requests": total,
        "rps": round(total / args.duration, 1),
        "events_s": {k: round(v, 1) for k, v in events.items()},
        **{k: v for k, v in ev_out.items() if k not in ("switch", "rollback")},
        "rollout": rollout,
        "cache_errors_counted": cache_errors,
        "phases": rows,
        "memory": mem,
        "checks": checks,
        "passed": all(checks.values()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def table(res: dict[str, Any]) -> str:
    lines = [
        "| phase | window (s) | requests | req/s | p50 ms | p99 ms | p99 miss ms | "
        "cache hits (repeats) | 5xx | 429 | lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["phases"]:
        hit = r["cache_hit_share_of_repeats"]
        lines.append(
            f"| {r['phase']} | {r['from_s']}–{r['to_s']} | {r['requests']} | "
            f"{r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['p99_miss_ms']} | "
            f"{'' if hit is None else f'{hit:.0%}'} | {r['status_5xx']} | "
            f"{r['status_429']} | {r['lost']} |"
        )
    m = res["memory"]
    lines += [
        "",
        f"Server RSS: {m['rss_start_mib']} MiB at the start of the load, "
        f"{m['rss_after_warmup_mib']} MiB after 10 s, max {m['rss_max_mib']} MiB, "
        f"{m['rss_end_mib']} MiB at the end: growth {m['growth_after_warmup_mib']} MiB "
        f"(bound {m['bound_mib']} MiB).",
        "Checks: " + ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in res["checks"].items()),
    ]
    return "\n".join(lines)


def write_doc(res: dict[str, Any]) -> None:
    ev = res["events_s"]
    body = (
        f"## Soak (`python -m bench.soak`)\n\n"
        f"{res['duration_s']} s at concurrency {res['concurrency']} against `python -m "
        f"service` ({res['model']}, CPU, {res['catalogue_items']}-item demo catalogue, private "
        f"redis-server), half cache-hit and half cache-miss traffic; a full reindex of every "
        f"item (all titles changed, so all re-embedded) from {ev['reindex_start']} s to "
        f"{ev['reindex_end']} s, a model switch from {ev['switch_start']} s to "
        f"{ev['switch_end']} s and a rollback from {ev['rollback_start']} s to "
        f"{ev['rollback_end']} s (docs/reliability.md), Redis stopped at {ev['redis_stop']} s "
        f"and back at "
        f"{ev['redis_start']} s (the cache is skipped for {REDIS_RETRY_S:g} s after a "
        f"failure). {res['requests']} requests, {res['rps']} req/s overall; {res['date']}, "
        f"{res['machine']['cpus']} shared cores. Raw: `bench/results/soak.json`.\n\n"
        f"{table(res)}"
    )
    write_section("soak", body, "python -m bench.soak", DOC)


def rollout_table(res: dict[str, Any]) -> str:
    """The phases around the switch and the rollback, and what each job did."""
    names = {
        "after reindex",
        "during model switch",
        "on the new model",
        "during rollback",
        "after rollback",
    }
    lines = [
        "| phase | window (s) | requests | p50 ms | p99 ms | 5xx | 429 | lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["phases"]:
        if r["phase"] in names:
            lines.append(
                f"| {r['phase']} | {r['from_s']}–{r['to_s']} | {r['requests']} | "
                f"{r['p50_ms']} | {r['p99_ms']} | {r['status_5xx']} | {r['status_429']} | "
                f"{r['lost']} |"
            )
    ro = res["rollout"]
    sw, rb = ro["switch"], ro["rollback"]

    def job(j: dict[str, Any]) -> str:
        how = (
            "the LM vectors of the served snapshot reused, index rows computed"
            if j.get("reused_lm_vectors")
            else f"index {j.get('index_source')}"
        )
        if j.get("index_source") == "saved":
            how = "its saved snapshot of the same catalogue loaded"
        return (
            f"{j.get('state')} in {j.get('job_s')} s ({j.get('from_version')} -> "
            f"{j.get('model_version')}; {how}; {j.get('embedded')} item texts encoded)"
        )

    lines += [
        "",
        f"- Switch to `{ro['version']}`: {job(sw)}; the first answer from the new model came "
        f"{sw.get('first_answer_s')} s after the request.",
        f"- Rollback: {job(rb)}.",
        f"- p50 / p99 outside the two jobs (after the reindex and after the rollback, before "
        f"Redis stops): {ro['p50_outside_ms']} / {ro['p99_outside_ms']} ms.",
        f"- (model, index) pairs answered: {len(ro['answered_pairs'])}, of which not built "
        f"together: {len(ro['foreign_pairs'])}.",
        "- Checks: "
        + ", ".join(
            f"{k} {'✓' if res['checks'][k] else '✗'}"
            for k in (
                "zero_5xx",
                "zero_lost",
                "model_switch_succeeded",
                "rollback_succeeded",
                "pairs_built_together",
            )
        ),
    ]
    return "\n".join(lines)


def write_rollout_doc(res: dict[str, Any], quick: bool) -> None:
    body = (
        f"{res['duration_s']} s{' (`--quick`)' if quick else ''} at concurrency "
        f"{res['concurrency']} against `python -m service` ({res['workers']} worker(s), "
        f"{res['model']} served zero-shot, CPU, {res['catalogue_items']}-item demo catalogue, "
        "private redis-server), half "
        f"cache-hit and half cache-miss traffic, the ranked-list cache off. After a full "
        f"reindex, the model is switched to `{res['rollout']['version']}` (a `hier` version "
        f"over the same LM files, with a random user model) and rolled back, each through "
        f"one worker while the others follow the store's `SERVING`; "
        f"{res['date']}, {res['machine']['cpus']} shared cores, the machine otherwise in use.\n\n"
        f"{rollout_table(res)}"
    )
    write_section("soak-rollout", body, "python -m bench.soak", RELIABILITY)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--warm-pool", type=int, default=200, help="histories re-sent as cache hits")
    p.add_argument("--redis-down-s", type=float, default=4.0)
    p.add_argument(
        "--rss-bound-mib",
        type=float,
        default=150.0,
        help="max RSS growth from 10 s into the load to its end",
    )
    p.add_argument("--quick", action="store_true", help="30 s smoke run; results not recorded")
    args = p.parse_args()
    if args.quick:
        args.duration = 30.0
    res = asyncio.run(soak(args))
    print(table(res))
    print(rollout_table(res))
    write_rollout_doc(res, args.quick)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        write_doc(res)
    sys.exit(0 if res["passed"] else 1)


if __name__ == "__main__":
    main()
