"""The ``hier`` model kind served: cache-miss ``/recommend`` against the ``flat`` kind, in one run.

Three services on one catalogue and one private redis-server, driven in interleaved rounds at
concurrency 32 (flat, hier, hier with 2 workers, flat, ...), each round with histories it has
never seen (every request a cache miss):

- ``flat``: the LM over the history text (the base MiniLM served with ``CPREC_ZERO_SHOT=text``);
  the LM's cost per request is what the ``hier`` kind removes (quick mode: over a 1,000-item
  sample of the catalogue, see ``run``).
- ``hier``: a ``hier`` model from the store (MiniLM item vectors, the ``configs/hier-cpu.yaml``
  user-model shape, a residual row for every catalogue item). Its weights are random: the work
  per request does not depend on their values, and training one takes half an hour.
- ``hier-2w``: the same model with ``CPREC_WORKERS=2`` (two processes, one port).

Traffic: ``id`` (FK-LOO test histories as item-id entries), ``titles`` (the histories as title
entries, the items of a third of the catalogue named by a title it does not hold, so the LM
encodes them in the request unless the process has met that title before) and, for ``flat``,
the history titles.

    python -m bench.serve_hier --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    FKData,
    LoadResult,
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
from bench.serve import merge

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "hier-cpu.yaml"


def publish_bench_hier(store: Path, items: list[dict[str, Any]], seed: int = 0) -> str:
    """Publish a random-weight ``hier`` model of the CPU recipe's shape over bundled MiniLM into
    ``store`` as ``production``; the version."""
    import torch
    import yaml

    from cprec.hier import HierConfig, HierRec
    from cprec.lm import bundled_dir
    from cprec.text import Template
    from model_store import ModelStore

    shape = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))["model"]
    torch.manual_seed(seed)
    ids = [it["item_id"] for it in items]
    cfg = HierConfig(
        text_dim=384,
        domains=sorted({it["domain"] for it in items}),
        residual_rows=len(ids) + 1,
        **{k: v for k, v in shape.items() if k in HierConfig.__dataclass_fields__},
    )
    model = HierRec(cfg, ids).eval()
    with torch.no_grad():  # some spread, as a trained model has (zero residuals score nothing)
        assert model.residual is not None
        model.residual.weight[1:].normal_(0.0, 0.05)
    lm = bundled_dir("minilm-l6", store)
    version = "bench-hier"
    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save_pretrained(Path(tmp) / "hier")
        ModelStore(store).publish(
            lm,
            {
                "version": version,
                "kind": "hier",
                "base_model": "minilm-l6",
                "pooling": "mean",
                "dim": cfg.dim,
                "max_length": 64,
                "template": Template().model_dump(),
            },
            aliases=("production",),
            extra_files={f"hier/{p.name}": p for p in sorted(saved.iterdir())},
        )
    return version


def id_body(fk: FKData, case: dict[str, Any]) -> dict[str, Any]:
    return {
        "user_id": case["user_id"],
        "history": [{"item_id": fk.items[i]["item_id"]} for i in case["history"]],
        "k": 10,
    }


def title_body(fk: FKData, case: dict[str, Any]) -> dict[str, Any]:
    """Title entries; a third of the catalogue's items (by id) are named by a title the
    catalogue does not hold (a new edition), so the LM encodes it; like a real item missing
    from the catalogue, the same one recurs across users' histories."""
    hist = []
    for i in case["history"]:
        it = fk.items[i]
        title = it["title"] if i % 3 != 1 else f"{it['title']} (new edition)"
        hist.append({"domain": it["domain"], "title": title})
    return {"user_id": case["user_id"], "history": hist, "k": 10}


def catalog_items(fk: FKData, cases: list[dict[str, Any]], extra: int | None) -> list[dict]:
    """Every item the cases' histories and targets name, plus ``extra`` others (None: all)."""
    if extra is None:
        return fk.items
    need = {i for c in cases for i in (*c["history"], c["target"])}
    rest = [i for i in range(len(fk.items)) if i not in need]
    need |= set(subset(rest, extra, seed=11))
    return [fk.items[i] for i in sorted(need)]


