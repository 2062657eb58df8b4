"""The runtime settings reach torch: ``cprec.runtime.configure_runtime`` sets them unless the
environment does, and the service and the benchmarks call it before anything imports torch
(libgomp and oneDNN read them once, when torch loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> str:
    unset = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    base = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "20000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "active"}, "None")],
)
def test_the_spin_count_is_set_unless_told(env: dict[str, str], expected: str) -> None:
    code = (
        "import os, cprec\n"
        "assert 'GOMP_SPINCOUNT' not in os.environ or os.environ['GOMP_SPINCOUNT'] == '5'\n"
        "from cprec.runtime import configure_runtime\n"
        "configure_runtime()\n"
        "print(os.environ.get('GOMP_SPINCOUNT'))"
    )
    assert _run(code, **env) == expected


@pytest.mark.parametrize("module", ["service.__main__", "bench.serve"])
def test_the_runtime_is_configured_before_torch_loads(module: str) -> None:
    code = (
        "import builtins, os\n"
        "seen = {}\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name.split('.')[0] == 'torch' and not seen:\n"
        "        seen.update({v: os.environ.get(v) for v in "
        "('GOMP_SPINCOUNT', 'ONEDNN_PRIMITIVE_CACHE_CAPACITY')})\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
        f"import {module}\n"
        "print(seen['GOMP_SPINCOUNT'], seen['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])\n"
    )
    assert _run(code).split() == ["20000", "16"]
