"""The GPU checks of ``bench/gpu_check.sh``: encoder, FAISS, hier training and serving figures on
a CUDA device, one JSON file per part, each naming the device it ran on (docs/gpu.md).

- ``encoder``: ``HFEncoder.core`` in bf16 on item titles and user histories, batch 1..256.
- ``faiss``: exact inner-product search of synthetic unit vectors, CPU index vs the same index
  moved to the GPU (``faiss.index_cpu_to_gpu``), 36k and 1M items.
- ``train``: ``hier`` training steps (``training.hier.Trainer``) in targets/s, CPU vs CUDA.
- ``serve``: the real service (``flat`` and ``hier`` kinds) at concurrency 1/8/32/128, batching on
  vs off, cache-miss traffic; also writes ``utilisation.json`` (nvidia-smi samples).

Without CUDA the parts that exist to measure the GPU are recorded as skipped, unless ``--smoke``
(tiny sizes: the harness itself is checked on CPU) or ``--allow-cpu`` asks for a CPU run.

    python -m bench.gpu --out bench/results/gpu [--parts encoder,faiss,train,serve] [--smoke]
    python -m bench.gpu --summary bench/results/gpu     # the table gpu_check.sh prints
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    REPO,
    FKData,
    LoadResult,
    Service,
    device_info,
    drive,
    history_texts,
    item_texts,
    load_fk,
    make_encoder,
    print_table,
    redis_server,
    run_service,
    subset,
    target,
    timed_core,
    write_catalog,
)

PARTS = ("encoder", "faiss", "train", "serve")
DIM = 384  # MiniLM's width: the FAISS part searches vectors of the size the service indexes
FLAT_BATCHING_GOAL = 3.0  # issue #18: on a GPU, batching on / off at concurrency 32 (flat kind)
DEMO_CATALOG = REPO / "service" / "data" / "demo_catalog.jsonl"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``FULL`` fits gpu_check.sh's per-part time limits on one GPU."""

    batch_sizes: tuple[int, ...]
    texts: int  # texts per kind the encoder part cycles through
    min_s: float  # timed seconds per encoder cell, FAISS cell and training row
    faiss_sizes: tuple[int, ...]
    faiss_queries: int
    train_warm_steps: int
    concurrency: tuple[int, ...]
    requests: dict[int, int]  # per concurrency: requests of one condition (each a new history)
    serve_max_s: float  # per condition
    extra_items: int | None  # catalogue items beside the ones the histories name (None: all)
    startup_timeout_s: float


FULL = Plan(
    batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    texts=1024,
    min_s=0.5,
    faiss_sizes=(36_000, 1_000_000),
    faiss_queries=1000,
    train_warm_steps=5,
    concurrency=(1, 8, 32, 128),
    requests={1: 64, 8: 256, 32: 768, 128: 1024},
    serve_max_s=6.0,
    extra_items=5000,
    startup_timeout_s=150,
)
SMOKE = Plan(
    batch_sizes=(1, 2),
    texts=8,
    min_s=0.05,
    faiss_sizes=(10_000,),
    faiss_queries=100,
    train_warm_steps=1,
    concurrency=(1, 8),
    requests={1: 4, 8: 16},
    serve_max_s=10.0,
    extra_items=None,
    startup_timeout_s=300,
)


# -- the device and its utilisation ----------------------------------------------------------
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def no_cuda_reason() -> str:
    """Why the GPU parts are skipped, in words a reader of the JSON can act on."""
    try:
        import torch
    except ImportError:
        return "no CUDA (torch is not installed)"
    if torch.version.cuda is None:
        return f"no CUDA (torch {torch.__version__} is a CPU-only build)"
    return f"no CUDA (torch {torch.__version__} sees no GPU)"


def describe_device() -> dict[str, Any]:
    """``bench.common.device_info``; without torch (a failed install) what is known anyway."""
    try:
        return device_info()
    except ImportError:
        info: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine()}
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        return {**info, "torch": None, "cuda": None}


