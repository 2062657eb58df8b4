"""bench/gpu_check.sh on a machine without a GPU: it parses, and its dry run (no installs, the
CPU smoke sizes of bench/gpu.py) writes every JSON file, each naming the device it ran on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"

# The keys each file holds when its part ran (``status`` "ok").
EXPECTED = {
    "encoder": {"model", "dtype", "rows", "peak_seq_s", "gpu_utilisation"},
    "faiss": {"dim", "k", "rows", "faiss_gpu", "gpu_skipped", "gpu_utilisation"},
    "train": {"config", "rows", "gpu_skipped", "best_gpu_vs_cpu_same_batch"},
    "serve": {"rows", "targets", "catalog_items", "gpu_utilisation"},
    "utilisation": {"overall", "rows", "nvidia_smi"},
}


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_dry_run_writes_every_file(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_OUT": str(tmp_path / "gpu")}
    env["GPU_CHECK_PY"] = sys.executable
    run = subprocess.run(
        ["bash", str(SCRIPT)], env=env, cwd=REPO, capture_output=True, text=True, timeout=240
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "== summary" in run.stdout and "every step passed" in run.stdout, out[-4000:]
    for part, keys in EXPECTED.items():
        data = json.loads((tmp_path / "gpu" / f"{part}.json").read_text(encoding="utf-8"))
        assert data["device_name"] and data["device"]["cpu_count"], part
        assert data["cuda_available"] is False
        if part in ("serve", "utilisation"):  # no services are started on the CPU
            assert data["status"].startswith("skipped: no CUDA"), data
            continue
        assert data["status"] == "ok", data
        assert keys <= data.keys(), (part, sorted(keys - data.keys()))
        assert data["rows"], part
    enc = json.loads((tmp_path / "gpu" / "encoder.json").read_text(encoding="utf-8"))
    assert enc["dtype"] == "bfloat16"
    assert {(r["kind"], r["batch"]) for r in enc["rows"]} >= {("title", 1), ("history", 2)}


def test_smoke_part_list_is_checked() -> None:
    """A typo in --parts is refused before anything runs."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--parts", "encodr", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "unknown parts" in run.stderr
