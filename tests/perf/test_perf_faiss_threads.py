"""``faiss_search_threads`` caps faiss' OpenMP team per search call without touching the
encoder's threads, and does not change results."""

from __future__ import annotations

import threading

import numpy as np
import torch

from service import index as index_mod
from service.catalog import Item
from service.index import ItemIndex, configure_faiss


def _index() -> ItemIndex:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((300, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return ItemIndex.build([Item(str(i), "D", f"t{i}") for i in range(300)], v, "m")


def test_search_threads_same_results_and_other_threads_untouched() -> None:
    idx = _index()
    q = idx.vectors[:20] + 0.01
    before = index_mod._SEARCH_THREADS
    out_before: dict[str, int] = {}
    t0 = threading.Thread(target=lambda: out_before.setdefault("fresh", torch.get_num_threads()))
    t0.start()
    t0.join()
    try:
        configure_faiss(search_threads=0)
        ref = idx.search("D", q, 5, exclude=[1, 2])
        main_threads = torch.get_num_threads()
        out: dict[str, object] = {}

        def worker() -> None:  # like asyncio.to_thread in Engine.recommend
            configure_faiss(search_threads=1)
            out["hits"] = idx.search("D", q, 5, exclude=[1, 2])

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert out["hits"] == ref
        assert torch.get_num_threads() == main_threads

        t = threading.Thread(target=lambda: out.setdefault("fresh", torch.get_num_threads()))
        t.start()
        t.join()
        # a new device thread keeps torch's default (compared with one started before the
        # search threads were capped; other tests may have changed the main thread's count)
        assert out["fresh"] == out_before["fresh"]
    finally:
        configure_faiss(search_threads=before)
