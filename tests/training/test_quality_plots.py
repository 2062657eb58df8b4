"""The quality pictures (bench/plots.py) on hand-built cases: per-case NDCG@10, the three splits,
the per-group means, the docs section and the training-curve log reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.plots import (
    HISTORY_BUCKETS,
    SAME,
    SWITCH,
    bar_chart,
    bucket_of,
    curves_chart,
    markdown,
    ndcg_at_10,
    ndcg_by_label,
    read_log,
    splits,
)
from training.dataset import Case, Item, TrainSeq

# Items 0-2 are Food, 3-5 Kitchen.
ITEMS = [Item(i, "Food" if i < 3 else "Kitchen", f"item {i}") for i in range(6)]
TRAIN = [TrainSeq("u0", [0, 1, 3, 1], ["Food", "Food", "Kitchen", "Food"])]
CASES = [
    Case("a", [0], 1, "Food"),  # same domain; target seen twice in training
    Case("b", [0, 1, 2, 3, 4, 5], 2, "Food"),  # last item Kitchen: a switch; target cold
    Case("c", [3, 0], 4, "Kitchen"),  # switch; cold
]


def test_ndcg_at_10() -> None:
    assert ndcg_at_10([7, 8, 9], 7) == 1.0
    assert ndcg_at_10([7, 8, 9], 9) == pytest.approx(1 / math.log2(4))
    assert ndcg_at_10(list(range(20)), 10) == 0.0  # rank 11: outside the first ten
    assert ndcg_at_10([], 1) == 0.0


def test_buckets() -> None:
    assert [bucket_of(n, HISTORY_BUCKETS) for n in (1, 5, 6, 20, 21, 41, 500)] == [
        "1-5",
        "1-5",
        "6-10",
        "11-20",
        "21-40",
        "41+",
        "41+",
    ]
    with pytest.raises(ValueError):
        bucket_of(0, HISTORY_BUCKETS)


def test_splits_label_each_case() -> None:
    by = {s.name: s for s in splits(CASES, ITEMS, TRAIN)}
    assert by["history"].labels == ["1-5", "6-10", "1-5"]
    assert by["switch"].labels == [SAME, SWITCH, SWITCH]
    assert by["seen"].labels == ["1-4", "0 (cold)", "0 (cold)"]
    for s in by.values():
        assert set(s.labels) <= set(s.order)


def test_ndcg_by_label_means_over_the_group() -> None:
    ranked = [[1, 2], [0, 1, 2], [5, 4]]  # ranks 1, 3, 2
    labels = [SAME, SWITCH, SWITCH]
    got = ndcg_by_label(CASES, ranked, labels)
    assert got[SAME] == (1.0, 1)
    assert got[SWITCH][1] == 2
    assert got[SWITCH][0] == pytest.approx((1 / math.log2(4) + 1 / math.log2(3)) / 2)


def test_pictures_and_section(tmp_path: Path) -> None:
    split = splits(CASES, ITEMS, TRAIN)[1]
    results = {
        "cprec": ndcg_by_label(CASES, [[1], [2], [4]], split.labels),
        "pop": ndcg_by_label(CASES, [[0], [0], [3]], split.labels),
    }
    png = tmp_path / "switch.png"
    bar_chart(split, results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown({"switch": (split, results)}, {"cprec": 1.0, "pop": 0.0}, 3, None, [])
    assert "| same domain | 1 | 1.0000 | 0.0000 |" in text
    assert "| domain switch | 2 | 1.0000 | 0.0000 |" in text
    assert "img/ndcg_by_switch.png" in text and "Not drawn" in text


def test_training_log_is_read_per_stage_and_drawn(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text(
        "stage,step,loss,lr,valid_ndcg10\n"
        "pretrain,1,9.5,0.001,\n"
        "pretrain,2,9.0,0.002,0.05\n"
        "finetune,1,8.0,0.001,\n",
        encoding="utf-8",
    )
    stages = read_log(log)
    assert list(stages) == ["pretrain", "finetune"]
    assert stages["pretrain"][1] == {"step": 2.0, "loss": 9.0, "lr": 0.002, "valid_ndcg10": 0.05}
    assert "valid_ndcg10" not in stages["pretrain"][0]
    assert curves_chart(log, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
