"""Quality table on FK-LOO: ``python -m bench.quality --budget | --full [--systems a,b,...]``.

Every row follows the FK-LOO protocol (``<shared>/benchmarks/fk_loo/README.md``): full ranking over
all items of the target domain, history masked, 50 distinct ids per case, metrics from
``training.evaluate`` (which equals the shared ``evaluate_topk.py``; every full-test list file
written here is re-scored by that script and the two must agree to 1e-9).

Systems (``--systems``):
  pop                 training-interaction counts (reproduces the anchor exactly)
  zeroshot-minilm     bundled MiniLM-L6 with the cprec template; two rows: ``text`` (user =
                      template history of the last 10 items) and ``mean10dom`` (mean of the last
                      10 target-domain item vectors)
  zeroshot-smollm2    the same with bundled SmolLM2-135M (last-token pooling)
  sasrec              compact SASRec on the mixed sequences (training/sasrec.py)
  finetune-only, cprec, cprec-cosine, cprec-domain-only, cprec-idres
                      from the training pipeline (``bench.flat_systems.run_system``) with the
                      config ``--train-config`` (default ``configs/quality-<mode>.yaml``; full
                      mode falls back to ``configs/gpu-full.yaml``, which needs CUDA); they show
                      "not available" (with the reason) when that module or config is missing.
                      The pipeline ranks every test case.

Modes:
  --budget  for a 2-core CPU, in two invocations of < 30 min each (uncontended). Every row ranks
            ALL items of the target domain for ALL 9,398 test users, so every list file is
            ``<row>.test.jsonl.gz`` and is re-scored by the shared scorer. The table's main
            columns are on a fixed sample of ``--subset`` (default 1,000) mixed users
            (``load_fkloo(subset=..., seed=0)``), the set SASRec early-stops on (its valid cases),
            the same for every row, anchors included (their published lists re-scored on it);
            the full-test NDCG@10 is a column too. What makes it a budget: SASRec trains for at
            most ``--sasrec-epochs`` (3) epochs and ``--sasrec-minutes`` (8); the CPRec family
            (``configs/quality-budget.yaml``) uses MiniLM-L6 with an MLM CPT and 100 CPT + 100
            fine-tuning steps. Both are far from converged: use --full (a GPU) for real figures.
            ``--budget`` runs pop, zero-shot MiniLM, SASRec, finetune-only and cprec;
            ``--budget --systems cprec-cosine,cprec-domain-only,cprec-idres`` the ablations
            (rows of both are merged in quality.json). SmolLM2 zero-shot needs ~16 min for the
            item vectors alone: ``--budget --systems zeroshot-smollm2`` (cached afterwards).
  --full    the whole test split for every row; SASRec up to 30 epochs with patience 3 on the
            full valid split (the anchor's recipe; ~25 min on 2 cores); all systems by default.

Outputs: ``bench/results/fk_loo/<row>.test.jsonl.gz`` (``.test.subset.jsonl.gz`` when a row only
covers the sample), ``bench/results/quality.json`` (per mode; rows of earlier runs of the same
mode are kept unless re-run), a rich table, and the section of ``docs/benchmarks.md`` between
its ``quality`` markers (``bench.common.write_section``); then ``bench/plots.py`` redraws the
pictures (``docs/img/``, the ``plots`` section) from those lists and keeps the headline run's
``log.csv`` as ``bench/results/fk_loo/cprec.log.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.common import DOCS, write_section  # noqa: E402
from bench.flat_systems import ROWS as FLAT_SYSTEMS  # noqa: E402
from bench.hier_systems import (  # noqa: E402
    DERIVED,
    HIER_CONFIG,
    HIER_SYSTEMS,
    LABELS,
    NOT_BUILT,
    OTHER_SYSTEMS,
    SCI_SYSTEMS,
)
from training.dataset import Case, Dataset  # noqa: E402
from training.evaluate import (  # noqa: E402
    METRICS,
    compute_metrics,
    read_topk_jsonl,
    write_topk_jsonl,
)
from training.fkloo import fkloo_dir, load_fkloo  # noqa: E402

log = logging.getLogger("bench.quality")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LISTS = RESULTS / "fk_loo"
QUALITY_JSON = RESULTS / "quality.json"
CACHE = REPO / "var" / "cache" / "quality"
STORE = REPO / "var" / "store"  # where the service keeps converted bundled bases

BASELINES = ["pop", "zeroshot-minilm", "zeroshot-smollm2", "sasrec"]
# The flat LLM-Rec dual encoder's rows (row name -> bench.flat_systems.SYSTEMS key): FLAT_SYSTEMS.
PIPELINE_SYSTEMS = list(FLAT_SYSTEMS)
HIER = list(HIER_SYSTEMS)
ALL_SYSTEMS = BASELINES + PIPELINE_SYSTEMS + HIER + OTHER_SYSTEMS
# Rows a system's run produces besides its own (cprec -> cprec-text-only).
ROW_ORDER = [r for s in ALL_SYSTEMS for r in (s, *[d for d, f in DERIVED.items() if f == s])]
DEFAULT_SYSTEMS = {
    "budget": ["flat-finetune-only", "flat", "pop", "zeroshot-minilm", "sasrec"],
    "full": ["pop", "zeroshot-default", "zeroshot-minilm", "sasrec", *HIER, *SCI_SYSTEMS],
}
SKIP_REASON = {
    ("budget", "zeroshot-smollm2"): "not in the budget: SmolLM2-135M embeds 1,062 tokens/s "
    "(39 item titles/s) on these 2 idle cores (a one-off timing of 500 titles through "
    "training.baselines.encode_texts, bf16), so the 36,298 item titles "
    "(~0.8M tokens) take ~13 min and the 9,398 test histories (~1.6M tokens) ~25 min more; run "
    "`--budget --systems zeroshot-smollm2` (~40 min) or `--full` on a GPU",
}
ZEROSHOT = {"zeroshot-minilm": "minilm-l6", "zeroshot-smollm2": "smollm2-135m"}

ROW_LABELS = {
    "pop": "Popularity",
    "zeroshot-minilm": "MiniLM-L6 zero-shot, user = template text of last 10 items",
    "zeroshot-minilm-mean10dom": "MiniLM-L6 zero-shot, mean of last 10 target-domain item vectors",
    "zeroshot-smollm2": "SmolLM2-135M zero-shot, user = template text of last 10 items",
    "zeroshot-smollm2-mean10dom": "SmolLM2-135M zero-shot, mean of last 10 target-domain items",
    "sasrec": "SASRec (mixed sequences)",
    "flat-finetune-only": "flat dual encoder: fine-tune only (no CPT)",
    "flat": "flat dual encoder: CPT (WSA) + fine-tune",
    "flat-cosine": "flat dual encoder with a cosine CPT schedule",
    "flat-domain-only": "flat dual encoder, CPT on domain-specific sequences only",
    "flat-idres": "flat dual encoder plus the item-ID residual (evaluation-only)",
    **LABELS,
}
ANCHORS = {  # file stem in <shared>/benchmarks/fk_loo/anchors -> label
    "pop": "anchor: Popularity",
    "minilm_text10": "anchor: MiniLM text of last 10 titles",
    "minilm_mean10": "anchor: MiniLM mean of last 10 item vectors",
    "minilm_mean10samedom": "anchor: MiniLM mean of last 10 target-domain vectors",
    "sasrec_mixed": "anchor: SASRec mixed",
    "sasrec_perdomain": "anchor: SASRec per domain",
}


# -- helpers -----------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
    try:
        from bench.common import device_info as common_info

        return common_info()
    except Exception:  # bench.common belongs to the perf benchmarks; keep going without it
        import platform

        import torch

        return {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        }


def micro(m: dict[str, Any]) -> dict[str, float]:
    return m["metrics"]["overall_micro"]


def slim(m: dict[str, Any]) -> dict[str, Any]:
    """The ``metrics`` part of a compute_metrics result, rounded for the JSON."""
    return {
        g: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        for g, row in m["metrics"].items()
    }


def align(ranked_by_user: dict[str, list[int]], cases: Sequence[Case]) -> list[list[int]] | None:
    if not all(c.user_id in ranked_by_user for c in cases):
        return None
    return [ranked_by_user[c.user_id] for c in cases]


def rescore(path: Path, ours: dict[str, Any]) -> dict[str, Any]:
    """Run the shared scorer on a full-test list file; it must agree with compute_metrics."""
    scorer = fkloo_dir().parent / "evaluate_topk.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        proc = subprocess.run(
            [
                sys.executable,
                str(scorer),
                "--split",
                str(fkloo_dir() / "test.tsv.gz"),
                "--pred",
                str(path),
                "--out-json",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            return {"ok": False, "error": proc.stderr.strip()[-2000:]}
        theirs = json.loads(out.read_text())["metrics"]
    diff = max(
        abs(float(theirs[g][k]) - float(ours["metrics"][g][k]))
        for g in theirs
        for k in ("n", *METRICS)
    )
    return {"ok": diff <= 1e-9, "max_abs_diff": diff, "scorer": str(scorer)}


class Ctx:
    """What every system runner needs: the data, the comparison cases, the mode and options."""

    def __init__(self, data: Dataset, sample: Dataset | None, mode: str, args: argparse.Namespace):
        self.data = data  # full split
        self.sample = sample  # budget: the fixed user sample (valid/test); None in full mode
        self.mode = mode
        self.args = args

    @property
    def cmp_test(self) -> list[Case]:
        return self.sample.test if self.sample is not None else self.data.test

    @property
    def cmp_valid(self) -> list[Case]:
        return self.sample.valid if self.sample is not None else self.data.valid

    @property
    def cold_test(self) -> list[int]:
        """Test cases whose target never occurs in training (an ID model cannot rank them)."""
        seen = {i for s in self.data.train for i in s.item_ids}
        return [k for k, c in enumerate(self.data.test) if c.target not in seen]


def make_row(
    ctx: Ctx, name: str, cases: Sequence[Case], ranked: list[list[int]], wall_s: float, **extra: Any
) -> dict[str, Any]:
    """Metrics on the comparison set (and on the full test when the lists cover it), list file
    written, shared-scorer check for full-test files."""
    full = len(cases) == len(ctx.data.test)
    LISTS.mkdir(parents=True, exist_ok=True)
    path = LISTS / (f"{name}.test.jsonl.gz" if full else f"{name}.test.subset.jsonl.gz")
    write_topk_jsonl(path, cases, ranked)
    by_user = {c.user_id: r for c, r in zip(cases, ranked, strict=True)}
    cmp_ranked = align(by_user, ctx.cmp_test)
    if cmp_ranked is None:
        raise RuntimeError(f"{name}: lists do not cover the comparison cases")
    m_cmp = compute_metrics(cmp_ranked, ctx.cmp_test, ctx.data.items, name=name, split="test")
    row: dict[str, Any] = {
        "system": name,
        "label": ROW_LABELS.get(name, name),
        "status": "ok",
        "mode": ctx.mode,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cmp_cases": len(ctx.cmp_test),
        "list_cases": len(cases),
        "list_file": str(path.relative_to(REPO)),
        "wall_s": round(wall_s, 1),
        "test_cmp": slim(m_cmp),
    }
    if full:
        m_full = compute_metrics(ranked, cases, ctx.data.items, name=name, split="test")
        row["test_full"] = slim(m_full)
        cold = ctx.cold_test
        if cold:
            m_cold = compute_metrics(
                [ranked[i] for i in cold], [cases[i] for i in cold], ctx.data.items
            )
            row["test_cold"] = slim(m_cold)
        if not ctx.args.no_rescore:
            row["scorer_check"] = rescore(path, m_full)
            if not row["scorer_check"]["ok"]:
                log.error("%s: shared scorer disagrees: %s", name, row["scorer_check"])
    row.update(extra)
    return row


def unavailable(name: str, mode: str, status: str, reason: str) -> dict[str, Any]:
    return {
        "system": name,
        "label": ROW_LABELS.get(name, name),
        "status": status,
        "reason": reason,
        "mode": mode,
    }


# -- systems -----------------------------------------------------------------------------------


def run_pop(ctx: Ctx) -> list[dict[str, Any]]:
    from training.baselines import rank_popularity

    t0 = time.perf_counter()
    ranked = rank_popularity(ctx.data, ctx.data.test)
    return [make_row(ctx, "pop", ctx.data.test, ranked, time.perf_counter() - t0)]


def run_zeroshot(ctx: Ctx, system: str) -> list[dict[str, Any]]:
    from training.baselines import run_zeroshot as zs

    t0 = time.perf_counter()
    text_cases = ctx.data.test  # every test user: the list file must pass the shared scorer
    run = zs(
        ZEROSHOT[system],
        ctx.data.items,
        ctx.data.test,
        text_cases=text_cases,
        cache_dir=CACHE,
        store_dir=STORE,
        n_last=10,
        device=ctx.args.device,
    )
    wall = time.perf_counter() - t0
    extra = {"stages": run.stages, "dtype": run.dtype, "items_from_cache": run.items_from_cache}
    return [
        make_row(ctx, system, text_cases, run.ranked["text"], wall, **extra),
        make_row(ctx, f"{system}-mean10dom", ctx.data.test, run.ranked["mean10dom"], wall, **extra),
    ]


def run_sasrec(ctx: Ctx) -> list[dict[str, Any]]:
    from training.sasrec import SASRecConfig, fit, rank_sasrec, valid_ndcg_fn

    epochs = ctx.args.sasrec_epochs or (3 if ctx.mode == "budget" else 30)
    minutes = ctx.args.sasrec_minutes
    if minutes is None and ctx.mode == "budget":
        minutes = 8.0
    cfg = SASRecConfig(
        max_epochs=epochs,
        patience=3,
        seed=ctx.args.seed,
        max_train_s=minutes * 60 if minutes else None,
    )
    t0 = time.perf_counter()
    res = fit(
        [s.item_ids for s in ctx.data.train],
        len(ctx.data.items),
        cfg,
        eval_fn=valid_ndcg_fn(ctx.cmp_valid, ctx.data.items),
    )
    t1 = time.perf_counter()
    ranked = rank_sasrec(res.model, ctx.data.test, ctx.data.items)
    infer_s = time.perf_counter() - t1
    stages = [
        {
            "stage": "train (incl. per-epoch valid)",
            "epochs": len(res.history),
            "best_epoch": res.best_epoch,
            "pairs": res.pairs,
            "pairs_seen": res.pairs_seen,
            "wall_s": round(res.train_s, 1),
            "pairs_per_s": round(res.pairs_seen / max(res.train_only_s, 1e-9), 1),
        },
        {
            "stage": "test inference + ranking",
            "cases": len(ctx.data.test),
            "wall_s": round(infer_s, 1),
        },
    ]
    return [
        make_row(
            ctx,
            "sasrec",
            ctx.data.test,
            ranked,
            time.perf_counter() - t0,
            stages=stages,
            history=res.history,
            best_valid_ndcg10=res.best_valid,
            valid_cases=len(ctx.cmp_valid),
            config=res.config,
        )
    ]


def fill_missing(rows: dict[str, Any], mode: str, args: argparse.Namespace) -> list[str]:
    """Rows not run say so (never a number); returns the table order."""
    for s in ALL_SYSTEMS:
        if s in rows or (mode == "budget" and s in HIER + OTHER_SYSTEMS):
            continue
        why = pipeline_missing(s, mode, args) if s in PIPELINE_SYSTEMS else NOT_BUILT.get(s)
        rows[s] = (
            unavailable(s, mode, "not available", why)
            if why
            else unavailable(s, mode, "not run", SKIP_REASON.get((mode, s), f"add --systems {s}"))
        )
    return [k for s in ROW_ORDER for k in (s, f"{s}-mean10dom") if k in rows]


def train_config_path(mode: str, args: argparse.Namespace) -> Path:
    """--train-config, else configs/quality-<mode>.yaml, else (full mode) configs/gpu-full.yaml."""
    if args.train_config:
        return Path(args.train_config)
    own = REPO / "configs" / f"quality-{mode}.yaml"
    if mode == "full" and not own.exists():
        return REPO / "configs" / "gpu-full.yaml"
    return own


def pipeline_missing(system: str, mode: str, args: argparse.Namespace) -> str | None:
    """Why a CPRec-family row cannot run (None when it can)."""
    try:
        import training.pipeline  # noqa: F401
    except Exception as e:  # say why instead of failing the other rows
        return f"training.pipeline not importable: {type(e).__name__}: {e}"
    path = train_config_path(mode, args)
    if not path.exists():
        rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        return f"no training config {rel} (pass --train-config)"
    try:
        import torch

        from training.config import load_config

        cfg = load_config(path)
    except Exception as e:
        return f"{path.name}: invalid training config: {type(e).__name__}: {e}"
    if str(cfg.model.device).startswith("cuda") and not torch.cuda.is_available():
        return f"{path.name} needs CUDA (model.device={cfg.model.device}) and none is present"
    return None


def run_pipeline_system(ctx: Ctx, system: str) -> list[dict[str, Any]]:
    """A CPRec-family row from the training helper's pipeline (imported lazily)."""
    why = pipeline_missing(system, ctx.mode, ctx.args)
    if why:
        return [unavailable(system, ctx.mode, "not available", why)]
    from bench.flat_systems import run_system as run_flat
    from training.config import load_config
    from training.data import load_data

    cfg_path = train_config_path(ctx.mode, ctx.args)
    cfg = load_config(cfg_path)
    if (
        getattr(cfg.data, "restrict_items", False)
        or getattr(cfg.data, "source", "fkloo") != "fkloo"
    ):
        return [
            unavailable(
                system,
                ctx.mode,
                "not available",
                f"{cfg_path}: not the FK-LOO protocol (needs data.source=fkloo and "
                "restrict_items=false)",
            )
        ]
    t0 = time.perf_counter()
    data = load_data(cfg.data)
    cases = list(ctx.data.test)  # every test user (scorer-valid file); the sample is a subset
    res = run_flat(FLAT_SYSTEMS[system], cfg, data, cases={"test": cases})
    ext = [[int(data.external_ids[i]) for i in lst] for lst in res.ranked["test"]]
    stages = []
    for st in ("cpt", "finetune"):
        sm = res.stages.get(st) or {}
        if sm:
            stages.append(
                {
                    "stage": f"{st} ({sm.get('objective', 'contrastive')})"
                    if st == "cpt"
                    else "finetune (InfoNCE)",
                    "steps": sm.get("steps_run", sm.get("steps")),
                    "tokens": sm.get("tokens"),
                    "wall_s": sm.get("seconds"),
                    "tokens_per_s": sm.get("tokens_per_s"),
                    "first_loss": sm.get("first_loss"),
                    "final_loss": sm.get("final_loss"),
                    "from_cache": bool(sm.get("reused")),  # e.g. cprec-idres reuses cprec's CPT
                }
            )
    stages.append(
        {"stage": "evaluate (embed items + rank)", "wall_s": res.stages["evaluate"]["seconds"]}
    )
    return [
        make_row(
            ctx,
            system,
            cases,
            ext,
            time.perf_counter() - t0,
            stages=stages,
            pipeline_stages=res.stages,
            train_config=str(
                cfg_path.relative_to(REPO) if cfg_path.is_relative_to(REPO) else cfg_path
            ),
            artifact_version=res.artifact_version,
        )
    ]