def device_name() -> str:
    """The GPU's name, or the CPU's where there is no CUDA device."""
    if cuda_available():
        import torch

        return str(torch.cuda.get_device_name(0))
    return f"cpu ({describe_device().get('cpu', 'unknown model')})"


def sync() -> None:
    """Wait for queued CUDA work, so a timer reads the work done, not the work launched."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class GpuSampler:
    """``nvidia-smi`` utilisation and memory every ``interval_s`` in a background thread; every
    summary is None where the tool is absent (a CPU machine)."""

    interval_s: float = 0.5
    tool: str | None = field(default_factory=lambda: shutil.which("nvidia-smi"))
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (t, util %, MiB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.tool:
            self._thread = threading.Thread(target=self._run, name="nvidia-smi", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        assert self.tool is not None
        argv = [
            self.tool,
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ]
        while not self._stop.is_set():
            with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError):
                line = subprocess.run(
                    argv, capture_output=True, text=True, timeout=5, check=True
                ).stdout.splitlines()[0]  # the first GPU: the one these checks use
                util, mem = (float(x) for x in line.split(","))
                self.samples.append((time.perf_counter(), util, mem))
            self._stop.wait(self.interval_s)

    def summary(self, t0: float = 0.0, t1: float = float("inf")) -> dict[str, Any] | None:
        if not self.tool:
            return None
        win = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not win:
            return {"samples": 0, "util_mean": None, "util_max": None, "mem_used_max_mib": None}
        util = [u for u, _ in win]
        return {
            "samples": len(win),
            "util_mean": round(float(np.mean(util)), 1),
            "util_max": round(float(np.max(util)), 1),
            "mem_used_max_mib": round(float(max(m for _, m in win)), 0),
        }


def write_part(out: Path, part: str, data: dict[str, Any]) -> Path:
    """``<out>/<part>.json`` with the device it ran on and the command."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{part}.json"
    payload = {
        "benchmark": f"gpu.{part}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python -m bench.gpu", *sys.argv[1:]]),
        "device_name": device_name(),
        "cuda_available": cuda_available(),
        "device": describe_device(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"wrote {path}", flush=True)
    return path


def skipped(reason: str) -> dict[str, Any]:
    return {"status": f"skipped: {reason}"}


# -- data ------------------------------------------------------------------------------------
def generated_data(n_cases: int, seed: int = 0) -> FKData:
    """The demo catalogue and random histories over it, for runs without the FK-LOO data."""
    rows = [json.loads(x) for x in DEMO_CATALOG.read_text(encoding="utf-8").splitlines() if x]
    items = [
        {"item_id": str(r["item_id"]), "domain": r["domain"], "title": r["title"]} for r in rows
    ]
    rng = np.random.default_rng(seed)
    cases = []
    for u in range(n_cases):
        pick = rng.choice(len(items), size=int(rng.integers(6, 16)), replace=False).tolist()
        last = items[pick[-1]]
        cases.append(
            {
                "user_id": f"gen{u}",
                "history": pick[:-1],
                "target": pick[-1],
                "domain": last["domain"],
            }
        )
    return FKData(items=items, cases=cases)


def bench_data(smoke: bool, n_cases: int) -> tuple[FKData, str]:
    """FK-LOO when it is at hand (and not ``smoke``), else generated; with where it came from."""
    if not smoke:
        try:
            fk = load_fk()
            if len(fk.cases) >= n_cases:
                return fk, "fk-loo"
            reason = f"FK-LOO has {len(fk.cases)} test cases, {n_cases} needed"
        except Exception as exc:  # missing or sha-mismatched data: say so, run on generated data
            reason = f"FK-LOO not available ({type(exc).__name__}: {exc})"
        print(f"{reason}: generated histories over the demo catalogue instead", flush=True)
        return generated_data(n_cases), f"generated ({reason})"
    return generated_data(n_cases), "generated (smoke)"


