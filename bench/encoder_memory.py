"""Encoder RSS under dynamic-batch shapes: ``python -m bench.encoder_memory [--batches N]``.

Feeds the CPU encoder (bundled MiniLM, bf16) random (batch 1..32, length 5..200) token batches, the
shapes dynamic batching produces, and records RSS. Each oneDNN primitive-cache capacity runs in
its own process because the capacity is read once, when torch first runs a oneDNN kernel: the
default 1024 against the service's 16 (``service/__init__.py``). Same seed, same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from bench.common import print_table, save_result


def _child(batches: int) -> dict[str, Any]:
    import random
    import time
    from pathlib import Path

    import psutil

    from cprec.encoder import HFEncoder
    from cprec.lm import bundled_dir

    proc = psutil.Process()
    enc = HFEncoder(
        bundled_dir("minilm-l6", Path("var/bench-store")), "mean", False, dtype="bfloat16"
    )
    rng = random.Random(0)
    start = proc.memory_info().rss / 2**20
    t0 = time.perf_counter()
    for _ in range(batches):
        b, t = rng.randint(1, 32), rng.randint(5, 200)
        enc.core([[101] + [1000 + rng.randint(0, 500) for _ in range(t)] + [102] for _ in range(b)])
    return {
        "rss_start_mib": round(start, 1),
        "rss_end_mib": round(proc.memory_info().rss / 2**20, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "batches": batches,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=450)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.batches)))
        return {}
    rows = []
    for cap in ("1024", "16"):
        env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": cap, "HF_HUB_OFFLINE": "1"}
        out = (
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.encoder_memory",
                    "--child",
                    "--batches",
                    str(args.batches),
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        rows.append(
            {
                "onednn_cache": int(cap),
                **r,
                "growth_mib": round(r["rss_end_mib"] - r["rss_start_mib"], 1),
            }
        )
    print_table("Encoder RSS over random batch shapes (MiniLM bf16, CPU)", rows)
    res = {"command": "python -m bench.encoder_memory --batches " + str(args.batches), "rows": rows}
    save_result("encoder_memory", res)
    return res


if __name__ == "__main__":
    main()
