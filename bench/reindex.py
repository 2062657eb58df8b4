"""Reindex: items/s embedding FK catalogue titles, length-sorted vs unsorted batches (raw encoder),
and an end-to-end ``/items/reindex/upload`` through the real service while ``/recommend`` keeps
being served (paced, loopback), counting every failed call during the swap.

Raw sorted/unsorted are measured in interleaved rounds around the end-to-end job, on the same
texts and batch size (``embed_batch_size``) the service uses, in the service's dtype.

    python -m bench.reindex --quick   # MiniLM, an 800-item subset (raw: a 384-item sample)
    python -m bench.reindex --full    # the whole 36,298-item FK catalogue (raw: 8,192 sample)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    ADMIN_TOKEN,
    FKData,
    item_texts,
    lat_summary,
    load_fk,
    make_encoder,
    print_table,
    redis_server,
    run_service,
    save_result,
    subset,
    target,
    write_catalog,
)

BATCH = 64  # the service's embed_batch_size default


def raw_round(enc: Any, ids: list[list[int]], sort: bool) -> float:
    """Items/s of ``core`` over all ``ids`` in batches of BATCH, length-sorted or as listed."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if sort else list(range(len(ids)))
    t0 = time.perf_counter()
    for s in range(0, len(order), BATCH):
        enc.core([ids[i] for i in order[s : s + BATCH]])
    return len(ids) / (time.perf_counter() - t0)


async def paced_recommend(
    url: str, bodies: list[dict[str, Any]], stop: asyncio.Event, interval_s: float
) -> dict[str, Any]:
    """One request every ``interval_s`` until ``stop``: failures and index versions seen."""
    lat: list[float] = []
    failed, versions, status = 0, [], {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        n = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = await client.post("/recommend", json=bodies[n % len(bodies)])
                code = str(r.status_code)
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                    v = r.json()["index_version"]
                    if not versions or versions[-1][0] != v:
                        versions.append((v, time.time()))
                else:
                    failed += 1
            except httpx.HTTPError as exc:
                code = type(exc).__name__
                failed += 1
            status[code] = status.get(code, 0) + 1
            n += 1
            await asyncio.sleep(interval_s)
    return {
        "requests": n,
        "failed": failed,
        "status": status,
        "index_versions": len(versions),
        **lat_summary(lat),
    }


async def end_to_end(
    fk: FKData,
    items: list[dict[str, Any]],
    seed_items: list[dict[str, Any]],
    model: str,
    hier: bool = False,
) -> dict[str, Any]:
    """The upload job through the service; ``hier``: serving a ``hier`` model from a store
    (``bench.serve_hier.publish_bench_hier``: MiniLM item vectors, the recipe's user model), whose
    reindex adds the item rows (adapter + residual) to the LM's work."""
    with (
        tempfile.TemporaryDirectory(prefix="cprec-bench-reindex-") as tmp,
        redis_server() as redis_url,
    ):
        seed_cat = write_catalog(seed_items, Path(tmp) / "seed.jsonl")
        data = "".join(
            json.dumps(
                {"item_id": it["item_id"], "domain": it["domain"], "title": it["title"]},
                ensure_ascii=False,
            )
            + "\n"
            for it in items
        ).encode()
        cases = subset(fk.cases, 16, seed=5)
        bodies = [{"history": fk.history_entries(c), "k": 10} for c in cases]
        store = None
        if hier:
            from bench.serve_hier import publish_bench_hier

            store = Path(tmp) / "store"
            publish_bench_hier(store, seed_items + items)
        settings = {} if hier else {"CPREC_BASE_MODEL": model}
        with run_service(seed_cat, redis_url, settings, store_dir=store) as svc:
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with httpx.AsyncClient(base_url=svc.url, timeout=60, headers=headers) as client:
                for b in bodies:  # warm: these histories are then cache hits during the swap
                    (await client.post("/recommend", json=b)).raise_for_status()
                stop = asyncio.Event()
                load = asyncio.create_task(paced_recommend(svc.url, bodies, stop, 0.1))
                await asyncio.sleep(1.0)
                r = await client.post(
                    "/items/reindex/upload",
                    data={"mode": "full"},
                    files={"file": ("fk.jsonl", data, "application/jsonl")},
                )
                r.raise_for_status()
                job_id = r.json()["job_id"]
                while True:
                    job = (await client.get(f"/items/reindex/{job_id}")).json()
                    if job["state"] in ("succeeded", "failed"):
                        break
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2.0)  # keep serving after the swap
                stop.set()
                swap = await load
                ready = (await client.get("/ready")).json()
    if job["state"] != "succeeded":
        raise RuntimeError(f"reindex job failed: {job}")
    seconds = job["finished_at"] - job["created_at"]
    return {
        "items": job["total"],
        "seconds": round(seconds, 2),
        "items_s": round(job["total"] / seconds, 1),
        "served_during_swap": swap,
        "indexed_after": ready.get("domains"),
    }