def run_hier_system(ctx: Ctx, system: str) -> list[dict[str, Any]]:
    from bench import hier_systems as hs

    def row(name: str, ranked: list[list[int]], wall: float, **extra: Any) -> dict[str, Any]:
        return make_row(ctx, name, ctx.data.test, ranked, wall, kind="hier", **extra)

    cfg = Path(ctx.args.hier_config)
    if system in hs.NOT_BUILT:
        return [unavailable(system, ctx.mode, "not available", hs.NOT_BUILT[system])]
    if system in HIER_SYSTEMS:
        return hs.run_hier_rows(system, cfg, list(ctx.data.test), row)
    if system == "zeroshot-default":
        return hs.run_zeroshot_default(ctx.data, list(ctx.data.test), row)
    return hs.run_sci(system, cfg, ctx.args.seed)


def run_system(ctx: Ctx, system: str) -> list[dict[str, Any]]:
    if system in HIER_SYSTEMS or system in OTHER_SYSTEMS:
        return run_hier_system(ctx, system)
    if system == "pop":
        return run_pop(ctx)
    if system in ZEROSHOT:
        return run_zeroshot(ctx, system)
    if system == "sasrec":
        return run_sasrec(ctx)
    return run_pipeline_system(ctx, system)


# -- anchors -----------------------------------------------------------------------------------


