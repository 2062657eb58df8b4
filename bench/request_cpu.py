"""The service's own CPU per request, this tree against an earlier commit, interleaved.

Two services from two source trees (``--base``, default the commit before the serving work of
issue 18, and the working tree) serve the same catalogue, each its own copy of the store, one
process each. Rounds alternate between them (A B, B A, ...) with histories neither has seen
(cache misses); the CPU time the service process spent (``/proc/<pid>/stat``: every thread) is
divided by the requests answered (and the main thread's alone: the event loop). Two workloads:

- ``hier`` with item-id histories (the random-weight recipe-shaped model of
  ``bench/serve_hier.py``): no LM forward, so the process is the service plus the user model.
- ``flat`` with a near-free encoder (a 2-layer random BERT, hidden 32, one OpenMP thread: the
  service ceiling of ``bench/serve.py``), title histories.

The targets are on the event loop's CPU per request (the main thread: HTTP, validation, the
request path, cache calls, serialisation), the share of the service that no encoder runs on;
the whole process's figure is reported beside it.

    python -m bench.request_cpu --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    REPO,
    build_tiny_bert,
    drive,
    load_fk,
    print_table,
    redis_server,
    run_service,
    save_result,
    subset,
    target,
    write_catalog,
)
from bench.serve_hier import catalog_items, id_body, publish_bench_hier

BASE = "87e4142"  # main before issue 18's serving changes


def checkout(ref: str, dest: Path) -> Path:
    """The tree of ``ref`` (git archive: no worktree left behind)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def process_cpu_s(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of ``pid``: all its threads, and its main thread alone (the
    event loop: HTTP, validation, the request path, cache calls, serialisation)."""

    def cpu(stat: Path) -> float:
        fields = stat.read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return cpu(Path(f"/proc/{pid}/stat")), cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


async def run(full: bool, base: str) -> dict[str, Any]:
    cmd = "python -m bench.request_cpu " + ("--full" if full else "--quick")
    rounds, n = (6, 800) if full else (3, 400)
    fk = load_fk()
    # Each service draws its own pass over the cases (its own process and Redis prefix: no
    # cache is shared), so every request is a history that service has not seen.
    cases = subset(fk.cases, 16 + rounds * n, seed=31)
    per: dict[str, dict[str, list[float]]] = {}
    loop_ms: dict[str, dict[str, list[float]]] = {}
    rps: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cprec-bench-cpu-")))
        trees = {"base": checkout(base, tmp / "base"), "new": REPO}
        redis_url = stack.enter_context(redis_server())
        items = catalog_items(fk, cases, 0)
        catalog = write_catalog(items, tmp / "catalog.jsonl")
        from cprec.lm import bundled_dir

        tiny = build_tiny_bert(tmp / "tiny-bert", bundled_dir("minilm-l6", tmp))
        hier_store = tmp / "store-hier"
        publish_bench_hier(hier_store, items)
        for workload in ("flat", "hier"):
            svcs = {}
            for name, tree in trees.items():
                if workload == "flat":
                    # One OpenMP thread: the near-free encoder's forwards are tiny, and a
                    # second thread spinning at their barriers would be counted as the
                    # service's CPU.
                    settings = {"CPREC_BASE_MODEL": str(tiny), "OMP_NUM_THREADS": "1"}
                    store = tmp / f"store-flat-{name}"
                else:
                    settings = {}
                    store = hier_store  # the second service loads the snapshot the first built
                settings["CPREC_TUNING__MAX_BATCH_SIZE"] = "32"
                svcs[name] = stack.enter_context(
                    run_service(catalog, redis_url, settings, store_dir=store, code=tree)
                )

            pools = {name: iter(cases) for name in svcs}

            def bodies(
                name: str, k: int, workload: str = workload, pools: dict[str, Any] = pools
            ) -> list[dict[str, Any]]:
                picked = [next(pools[name]) for _ in range(k)]
                if workload == "hier":
                    return [id_body(fk, c) for c in picked]
                return [{"history": fk.history_entries(c), "k": 10} for c in picked]

            for name, svc in svcs.items():
                await drive(svc.url, bodies(name, 16), 16, 16, 60)  # warm-up, not counted
            per[workload] = {name: [] for name in svcs}
            loop_ms[workload] = {name: [] for name in svcs}
            rps[workload] = {name: [] for name in svcs}
            for r in range(rounds):
                order = list(svcs) if r % 2 == 0 else list(reversed(svcs))
                for name in order:
                    svc = svcs[name]
                    c0 = process_cpu_s(svc.proc.pid)
                    res = await drive(svc.url, bodies(name, n), 32, n, 120)
                    c1 = process_cpu_s(svc.proc.pid)
                    if res.failed:
                        raise RuntimeError(f"{workload}/{name}: {res.failed} failed requests")
                    per[workload][name].append(1000 * (c1[0] - c0[0]) / res.ok)
                    loop_ms[workload][name].append(1000 * (c1[1] - c0[1]) / res.ok)
                    rps[workload][name].append(res.ok / res.elapsed_s)
            for svc in svcs.values():
                svc.proc.terminate()
    rows = []
    for workload, by in per.items():
        ratios = [b / a for a, b in zip(by["base"], by["new"], strict=True)]
        rows.append(
            {
                "workload": workload,
                "base_ms": round(float(np.median(by["base"])), 3),
                "new_ms": round(float(np.median(by["new"])), 3),
                "ratio": round(float(np.median(ratios)), 3),
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "base_loop_ms": round(float(np.median(loop_ms[workload]["base"])), 3),
                "new_loop_ms": round(float(np.median(loop_ms[workload]["new"])), 3),
                "base_rps": round(float(np.median(rps[workload]["base"])), 1),
                "new_rps": round(float(np.median(rps[workload]["new"])), 1),
            }
        )
    print_table(f"service CPU ms per cache-miss request, {base} vs this tree (c32)", rows)
    flat = next(r for r in rows if r["workload"] == "flat")
    hier = next(r for r in rows if r["workload"] == "hier")
    targets = {}
    for r, what in ((hier, "hier, id histories"), (flat, "flat, near-free encoder")):
        loop = r["new_loop_ms"] / r["base_loop_ms"]
        targets[f"service_loop_cpu_per_request_{r['workload']}"] = target(
            loop,
            0.70,
            loop <= 0.70,
            cmd,
            direction="<=",
            note=f"{what}: event-loop CPU (HTTP, validation, request path, cache calls, "
            f"serialisation) {r['new_loop_ms']} / {r['base_loop_ms']} ms per request at {base} "
            f"(medians of {rounds} alternating rounds); the whole process {r['new_ms']} / "
            f"{r['base_ms']} ms = {r['ratio']} (per-round range {r['ratio_range'][0]}-"
            f"{r['ratio_range'][1]}); {r['new_rps']} / {r['base_rps']} requests/s",
        )
    out = {"command": cmd, "base": base, "rounds": rounds, "requests": n, "rows": rows,
           "targets": targets}  # fmt: skip
    save_result("request_cpu", out)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--base", default=BASE, help="the commit to compare with")
    args = ap.parse_args(argv)
    return asyncio.run(run(args.full and not args.quick, args.base))


if __name__ == "__main__":
    main()
