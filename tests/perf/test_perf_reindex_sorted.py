"""Length-sorted reindex batches give the vectors of unsorted, one-at-a-time encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cprec.encoder import HFEncoder
from service.catalog import Item

TITLES = [
    "Coffee",
    "Dark Roast Coffee Beans, Two Pound Bag, Whole Bean, Fair Trade Certified",
    "Tea",
    "Cast Iron Skillet 10 inch",
    "Honey",
    "Stainless Steel French Press Coffee Maker with Four Level Filtration System, 34 Ounce",
    "Oat Milk",
    "Kettle",
]


async def test_sorted_reindex_equals_unsorted(app_client: Any, tiny_bert_dir: Path) -> None:
    enc = HFEncoder(tiny_bert_dir, pooling="mean", is_decoder=False, device="cpu", dtype="float32")
    items = [Item(f"i{n}", "Food" if n % 2 else "Kitchen", t) for n, t in enumerate(TITLES)]
    async with app_client(encoder=enc, embed_batch_size=3) as (_, engine, _enc):
        got = await engine.reindexer.embed_items(items)  # length-sorted batches of 3, padded
        texts = [engine.model.lm_text(it.domain, it.title, it.extra_text) for it in items]
        want = np.stack([enc.core(enc.pre([t], "item"))[0] for t in texts])
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 1 - 1e-5
