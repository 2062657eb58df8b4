"""Several service processes on one port (``CPREC_WORKERS``).

The parent binds the socket and starts each worker as a fresh interpreter (spawn: no torch or
faiss state is forked) that serves on the inherited socket; the kernel hands each new
connection to a worker that is accepting. Each worker is a whole service (model, index, event
loop: one GIL each) and they meet only where several replicas would: the model store, the saved
index snapshots (``CURRENT``, the writer lock, job statuses) and Redis. A reindex through one
worker is published to the store and every other worker swaps it in within ``index_sync_s``
plus the time to load it (``Engine._follow_store``).

The parent restarts a worker that dies after it started serving; one that fails to start stops
them all (the same settings would fail again). SIGTERM/SIGINT are passed to every worker, which
drains as a single service does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from typing import Any

from service.settings import Settings

log = logging.getLogger("service.supervisor")

STARTUP_FAILURE = 3  # a worker's exit status when it never started serving (uvicorn's own)
RESTARTS_PER_MINUTE = 5  # more crashes than this in a minute: give up instead of flapping


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def threads_per_worker(workers: int) -> int:
    """Cores per worker for torch's and faiss's thread teams: N workers with a team of all the
    cores each would oversubscribe the machine N times."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def worker_main(overrides: dict[str, Any], sock: socket.socket, index: int) -> None:
    """One worker: the whole service on the inherited socket (runs in the spawned child)."""
    os.environ["CPREC_WORKER"] = str(index)
    from service.__main__ import serve_one  # the child imports the service afresh

    serve_one(Settings(**overrides), sockets=[sock])


def supervise(settings: Settings, overrides: dict[str, Any], workers: int) -> int:
    """Run ``workers`` workers until SIGTERM/SIGINT; the exit status (0 after a clean stop)."""
    sock = bind(settings.host, settings.port)
    threads = str(threads_per_worker(workers))
    # Read by each child's torch and faiss when they load (spawned children inherit the env).
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def start(index: int) -> BaseProcess:
        proc = ctx.Process(
            target=worker_main, args=(overrides, sock, index), name=f"cprec-worker-{index}"
        )
        proc.start()
        return proc

    def on_signal(sig: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs = [start(i) for i in range(workers)]
    log.info(
        "serving on http://%s:%d with %d workers (pids %s, %s threads each)",
        settings.host,
        settings.port,
        workers,
        ", ".join(str(p.pid) for p in procs),
        threads,
    )
    restarts: list[float] = []
    status = 0
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if proc.is_alive() or stopping:
                continue
            code = proc.exitcode
            if code == STARTUP_FAILURE:
                log.error("worker %d failed to start (see its log); stopping", i)
                stopping, status = True, STARTUP_FAILURE
                break
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > RESTARTS_PER_MINUTE:
                log.error("workers keep dying (%d restarts in a minute); stopping", len(restarts))
                stopping, status = True, 1
                break
            log.warning("worker %d (pid %s) exited with %s; starting it again", i, proc.pid, code)
            procs[i] = start(i)
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)  # each drains: /ready 503, in-flight finish
    deadline = time.monotonic() + 40
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    sock.close()
    return status
