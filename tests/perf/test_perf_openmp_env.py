"""The OpenMP spin setting reaches libgomp: ``cprec`` sets it on import, and the service and the
serving benchmark import ``cprec`` before torch (libgomp reads it when torch loads it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
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
def test_cprec_sets_the_spin_count_unless_told(env: dict[str, str], expected: str) -> None:
    code = "import os, cprec; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _run(code, **env) == expected


@pytest.mark.parametrize("module", ["service.__main__", "bench.serve"])
def test_cprec_is_imported_before_torch(module: str) -> None:
    code = (
        "import builtins, sys\n"
        "seen = []\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name.split('.')[0] in ('cprec', 'torch') and name.split('.')[0] not in seen:\n"
        "        seen.append(name.split('.')[0])\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
        f"import {module}\n"
        "print(','.join(seen))\n"
    )
    assert _run(code).split(",")[:1] == ["cprec"]
