"""Non-CPRec rows of the quality table: popularity and zero-shot text encoders (SASRec: sasrec.py).

- **pop**: item counts over all of ``train.tsv.gz``, ranked within the target domain, history
  removed, ties to the smaller id (reproduces the anchor ``pop_test.metrics.json`` exactly).
- **zero-shot** (``minilm-l6``, ``smollm2-135m``, bundled, no download): ``cprec.encoder.HFEncoder``
  (what the service encodes with) with the cprec template, i.e. the same text a served base model
  sees. Item text = ``Template.render_item(domain, title)``; user text =
  ``Template.render_history`` of the last ``n_last`` history items (cut from the left, so recent
  items survive truncation). Variant ``mean10dom``: the mean of the vectors of the last 10 history
  items *of the target domain* (falls back to the last 10 of any domain when a case has none: 111
  valid Food cases, no test case), L2-normalised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cprec.text import DEFAULT_TEMPLATE, Behaviour, Template
from training.dataset import Case, Dataset, Item, TrainSeq
from training.evaluate import rank_from_scores, rank_topk

log = logging.getLogger(__name__)

ZEROSHOT_MODELS = ("minilm-l6", "smollm2-135m")


# --------------------------------------------------------------------------- popularity


def popularity_counts(train: Sequence[TrainSeq], n_items: int) -> np.ndarray:
    """[n_items] interaction counts over the training sequences (float64)."""
    flat = np.fromiter((i for s in train for i in s.item_ids), dtype=np.int64)
    return np.bincount(flat, minlength=n_items).astype(np.float64)


def rank_popularity(data: Dataset, cases: Sequence[Case], k: int = 50) -> list[list[int]]:
    counts = popularity_counts(data.train, len(data.items))
    return rank_from_scores(
        lambda b: np.broadcast_to(counts, (len(b), counts.size)), cases, data.items, k=k, batch=2048
    )


# --------------------------------------------------------------------------- zero-shot encoders


@dataclass
class EncodeStats:
    """Throughput of one encoding stage (real tokens, special tokens included, no padding)."""

    name: str
    texts: int = 0
    tokens: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "texts": self.texts,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
        }


def encode_texts(
    encoder,
    texts: Sequence[str],
    kind: str,
    stats: EncodeStats,  # type: ignore[no-untyped-def]
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """``HFEncoder.encode`` (length-sorted batches, input order kept) plus a progress bar and
    token counts; -> [n, D] float32 unit vectors."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    ids = encoder.pre(list(texts), kind)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.empty((len(ids), encoder.dim), dtype=np.float32)
    for s in tqdm(
        range(0, len(order), batch_size),
        desc=stats.name,
        disable=not progress,
        leave=False,
        mininterval=5.0,
    ):
        chunk = order[s : s + batch_size]
        out[chunk] = encoder.core([ids[i] for i in chunk])
    stats.texts += len(ids)
    stats.tokens += sum(len(x) for x in ids)
    stats.wall_s += time.perf_counter() - t0
    return out


def item_texts(items: Sequence[Item], template: Template = DEFAULT_TEMPLATE) -> list[str]:
    return [template.render_item(it.domain, it.title) for it in items]


def user_texts(
    cases: Sequence[Case],
    items: Sequence[Item],
    n_last: int = 10,
    template: Template = DEFAULT_TEMPLATE,
) -> list[str]:
    """The last ``n_last`` history items, oldest first, as the template renders a history."""
    out = []
    for c in cases:
        beh = [Behaviour(items[i].domain, items[i].title) for i in c.history]
        out.append(template.render_history(beh, max_items=n_last))
    return out


def _items_key(
    model: str, items: Sequence[Item], template: Template, max_length: int, dtype: str
) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.item_id}\t{it.domain}\t{it.title}\n".encode())
    return f"{model}-{template.fingerprint()}-L{max_length}-{dtype}-{h.hexdigest()[:12]}"


