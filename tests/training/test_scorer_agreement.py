"""compute_metrics == the shared scorer (subprocess) == the anchor, on popularity / FK-LOO test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training.baselines import rank_popularity
from training.evaluate import METRICS, compute_metrics, write_topk_jsonl
from training.fkloo import fkloo_dir, load_fkloo

SCORER = fkloo_dir().parent / "evaluate_topk.py"
ANCHOR = fkloo_dir() / "anchors" / "pop_test.metrics.json"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not SCORER.exists() or not ANCHOR.exists(),
        reason="FK-LOO scorer/anchors not found (set CPREC_SHARED_DIR)",
    ),
]


def leaves(metrics: dict) -> dict[tuple[str, str], float]:
    return {(g, m): float(v[m]) for g, v in metrics.items() for m in ("n", *METRICS)}


def test_pop_agrees_with_scorer_and_anchor(tmp_path):
    data = load_fkloo()
    ranked = rank_popularity(data, data.test)
    ours = compute_metrics(ranked, data.test, data.items)["metrics"]
    pred = write_topk_jsonl(tmp_path / "pop_test.jsonl.gz", data.test, ranked)
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCORER),
            "--split",
            str(fkloo_dir() / "test.tsv.gz"),
            "--pred",
            str(pred),
            "--out-json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(out.read_text())["metrics"]
    anchor = json.loads(ANCHOR.read_text())["metrics"]
    assert list(ours) == list(theirs) == list(anchor)
    a, b, c = leaves(ours), leaves(theirs), leaves(anchor)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
        assert a[key] == pytest.approx(c[key], abs=1e-9), key
