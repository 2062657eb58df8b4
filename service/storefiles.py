"""Files several processes share under the store: an exclusive lock, and job statuses.

Workers on one machine and replicas on several meet only in the store (and Redis); these are
the two ways they coordinate there, used by the reindex and rollout paths alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

JOBS_KEPT = 100  # finished jobs whose status stays queryable, per kind of job


@contextlib.asynccontextmanager
async def store_lock(path: Path, poll_s: float = 0.05) -> AsyncIterator[None]:
    """An exclusive flock on ``path`` across processes (and across tasks of one process: each
    holder opens its own descriptor); released by the kernel if the holder dies, so a killed
    writer never leaves the store locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(poll_s)
        yield
    finally:
        os.close(fd)


def write_status(path: Path, data: bytes, keep: int, finished: bool) -> None:
    """Write a job's status where every worker reads it (temp file + rename: a reader sees a
    whole status); once a job has finished, statuses beyond the newest ``keep`` are removed.
    A failure is logged: the status stays visible to the process that runs the job."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        if finished:
            kept = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
            for old in kept[:-keep]:
                old.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot write job status %s: %s", path, exc)