def item_vectors(
    encoder,
    items: Sequence[Item],
    template: Template,
    cache_dir: Path | None,  # type: ignore[no-untyped-def]
    stats: EncodeStats,
    max_length: int,
    progress: bool = True,
) -> tuple[np.ndarray, bool]:
    """[n_items, D] item vectors, cached on disk (keyed by model, template, catalogue, length,
    dtype) so repeated budget runs do not re-encode 36k titles. Returns (vectors, from_cache)."""
    dtype = str(getattr(encoder, "dtype", "na")).removeprefix("torch.")
    path = None
    if cache_dir is not None:
        key = _items_key(encoder.name, items, template, max_length, dtype)
        path = Path(cache_dir) / "item_vectors" / f"{key}.npy"
        if path.exists():
            return np.load(path), True
    vecs = encode_texts(encoder, item_texts(items, template), "item", stats, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, vecs)
        tmp.replace(path)
        # How the cached vectors were made, so a later run that reuses them can still report
        # the encoding cost.
        meta = {**stats.as_dict(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return vecs, False


def cached_item_stats(
    encoder,
    items: Sequence[Item],
    template: Template,  # type: ignore[no-untyped-def]
    cache_dir: Path,
    max_length: int,
) -> dict[str, Any] | None:
    """The encoding stats saved beside cached item vectors (None when absent)."""
    dtype = str(getattr(encoder, "dtype", "na")).removeprefix("torch.")
    key = _items_key(encoder.name, items, template, max_length, dtype)
    meta = Path(cache_dir) / "item_vectors" / f"{key}.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def mean_target_domain_vectors(
    item_vecs: np.ndarray, cases: Sequence[Case], items: Sequence[Item], n_last: int = 10
) -> np.ndarray:
    """[n_cases, D]: mean of the last ``n_last`` target-domain history item vectors, normalised;
    cases without a target-domain history item use their last ``n_last`` items of any domain."""
    out = np.empty((len(cases), item_vecs.shape[1]), dtype=np.float32)
    for r, c in enumerate(cases):
        same = [i for i in c.history if items[i].domain == c.domain][-n_last:]
        pick = same or list(c.history)[-n_last:]
        v = item_vecs[pick].mean(0)
        out[r] = v / max(float(np.linalg.norm(v)), 1e-12)
    return out


@dataclass
class ZeroShotRun:
    """Rankings and stage timings of one zero-shot encoder."""

    model: str
    ranked: dict[str, list[list[int]]] = field(default_factory=dict)  # variant -> lists
    stages: list[dict[str, Any]] = field(default_factory=list)
    dtype: str = ""
    items_from_cache: bool = False


def run_zeroshot(
    model: str,
    items: Sequence[Item],
    cases: Sequence[Case],
    *,
    text_cases: Sequence[Case] | None = None,
    cache_dir: Path | None = None,
    store_dir: Path | None = None,
    n_last: int = 10,
    max_length: int = 256,
    template: Template = DEFAULT_TEMPLATE,
    device: str = "cpu",
    progress: bool = True,
) -> ZeroShotRun:
    """Rank ``cases`` with variant ``mean10dom`` and ``text_cases`` (default: ``cases``) with
    variant ``text`` (user text encoded by the model, the expensive part on CPU)."""
    from cprec.encoder import HFEncoder
    from cprec.lm import BUNDLED
    from training.config import store_dir as default_store

    if model not in BUNDLED:
        raise KeyError(f"unknown zero-shot model {model!r}; known: {sorted(BUNDLED)}")
    t0 = time.perf_counter()
    # store_dir: where a bundled base that needs converting (SmolLM2's GGUF) is converted once
    # (default: the model store); cache_dir: item vectors of this benchmark.
    enc = HFEncoder.from_base(
        model, store_dir or default_store(), max_length=max_length, device=device
    )
    run = ZeroShotRun(model=model, dtype=str(enc.dtype).removeprefix("torch."))
    run.stages.append({"stage": "load", "wall_s": round(time.perf_counter() - t0, 2)})
    st_items = EncodeStats(f"{model} items")
    ivecs, run.items_from_cache = item_vectors(
        enc, items, template, cache_dir, st_items, max_length, progress
    )
    if not run.items_from_cache:
        run.stages.append(st_items.as_dict())
    else:
        cached = cached_item_stats(enc, items, template, Path(cache_dir), max_length)  # type: ignore[arg-type]
        run.stages.append(
            {
                "stage": f"{model} items",
                "from_cache": True,
                **({"cached_run": cached} if cached else {}),
            }
        )

    t1 = time.perf_counter()
    run.ranked["mean10dom"] = rank_topk(
        mean_target_domain_vectors(ivecs, cases, items, n_last), ivecs, cases, items
    )
    run.stages.append(
        {
            "stage": "mean10dom rank",
            "cases": len(cases),
            "wall_s": round(time.perf_counter() - t1, 2),
        }
    )

    tc = list(text_cases if text_cases is not None else cases)
    st_users = EncodeStats(f"{model} users")
    uvecs = encode_texts(
        enc, user_texts(tc, items, n_last, template), "query", st_users, progress=progress
    )
    run.stages.append(st_users.as_dict())
    t2 = time.perf_counter()
    run.ranked["text"] = rank_topk(uvecs, ivecs, tc, items)
    run.stages.append(
        {"stage": "text rank", "cases": len(tc), "wall_s": round(time.perf_counter() - t2, 2)}
    )
    return run
