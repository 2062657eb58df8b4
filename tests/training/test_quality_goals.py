"""The quality table's hierarchical-model targets are computed from the rows, never typed."""

from __future__ import annotations

from bench.quality import SASREC_REF, hier_goals, hier_lines
from training.evaluate import METRICS


def row(micro: float, food: float, kitchen: float, **extra) -> dict:  # type: ignore[no-untyped-def]
    cells = {"Food": food, "Kitchen": kitchen, "overall_micro": micro}
    return {
        "status": "ok",
        "test_full": {
            g: {**dict.fromkeys(METRICS, 0.0), "NDCG@10": v, "n": 10} for g, v in cells.items()
        },
        **extra,
    }


def goals(rows: dict) -> dict[str, bool]:  # type: ignore[type-arg]
    run = {"rows": rows, "order": list(rows)}
    return {g["goal"]: g["met"] for g in hier_goals(run)}


def test_headline_needs_the_ratio_and_both_domains() -> None:
    sas = row(0.058, 0.10, 0.034)
    g = goals({"cprec": row(0.070, 0.12, 0.045), "sasrec": sas})
    assert all(g.values()) and len(g) == 3
    g = goals({"cprec": row(SASREC_REF * 1.1, 0.12, 0.030), "sasrec": sas})
    assert list(g.values()) == [False, True, False]


def test_seed_spread_and_second_dataset_rows() -> None:
    rows = {
        "cprec": row(0.070, 0.12, 0.045),
        "cprec-seed2": row(0.060, 0.11, 0.040),
        "sasrec": row(0.058, 0.10, 0.034),
        "sci-cprec": row(0.05, 0.05, 0.05),
        "sci-sasrec": row(0.06, 0.06, 0.06),
        "sci-pop": row(0.01, 0.01, 0.01),
        "sci-unseen-cprec": row(0.02, 0.02, 0.02),
    }
    g = goals(rows)
    # lower seed 0.060 - sasrec 0.058 = 0.002 < the spread 0.010: not beyond the seed noise
    assert g["cprec ahead of sasrec beyond the seed spread (both seeds)"] is False
    assert g["Scientific: cprec ahead of SASRec"] is False
    assert g["Scientific never trained on: ahead of its popularity"] is True
    text = "\n".join(hier_lines({"rows": rows, "order": list(rows)}))
    assert "NOT met: Scientific: cprec ahead of SASRec (0.0500 vs 0.0600)" in text