# -- encoder ---------------------------------------------------------------------------------
def part_encoder(plan: Plan, model: str, smoke: bool, sampler: GpuSampler) -> dict[str, Any]:
    """seq/s and tok/s of ``HFEncoder.core`` in bf16 per text kind and batch size."""
    device = "cuda" if cuda_available() else "cpu"
    enc = make_encoder(model, dtype="bfloat16", max_length=256, device=device)
    fk, source = bench_data(smoke, plan.texts)
    texts = {
        "title": item_texts(subset(fk.items, plan.texts, seed=1)),
        "history": history_texts(fk, subset(fk.cases, plan.texts, seed=1)),
    }
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for kind, tx in texts.items():
        ids = enc.pre(tx, "query" if kind == "history" else "item")
        for bs in plan.batch_sizes:
            n_batches = max(1, min(len(ids) // bs, 8))
            batches = [ids[i * bs : (i + 1) * bs] for i in range(n_batches)]
            enc.core(batches[0])  # this shape's first forward (kernel choice) is not timed
            t0 = time.perf_counter()
            el, n, tok = timed_core(enc, batches, plan.min_s)  # core returns host arrays: synced
            rows.append(
                {
                    "kind": kind,
                    "batch": bs,
                    "mean_tokens": round(float(np.mean([len(x) for x in ids])), 1),
                    "seq_s": round(n / el, 1),
                    "tok_s": round(tok / el, 0),
                    "ms_per_batch": round(1000 * el * len(batches[0]) / n, 3),
                    "gpu": sampler.summary(t0, time.perf_counter()),
                }
            )
    print_table(f"encoder {model} ({device}, bf16)", rows, [c for c in rows[0] if c != "gpu"])
    peak = {
        kind: max((r for r in rows if r["kind"] == kind), key=lambda r: r["seq_s"])
        for kind in texts
    }
    return {
        "status": "ok",
        "model": model,
        "device_type": device,
        "dtype": str(enc.dtype).removeprefix("torch."),
        "max_length": 256,
        "texts": source,
        "rows": rows,
        "peak_seq_s": {k: {"batch": r["batch"], "seq_s": r["seq_s"]} for k, r in peak.items()},
        "gpu_utilisation": sampler.summary(t_start),
    }


# -- faiss -----------------------------------------------------------------------------------
def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)  # [n, dim]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_search(index: Any, queries: np.ndarray, k: int, min_s: float) -> tuple[float, np.ndarray]:
    """Queries/s of ``index.search`` over the whole query block, repeated for ``min_s``."""
    _, ids = index.search(queries, k)  # warm-up (GPU: first-call allocations), also the answer
    n, t0 = 0, time.perf_counter()
    while True:
        index.search(queries, k)  # returns host arrays: each call is complete when it returns
        n += 1
        el = time.perf_counter() - t0
        if el >= min_s:
            return n * queries.shape[0] / el, ids


def part_faiss(plan: Plan, sampler: GpuSampler, k: int = 10) -> dict[str, Any]:
    import faiss

    # service.index.gpu_available's test, not imported: the service brings torch in, and this
    # part is the one that runs where the CUDA torch is missing
    on_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    why_not = None
    if not on_gpu:
        why_not = (
            "faiss has no GPU support (faiss-gpu not installed)"
            if not hasattr(faiss, "StandardGpuResources")
            else "faiss sees no GPU"
        )
    res = faiss.StandardGpuResources() if on_gpu else None
    rng = np.random.default_rng(0)
    rows = []
    t_start = time.perf_counter()
    for n in plan.faiss_sizes:
        xb = unit_rows(rng, n, DIM)  # [n, DIM]
        xq = unit_rows(rng, plan.faiss_queries, DIM)  # [Q, DIM]
        cpu = faiss.IndexFlatIP(DIM)
        cpu.add(xb)
        t0 = time.perf_counter()
        cpu_qps, cpu_ids = timed_search(cpu, xq, k, plan.min_s)
        row: dict[str, Any] = {"items": n, "queries": plan.faiss_queries, "cpu_qps": round(cpu_qps)}
        row.update(gpu_qps=None, gpu_vs_cpu=None, same_top10=None)
        if res is not None:
            gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
            gpu_qps, gpu_ids = timed_search(gpu, xq, k, plan.min_s)
            row["gpu_qps"] = round(gpu_qps)
            row["gpu_vs_cpu"] = round(gpu_qps / cpu_qps, 2)
            # exact search both ways: the same ids, up to float ties
            row["same_top10"] = round(float(np.mean(np.all(gpu_ids == cpu_ids, axis=1))), 4)
            del gpu
        row["gpu"] = sampler.summary(t0, time.perf_counter())
        rows.append(row)
        del xb, cpu
    print_table("FAISS flat inner product, k=10", rows, [c for c in rows[0] if c != "gpu"])
    return {
        "status": "ok",
        "index": "IndexFlatIP",
        "dim": DIM,
        "k": k,
        "cpu_threads": faiss.omp_get_max_threads(),
        "faiss_gpu": on_gpu,
        "gpu_skipped": why_not,
        "rows": rows,
        "gpu_utilisation": sampler.summary(t_start),
    }


# -- hier training ---------------------------------------------------------------------------
def part_train(plan: Plan, smoke: bool, sampler: GpuSampler) -> dict[str, Any]:
    """Targets/s of the hier recipe's training step (loss, backward, Adam) on the CPU as the
    recipe runs it, and on the GPU in fp32 and bf16; stage 2's batches of the target dataset.

    The item text vectors are random unit vectors: a step's cost does not depend on their values,
    and the LM pass that makes the real ones is measured by the encoder part."""
    import torch

    from training import hier
    from training.loop import Update
    from training.schedule import make_scheduler

    fk_ok = False
    if not smoke:
        with contextlib.suppress(Exception):
            from training.fkloo import fkloo_dir, verify

            verify(fkloo_dir())
            fk_ok = True
    recipe = REPO / "configs" / ("hier-cpu.yaml" if fk_ok else "hier-smoke.yaml")
    cfg = hier.load_hier_config(recipe, ["progress=false"])
    corpus = hier.build_corpus(cfg)
    rng = np.random.default_rng(cfg.seed)
    text = torch.from_numpy(unit_rows(rng, len(corpus.items), DIM))  # [N, DIM]
    tgt = corpus.target_source
    inp, tg = hier.windows(tgt.mixed, cfg.model.max_len)  # [W, max_len] each

    def measure(device: str, bf16: bool, batch_targets: int) -> dict[str, Any]:
        torch.manual_seed(cfg.seed)
        model = hier.new_model(cfg, corpus, text)
        # the recipe's own option (HierTrainConfig.device): model, tables and batches on device
        trainer = hier.Trainer(model, corpus, text, cfg.model.softmax, bf16=bf16, device=device)
        batches = hier.make_batches(inp, tg, 0, batch_targets, np.random.default_rng(cfg.seed))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.finetune.lr, fused=True)
        update = Update(model, opt, make_scheduler(opt, "constant", 1, warmup_frac=0.0))
        objective = hier.Plan(trainer, batches, [])
        model.train()
        for i in range(plan.train_warm_steps):
            update(objective, batches[i % len(batches)])
        sync()
        steps = targets = 0
        t0 = time.perf_counter()
        while True:
            _, n = update(objective, batches[(plan.train_warm_steps + steps) % len(batches)])
            steps, targets = steps + 1, targets + n
            if steps % 5 == 0:
                sync()
                el = time.perf_counter() - t0
                if el >= plan.min_s * 4:
                    break
        return {
            "device": trainer.device.type,
            "bf16": bf16,
            "batch_targets": batch_targets,
            "steps": steps,
            "targets_s": round(targets / el, 1),
            "ms_per_step": round(1000 * el / steps, 2),
            "gpu": sampler.summary(t0, time.perf_counter()),
        }

    t_start = time.perf_counter()
    rows = [measure("cpu", hier.resolve_bf16(cfg.bf16), cfg.batch_targets)]
    gpu_skipped = None
    if cuda_available():
        for bf16, bt in ((False, cfg.batch_targets), (True, cfg.batch_targets)):
            rows.append(measure("cuda", bf16, bt))
        rows.append(measure("cuda", True, 8 * cfg.batch_targets))  # a GPU wants larger steps
    else:
        gpu_skipped = no_cuda_reason()
    print_table(f"hier training steps ({cfg.name})", rows, [c for c in rows[0] if c != "gpu"])
    cpu_rate = rows[0]["targets_s"]
    same = [r for r in rows[1:] if r["batch_targets"] == cfg.batch_targets]
    return {
        "status": "ok",
        "config": str(recipe.relative_to(REPO)),
        "target": cfg.target,
        "items": len(corpus.items),
        "softmax": cfg.model.softmax,
        "rows": rows,
        "gpu_skipped": gpu_skipped,
        "best_gpu_vs_cpu_same_batch": round(max(r["targets_s"] for r in same) / cpu_rate, 2)
        if same
        else None,
        "gpu_utilisation": sampler.summary(t_start),
    }