def anchor_rows(ctx: Ctx) -> dict[str, Any]:
    """Published anchor numbers (full test) and, in budget mode, their lists on the sample."""
    out: dict[str, Any] = {}
    adir = fkloo_dir() / "anchors"
    for stem, label in ANCHORS.items():
        mpath, lpath = adir / f"{stem}_test.metrics.json", adir / f"{stem}_test.jsonl.gz"
        if not mpath.exists():
            continue
        row: dict[str, Any] = {
            "label": label,
            "source": str(mpath),
            "test_full": json.loads(mpath.read_text())["metrics"],
        }
        if ctx.sample is not None and lpath.exists():
            ranked = align(read_topk_jsonl(lpath), ctx.cmp_test)
            if ranked is not None:
                row["test_cmp"] = slim(compute_metrics(ranked, ctx.cmp_test, ctx.data.items))
        else:
            row["test_cmp"] = row["test_full"]
        out[stem] = row
    return out


# -- reporting ---------------------------------------------------------------------------------

COLS = [
    ("Recall@10", "overall_micro"),
    ("NDCG@10", "overall_micro"),
    ("Recall@50", "overall_micro"),
    ("NDCG@50", "overall_micro"),
    ("MRR", "overall_micro"),
    ("NDCG@10", "Food"),
    ("NDCG@10", "Kitchen"),
    ("NDCG@10", "overall_macro"),
]
HEAD = ["R@10", "N@10", "R@50", "N@50", "MRR", "N@10 Food", "N@10 Kitchen", "N@10 macro"]


