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

from bench.common import PY, REPO, device_info, results_dir

BENCHES = ["encoder", "serve", "reindex", "search"]
DOCS = REPO / "docs" / "benchmarks.md"
MARKERS = {  # docs section per mode
    "quick": ("<!-- perf:start -->", "<!-- perf:end -->"),
    "full": ("<!-- perf-full:start -->", "<!-- perf-full:end -->"),
}


def gpu_targets(mode: str) -> dict[str, Any]:
    """GPU targets are measured only on a GPU machine; otherwise say so instead of guessing."""
    import torch

    if torch.cuda.is_available():
        return {}
    cmd = f"python -m bench.serve --{mode} (on a GPU machine)"
    return {
        "batching_gpu_throughput_c32": {
            "measured": None,
            "target": 3.0,
            "met": False,
            "command": cmd,
            "not_run": "no GPU machine lent to this task",
        }
    }


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


def render(mode: str) -> str:
    d = results_dir(mode)
    start, end = MARKERS[mode]
    s = _load(d, "summary") or {"targets": {}}
    dev = s.get("device", {})
    loads = ", ".join(
        f"{n} {r['loadavg_at_start']} ({r['created_at']})" for n, r in s.get("runs", {}).items()
    )
    peak = max((r["loadavg_at_start"] for r in s.get("runs", {}).values()), default=0.0)
    busy_note = (  # the benchmarks themselves keep both cores busy: ~2 is their own load
        " (**above the benchmarks' own load of ~2: other jobs shared the machine**, absolute "
        "numbers are low and noisy)"
        if peak > 3.0
        else " (about the benchmarks' own load of ~2)"
    )
    runs = s.get("runs", {})
    kinds = {(r.get("cpu"), r.get("avx512_bf16"), r.get("cuda")) for r in runs.values()}
    bf16 = dev.get("avx512_bf16")
    native = ("yes, with AMX tiles" if dev.get("amx_bf16") else "yes") if bf16 else "no"
    dtype_note = (
        f" Native bf16: {native}, so the service's CPU dtype is "
        f"{'bf16' if bf16 else 'fp32'} (`CPREC_DTYPE=auto`)."
        + (
            " **The benchmarks below ran on different machines** ("
            + ", ".join(
                f"{n} on {r.get('cpu') or '?'}"
                + (" with native bf16" if r.get("avx512_bf16") else " without native bf16")
                for n, r in runs.items()
            )
            + "); compare ratios within one benchmark only."
            if len(kinds) > 1
            else ""
        )
    )
    secs = s.get("seconds", {})
    wall_note = (
        "Wall time per benchmark: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
        + f"; {sum(secs.values()):.0f} s in all"
        + (" (quick mode's budget: 600 s)." if mode == "quick" else ".")
        if secs
        else ""
    )
    lines = [
        start,
        "",
        "## Performance (issue 5)" if mode == "quick" else "## Performance, full mode (issue 5)",
        "",
        (
            "Generated by `make bench` (`python -m bench --quick`) from `bench/results/*.json`"
            if mode == "quick"
            else "Generated by `python -m bench --full` from `bench/results/full/*.json`"
        )
        + "; do not edit by hand (`python -m bench --docs-only` regenerates both sections).",
        "",
        f"Run: {s.get('mode', '?')} mode, {s.get('created_at', '?')}, on "
        f"{dev.get('cpu', '?')} ({dev.get('cpu_count', '?')} cores, torch "
        f"{dev.get('torch', '?')}, {dev.get('torch_threads', '?')} threads, CUDA: "
        f"{dev.get('cuda') or 'none'}). 1-minute load average at each benchmark's start: "
        f"{loads}{busy_note}. Every target is a ratio of two conditions measured side by side "
        "in the same run, in interleaved rounds; the serving targets are medians of per-round "
        "ratios (paired rounds below), with their range and how many rounds alone meet the goal "
        "in the detail. GPU rows: "
        + ("see the tables. " if dev.get("cuda") else "not run, no GPU machine lent to this task. ")
        + wall_note
        + dtype_note,
        "",
        "Optimisations in the code, each pinned by a behaviour test (`tests/perf/`, and "
        "`tests/service/test_service_batcher.py` for batching): one device "
        "thread loads the model and runs every torch op (torch's libgomp stops spin-waiting between"
        " ops once more threads than CPUs have run parallel regions; a load on another thread was "
        "enough to throttle every forward); bf16 weights on CPUs with native bf16 "
        "(`CPREC_DTYPE=auto`); dynamic batching (on CPU each coalesced batch is length-sorted and "
        "split into forwards with <= 25% padding, `CPREC_BATCH_MAX_PADDING=auto`, and <= 2048 "
        "padded tokens each, `CPREC_BATCH_MAX_FORWARD_TOKENS=auto`; `on-single` below"
        " is one padded forward per batch, the GPU default; on CPU a batch waits up to "
        "`CPREC_BATCH_COALESCE_MS=auto` (50 ms), or a tenth of the last batch's device time if "
        "longer (`CPREC_BATCH_COALESCE_SHARE`), for as many requests as the last batch served "
        "plus those queued behind it, and not at all once they are there; a request that arrives "
        "while a batch runs joins its remaining forwards); libgomp's spin before "
        "sleeping is 0.2 ms (`GOMP_SPINCOUNT=20000`, set when `cprec` is imported, before torch); "
        "request metrics are plain ASGI middleware; the route dependencies are `async`, so no "
        "request takes a thread-pool hop; the Redis lookups and stores issued in one event-loop "
        "tick go out as one pipeline (one round trip), and the histories of one tick are "
        "tokenised by one call per pool thread (`service/coalesce.py`); "
        "`normalise_title` skips its per-character pass "
        "for printable titles; the searches of concurrent requests share one faiss call per domain "
        "(`service/search.py`), and a block of 16 or more is cut into parallel single-threaded "
        "calls (`CPREC_SEARCH_PARALLEL_CALLS=auto`, the CPU count): right after a batch its "
        "clients' searches are all the next batch waits for; a repeated request is answered "
        "from an in-process cache of ranked lists per index snapshot, without Redis or a "
        "search (`CPREC_RESULT_CACHE_SIZE`); faiss searches run with one OpenMP thread per call "
        "(`CPREC_FAISS_SEARCH_THREADS=1`) so they do not stall beside the encoder's threads; "
        "histories and titles "
        "are tokenised by a private copy of the Rust tokenizer, without a lock and without the "
        "GIL (`cprec.lm.TextTokenizer`); "
        "reindex embeds length-sorted batches on the device thread; tokenisation, forward and "
        "search run off the event loop; `CPREC_QUANTIZE=int8` is an option, off by default (see its"
        " rows below: dynamic int8 makes a vector depend on its batch). The load generator is a "
        "lean keep-alive HTTP/1.1 client "
        "(`bench.common.HTTPConn`): it shares the 2 cores with the service it measures, so it "
        "spends as little CPU per request as it can, and opens its connections before each "
        "round's clock starts.",
        "",
        "The overhead target compares the service with the raw encoder's best row, which "
        "includes batches split exactly as the service splits them (`forwards: split`): the "
        "service's own forwards are then the same work, and the gap is what HTTP, the event "
        "loop, tokenisation, Redis and search cost. On 2 cores that cost is larger than its CPU "
        "time when it runs beside a forward: the device thread's two OpenMP threads wait at "
        "every barrier whenever another thread takes one of the cores (compare "
        "`seq_s_in_forward` with the raw table). Coalescing whole cohorts of clients into one "
        "batch moves most of that work between forwards, where it costs device idle time "
        "instead (`device_busy`): the cohort's searches, responses and next requests go through "
        "one event loop, a roughly fixed number of milliseconds per batch (the service "
        "ceiling table measures it per request: `outside_forward_ms`). The faster the "
        "forwards (bf16 matrix units such as AMX), the larger that fixed share of each batch, "
        "and the lower `device_busy` on the same code. Answering each forward's "
        "requests at once and letting the next ones join (continuous batching) kept the device "
        "busy but slowed every forward by more than it gained on 2 cores (A/B in the issue "
        "notes), so batches are answered whole.",
        "",
        "### Targets",
        "",
    ]
    trows = []
    for name, t in s["targets"].items():
        met = "not run: " + t["not_run"] if t.get("not_run") else ("met" if t["met"] else "NOT met")
        trows.append(
            {
                "target": name,
                "measured": t["measured"],
                "goal": f"{t.get('direction', '')} {t['target']}".strip(),
                "result": met,
                "detail": t.get("note", ""),
                "command": f"`{t['command']}`",
            }
        )
    lines += _table(trows, ["target", "measured", "goal", "result", "detail", "command"])
    enc = _load(d, "encoder")
    if enc:
        lines += [
            "",
            f"### Raw encoder (`{enc['command']}`)",
            "",
            "Sequences/s and real tokens/s of `HFEncoder.core` (no HTTP), median over "
            "interleaved rounds; `default` is what the service runs (bf16 on CPUs with "
            "native bf16).",
            "",
        ]
        lines += _table(
            enc["rows"],
            ["model", "variant", "dtype", "kind", "batch", "mean_tokens", "seq_s", "tok_s"],
        )
        agree = enc.get("dtype_agreement")
        if agree:
            lines += [
                "",
                f"Default dtype ({agree['dtype']}) against fp32: cosine between the vectors of "
                "the same texts, each encoded alone (the `bf16_cosine_vs_fp32` target; the "
                "`default` quality row below is its ranking effect).",
                "",
            ]
            lines += _table(
                [agree],
                [
                    "model",
                    "dtype",
                    "history_n",
                    "history_cos_min",
                    "history_cos_mean",
                    "title_n",
                    "title_cos_min",
                    "title_cos_mean",
                ],
            )
        q = enc["quantization"]
        from bench.encoder import int8_decision

        decision = int8_decision(q, enc["quality"])[1]
        lines += [
            "",
            f"Quantisation option (`CPREC_QUANTIZE=int8`): quality on "
            f"{q['quality_subset']}: zero-shot minilm-l6, full ranking over the target "
            "domain, history masked.",
            "",
        ]
        lines += _table(
            enc["quality"],
            [
                "variant",
                "dtype",
                "users",
                "candidates",
                "ndcg10",
                "recall10",
                "hits10",
                "rel_loss_vs_fp32",
                "ndcg_loss_ci95",
                "mrr_full",
                "mrr_rel_loss_vs_fp32",
                "mrr_loss_ci95",
                "top10_overlap",
            ],
        )
        lines += [
            "",
            f"int8 speedup on histories at batch 1: {q['speedup_vs_fp32_history_b1']}x "
            f"vs fp32, {q['speedup_vs_default_history_b1']}x vs the default dtype; "
            f"on titles at batch 32 {q['speedup_vs_fp32_title_b32']}x vs fp32. "
            + (
                "Batch invariance (min cosine between one of 16 histories encoded alone and "
                "in one batch with the others): "
                + ", ".join(
                    f"{k.removeprefix('batch_cos_min_')} {v}"
                    for k, v in q.items()
                    if k.startswith("batch_cos_min_")
                )
                + ". "
                if "batch_cos_min_int8" in q
                else ""
            )
            + f"Decision: **{decision}** (`CPREC_QUANTIZE` defaults to `none`; it is on only "
            "when NDCG@10 and full-ranking MRR both lose under 2% relative to fp32, int8 is "
            "faster than the default dtype, and a vector does not depend on its batch). "
            "`*_ci95` are paired-bootstrap 95% intervals of the relative loss (users resampled "
            "together); `top10_overlap` is the share of fp32's top 10 a variant keeps.",
        ]
    srv = _load(d, "serve")
    if srv:
        lines += [
            "",
            f"### Service under load (`{srv['command']}`)",
            "",
            f"Real uvicorn processes, real Redis, {srv['catalog_items']} FK catalogue "
            "items; FK-LOO test histories as title entries; closed-loop load on 127.0.0.1. "
            "The services log at WARNING, so without uvicorn's access line per request "
            "(`CPREC_ACCESS_LOG`, on at the default INFO: event-loop work on every request, "
            "not measured here). "
            "miss = each history sent once; hit = requests already answered (the ranked "
            "list is cached); hit-vector = answered histories with a new k (the user vector "
            "comes from Redis, the search runs). p99_spread = p99 / p50 over the rounds "
            "pooled; p99_gap_ms = p99 - p50 and round_spread = p99 / p50 within each round "
            "(median over rounds). The batching spread target compares p99_gap_ms: in a closed "
            "loop that saturates the CPU a request waits about one batch's forwards (batching "
            "on) or the forwards queued ahead of it (off), both a sum over about 32 histories, "
            "so p99 / p50 comes out close either way, while the tail in milliseconds shrinks "
            "with the forwards. A batched request's tail is a client that missed its cohort's "
            "batch: on CPU it joins the batch's remaining forwards.",
            "",
        ]
        lines += _table(
            srv["rows"],
            [
                "model",
                "batching",
                "traffic",
                "concurrency",
                "requests",
                "failed",
                "rps",
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "p99_spread",
                "p99_gap_ms",
                "round_spread",
            ],
        )
        lines += [
            "",
            "Raw encoder on the same histories in the same run (the overhead baseline, its best "
            "row): one padded forward per batch, or the batch split into length-sorted forwards "
            "with the service's CPU rule (<= 25% padding). Timed on the benchmark's main thread, "
            "where nothing else runs, "
            + (
                f"over {srv['plan']['raw_histories']} held-out histories, cycled (the service "
                "never sees one cohort twice, and one cohort of 32 repeated runs faster than "
                "varied ones):"
                if srv["plan"].get("raw_histories")
                else "over ONE cohort of 32 held-out histories, repeated: this run predates the "
                "raw limit over 128 histories, and one repeated cohort runs faster than varied "
                "ones, so its overhead ratio is biased low:"
            ),
            "",
        ]
        lines += _table(srv["raw"], ["model", "batch", "forwards", "seq_s_median", "rounds"])
        lines += [
            "",
            "`GET /live` every 20 ms while `/recommend` runs at concurrency 32, in one extra "
            "round per service (the probe's own requests preempt the forwards' threads on 2 "
            "cores, so the throughput and latency rounds above run without it):",
            "",
        ]
        lines += _table(srv["live"], ["model", "batching", "probes", "p50_ms", "p95_ms", "p99_ms"])
        if srv.get("paired"):
            lines += [
                "",
                "Paired rounds at concurrency 32: each round runs batching on, off and "
                "on-single, then the raw encoder, within about a minute; the batching and "
                "overhead targets are the medians of these per-round ratios (a ratio of medians "
                "taken over a whole run mixes the drift between rounds into it). raw_best = the "
                "raw configuration that is best over the run (by median), read in that round; "
                "gap = p99 - p50 in the round. A batched round's p99 is its slowest batch (1% of "
                "a round is fewer requests than one batch of 32), and a batch's time is the sum "
                "of its cohort's history lengths, so the gap ratio swings between rounds:",
                "",
            ]
            lines += _table(
                srv["paired"],
                [
                    "model",
                    "round",
                    "rps_on",
                    "rps_off",
                    "raw_best",
                    "batching",
                    "overhead",
                    "gap_on_ms",
                    "gap_off_ms",
                    "gap_ratio",
                ],
            )
        if srv.get("device_thread"):
            lines += [
                "",
                "Device thread during the highest-concurrency rounds (from each service's "
                "`/metrics`): the busy share of wall time, and sequences/s inside the forward "
                "passes (compare with the raw encoder above); mean_batch = texts per forward, "
                "requests_per_batch = requests per coalesced batch:",
                "",
            ]
            lines += _table(
                srv["device_thread"],
                [
                    "model",
                    "batching",
                    "concurrency",
                    "forwards",
                    "mean_batch",
                    "requests_per_batch",
                    "device_busy",
                    "seq_s_in_forward",
                ],
            )
        if srv.get("ceiling"):
            lines += [
                "",
                "Service ceiling: the same service with a near-free encoder (a 2-layer random "
                "BERT, hidden 32, MiniLM's tokenizer; a forward of 32 histories takes "
                "milliseconds), same catalogue and Redis, batching on, its own cache-miss "
                "histories. Its requests/s "
                "are bounded by what every request costs outside the forward (HTTP, validation, "
                "tokenisation, Redis, search, the response) with the load generator on the same "
                "cores. ms_per_request = 1000 / rps; outside_forward_ms = ms_per_request x (1 - "
                "device_busy), the wall time per request with the device idle. A batch waits "
                "for its cohort's work between forwards, so beside a raw encoder of r seq/s the "
                "overhead ratio can reach about 1 / (1 + outside_forward_ms / 1000 x r): close "
                "to 1 for slow forwards, bounded by this cost for fast ones (a GPU, AMX):",
                "",
            ]
            lines += _table(
                srv["ceiling"],
                [
                    "model",
                    "concurrency",
                    "requests",
                    "failed",
                    "rps",
                    "ms_per_request",
                    "outside_forward_ms",
                    "p50_ms",
                    "p99_ms",
                    "device_busy",
                    "mean_batch",
                ],
            )
    rx = _load(d, "reindex")
    if rx:
        lines += ["", f"### Reindex (`{rx['command']}`)", ""]
        lines += _table(rx["raw"], ["model", "batches", "batch", "items", "items_s_median"])
        lines += [""]
        lines += _table(
            rx["e2e"],
            [
                "model",
                "items",
                "seconds",
                "items_s",
                "recommend_during",
                "recommend_failed",
                "recommend_p99_ms",
                "index_versions_seen",
            ],
        )
    se = _load(d, "search")
    if se:
        lines += [
            "",
            f"### Search (`{se['command']}`)",
            "",
            "Exact per-domain search through `ItemIndex.search` on seeded synthetic 384-d "
            "vectors at the FK domain sizes; `threads` = faiss OpenMP threads per search "
            "(the service uses `CPREC_FAISS_SEARCH_THREADS=1`).",
            "",
        ]
        lines += _table(
            se["exact"],
            [
                "threads",
                "domain",
                "items",
                "batch",
                "latency_ms_p50",
                "latency_ms_p99",
                "queries_s",
            ],
        )
        h = se["hnsw"]
        lines += [
            "",
            f"HNSW (the service's M=32, efConstruction 64) vs exact at {h['n']:,} "
            f"clustered synthetic vectors, {h['queries']} queries (build {h['build_s']} s):",
            "",
        ]
        lines += _table(
            h["rows"], ["index", "ef_search", "recall10", "queries_s_b1", "queries_s_batch"]
        )
    lines += ["", end]
    return "\n".join(lines)


def write_docs() -> None:
    """Both modes' sections, each from its own results (a mode never run is left out)."""
    text = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else "# Benchmarks\n"
    for mode, (start, end) in MARKERS.items():
        if not (results_dir(mode) / "summary.json").is_file():
            continue
        block = render(mode)
        if start in text and end in text:
            a, b = text.index(start), text.index(end) + len(end)
            text = text[:a] + block + text[b:]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text, encoding="utf-8")


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
        for m in MARKERS:  # both modes' summaries, keeping each run's timestamp and timings
            path = results_dir(m) / "summary.json"
            if path.is_file():
                old = json.loads(path.read_text())
                summarise(m, old.get("seconds", {}), old.get("created_at"))
    write_docs()
    print(f"wrote {results_dir(mode) / 'summary.json'} and {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
