"""The FK-LOO protocol: full ranking within the target domain, history masked, 50-item lists.

Mirrors ``<shared>/benchmarks/evaluate_topk.py`` exactly (same formulas, same summation order), so
``compute_metrics`` on a ranking equals the shared scorer's output on the JSONL written from it.

Metrics, with r = 1-based rank of the target (no hit when absent from the 50):
Recall@K = 1[r <= K], NDCG@K = 1[r <= K] / log2(r + 1), MRR = 1/r (MRR@50); K in {10, 50};
per target domain, overall micro (mean over cases) and macro (mean of the domain values).
Ties in scores go to the smaller item_id, so every ranking here is deterministic.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.dataset import Case, Item

K_LIST = 50
KS = (10, 50)
METRICS = ("Recall@10", "NDCG@10", "Recall@50", "NDCG@50", "MRR")


def _domain_ids(items: Sequence[Item]) -> dict[str, np.ndarray]:
    by: dict[str, list[int]] = defaultdict(list)
    for it in items:
        by[it.domain].append(it.item_id)
    return {d: np.array(sorted(v), dtype=np.int64) for d, v in by.items()}


def _group(cases: Sequence[Case]) -> dict[str, list[int]]:
    """Case indices per target domain, in case order."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(cases):
        by[c.domain].append(i)
    return by


def topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """[B, n] scores -> [B, k] column indices, best first; ties go to the smaller column.

    Columns are item ids in ascending order, so "smaller column" = "smaller item_id". A partition
    finds each row's k-th value; only the entries >= it (k, or more on ties) are sorted exactly.
    """
    b, n = scores.shape
    if k > n:
        raise ValueError(f"k={k} > {n} candidates")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    kth = np.partition(scores, n - k, axis=1)[:, n - k]  # [B], k-th largest per row
    out = np.empty((b, k), dtype=np.int64)
    for r in range(b):
        row = scores[r]
        cand = np.flatnonzero(row >= kth[r])  # ascending column ids, >= k entries
        order = np.lexsort((cand, -row[cand]))[:k]  # by score desc, then column asc
        out[r] = cand[order]
    return out


def _mask_history(scores: np.ndarray, rows: Sequence[Case], dom_ids: np.ndarray) -> None:
    """Set history items of each row to -inf in place ([B, n_dom] scores over ``dom_ids``)."""
    for r, c in enumerate(rows):
        if not c.history:
            continue
        h = np.asarray(c.history, dtype=np.int64)
        pos = np.searchsorted(dom_ids, h)  # column of each history id, if it is in this domain
        hit = dom_ids[np.minimum(pos, dom_ids.size - 1)] == h  # other-domain ids are not there
        scores[r, pos[hit]] = -np.inf


def _check_enough(dom: str, dom_ids: np.ndarray, cases: Sequence[Case], k: int) -> None:
    worst = max((len(c.history) for c in cases), default=0)
    if dom_ids.size - worst < k:
        raise ValueError(f"domain {dom}: {dom_ids.size} items minus a {worst}-item history < k={k}")


def rank_topk(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    cases: Sequence[Case],
    items: Sequence[Item],
    k: int = K_LIST,
    batch: int = 512,
) -> list[list[int]]:
    """Dot-product ranking: ``user_vecs`` [n_cases, D] (row i = cases[i]), ``item_vecs``
    [n_items, D] (row = item_id) -> per case ``k`` item ids of its target domain, history masked."""
    if len(user_vecs) != len(cases):
        raise ValueError(f"{len(user_vecs)} user vectors for {len(cases)} cases")
    if len(item_vecs) != len(items):
        raise ValueError(f"{len(item_vecs)} item vectors for {len(items)} items")
    user_vecs = np.ascontiguousarray(user_vecs, dtype=np.float32)
    item_vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
    doms = _domain_ids(items)

    def scores_for(idx: list[int], dom_ids: np.ndarray) -> np.ndarray:
        return user_vecs[idx] @ item_vecs[dom_ids].T  # [B, n_dom]

    return _rank_grouped(cases, doms, scores_for, k, batch)


def rank_from_scores(
    score_fn: Callable[[list[Case]], Any],
    cases: Sequence[Case],
    items: Sequence[Item],
    k: int = K_LIST,
    batch: int = 256,
) -> list[list[int]]:
    """Rank with a model that scores every item: ``score_fn(batch_cases)`` -> [B, n_items]
    (numpy or torch); only the target domain's columns are used, history masked."""
    doms = _domain_ids(items)
    n_items = len(items)

    def scores_for(idx: list[int], dom_ids: np.ndarray) -> np.ndarray:
        s = score_fn([cases[i] for i in idx])
        if hasattr(s, "detach"):  # torch tensor
            s = s.detach().float().cpu().numpy()
        s = np.asarray(s, dtype=np.float32)
        if s.shape != (len(idx), n_items):
            raise ValueError(f"score_fn returned {s.shape}, expected {(len(idx), n_items)}")
        return s[:, dom_ids]  # [B, n_dom]

    return _rank_grouped(cases, doms, scores_for, k, batch)