async def run(full: bool) -> dict[str, Any]:
    cmd = "python -m bench.reindex " + ("--full" if full else "--quick")
    model = "minilm-l6"
    fk = load_fk()
    all_ids = list(range(len(fk.items)))
    bench_ids = all_ids if full else subset(all_ids, 800, seed=7)
    rest = sorted(set(all_ids) - set(bench_ids)) or all_ids
    # The service starts on a small catalogue of other items, so every upload row is new work
    # (a reindex reuses the vectors of unchanged texts). Full mode has no other items, so it
    # starts on 256 items with changed titles.
    seed_items = [dict(fk.items[i]) for i in subset(rest, 256, seed=8)]
    if full:
        seed_items = [{**it, "title": it["title"] + " (seed)"} for it in seed_items]
    items = [fk.items[i] for i in bench_ids]
    enc = make_encoder(model)
    sample = subset(items, 8192 if full else 384, seed=9)
    ids = enc.pre(item_texts(sample), "item")
    raw: dict[str, list[float]] = {"sorted": [], "unsorted": []}
    rounds = 3  # paired rounds: the ratio is the median of per-round sorted/unsorted ratios
    for _ in range(rounds - 1):
        for sort in (False, True):
            raw["sorted" if sort else "unsorted"].append(raw_round(enc, ids, sort))
    e2e = await end_to_end(fk, items, seed_items, model)
    e2e_hier = await end_to_end(fk, items, seed_items, model, hier=True)
    for sort in (False, True):
        raw["sorted" if sort else "unsorted"].append(raw_round(enc, ids, sort))
    del enc
    raw_rows = [
        {
            "model": model,
            "batches": k,
            "batch": BATCH,
            "items": len(ids),
            "items_s_median": round(statistics.median(v), 1),
            "rounds": [round(x, 1) for x in v],
        }
        for k, v in raw.items()
    ]
    e2e_rows = [
        {
            "model": name,
            "items": e["items"],
            "seconds": e["seconds"],
            "items_s": e["items_s"],
            "recommend_during": e["served_during_swap"]["requests"],
            "recommend_failed": e["served_during_swap"]["failed"],
            "recommend_p99_ms": e["served_during_swap"]["p99_ms"],
            "index_versions_seen": e["served_during_swap"]["index_versions"],
        }
        for name, e in ((model, e2e), ("hier (minilm-l6)", e2e_hier))
    ]
    sw, swh = e2e["served_during_swap"], e2e_hier["served_during_swap"]
    print_table("raw encoder, FK titles, batch 64 (median over interleaved rounds)", raw_rows)
    print_table("end-to-end /items/reindex/upload while /recommend is served (10/s)", e2e_rows)
    srt = statistics.median(raw["sorted"])
    uns = statistics.median(raw["unsorted"])
    ratio = statistics.median(a / b for a, b in zip(raw["sorted"], raw["unsorted"], strict=True))
    e2e_ratio = e2e["items_s"] / srt
    targets = {
        "reindex_length_sorted_vs_unsorted": target(
            ratio,
            1.5,
            ratio >= 1.5,
            cmd,
            direction=">=",
            note=f"median of paired per-round ratios; medians sorted {srt:.1f} / unsorted "
            f"{uns:.1f} items/s",
        ),
        "reindex_end_to_end_vs_raw": target(
            e2e_ratio,
            0.8,
            e2e_ratio >= 0.8,
            cmd,
            direction=">=",
            note=f"end-to-end {e2e['items_s']} items/s ({e2e['items']} items) / raw sorted "
            f"{srt:.1f}",
        ),
        "reindex_hier_end_to_end_vs_raw": target(
            e2e_hier["items_s"] / srt,
            0.8,
            e2e_hier["items_s"] / srt >= 0.8,
            cmd,
            direction=">=",
            note=f"hier model: end-to-end {e2e_hier['items_s']} items/s ({e2e_hier['items']} "
            f"items) / raw sorted LM titles {srt:.1f}",
        ),
        "reindex_hier_swap_failed_recommend": target(
            swh["failed"],
            0,
            swh["failed"] == 0,
            cmd,
            direction="==",
            note=f"hier model: {swh['requests']} /recommend calls during the job and swap",
        ),
        "reindex_swap_failed_recommend": target(
            sw["failed"],
            0,
            sw["failed"] == 0,
            cmd,
            direction="==",
            note=f"{sw['requests']} /recommend calls during the job and swap",
        ),
    }
    res = {
        "mode": "full" if full else "quick",
        "command": cmd,
        "raw": raw_rows,
        "e2e": e2e_rows,
        "e2e_detail": e2e,
        "e2e_hier_detail": e2e_hier,
        "targets": targets,
    }
    save_result("reindex", res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args(argv)
    return asyncio.run(run(args.full and not args.quick))


if __name__ == "__main__":
    main()
