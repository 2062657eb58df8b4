"""Process-wide settings of torch's native runtimes, which are read once, when torch loads.

Call :func:`configure_runtime` before anything imports torch: the service does it first thing in
``service/__init__.py`` and the benchmarks in ``bench/__init__.py``, so ``python -m service`` and
``python -m bench.*`` run under the same settings (``tests/perf/test_perf_openmp_env.py`` pins
that). Training does not call it: its loops own the cores and want libgomp's defaults.
"""

from __future__ import annotations

import os

# libgomp's spin count before a waiting OpenMP thread sleeps (its own default spins far longer).
# A service shares two cores between its event loop and torch's thread team; a long spin takes
# the CPU the loop needs (docs/decisions/003-serving-on-two-cores.md).
GOMP_SPINCOUNT = "20000"
# oneDNN's per-shape primitive cache (1024 by default): dynamic batching makes many shapes and
# the default grew an encoder's memory without making it faster (same decision record).
ONEDNN_PRIMITIVE_CACHE_CAPACITY = "16"


def configure_runtime() -> None:
    """Set the two variables unless the environment already does (an explicit value wins;
    ``OMP_WAIT_POLICY`` set means the operator chose the OpenMP waiting behaviour)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY)