def _rank_grouped(
    cases: Sequence[Case],
    doms: dict[str, np.ndarray],
    scores_for: Callable[[list[int], np.ndarray], np.ndarray],
    k: int,
    batch: int,
) -> list[list[int]]:
    out: list[list[int] | None] = [None] * len(cases)
    for dom, idx in _group(cases).items():
        if dom not in doms:
            raise ValueError(f"target domain {dom!r} has no items")
        dom_ids = doms[dom]
        _check_enough(dom, dom_ids, [cases[i] for i in idx], k)
        for s in range(0, len(idx), batch):
            chunk = idx[s : s + batch]
            scores = np.array(scores_for(chunk, dom_ids), dtype=np.float32, copy=True)
            _mask_history(scores, [cases[i] for i in chunk], dom_ids)
            top = dom_ids[topk_rows(scores, k)]  # [B, k] item ids
            for r, i in enumerate(chunk):
                out[i] = top[r].tolist()
    return out  # type: ignore[return-value]


def validate_ranked(
    ranked: Sequence[Sequence[int]],
    cases: Sequence[Case],
    items: Sequence[Item] | None = None,
    k: int = K_LIST,
) -> None:
    """The shared scorer's checks: exactly k distinct ids, no history item, target domain only."""
    if len(ranked) != len(cases):
        raise ValueError(f"{len(ranked)} lists for {len(cases)} cases")
    for lst, c in zip(ranked, cases, strict=True):
        if len(lst) != k:
            raise ValueError(f"{c.user_id}: list of {len(lst)} ids, need exactly {k}")
        if len(set(lst)) != k:
            raise ValueError(f"{c.user_id}: duplicated ids in list")
        if set(lst) & set(c.history):
            raise ValueError(
                f"{c.user_id}: history items not masked: {sorted(set(lst) & set(c.history))[:5]}"
            )
        if items is not None:
            bad = [i for i in lst if not (0 <= i < len(items)) or items[i].domain != c.domain]
            if bad:
                raise ValueError(f"{c.user_id}: ids outside domain {c.domain}: {bad[:5]}")


def _metrics_for(ranks: list[int | None]) -> dict[str, float]:
    n = len(ranks)
    out: dict[str, float] = {"n": n}
    for kk in KS:
        hits = [r for r in ranks if r is not None and r <= kk]
        out[f"Recall@{kk}"] = len(hits) / n if n else float("nan")
        out[f"NDCG@{kk}"] = sum(1.0 / math.log2(r + 1) for r in hits) / n if n else float("nan")
    out["MRR"] = sum(1.0 / r for r in ranks if r is not None) / n if n else float("nan")
    return out


def compute_metrics(
    ranked: Sequence[Sequence[int]],
    cases: Sequence[Case],
    items: Sequence[Item] | None = None,
    name: str = "",
    split: str = "",
    k: int = K_LIST,
) -> dict[str, Any]:
    """Same structure as the anchors' ``*.metrics.json``: ``{name, split, list_length, metrics:
    {<domain>..., overall_micro, overall_macro}}``; each leaf has ``n`` and the five metrics."""
    validate_ranked(ranked, cases, items, k)
    by_dom: dict[str, list[int | None]] = defaultdict(list)
    for lst, c in zip(ranked, cases, strict=True):
        by_dom[c.domain].append(list(lst).index(c.target) + 1 if c.target in lst else None)
    res: dict[str, Any] = OrderedDict()
    for dom in sorted(by_dom):
        res[dom] = _metrics_for(by_dom[dom])
    # Same order as the scorer: domains in first-appearance order, concatenated.
    res["overall_micro"] = _metrics_for([r for lst in by_dom.values() for r in lst])
    macro: dict[str, float] = {"n": res["overall_micro"]["n"]}
    for m in METRICS:
        macro[m] = sum(res[d][m] for d in by_dom) / len(by_dom) if by_dom else float("nan")
    res["overall_macro"] = macro
    return OrderedDict(name=name, split=split, list_length=k, metrics=res)


def ndcg_at_10_micro(metrics: dict[str, Any]) -> float:
    """Early-stopping criterion; accepts compute_metrics' output or its inner ``metrics``."""
    inner = metrics.get("metrics", metrics)
    return float(inner["overall_micro"]["NDCG@10"])


def write_topk_jsonl(
    path: str | Path, cases: Sequence[Case], ranked: Sequence[Sequence[int]]
) -> Path:
    """One ``{"user_id", "ranked_item_ids"}`` line per case, as the shared scorer reads it;
    gzip (mtime 0, byte-reproducible) when the path ends with ``.gz``."""
    path = Path(path)
    if len(ranked) != len(cases):
        raise ValueError(f"{len(ranked)} lists for {len(cases)} cases")
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    for c, lst in zip(cases, ranked, strict=True):
        buf.write(json.dumps({"user_id": c.user_id, "ranked_item_ids": [int(i) for i in lst]}))
        buf.write("\n")
    data = buf.getvalue().encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    if path.name.endswith(".gz"):
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        ):
            gz.write(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)
    return path


def read_topk_jsonl(path: str | Path) -> dict[str, list[int]]:
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        return {
            o["user_id"]: [int(i) for i in o["ranked_item_ids"]]
            for o in (json.loads(line) for line in fh if line.strip())
        }
