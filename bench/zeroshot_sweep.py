"""How the zero-shot default was chosen: ``python -m bench.zeroshot_sweep``.

On FK-LOO **valid** (test is never looked at), the user vector is the recency-weighted mean of the
history's MiniLM item vectors (half-life in items), over all history items or the target domain's
first, and the item score adds ``beta * log(1 + training count)``. Prints a table and writes
``bench/results/zeroshot_sweep.json``; ``cprec.hier`` keeps the chosen pair (``ZS_HALF_LIFE``,
``ZS_POP_WEIGHT``), see ``docs/decisions/001-zero-shot-default.md``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zeroshot_sweep.json"
HALF_LIVES = [1.0, 3.0, 10.0]
BETAS = [0.0, 0.02, 0.05, 0.1]


def main() -> int:
    from cprec.hier import recency_weights
    from training.baselines import popularity_counts
    from training.evaluate import compute_metrics, rank_topk
    from training.fkloo import load_fkloo
    from training.hier import HierTrainConfig, text_vectors

    d = load_fkloo()
    cfg = HierTrainConfig(progress=False)
    v, _ = text_vectors(cfg, d.items, cfg.cache_dir)
    logpop = np.log1p(popularity_counts(d.train, len(d.items))).astype(np.float32)
    cases = d.valid
    rows = []
    t0 = time.perf_counter()
    for hl in HALF_LIVES:
        for same in (False, True):
            u = np.ones((len(cases), v.shape[1] + 1), np.float32)
            for r, c in enumerate(cases):
                h = [i for i in c.history if d.items[i].domain == c.domain] if same else []
                h = h or list(c.history)
                w = recency_weights(len(h), hl)[:, None]  # [n, 1]
                x = (w * v[h]).sum(0)
                u[r, :-1] = x / max(float(np.linalg.norm(x)), 1e-12)
            for beta in BETAS:
                items = np.concatenate([v, beta * logpop[:, None]], 1)
                m = compute_metrics(rank_topk(u, items, cases, d.items), cases, d.items)
                mm = m["metrics"]
                rows.append(
                    {
                        "half_life": hl,
                        "target_domain_first": same,
                        "pop_weight": beta,
                        "valid_ndcg10": round(mm["overall_micro"]["NDCG@10"], 5),
                        "food": round(mm["Food"]["NDCG@10"], 5),
                        "kitchen": round(mm["Kitchen"]["NDCG@10"], 5),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["valid_ndcg10"])
    out = {
        "benchmark": "zeroshot_sweep",
        "split": "valid",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "best": best,
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"best: {best}; wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