# -- serving ---------------------------------------------------------------------------------
def serve_rows(
    kind: str, results: dict[tuple[str, int], tuple[LoadResult, dict[str, Any] | None]]
) -> list[dict[str, Any]]:
    rows = []
    for (batching, conc), (r, gpu) in results.items():
        s = r.summary()
        rows.append(
            {
                "kind": kind,
                "batching": batching,
                "concurrency": conc,
                "requests": s["requests"],
                "failed": s["failed"],
                "rps": s["rps"],
                "p50_ms": s["p50_ms"],
                "p99_ms": s["p99_ms"],
                "cached_share": s["cached_share"],
                "http_status": s["status"],
                "gpu": gpu,
            }
        )
    return rows


async def serve_kind(
    kind: str,
    start: Callable[[str], contextlib.AbstractContextManager[Service]],
    bodies: Iterator[dict[str, Any]],
    plan: Plan,
    sampler: GpuSampler,
) -> list[dict[str, Any]]:
    """Batching on and off for one model kind, interleaved per concurrency, every request a
    history that no service has seen (cache-miss traffic)."""

    def fresh(n: int) -> list[dict[str, Any]]:
        return [next(bodies) for _ in range(n)]

    results: dict[tuple[str, int], tuple[LoadResult, dict[str, Any] | None]] = {}
    with contextlib.ExitStack() as stack:
        # "on" first: it embeds the catalogue and saves the index, which "off" then loads
        svcs = {b: stack.enter_context(start(b)) for b in ("on", "off")}
        for svc in svcs.values():  # first-request allocations, not counted
            await drive(svc.url, fresh(8), 8, 8, 60)
        for conc in plan.concurrency:
            n = plan.requests[conc]
            for batching, svc in svcs.items():
                t0 = time.perf_counter()
                r = await drive(svc.url, fresh(n), conc, n, plan.serve_max_s)
                results[(batching, conc)] = (r, sampler.summary(t0, time.perf_counter()))
    return serve_rows(kind, results)


