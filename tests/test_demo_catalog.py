"""The shipped demo catalogue is what ``tools/make_demo_catalog.py`` generates, byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generator_reproduces_the_shipped_catalogue(tmp_path: Path) -> None:
    out = tmp_path / "demo.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_demo_catalog.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert out.read_bytes() == (ROOT / "service" / "data" / "demo_catalog.jsonl").read_bytes()
