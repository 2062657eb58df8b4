"""The FK-LOO metrics on hand-built rankings, with exact expected values."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from training.dataset import Case, Item
from training.evaluate import (
    compute_metrics,
    ndcg_at_10_micro,
    rank_from_scores,
    rank_topk,
    read_topk_jsonl,
    topk_rows,
    write_topk_jsonl,
)

# 60 "A" items (ids 0..59) and 70 "B" items (ids 60..129): enough for 50-item lists.
ITEMS = [Item(i, "A" if i < 60 else "B", f"t{i}") for i in range(130)]
A_IDS = list(range(60))
B_IDS = list(range(60, 130))


def case(uid: str, target: int, dom: str, history: list[int] | None = None) -> Case:
    return Case(uid, history or [], target, dom)


def with_target_at(target: int, rank: int | None, pool: list[int]) -> list[int]:
    """A 50-item list from ``pool`` with ``target`` at 1-based ``rank`` (absent when None)."""
    others = [i for i in pool if i != target][:50]
    if rank is None:
        return others
    others = others[:49]
    return others[: rank - 1] + [target] + others[rank - 1 :]


def test_metrics_exact_values():
    cases = [case("u1", 5, "A"), case("u2", 7, "A"), case("u3", 70, "B"), case("u4", 80, "B")]
    ranked = [
        with_target_at(5, 1, A_IDS),  # r=1
        with_target_at(7, 20, A_IDS),  # r=20: in @50 only
        with_target_at(70, 3, B_IDS),  # r=3
        with_target_at(80, None, B_IDS),  # miss
    ]
    res = compute_metrics(ranked, cases, ITEMS)
    m = res["metrics"]
    assert list(m) == ["A", "B", "overall_micro", "overall_macro"]
    assert res["list_length"] == 50
    assert m["A"] == {
        "n": 2,
        "Recall@10": 0.5,
        "NDCG@10": 0.5,
        "Recall@50": 1.0,
        "NDCG@50": (1.0 + 1.0 / math.log2(21)) / 2,
        "MRR": (1.0 + 1.0 / 20) / 2,
    }
    assert m["B"]["Recall@10"] == 0.5 and m["B"]["NDCG@10"] == pytest.approx(0.5 / 2, abs=0)
    assert m["B"]["MRR"] == pytest.approx((1 / 3) / 2, abs=1e-15)
    micro = m["overall_micro"]
    assert micro["n"] == 4
    assert micro["Recall@10"] == 0.5
    assert micro["NDCG@10"] == pytest.approx((1.0 + 0.5) / 4, abs=1e-15)
    assert micro["MRR"] == pytest.approx((1 + 1 / 20 + 1 / 3) / 4, abs=1e-15)
    macro = m["overall_macro"]
    assert macro["n"] == 4
    assert macro["NDCG@50"] == pytest.approx((m["A"]["NDCG@50"] + m["B"]["NDCG@50"]) / 2, abs=1e-15)
    assert ndcg_at_10_micro(res) == micro["NDCG@10"] == ndcg_at_10_micro(m)


def test_list_checks():
    c = [case("u1", 5, "A", history=[3])]
    with pytest.raises(ValueError, match="exactly 50"):
        compute_metrics([A_IDS[:49]], c)
    with pytest.raises(ValueError, match="duplicated"):
        compute_metrics([[0] + A_IDS[1:50][:-1] + [0]], c)
    with pytest.raises(ValueError, match="history"):
        compute_metrics([A_IDS[:50]], c)  # contains item 3
    with pytest.raises(ValueError, match="outside domain"):
        compute_metrics([[i for i in A_IDS if i != 3][:49] + [100]], c, ITEMS)


def test_rank_topk_masks_history_and_domain():
    rng = np.random.default_rng(0)
    item_vecs = rng.standard_normal((130, 8)).astype(np.float32)
    # user vector = an A item's vector: that item would rank first, but it is in the history.
    cases = [case("u1", 1, "A", history=[0, 61]), case("u2", 100, "B", history=[99, 5])]
    user_vecs = np.stack([item_vecs[0], item_vecs[99]])
    ranked = rank_topk(user_vecs, item_vecs, cases, ITEMS)
    assert [len(r) for r in ranked] == [50, 50]
    assert all(len(set(r)) == 50 for r in ranked)
    assert set(ranked[0]) <= set(A_IDS) and 0 not in ranked[0]
    assert set(ranked[1]) <= set(B_IDS) and 99 not in ranked[1]
    # exact order = brute force on the unmasked candidates
    for r, c, u in zip(ranked, cases, user_vecs, strict=True):
        pool = [i for i in (A_IDS if c.domain == "A" else B_IDS) if i not in c.history]
        s = item_vecs[pool] @ u
        want = [pool[j] for j in sorted(range(len(pool)), key=lambda j: (-s[j], pool[j]))[:50]]
        assert r == want


def test_ties_go_to_smaller_id():
    scores = np.zeros((1, 130), dtype=np.float32)
    scores[0, 120] = 2.0  # one clear winner, the rest tied
    cases = [case("u1", 65, "B", history=[60])]
    ranked = rank_from_scores(lambda b: np.repeat(scores, len(b), 0), cases, ITEMS)
    assert ranked[0] == [120] + [i for i in range(61, 130) if i != 120][:49]
    # topk_rows on its own: ties at the k-th value resolved by column
    s = np.array([[1, 3, 3, 3, 0, 3]], dtype=np.float32)
    assert topk_rows(s, 3).tolist() == [[1, 2, 3]]


def test_rank_from_scores_shape_check():
    with pytest.raises(ValueError, match="expected"):
        rank_from_scores(lambda b: np.zeros((len(b), 5)), [case("u", 1, "A")], ITEMS)


def test_jsonl_roundtrip(tmp_path):
    cases = [case("u1", 5, "A"), case("u2", 70, "B")]
    ranked = [A_IDS[:50], B_IDS[:50]]
    p = write_topk_jsonl(tmp_path / "run.jsonl.gz", cases, ranked)
    with gzip.open(p, "rt") as fh:
        first = json.loads(fh.readline())
    assert first == {"user_id": "u1", "ranked_item_ids": A_IDS[:50]}
    assert read_topk_jsonl(p) == {"u1": A_IDS[:50], "u2": B_IDS[:50]}
    # byte-reproducible (gzip mtime 0)
    q = write_topk_jsonl(tmp_path / "again.jsonl.gz", cases, ranked)
    assert p.read_bytes() == q.read_bytes()
    plain = write_topk_jsonl(tmp_path / "run.jsonl", cases, ranked)
    assert plain.read_text().count("\n") == 2