def batching_ratio(rows: list[dict[str, Any]], kind: str, conc: int) -> float | None:
    rps = {r["batching"]: r["rps"] for r in rows if r["kind"] == kind and r["concurrency"] == conc}
    if not rps.get("off"):
        return None
    return round(rps["on"] / rps["off"], 3)


def part_serve(plan: Plan, smoke: bool, sampler: GpuSampler, out: Path) -> dict[str, Any]:
    from bench.serve_hier import catalog_items, id_body, publish_bench_hier

    device = "cuda" if cuda_available() else "cpu"
    per_service = 8 + sum(plan.requests[c] for c in plan.concurrency)
    fk, source = bench_data(smoke, 4 * per_service)
    cases = subset(fk.cases, 4 * per_service, seed=21)
    items = catalog_items(fk, cases, plan.extra_items)
    flat_cases, hier_cases = cases[: 2 * per_service], cases[2 * per_service :]
    flat_bodies = (
        {"user_id": c["user_id"], "history": fk.history_entries(c), "k": 10} for c in flat_cases
    )
    hier_bodies = (id_body(fk, c) for c in hier_cases)
    common = {"CPREC_DEVICE": device}
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cprec-bench-gpu-")))
        catalog = write_catalog(items, tmp / "catalog.jsonl")
        # A private redis-server where there is one; else each service's in-process cache.
        redis_url = stack.enter_context(redis_server()) if shutil.which("redis-server") else None
        hier_store = tmp / "store-hier"
        version = publish_bench_hier(hier_store, items)

        def flat(batching: str) -> contextlib.AbstractContextManager[Service]:
            env = {**common, "CPREC_BASE_MODEL": "minilm-l6", "CPREC_ZERO_SHOT": "text"}
            env["CPREC_BATCHING"] = "true" if batching == "on" else "false"
            return run_service(
                catalog, redis_url, env, plan.startup_timeout_s, store_dir=tmp / "store-flat"
            )

        def hier(batching: str) -> contextlib.AbstractContextManager[Service]:
            env = {**common, "CPREC_BATCHING": "true" if batching == "on" else "false"}
            return run_service(
                catalog, redis_url, env, plan.startup_timeout_s, store_dir=hier_store
            )

        rows = asyncio.run(serve_kind("flat", flat, flat_bodies, plan, sampler))
        rows += asyncio.run(serve_kind("hier", hier, hier_bodies, plan, sampler))
    cols = [c for c in rows[0] if c not in ("gpu", "http_status")]
    print_table(f"cache-miss POST /recommend ({device}, {len(items)} items)", rows, cols)
    cmd = "python -m bench.gpu --parts serve"
    conc = 32 if 32 in plan.concurrency else max(plan.concurrency)
    flat_ratio = batching_ratio(rows, "flat", conc)
    targets: dict[str, Any] = {}
    if flat_ratio is not None:
        targets[f"flat_batching_on_vs_off_c{conc}"] = target(
            flat_ratio,
            FLAT_BATCHING_GOAL,
            flat_ratio >= FLAT_BATCHING_GOAL,
            cmd,
            direction=">=",
            note="one round per condition; the goal is for a GPU"
            + ("" if device == "cuda" else " (this run was on the CPU)"),
        )
    hier_ratio = batching_ratio(rows, "hier", conc)
    targets[f"hier_batching_on_vs_off_c{conc}"] = {
        "measured": hier_ratio,
        "target": None,
        "met": None,
        "note": "recorded, no goal (issue #18 sets one for flat): an item-id history runs the "
        "small user model, no LM forward",
    }
    util = {
        "status": "ok",
        "sampled_during": "serve",
        "interval_s": sampler.interval_s,
        "nvidia_smi": sampler.tool is not None,
        "overall": sampler.summary(t_start),
        "rows": [
            {k: r[k] for k in ("kind", "batching", "concurrency", "rps")} | {"gpu": r["gpu"]}
            for r in rows
        ],
    }
    write_part(out, "utilisation", util)
    return {
        "status": "ok",
        "device_type": device,
        "histories": source,
        "catalog_items": len(items),
        "hier_model": version,
        "redis": redis_url is not None,
        "plan": {k: v for k, v in asdict(plan).items() if k in ("concurrency", "requests")}
        | {"max_s": plan.serve_max_s, "traffic": "cache-miss: every request a new history"},
        "rows": rows,
        "targets": targets,
        "gpu_utilisation": util["overall"],
    }


