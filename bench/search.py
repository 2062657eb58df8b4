"""FAISS search as the service runs it: exact per-domain search latency and throughput for query
batches 1..256 (``ItemIndex.search``: flat inner product, history exclusion, BLAS threshold as
configured at start), and the recall/speed trade-off of the HNSW index on synthetic vectors.

Synthetic vectors are seeded, unit-norm, 384-d (MiniLM's width) and clustered (2,000 Gaussian
clusters): uniform random vectors would be a worst case no catalogue looks like. Recall@10 of
HNSW is measured against the exact flat index on the same queries.

    python -m bench.search --quick   # FK domain sizes; HNSW on 10,000 vectors
    python -m bench.search --full    # HNSW on 1,000,000 vectors (the build takes a while)
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any

import faiss
import numpy as np

from bench.common import print_table, save_result

DIM = 384
FK_DOMAINS = {"Food": 8661, "Kitchen": 27637}


def clustered(n: int, seed: int, n_clusters: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).standard_normal((n_clusters, DIM)).astype(np.float32)
    x = centers[rng.integers(0, n_clusters, n)] + 0.6 * rng.standard_normal((n, DIM)).astype(
        np.float32
    )  # [n, D]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact(batch_sizes: list[int], min_s: float) -> list[dict[str, Any]]:
    """Per domain, per OpenMP thread count (the service's 1 vs all cores), per batch size."""
    from service.catalog import Item
    from service.index import ItemIndex, configure_faiss

    items, vecs = [], []
    for d, n in FK_DOMAINS.items():
        items += [Item(f"{d}-{i}", d, f"{d} item {i}") for i in range(n)]
        vecs.append(clustered(n, seed=len(d)))
    idx = ItemIndex.build(items, np.concatenate(vecs), "bench")
    queries = clustered(max(batch_sizes) * 4, seed=99)
    exclude = list(range(0, 40, 3))  # a 13-item history
    rows = []
    for threads, d, bs in itertools.product([1, os.cpu_count() or 1], FK_DOMAINS, batch_sizes):
        configure_faiss(blas_threshold=4, search_threads=threads)  # as Engine.start does
        lat = []
        t_end = time.perf_counter() + min_s
        i = 0
        while time.perf_counter() < t_end or i < 3:
            q = queries[(i * bs) % len(queries) :][:bs]
            if len(q) < bs:
                q = queries[:bs]
            t0 = time.perf_counter()
            idx.search(d, q, 10, exclude)
            lat.append(time.perf_counter() - t0)
            i += 1
        med = float(np.median(lat))
        rows.append(
            {
                "threads": threads,
                "domain": d,
                "items": FK_DOMAINS[d],
                "batch": bs,
                "latency_ms_p50": round(med * 1000, 3),
                "latency_ms_p99": round(float(np.percentile(lat, 99)) * 1000, 3),
                "queries_s": round(bs / med, 0),
            }
        )
    return rows


def hnsw_tradeoff(n: int, n_queries: int, efs: list[int], m: int = 32) -> dict[str, Any]:
    from service.index import _new_faiss

    base = clustered(n, seed=1)
    queries = clustered(n_queries, seed=2)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(base)
    t0 = time.perf_counter()
    _, truth = flat.search(queries, 10)  # [Q, 10]
    flat_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hnsw = _new_faiss(DIM, "hnsw", m, 128)  # the service's HNSW settings
    hnsw.add_with_ids(base, np.arange(n, dtype=np.int64))
    build_s = time.perf_counter() - t0
    inner = faiss.downcast_index(faiss.downcast_index(hnsw).index)
    rows = [
        {
            "index": "flat (exact)",
            "ef_search": "-",
            "recall10": 1.0,
            "queries_s_b1": None,
            "queries_s_batch": round(n_queries / flat_s, 0),
        }
    ]
    for ef in efs:
        inner.hnsw.efSearch = ef
        t0 = time.perf_counter()
        _, got = hnsw.search(queries, 10)
        batch_s = time.perf_counter() - t0
        n1 = min(200, n_queries)
        t0 = time.perf_counter()
        for q in queries[:n1]:
            hnsw.search(q.reshape(1, -1), 10)
        b1_s = time.perf_counter() - t0
        recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
        rows.append(
            {
                "index": f"hnsw M={m}",
                "ef_search": ef,
                "recall10": round(float(recall), 4),
                "queries_s_b1": round(n1 / b1_s, 0),
                "queries_s_batch": round(n_queries / batch_s, 0),
            }
        )
    t0 = time.perf_counter()
    for q in queries[:50]:
        flat.search(q.reshape(1, -1), 10)
    rows[0]["queries_s_b1"] = round(50 / (time.perf_counter() - t0), 0)
    return {"n": n, "queries": n_queries, "build_s": round(build_s, 1), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args(argv)
    full = args.full and not args.quick
    cmd = "python -m bench.search " + ("--full" if full else "--quick")
    ex = exact([1, 4, 16, 64, 256] if full else [1, 16, 256], 1.0 if full else 0.3)
    print_table("exact per-domain search (ItemIndex.search, k=10, 13 excluded)", ex)
    ann = hnsw_tradeoff(
        1_000_000 if full else 10_000,
        1000 if full else 300,
        [16, 32, 64, 128, 256] if full else [16, 64, 128],
    )
    print_table(
        f"HNSW vs exact at {ann['n']:,} synthetic vectors (build {ann['build_s']} s)", ann["rows"]
    )
    res = {
        "mode": "full" if full else "quick",
        "command": cmd,
        "exact": ex,
        "hnsw": ann,
        "faiss_threads": faiss.omp_get_max_threads(),
        "targets": {},
    }
    save_result("search", res)
    return res


if __name__ == "__main__":
    main()