async def run(full: bool, infinity: bool = True) -> dict[str, Any]:
    cmd = "python -m bench.serve_hier " + ("--full" if full else "--quick")
    plan: dict[str, Any] = {
        "concurrency": 32,
        "rounds": 5 if full else 3,
        "requests": {"flat": 96 if full else 48, "hier": 1024 if full else 320, "infinity": 48},
        # item-id and catalogue-title rounds run above 1,000 requests/s: rounds of a few hundred
        # requests were mostly ramp-up, so these send more, from a set of histories reused
        # every round with a new k and Redis flushed between rounds (every request a miss)
        "requests_long": 3072 if full else 1536,
        "max_s": 60,
        "extra_items": None if full else 1000,
    }
    fk = load_fk()
    rounds, conc = plan["rounds"], plan["concurrency"]
    n_flat, n_hier, n_inf = (plan["requests"][k] for k in ("flat", "hier", "infinity"))
    # Every request a history its service has not seen: each service draws from its own pass
    # over the cases (services keep their caches apart: own processes, own Redis prefix), so
    # the cases must cover the busiest service's three hier traffics, plus the warm-ups.
    need = 3 * 16 + rounds * n_hier + plan["requests_long"]
    cases = subset(fk.cases, need, seed=21)
    items = catalog_items(fk, cases, plan["extra_items"])
    pools: dict[str, Any] = {}

    def fresh(service: str, n: int, make: Any) -> list[dict[str, Any]]:
        pool = pools.setdefault(service, iter(range(len(cases))))
        return [make(next(pool)) for _ in range(n)]

    def ids(i: int) -> dict[str, Any]:
        return id_body(fk, cases[i])

    def titles(i: int) -> dict[str, Any]:
        return title_body(fk, cases[i])

    def plain(i: int) -> dict[str, Any]:
        c = cases[i]
        return {"user_id": c["user_id"], "history": fk.history_entries(c), "k": 10}

    n_long = plan["requests_long"]
    reused: dict[tuple[str, str], list[dict[str, Any]]] = {}  # the long conditions' histories

    # (service, history) -> (service, body maker, requests per round); round order as listed
    conditions: dict[tuple[str, str], tuple[str, Any, int]] = {
        ("flat", "titles"): ("flat", plain, n_flat),
        ("hier", "id"): ("hier", ids, n_long),
        ("hier", "catalog-titles"): ("hier", plain, n_long),
        ("hier", "titles"): ("hier", titles, n_hier),
        ("hier-2w", "id"): ("hier-2w", ids, n_long),
        ("hier-2w", "titles"): ("hier-2w", titles, n_hier),
    }
    long_keys = {("hier", "id"), ("hier", "catalog-titles"), ("hier-2w", "id")}
    inf_note = ""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cprec-bench-hier-")))
        catalog = write_catalog(items, tmp / "catalog.jsonl")
        # flat answers from a 1,000-item sample in quick mode: its requests are bound by the LM
        # over the history text, the search is a sliver of them at either size, and indexing
        # the whole catalogue with the LM a second time would take a minute of the budget
        flat_catalog = (
            catalog
            if full
            else write_catalog(subset(items, 1000, seed=3), tmp / "flat-catalog.jsonl")
        )
        redis_url = stack.enter_context(redis_server())
        hier_store = tmp / "store-hier"
        version = publish_bench_hier(hier_store, items)
        common = {"CPREC_TUNING__MAX_BATCH_SIZE": "32"}
        flat = {**common, "CPREC_BASE_MODEL": "minilm-l6"}
        procs = {
            "flat": stack.enter_context(run_service(flat_catalog, redis_url, flat)),
            # the first hier service builds the snapshot, the second loads it
            "hier": stack.enter_context(
                run_service(
                    catalog, redis_url, common, store_dir=hier_store, startup_timeout_s=1800
                )
            ),
            "hier-2w": stack.enter_context(
                run_service(catalog, redis_url, common, store_dir=hier_store, workers=2)
            ),
        }
        urls = {name: svc.url for name, svc in procs.items()}
        rss = {name: tree_rss_mib(svc.proc.pid) for name, svc in procs.items()}
        if infinity:
            try:
                urls["infinity"], inf_make, inf_note = start_infinity(stack, fk, cases)
                conditions[("infinity", "history-text")] = ("infinity", inf_make, n_inf)
            except Exception as exc:  # noqa: BLE001 - a missing baseline is reported, not fatal
                inf_note = f"infinity-emb not run: {type(exc).__name__}: {str(exc)[:300]}"
                print(inf_note)
        res: dict[tuple[str, str], list[LoadResult]] = {k: [] for k in conditions}
        busy: dict[tuple[str, str], list[float]] = {k: [] for k in conditions}
        for name, make, _ in conditions.values():  # warm-up, not counted
            path = "/embeddings" if name == "infinity" else "/recommend"
            await drive(urls[name], fresh(name, 16, make), 16, 16, 60, path=path)
        import redis

        own_redis = redis.Redis.from_url(redis_url)  # the benchmark's private redis-server
        # one set of histories per service: id and catalogue titles resolve to the same rows
        # (the same user-vector key), so they are told apart by k and the flush between them
        picked = {svc: [next(pools.setdefault(svc, iter(range(len(cases))))) for _ in range(n_long)]
                  for svc in {k[0] for k in long_keys}}  # fmt: skip
        for k in long_keys:
            reused[k] = [conditions[k][1](i) for i in picked[k[0]]]
        for rnd in range(rounds):
            for key, (name, make, n) in conditions.items():
                path = "/embeddings" if name == "infinity" else "/recommend"
                if key in long_keys:
                    own_redis.flushdb()  # no user vector from an earlier round
                    k = 11 + rnd + (rounds if key[1] == "catalog-titles" else 0)
                    bodies = [{**b, "k": k} for b in reused[key]]  # nor a ranked list
                else:
                    bodies = fresh(name, n, make)
                c0 = machine_cpu()
                r = await drive(urls[name], bodies, conc, n, plan["max_s"], path=path)
                c1 = machine_cpu()
                res[key].append(r)
                busy[key].append((c1[0] - c0[0]) / max(c1[1] - c0[1], 1e-9))
    rows = [
        {
            "service": name,
            "history": hist,
            "concurrency": conc,
            **merge(rs),
            "machine_busy": round(float(np.median(busy[(name, hist)])), 3),
            "rss_mib": rss.get(name),
        }
        for (name, hist), rs in res.items()
    ]
    cols = ["service", "history", "concurrency", "requests", "failed", "rps", "p50_ms", "p95_ms",
            "p99_ms", "cached_share", "machine_busy", "rss_mib"]  # fmt: skip
    print_table(f"cache-miss POST /recommend, {len(items)} catalogue items", rows, cols)

    def per_round(a: tuple[str, str], b: tuple[str, str]) -> list[float]:
        return [
            (x.ok / x.elapsed_s) / (y.ok / y.elapsed_s) for x, y in zip(res[a], res[b], strict=True)
        ]

    def row(service: str, history: str) -> dict[str, Any]:
        return next(r for r in rows if (r["service"], r["history"]) == (service, history))

    flat_t = ("flat", "titles")
    ratios: dict[str, tuple[list[float], float, str]] = {
        "hier_id_vs_flat_c32": (per_round(("hier", "id"), flat_t), 10.0, "1 process each"),
        "hier_titles_vs_flat_c32": (
            per_round(("hier", "titles"), flat_t),
            3.0,
            "1 process each; a third of the items named by a title the catalogue lacks",
        ),
        "workers2_vs_1_c32": (
            per_round(("hier-2w", "id"), ("hier", "id")),
            1.6,
            "id histories, CPREC_WORKERS=2 vs 1; the machine's two cores were "
            f"{row('hier', 'id')['machine_busy']:.0%} busy with one worker (service, load "
            f"generator and Redis together), {row('hier-2w', 'id')['machine_busy']:.0%} with two",
        ),
    }
    if ("infinity", "history-text") in res:
        inf = ("infinity", "history-text")
        ratios["hier_vs_infinity_c32"] = (
            per_round(("hier", "id"), inf),
            5.0,
            "hier /recommend (id histories, 1 process) / infinity-emb texts/s embedding the "
            f"history text; catalogue titles instead of ids: "
            f"{np.median(per_round(('hier', 'catalog-titles'), inf)):.1f}x; {inf_note}",
        )
    targets = {
        name: target(
            float(np.median(v)),
            goal,
            float(np.median(v)) >= goal,
            cmd,
            direction=">=",
            note=f"{what}: median of {len(v)} interleaved rounds, range {min(v):.3g}-{max(v):.3g}",
        )
        for name, (v, goal, what) in ratios.items()
    }
    if ("infinity", "history-text") not in res:
        targets["hier_vs_infinity_c32"] = {
            "measured": None,
            "target": 5.0,
            "met": False,
            "command": cmd,
            "direction": ">=",
            "note": inf_note,
            "not_run": inf_note,
        }
    for svc in ("hier", "hier-2w"):
        r = row(svc, "id")
        targets[f"{svc.replace('-', '_')}_id_p99_c32_ms"] = target(
            r["p99_ms"],
            100.0,
            r["p99_ms"] <= 100.0,
            cmd,
            direction="<=",
            note=f"{r['requests']} requests pooled over {rounds} rounds, {r['rps']} rps",
        )
    out = {"command": cmd, "plan": plan, "model": version, "catalog_items": len(items),
           "rows": rows, "targets": targets}  # fmt: skip
    save_result("serve_hier", out)
    return out


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children (a supervisor and its workers), in MiB."""
    import subprocess

    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    total = 0
    for p in [pid, *(int(x) for x in kids.split())]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return round(total / 1024, 1)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far (``/proc/stat``), in clock ticks:
    over a round, the share of both cores that the service, the load generator, Redis and
    anything else kept busy."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return float(sum(fields) - idle), float(sum(fields))


def start_infinity(
    stack: contextlib.ExitStack, fk: FKData, cases: list[dict[str, Any]]
) -> tuple[str, Any, str]:
    """infinity-emb (``bench/infinity.py``: its throwaway venv) serving the bundled MiniLM in the
    service's dtype: its URL, a maker of ``/embeddings`` bodies (one history text each) and a
    note naming it."""
    from bench.common import history_texts
    from bench.infinity import VERSION, embed_bodies, resolve_dtype, run_infinity, served_models
    from cprec.lm import bundled_dir

    dtype = resolve_dtype("auto")
    url = stack.enter_context(run_infinity(bundled_dir("minilm-l6", REPO / "var" / "store"), dtype))
    model = served_models(url)[0]

    def make(i: int) -> dict[str, Any]:
        return embed_bodies(history_texts(fk, [cases[i]]), model)[0]

    return url, make, f"infinity-emb {VERSION} ({dtype}, batch 32, 1 process)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument(
        "--no-infinity", action="store_true", help="skip the infinity-emb baseline (its venv)"
    )
    args = ap.parse_args(argv)
    return asyncio.run(run(args.full and not args.quick, infinity=not args.no_infinity))


if __name__ == "__main__":
    main()