# -- the summary -----------------------------------------------------------------------------
def summary_rows(out: Path) -> list[dict[str, Any]]:
    """One line per figure the issue asks for, read back from ``out``'s JSON files."""

    def load(part: str) -> dict[str, Any] | None:
        path = out / f"{part}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    rows: list[dict[str, Any]] = []

    def add(part: str, what: str, value: Any, device: str) -> None:
        rows.append({"part": part, "figure": what, "value": value, "device": device})

    for part in (*PARTS, "utilisation"):
        d = load(part)
        if d is None:
            add(part, "-", "no file", "-")
            continue
        dev = str(d.get("device_name", "?"))
        if d.get("status") != "ok":
            add(part, "-", d.get("status"), dev)
        elif part == "encoder":
            for kind, p in d["peak_seq_s"].items():
                add(part, f"{kind} seq/s, best batch {p['batch']}", p["seq_s"], dev)
        elif part == "faiss":
            for r in d["rows"]:
                gpu = "no faiss-gpu" if r["gpu_qps"] is None else f"gpu {r['gpu_qps']}"
                add(part, f"{r['items']} items q/s", f"cpu {r['cpu_qps']}, {gpu}", dev)
        elif part == "train":
            for r in d["rows"]:
                what = f"targets/s {r['device']} bf16={r['bf16']} batch {r['batch_targets']}"
                add(part, what, r["targets_s"], dev)
        elif part == "serve":
            for name, t in d["targets"].items():
                met = "" if t.get("met") is None else (" met" if t["met"] else " NOT met")
                goal = "" if t.get("target") is None else f" (goal >= {t['target']})"
                add(part, name, f"{t['measured']}{goal}{met}", dev)
        elif part == "utilisation":
            o = d.get("overall") or {}
            add(part, "GPU util % mean/max", f"{o.get('util_mean')}/{o.get('util_max')}", dev)
    return rows