def table_rows(run: dict[str, Any], anchors: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in run["order"]:
        r = run["rows"][name]
        if name.startswith("sci-"):
            continue  # another dataset: its own table
        if r.get("status") != "ok":
            rows.append([name, r.get("status", "?"), *["-"] * 10])
            continue
        m = r["test_cmp"]
        full = r.get("test_full", {}).get("overall_micro", {}).get("NDCG@10")
        rows.append(
            [
                name,
                str(r["cmp_cases"]),
                *[f"{m[g][k]:.4f}" for k, g in COLS],
                f"{full:.4f}" if full is not None else "-",
                f"{r.get('wall_s', 0):.0f}",
            ]
        )
    for stem, a in anchors.items():
        m = a.get("test_cmp")
        if m is None:
            continue
        rows.append(
            [
                f"anchor:{stem}",
                str(m["overall_micro"]["n"]),
                *[f"{m[g][k]:.4f}" for k, g in COLS],
                f"{a['test_full']['overall_micro']['NDCG@10']:.4f}",
                "-",
            ]
        )
    return rows


HEADERS = ["system", "cases", *HEAD, "N@10 full test", "wall s"]


def print_table(mode: str, run: dict[str, Any], anchors: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in [HEADERS, *table_rows(run, anchors)]:
            print(" | ".join(r))
        return
    t = Table(title=f"FK-LOO test, {mode} mode ({run['cmp_desc']})")
    for h in HEADERS:
        t.add_column(h, justify="left" if h == "system" else "right", overflow="fold")
    for r in table_rows(run, anchors):
        t.add_row(*r)
    con = Console(width=200)
    con.print(t)
    for name in run["order"]:
        r = run["rows"][name]
        if r.get("status") != "ok":
            con.print(f"  {name}: {r.get('status')}: {r.get('reason', '')}", highlight=False)


GOAL_BASELINES = [
    "pop",
    "zeroshot-minilm",
    "zeroshot-minilm-mean10dom",
    "zeroshot-smollm2",
    "sasrec",
]


def goal_checks(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, computed from the rows: ``cprec`` ahead of every baseline on Food,
    Kitchen and overall micro NDCG@10, and ahead of ``finetune-only`` (CPT + WSA helps). On the
    full test split when both rows cover it, else on the comparison set."""
    rows = run["rows"]
    me = rows.get("cprec", {})
    out = []
    if me.get("status") != "ok":
        return out
    for other in [*GOAL_BASELINES, "finetune-only"]:
        r = rows.get(other, {})
        if r.get("status") != "ok":
            continue
        key = "test_full" if "test_full" in me and "test_full" in r else "test_cmp"
        cells = {
            g: (me[key][g]["NDCG@10"], r[key][g]["NDCG@10"])
            for g in ("Food", "Kitchen", "overall_micro")
        }
        out.append(
            {
                "vs": other,
                "on": "full test" if key == "test_full" else "comparison set",
                "cells": cells,
                "ahead": all(a > b for a, b in cells.values()),
            }
        )
    return out


def goal_lines(run: dict[str, Any]) -> list[str]:
    checks = goal_checks(run)
    if not checks:
        return []
    lines = ["", "Goal checks (`cprec` NDCG@10 vs each row; Food / Kitchen / overall micro):"]
    for c in checks:
        cells = "; ".join(f"{g} {a:.4f} vs {b:.4f}" for g, (a, b) in c["cells"].items())
        verdict = "ahead on all three" if c["ahead"] else "NOT ahead on all three"
        lines.append(f"- vs `{c['vs']}` ({c['on']}): {verdict} ({cells})")
    return lines


SASREC_REF = 0.0581  # the FK-LOO anchor's SASRec (mixed) test micro NDCG@10
HEADLINE_RATIO = 1.15


def _ndcg(r: dict[str, Any] | None, group: str = "overall_micro", key: str = "test_full") -> float:
    if not r or r.get("status") != "ok" or key not in r or group not in r[key]:
        return float("nan")
    return float(r[key][group]["NDCG@10"])


def hier_goals(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The hierarchical model's targets, each met or not with its measured figures."""
    rows = run["rows"]
    get = rows.get
    me, sas = get("cprec"), get("sasrec")
    out: list[dict[str, Any]] = []

    def goal(name: str, ok: bool, detail: str) -> None:
        out.append({"goal": name, "met": bool(ok), "detail": detail})

    if me and me.get("status") == "ok":
        c = _ndcg(me)
        goal(
            f"cprec micro NDCG@10 >= {HEADLINE_RATIO} x SASRec's {SASREC_REF}",
            c >= HEADLINE_RATIO * SASREC_REF,
            f"{c:.4f} = {c / SASREC_REF:.3f}x the anchor"
            + (
                f"; {c / _ndcg(sas):.3f}x this run's sasrec row ({_ndcg(sas):.4f})"
                if sas and sas.get("status") == "ok"
                else ""
            ),
        )
        for g in ("Food", "Kitchen"):
            if sas and sas.get("status") == "ok":
                a, b = _ndcg(me, g), _ndcg(sas, g)
                goal(f"cprec ahead of sasrec on {g}", a > b, f"{a:.4f} vs {b:.4f}")
        s2 = get("cprec-seed2")
        if s2 and s2.get("status") == "ok" and sas and sas.get("status") == "ok":
            lo = min(c, _ndcg(s2))
            spread = abs(c - _ndcg(s2))
            goal(
                "cprec ahead of sasrec beyond the seed spread (both seeds)",
                lo - _ndcg(sas) > spread,
                f"seeds {c:.4f} / {_ndcg(s2):.4f} (spread {spread:.4f}); sasrec {_ndcg(sas):.4f}",
            )
    zs, pop = get("zeroshot-default"), get("pop")
    if zs and pop and zs.get("status") == "ok" and pop.get("status") == "ok":
        a, b = _ndcg(zs), _ndcg(pop)
        goal("zero-shot default ahead of popularity", a > b, f"{a:.4f} vs {b:.4f}")
    sc, ss, sp, su = get("sci-cprec"), get("sci-sasrec"), get("sci-pop"), get("sci-unseen-cprec")
    if sc and ss and sc.get("status") == "ok" and ss.get("status") == "ok":
        a, b = _ndcg(sc), _ndcg(ss)
        goal("Scientific: cprec ahead of SASRec", a > b, f"{a:.4f} vs {b:.4f}")
    if su and sp and su.get("status") == "ok" and sp.get("status") == "ok":
        a, b = _ndcg(su), _ndcg(sp)
        goal("Scientific never trained on: ahead of its popularity", a > b, f"{a:.4f} vs {b:.4f}")
    return out


def hier_lines(run: dict[str, Any], other: dict[str, Any] | None = None) -> list[str]:
    """Cold-target table, Scientific table, the flat rows of ``other`` (the budget run: their
    lists cover the whole test split) and the targets."""
    rows = run["rows"]
    lines: list[str] = []
    flat = [
        (n, r)
        for n, r in (other or {}).items()
        if n in FLAT_SYSTEMS and r.get("status") == "ok" and "test_full" in r
    ]
    if flat and any(n in rows for n in HIER):
        lines += [
            "",
            "The flat dual encoder's rows (from the budget-mode run below; their lists cover the "
            "whole test split, so these are full-test figures):",
            "",
            "| system | N@10 micro | N@10 Food | N@10 Kitchen | wall s |",
            "|---|---:|---:|---:|---:|",
        ]
        for n, r in flat:
            t = r["test_full"]
            lines.append(
                f"| {n} | {t['overall_micro']['NDCG@10']:.4f} | {t['Food']['NDCG@10']:.4f} | "
                f"{t['Kitchen']['NDCG@10']:.4f} | {r.get('wall_s', 0):.0f} |"
            )
    cold = [(n, r) for n in run["order"] if "test_cold" in (r := rows[n])]
    if cold:
        n_cold = cold[0][1]["test_cold"]["overall_micro"]["n"]
        lines += [
            "",
            f"Cold targets: the {n_cold} test cases whose target never occurs in training "
            "(micro over those cases):",
            "",
            "| system | R@10 | N@10 | R@50 | MRR |",
            "|---|---:|---:|---:|---:|",
        ]
        for n, r in cold:
            m = r["test_cold"]["overall_micro"]
            lines.append(
                f"| {n} | {m['Recall@10']:.4f} | {m['NDCG@10']:.4f} | {m['Recall@50']:.4f} "
                f"| {m['MRR']:.4f} |"
            )
    sci = [(n, rows[n]) for n in run["order"] if n.startswith("sci-")]
    if any(r.get("status") == "ok" for _, r in sci):
        lines += [
            "",
            "Amazon Scientific (`amazon18_scientific_unisrec`, leave-one-out: last item test, "
            "second-to-last valid, full ranking over the 4,385 items, history masked):",
            "",
            "| system | cases | R@10 | N@10 | R@50 | N@50 | MRR | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in sci:
            if r.get("status") != "ok":
                lines.append(f"| {n} | {r.get('status')} | - | - | - | - | - | - |")
                continue
            m = r["test_full"]["overall_micro"]
            lines.append(
                f"| {n} | {m['n']} | {m['Recall@10']:.4f} | {m['NDCG@10']:.4f} | "
                f"{m['Recall@50']:.4f} | {m['NDCG@50']:.4f} | {m['MRR']:.4f} | "
                f"{r.get('wall_s', 0):.0f} |"
            )
    goals = hier_goals(run)
    if goals:
        lines += ["", "Targets of the hierarchical model (full test split):"]
        lines += [
            f"- {'met' if g['met'] else 'NOT met'}: {g['goal']} ({g['detail']})" for g in goals
        ]
    return lines


def markdown(q: dict[str, Any]) -> str:
    lines = [
        "## Quality (FK-LOO)",
        "",
        "From `bench/results/quality.json`.",
        "Protocol: `<shared>/benchmarks/fk_loo/README.md` (full ranking over the target domain, "
        "history masked, 50 ids per case). Metrics are micro over the cases unless named; "
        "`N@10 full test` is the whole 9,398-case test split when the row's lists cover it "
        "(those list files are re-scored by the shared `evaluate_topk.py`, agreement "
        "required to 1e-9). Anchor rows are the published reference runs "
        "(`fk_loo/anchors/`), re-scored on the same cases as the other rows.",
        "",
    ]
    for mode in ("budget", "full"):
        run = q.get("runs", {}).get(mode)
        if not run:
            continue
        dev = run.get("device", {})
        sources = {r.get("command") for r in run["rows"].values() if r.get("status") == "ok"}
        invs = [i for i in run.get("invocations") or [run] if i["command"] in sources] or [run]
        lines += [
            f"### {mode} mode",
            "",
            f"{dev.get('cpu', '?')} ({dev.get('cpu_count', '?')} cores, "
            f"GPU: {dev.get('cuda') or 'none'}, load average at the last start "
            f"{round(dev.get('loadavg_at_start') or 0, 1)}). Comparison set: {run['cmp_desc']}. "
            "Rows come from these invocations: "
            + "; ".join(f"`{i['command']}` ({i['created_at']}, {i['wall_s']:.0f} s)" for i in invs)
            + ".",
            "",
        ]
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|")
        for r in table_rows(run, q.get("anchors", {}).get(mode, {})):
            lines.append("| " + " | ".join(r) + " |")
        notes = [
            f"- `{name}`: {run['rows'][name]['status']}: {run['rows'][name].get('reason', '')}"
            for name in run["order"]
            if run["rows"][name].get("status") != "ok"
        ]
        for name in run["order"]:
            r = run["rows"][name]
            if r.get("status") == "ok" and r.get("kind") == "hier":
                ov = r.get("overrides")
                budget = (
                    f"; `{r['hier_config']}` with {', '.join(f'`{o}`' for o in ov) or 'no change'}"
                    if r.get("hier_config")
                    else ""
                )
                train = f", {r['train_s']:.0f} s of training" if r.get("train_s") else ""
                notes.append(f"- `{name}`: {r.get('label', name)}{budget}{train}")
            if r.get("status") == "ok" and r.get("stages"):
                st = "; ".join(
                    f"{s['stage']}: {s.get('wall_s', '-')} s"
                    + (f", {s['tokens_per_s']} tok/s" if "tokens_per_s" in s else "")
                    + (f", {s['pairs_per_s']} pairs/s" if "pairs_per_s" in s else "")
                    + (f", {s['targets_per_s']} targets/s" if "targets_per_s" in s else "")
                    + (", from cache" if s.get("from_cache") else "")
                    + (
                        " (encoded {created_at}: {wall_s} s, {tokens_per_s} tok/s)".format(
                            **s["cached_run"]
                        )
                        if s.get("cached_run")
                        else ""
                    )
                    for s in r["stages"]
                    if isinstance(s, dict) and "stage" in s
                )
                notes.append(f"- `{name}` ({r.get('created_at', '')}): {st}")
            if r.get("scorer_check"):
                sc = r["scorer_check"]
                notes.append(
                    f"- `{r['list_file']}` re-scored by the shared scorer: "
                    f"{'agrees' if sc['ok'] else 'DISAGREES'} "
                    f"(max |diff| {sc.get('max_abs_diff', 'n/a')})"
                )
        if notes:
            lines += ["", "Per row (status, stages, scorer checks):", *notes]
        lines += goal_lines(run)
        other = q.get("runs", {}).get("budget", {}).get("rows") if mode == "full" else None
        lines += hier_lines(run, other)
        anchors = q.get("anchors", {}).get(mode, {})
        if anchors:
            lines += [
                "",
                "Anchors: "
                + "; ".join(
                    f"`anchor:{k}` = {a['label'].removeprefix('anchor: ')}"
                    for k, a in anchors.items()
                )
                + ".",
            ]
        if run.get("notes"):
            lines += ["", *[f"- {n}" for n in run["notes"]]]
        lines.append("")
    return "\n".join(lines)


def write_docs(section: str) -> None:
    """Replace only our marked section; the rest of the file belongs to other benchmarks."""
    write_section("quality", section, "python -m bench.quality", DOCS)


def write_plots() -> None:
    """The pictures of the results (``bench/plots.py``) from the lists just stored; a failure
    there is logged and loses no result."""
    from bench import plots

    try:
        for path in plots.write_all():
            log.info("wrote %s", path.relative_to(REPO))
    except Exception:
        log.exception("plots not redrawn; run `python -m bench.plots` to see why")


# -- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", action="store_true", help="2-core CPU run on a user sample")
    g.add_argument("--full", action="store_true", help="the whole test split")
    ap.add_argument("--systems", default=None, help=f"comma list from {ALL_SYSTEMS}")
    ap.add_argument("--subset", type=int, default=1000, help="budget: users in the sample")
    ap.add_argument("--seed", type=int, default=2024, help="SASRec seed (the anchor's)")
    ap.add_argument(
        "--sasrec-epochs", type=int, default=None, help="max SASRec epochs (budget 3, full 30)"
    )
    ap.add_argument(
        "--train-config",
        default=None,
        help="TrainConfig YAML for the CPRec systems (default configs/quality-<mode>.yaml)",
    )
    ap.add_argument(
        "--hier-config",
        default=str(HIER_CONFIG),
        help="HierTrainConfig YAML of the hier rows (default configs/hier-cpu.yaml)",
    )
    ap.add_argument(
        "--sasrec-minutes",
        type=float,
        default=None,
        help="cap on SASRec training wall time (budget default 8, full: none)",
    )
    ap.add_argument("--device", default="cpu", help="zero-shot encoder device (cpu|cuda|auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-rescore", action="store_true", help="skip the shared-scorer re-check")
    ap.add_argument("--docs-only", action="store_true", help="regenerate the docs from the JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    mode = "budget" if args.budget else "full"

    if args.docs_only:
        q = json.loads(QUALITY_JSON.read_text()) if QUALITY_JSON.exists() else {}
        for m, run in q.get("runs", {}).items():  # rows not run get today's reason
            run["rows"] = {
                k: r
                for k, r in run["rows"].items()
                if r.get("status") not in ("not run", "not available")
            }
            run["order"] = fill_missing(run["rows"], m, args)
        write_docs(markdown(q))
        write_plots()
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    systems = args.systems.split(",") if args.systems else DEFAULT_SYSTEMS[mode]
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {ALL_SYSTEMS}")

    t_all = time.perf_counter()
    data = load_fkloo()
    sample = load_fkloo(subset=args.subset, seed=0) if mode == "budget" else None
    ctx = Ctx(data, sample, mode, args)
    cmp_desc = (
        f"{len(sample.test)} sampled test users (load_fkloo(subset={args.subset}, seed=0))"
        if sample
        else f"all {len(data.test)} test users"
    )

    new_rows: dict[str, Any] = {}
    for s in systems:
        log.info("=== %s (%s mode)", s, mode)
        try:
            for r in run_system(ctx, s):
                new_rows[r["system"]] = r
                if r.get("status") == "ok":
                    om = (r.get("test_cmp") or r["test_full"])["overall_micro"]
                    log.info(
                        "%s: NDCG@10 %.4f Recall@10 %.4f on %d cases (%.0f s)",
                        r["system"],
                        om["NDCG@10"],
                        om["Recall@10"],
                        om["n"],
                        r["wall_s"],
                    )
        except Exception as e:  # one broken system must not lose the others' results
            log.exception("%s failed", s)
            if new_rows.get(s, {}).get("status") == "ok":  # keep the row; a later step failed
                new_rows[s]["error_after_row"] = f"{type(e).__name__}: {e}"
            else:
                new_rows[s] = unavailable(s, mode, "failed", f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - t_all
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in new_rows.values():
        r["command"] = command

    # Re-read just before writing: another invocation (e.g. --systems sasrec) may have finished
    # meanwhile; rows of the same mode and comparison set are merged, this run's rows win.
    q = json.loads(QUALITY_JSON.read_text()) if QUALITY_JSON.exists() else {}
    q.setdefault("benchmark", "quality")
    q.setdefault("runs", {})
    prev = q["runs"].get(mode, {})
    same = prev.get("cmp_desc") == cmp_desc
    rows: dict[str, Any] = {
        k: v for k, v in prev.get("rows", {}).items() if same and v.get("status") == "ok"
    }
    rows.update(new_rows)
    order = fill_missing(rows, mode, args)
    invocations = (prev.get("invocations", []) if same else [])[-9:] + [
        {"command": command, "created_at": created, "wall_s": round(wall, 1), "systems": systems}
    ]
    run = {
        "command": command,
        "created_at": created,
        "wall_s": round(wall, 1),
        "device": device_info(),
        "cmp_desc": cmp_desc,
        "order": order,
        "rows": rows,
        "invocations": invocations,
        "notes": [
            "budget: zero-shot `text` rows cover the sample only (list file "
            "`*.test.subset.jsonl.gz`); SASRec early-stops on the sample's valid cases with a "
            "capped number of epochs (see its row in quality.json)"
            if mode == "budget"
            else "full: every row covers all test users",
            "wall times are on a machine shared with other jobs (see load average); compare "
            "them only within one run",
        ],
    }
    q["runs"][mode] = run
    q.setdefault("anchors", {})[mode] = anchor_rows(ctx)
    q["updated_at"] = created
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = QUALITY_JSON.with_name(f"{QUALITY_JSON.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(q, indent=2) + "\n", encoding="utf-8")
    tmp.replace(QUALITY_JSON)
    print_table(mode, run, q["anchors"][mode])
    write_docs(markdown(q))
    write_plots()
    print(
        f"wrote {QUALITY_JSON.relative_to(REPO)}, {DOCS.relative_to(REPO)} and lists in "
        f"{LISTS.relative_to(REPO)}/ ({run['wall_s']:.0f} s)"
    )
    bad = [r for r in new_rows.values() if r.get("scorer_check") and not r["scorer_check"]["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
