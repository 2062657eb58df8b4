"""``python -m bench [--quick|--full] [--only serve,encoder,...] [--models a,b] [--docs-only]``

Runs the four performance benchmarks one after another (each in its own process, so one model's
threads and memory never leak into the next measurement), then writes
``bench/results/summary.json`` (``{"targets": {name: {"measured", "target", "met", "command"}}}``)
and regenerates the perf section of ``docs/benchmarks.md`` from the JSON results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import DOCS, PY, REPO, device_info, results_dir, write_section

BENCHES = ["encoder", "serve", "serve_hier", "request_cpu", "reindex", "search"]
MODES = ("quick", "full")


def gpu_targets(mode: str, serve_json: Path | None = None) -> dict[str, Any]:
    """The GPU batching goal (issue #18) as ``bash bench/gpu_check.sh`` measured it: read from its
    ``bench/results/gpu/serve.json`` (one file for both modes), never guessed; without a GPU run
    the target says it was not measured."""
    path = serve_json or REPO / "bench" / "results" / "gpu" / "serve.json"
    entry: dict[str, Any] = {
        "measured": None,
        "target": 3.0,
        "met": False,
        "command": "bash bench/gpu_check.sh",
        "direction": ">=",
    }
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    ratio = (data or {}).get("targets", {}).get("flat_batching_on_vs_off_c32")
    if data is None:
        why = "no GPU in this session"
    elif data.get("status") != "ok":
        why = f"{path.name}: {data.get('status')}"
    elif not data.get("cuda_available"):
        why = f"{path.name} ran on {data.get('device_name')}, not a GPU"
    elif ratio is None:
        why = f"{path.name} holds no flat_batching_on_vs_off_c32"
    else:
        src = f"{path.name} of {data.get('created_at')} on {data.get('device_name')}"
        entry.update(
            measured=ratio["measured"],
            target=ratio.get("target", entry["target"]),
            met=ratio["met"],
            note=f"{ratio['note']}; {src}" if ratio.get("note") else src,
        )
        return {"batching_gpu_throughput_c32": entry}
    entry.update(not_run=why, note=f"not measured: {why}")
    return {"batching_gpu_throughput_c32": entry}


def summarise(
    mode: str, timings: dict[str, float], created_at: str | None = None
) -> dict[str, Any]:
    d = results_dir(mode)
    targets: dict[str, Any] = {}
    for name in BENCHES:
        path = d / f"{name}.json"
        if path.is_file():
            targets.update(json.loads(path.read_text()).get("targets", {}))
    targets.update(gpu_targets(mode))
    old = d / "summary.json"
    prev = json.loads(old.read_text()) if old.is_file() else {}
    # a partial run (--only) keeps the other benchmarks' timings; --docs-only (created_at
    # given) also keeps the run's device reading instead of taking one now
    timings = {**prev.get("seconds", {}), **timings}
    summary = {
        "mode": mode,
        "created_at": created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": prev.get("device") if created_at and prev.get("device") else device_info(),
        "seconds": timings,
        "runs": {  # when each benchmark ran and how loaded the shared machine was
            n: {
                "created_at": r.get("created_at"),
                "command": r.get("command"),
                "loadavg_at_start": round(r.get("device", {}).get("loadavg_at_start", -1), 1),
                # machines differ (this workplace lends CPUs with and without native bf16,
                # which sets the service's CPU dtype): each run says which one it had
                "avx512_bf16": r.get("device", {}).get("avx512_bf16"),
                "cuda": r.get("device", {}).get("cuda"),
                "cpu": r.get("device", {}).get("cpu"),
            }
            for n in BENCHES
            if (r := _load(d, n))
        },
        "targets": targets,
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -- docs ----------------------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        short = f"{v:.3g}"
        # a cosine of 0.99992 is not 1: keep the digits that tell it apart from a whole number
        return f"{v:.6g}" if float(short) == round(v) != v else short
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items())
    return str(v).replace("|", "/")


def _load(d: Path, name: str) -> dict[str, Any] | None:
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


# Each table of a mode's section: (result file, key in it, heading, what it shows, columns).
# The heading gets the command that produced the file.
TABLES: list[tuple[str, str, str, str, list[str]]] = [
    (
        "encoder",
        "rows",
        "Raw encoder",
        "Sequences/s and real tokens/s of `HFEncoder.core` (no HTTP), median over interleaved "
        "rounds; `default` is what the service runs (bf16 on CPUs with native bf16).",
        ["model", "variant", "dtype", "kind", "batch", "mean_tokens", "seq_s", "tok_s"],
    ),
    (
        "encoder",
        "dtype_agreement",
        "",
        "Default dtype against fp32: cosine between the vectors of the same texts, each encoded "
        "alone (the `bf16_cosine_vs_fp32` target).",
        [
            "model", "dtype", "history_n", "history_cos_min", "history_cos_mean", "title_n",
            "title_cos_min", "title_cos_mean",
        ],
    ),
    (
        "encoder",
        "quality",
        "",
        "Quantisation option (`CPREC_QUANTIZE=int8`) against fp32 and the default dtype: "
        "zero-shot minilm-l6, full ranking over the target domain, history masked. `*_ci95` are "
        "paired-bootstrap 95% intervals of the relative loss; `top10_overlap` is the share of "
        "fp32's top 10 a variant keeps. int8 is on only when NDCG@10 and full-ranking MRR both "
        "lose under 2% relative to fp32, it is faster than the default dtype, and a vector does "
        "not depend on its batch.",
        [
            "variant", "dtype", "users", "candidates", "ndcg10", "recall10", "hits10",
            "rel_loss_vs_fp32", "ndcg_loss_ci95", "mrr_full", "mrr_rel_loss_vs_fp32",
            "mrr_loss_ci95", "top10_overlap",
        ],
    ),
    (
        "serve",
        "rows",
        "Service under load",
        "Real uvicorn processes (access log off), real Redis, the FK catalogue, FK-LOO test "
        "histories as title entries, closed-loop load on 127.0.0.1. miss = each history sent "
        "once; hit = requests already answered (ranked list cached); hit-vector = answered "
        "histories with a new k (vector from Redis, search runs). p99_gap_ms = p99 - p50 and "
        "round_spread = p99 / p50 within each round (median over rounds).",
        [
            "model", "batching", "traffic", "concurrency", "requests", "failed", "rps",
            "p50_ms", "p95_ms", "p99_ms", "p99_spread", "p99_gap_ms", "round_spread",
        ],
    ),
    (
        "serve",
        "raw",
        "",
        "Raw encoder on held-out histories of the same run (the overhead baseline, its best "
        "row): one padded forward per batch, or split into length-sorted forwards by the "
        "service's CPU rule.",
        ["model", "batch", "forwards", "seq_s_median", "rounds"],
    ),
    (
        "serve",
        "live",
        "",
        "`GET /live` every 20 ms while `/recommend` runs at concurrency 32, in one extra round "
        "per service.",
        ["model", "batching", "probes", "p50_ms", "p95_ms", "p99_ms"],
    ),
    (
        "serve",
        "paired",
        "",
        "Paired rounds at concurrency 32 (batching on, off, on-single, then the raw encoder, "
        "within about a minute): the batching and overhead targets are medians of these "
        "per-round ratios; gap = p99 - p50 in the round.",
        [
            "model", "round", "rps_on", "rps_off", "raw_best", "batching", "overhead",
            "gap_on_ms", "gap_off_ms", "gap_ratio",
        ],
    ),
    (
        "serve",
        "device_thread",
        "",
        "Device thread in the highest-concurrency rounds (from `/metrics`): busy share of wall "
        "time, sequences/s inside the forwards, texts per forward, requests per batch.",
        [
            "model", "batching", "concurrency", "forwards", "mean_batch", "requests_per_batch",
            "device_busy", "seq_s_in_forward",
        ],
    ),
    (
        "serve",
        "ceiling",
        "",
        "Service ceiling: the same service with a near-free encoder (a 2-layer random BERT). "
        "outside_forward_ms = wall time per request with the device idle; beside a raw encoder "
        "of r seq/s the overhead ratio can reach about 1 / (1 + outside_forward_ms / 1000 x r).",
        [
            "model", "concurrency", "requests", "failed", "rps", "ms_per_request",
            "outside_forward_ms", "p50_ms", "p99_ms", "device_busy", "mean_batch",
        ],
    ),
    (
        "serve_hier",
        "rows",
        "Serving the hier model",
        "Cache-miss traffic at concurrency 32, interleaved rounds (each service and traffic in"
        " turn; titles, flat and infinity rounds send histories never sent before, id and "
        "catalog-titles rounds one set of histories with a new k each round and the "
        "benchmark's Redis flushed before it: every request a miss). flat = the base MiniLM "
        "over the history text; hier = a random-weight model of the CPU recipe's shape from "
        "the store (the work per request does not depend on the weights); hier-2w = the same "
        "with CPREC_WORKERS=2. id = FK-LOO histories as item ids; catalog-titles = as the "
        "catalogue items' titles; titles = a third of the items named by a title the catalogue"
        " lacks (encoded by the LM unless the process met it before); infinity = infinity-emb "
        "embedding the history text (POST /embeddings). machine_busy = share of both cores "
        "busy during the rounds (service, load generator, Redis); rss_mib = the service's "
        "resident memory after start (all its processes).",
        [
            "service", "history", "requests", "failed", "rps", "p50_ms", "p95_ms", "p99_ms",
            "machine_busy", "rss_mib",
        ],
    ),
    (
        "request_cpu",
        "rows",
        "Service CPU per request",
        "CPU seconds of the service process per cache-miss request at concurrency 32, the "
        "commit before this work (base) against this tree, in alternating rounds; flat with a "
        "near-free encoder (what a request costs besides the LM) and hier with id histories.",
        [
            "workload", "base_ms", "new_ms", "ratio", "ratio_range", "base_loop_ms", "new_loop_ms",
            "base_rps", "new_rps",
        ],
    ),
    (
        "reindex",
        "raw",
        "Reindex",
        "Raw item encoding by batch, then the whole reindex through the service while "
        "`/recommend` runs.",
        ["model", "batches", "batch", "items", "items_s_median"],
    ),
    (
        "reindex",
        "e2e",
        "",
        "",
        [
            "model", "items", "seconds", "items_s", "recommend_during", "recommend_failed",
            "recommend_p99_ms", "index_versions_seen",
        ],
    ),
    (
        "search",
        "exact",
        "Search",
        "Exact per-domain search through `ItemIndex.search` on seeded synthetic 384-d vectors "
        "at the FK domain sizes; `threads` = faiss OpenMP threads per search.",
        ["threads", "domain", "items", "batch", "latency_ms_p50", "latency_ms_p99", "queries_s"],
    ),
    (
        "search",
        "hnsw.rows",
        "",
        "HNSW (the service's M=32) against exact search on clustered synthetic vectors.",
        ["index", "ef_search", "recall10", "queries_s_b1", "queries_s_batch"],
    ),
]  # fmt: skip


def _run_line(mode: str, s: dict[str, Any]) -> str:
    """Where and when the run happened, and whether the machine was shared."""
    dev = s.get("device", {})
    runs = s.get("runs", {})
    loads = ", ".join(f"{n} {r['loadavg_at_start']}" for n, r in runs.items())
    peak = max((r["loadavg_at_start"] for r in runs.values()), default=0.0)
    busy = " (above the benchmarks' own ~2: other jobs shared the machine)" if peak > 3 else ""
    cpus = {(r.get("cpu"), r.get("avx512_bf16")) for r in runs.values()}
    mixed = (
        " The benchmarks ran on different machines: compare within one." if len(cpus) > 1 else ""
    )
    bf16 = "yes" if dev.get("avx512_bf16") else "no"
    secs = s.get("seconds", {})
    return (
        f"Run: {mode} mode, {s.get('created_at', '?')}, on {dev.get('cpu', '?')} "
        f"({dev.get('cpu_count', '?')} cores, native bf16: {bf16}, CUDA: "
        f"{dev.get('cuda') or 'none'}); load average at each start: {loads}{busy}; "
        f"{sum(secs.values()):.0f} s in all.{mixed} Every target is a ratio of two conditions "
        "measured side by side in the same run; serving targets are medians of per-round "
        "ratios. What each optimisation measured when it was made: "
        "docs/decisions/003-serving-on-two-cores.md."
    )


def render(mode: str) -> str:
    """The ``mode`` section of docs/benchmarks.md from its result files (a missing one is
    left out)."""
    d = results_dir(mode)
    s = _load(d, "summary") or {"targets": {}}
    title = "## Performance" if mode == "quick" else "## Performance, full mode"
    lines = [title, "", _run_line(mode, s), "", "### Targets", ""]
    trows = [
        {
            "target": name,
            "measured": t["measured"],
            "goal": f"{t.get('direction', '')} {t['target']}".strip(),
            "result": "not run: " + t["not_run"]
            if t.get("not_run")
            else ("met" if t["met"] else "NOT met"),
            "detail": t.get("note", ""),
            "command": f"`{t['command']}`",
        }
        for name, t in s["targets"].items()
    ]
    lines += _table(trows, ["target", "measured", "goal", "result", "detail", "command"])
    results = {n: _load(d, n) for n in BENCHES}
    for name, key, heading, text, cols in TABLES:
        res = results.get(name)
        data: Any = res
        for part in key.split("."):
            data = data.get(part) if isinstance(data, dict) else None
        if res and heading:
            lines += ["", f"### {heading} (`{res['command']}`)"]
        if not data:
            continue
        lines += ["", text, ""] if text else [""]
        lines += _table(data if isinstance(data, list) else [data], cols)
        if key == "quality":
            lines += ["", _int8_line(res)]  # type: ignore[arg-type]
    return "\n".join(lines)


def _int8_line(enc: dict[str, Any]) -> str:
    from bench.encoder import int8_decision

    q = enc["quantization"]
    invariance = ", ".join(
        f"{k.removeprefix('batch_cos_min_')} {v}" for k, v in q.items() if k.startswith("batch_cos")
    )
    return (
        f"int8 speed-up on histories at batch 1: {q['speedup_vs_fp32_history_b1']}x vs fp32, "
        f"{q['speedup_vs_default_history_b1']}x vs the default dtype; batch invariance (min "
        f"cosine alone vs in a batch of 16): {invariance or '-'}. Decision: "
        f"**{int8_decision(q, enc['quality'])[1]}**."
    )


def write_docs() -> None:
    """Both modes' sections, each from its own results (a mode never run is left out)."""
    for mode in MODES:
        if (results_dir(mode) / "summary.json").is_file():
            section = "perf" if mode == "quick" else "perf-full"
            write_section(section, render(mode), f"python -m bench --{mode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the `make bench` mode (default)")
    ap.add_argument("--full", action="store_true", help="the full grid (long)")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
    ap.add_argument("--docs-only", action="store_true", help="regenerate docs from results")
    ap.add_argument("--models", default="", help="encoders for bench.serve (see its --help)")
    args = ap.parse_args()
    mode = "full" if args.full and not args.quick else "quick"
    timings: dict[str, float] = {}
    if not args.docs_only:
        names = [n for n in BENCHES if not args.only or n in args.only.split(",")]
        failed = []
        for name in names:
            t0 = time.perf_counter()
            print(f"\n==== bench.{name} --{mode}", flush=True)
            extra = ["--models", args.models] if name == "serve" and args.models else []
            rc = subprocess.call([PY, "-m", f"bench.{name}", f"--{mode}", *extra], cwd=REPO)
            timings[name] = round(time.perf_counter() - t0, 1)
            if rc != 0:
                failed.append(name)
        summary = summarise(mode, timings)
        print("\n## targets")
        for k, t in summary["targets"].items():
            res = "not run" if t.get("not_run") else ("met" if t["met"] else "NOT met")
            print(f"  {k}: {t['measured']} (target {t.get('direction', '')} {t['target']}) {res}")
        print(f"  seconds: {timings}")
        if failed:
            write_docs()
            sys.exit(f"benchmarks failed: {failed}")
    else:
        for m in MODES:  # both modes' summaries, keeping each run's timestamp and timings
            path = results_dir(m) / "summary.json"
            if path.is_file():
                old = json.loads(path.read_text())
                summarise(m, old.get("seconds", {}), old.get("created_at"))
    write_docs()
    print(f"wrote {results_dir(mode) / 'summary.json'} and {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