# -- the command -----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {PARTS}")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU check)")
    ap.add_argument(
        "--allow-cpu", action="store_true", help="run the GPU parts on the CPU too (the harness)"
    )
    ap.add_argument("--model", default="minilm-l6", help="the encoder part's bundled LM")
    ap.add_argument("--summary", type=Path, help="print the table of a results folder and exit")
    args = ap.parse_args(argv)
    if args.summary is not None:
        print_table(f"GPU check results in {args.summary}", summary_rows(args.summary))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {PARTS}")
    plan = SMOKE if args.smoke else FULL
    cuda = cuda_available()
    print(f"device: {device_name()} (CUDA {'yes' if cuda else 'no'})", flush=True)
    failed = []
    with GpuSampler() as sampler:
        for part in parts:
            # encoder and train have a CPU baseline worth a smoke run; serving starts services.
            cpu_ok = args.allow_cpu or (args.smoke and part != "serve")
            try:
                if part != "faiss" and not cuda and not cpu_ok:
                    data = skipped(no_cuda_reason())
                    if part == "serve":
                        write_part(args.out, "utilisation", skipped(f"{no_cuda_reason()}, serve"))
                elif part == "encoder":
                    data = part_encoder(plan, args.model, args.smoke, sampler)
                elif part == "faiss":
                    data = part_faiss(plan, sampler)
                elif part == "train":
                    data = part_train(plan, args.smoke, sampler)
                else:
                    data = part_serve(plan, args.smoke, sampler, args.out)
            except Exception as exc:  # one broken part must not lose the others' files
                import traceback

                traceback.print_exc()
                data = {"status": f"failed: {type(exc).__name__}: {exc}"}
                failed.append(part)
            write_part(args.out, part, data)
    if failed:
        print(f"failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
