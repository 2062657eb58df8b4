"""The ``hier`` recipe end to end: corpus -> LM item vectors -> stage 1 (CPT, WSA) -> stage 2
(fine-tune, early stopping) -> evaluation -> publish. ``make train`` runs it on FK-LOO.

``python -m training hier --config configs/hier-cpu.yaml [--set key=value] [--no-publish]``
writes under ``output_dir``: ``model/`` (a recommender folder, ``cprec.recommender``: the LM's files
at its root, the ``HierRec`` under ``hier/``, ``recommender.json``; loadable with
``Recommender.from_pretrained``), ``curves.png`` (loss, LR, valid NDCG@10), ``log.csv``,
``metrics.json``, ``stages.json`` and ``catalog.jsonl`` (the target catalogue as the service reads
it), then publishes ``model/`` as ``latest`` and ``production`` and prints the command that
serves it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cprec.hier import HierRec
from cprec.recommender import RecommenderConfig, save_pretrained
from cprec.text import DEFAULT_TEMPLATE
from model_store import Artifact
from training.config import store_dir as default_store
from training.dataset import Case
from training.evaluate import compute_metrics
from training.hier import (
    Corpus,
    HierResult,
    HierTrainConfig,
    build_corpus,
    lm_source,
    load_hier_config,
    text_vectors,
    train_hier,
)
from training.loop import plot_curves, write_log
from training.publish import metrics_table, publish

log = logging.getLogger(__name__)


@dataclass
class HierRun:
    cfg: HierTrainConfig
    corpus: Corpus
    text: np.ndarray
    result: HierResult
    stages: list[dict[str, Any]]
    wall_s: float

    @property
    def model(self) -> HierRec:
        return self.result.model

    def rank(self, cases: Sequence[Case], use_residual: bool = True) -> list[list[int]]:
        return self.result.trainer.rank(cases, use_residual=use_residual)


def run_hier(cfg: HierTrainConfig) -> HierRun:
    """Train one ``hier`` model; the LM item vectors are cached per catalogue."""
    t0 = time.perf_counter()
    corpus = build_corpus(cfg)
    text, enc_stage = text_vectors(cfg, corpus.items, cfg.cache_dir)
    res = train_hier(cfg, corpus, text, corpus.target.valid[: cfg.valid_cases])
    stages = [enc_stage]
    for key in ("pretrain", "finetune"):
        if key in res.stages:
            stages.append(res.stages[key])
    return HierRun(cfg, corpus, text, res, stages, time.perf_counter() - t0)


def recommender_config(run: HierRun) -> RecommenderConfig:
    """What serving needs to load the run's model (``recommender.json``, the manifest's fields)."""
    src = lm_source(run.cfg)
    return RecommenderConfig(
        kind="hier",
        base_model=run.cfg.lm,
        pooling=src.pooling,
        is_decoder=src.is_decoder,
        dim=run.model.cfg.dim,
        max_length=run.cfg.lm_max_length,
        template=DEFAULT_TEMPLATE.model_dump(),
    )


def write_outputs(run: HierRun, out_dir: Path) -> dict[str, Any]:
    """The recommender folder ``model/``, curves, log and the metrics of valid and test."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = out_dir / "model"
    if folder.exists():  # a previous run's files must not ride along into a publish
        shutil.rmtree(folder)
    save_pretrained(folder, lm_source(run.cfg).path, recommender_config(run), hier=run.model)
    plot_curves(run.result.curves, out_dir / "curves.png")
    write_log(
        [{"stage": k, **r} for k, rs in run.result.curves.items() for r in rs],
        out_dir / "log.csv",
    )
    tgt = run.corpus.target
    metrics = {
        split: compute_metrics(run.rank(cases), cases, tgt.items, name=run.cfg.name, split=split)
        for split, cases in (("valid", tgt.valid), ("test", tgt.test))
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out_dir / "stages.json").write_text(
        json.dumps({"stages": run.stages, "history": run.result.history}, indent=2),
        encoding="utf-8",
    )
    return metrics


def write_catalog(run: HierRun, path: Path) -> Path:
    """The target catalogue as the service's JSONL (popularity = training interactions)."""
    tgt = run.corpus.target
    pop = Counter(i for s in tgt.train for i in s.item_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for it in tgt.items:
            row = {
                "item_id": run.corpus.keys[it.item_id],
                "domain": it.domain,
                "title": it.title,
                "popularity": pop.get(it.item_id, 0),
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def stage_publish(
    run: HierRun,
    out_dir: Path,
    metrics: dict[str, Any],
    store: Path,
    production: bool = True,
    version: str | None = None,
) -> Artifact:
    """Publish ``out_dir/model`` (written by :func:`write_outputs`) with the curves and log."""
    cfg = run.model.cfg
    card = [
        "## Model",
        "",
        f"Kind `hier`: {run.cfg.lm} item text vectors ({cfg.text_dim}-d) -> {cfg.adapter} adapter "
        f"-> {cfg.dim}-d item vectors (+ learned residual for {max(cfg.residual_rows - 1, 0)} "
        f"training items); user = {cfg.layers}-layer causal transformer over the last "
        f"{cfg.max_len} items; score = {cfg.score}.",
        "",
    ]
    return publish(
        out_dir / "model",
        store,
        name=run.cfg.name,
        version=version,
        production=production,
        train_config={"train": run.cfg.dump(), "hier": cfg.to_dict()},
        metrics=metrics,
        training={"stages": run.stages},
        extra_files={
            "curves/hier.png": out_dir / "curves.png",
            "logs/hier.csv": out_dir / "log.csv",
        },
        card=card,
    )


def main_hier(
    config: Path, overrides: Sequence[str], publish: bool = True, store_dir: Path | None = None
) -> int:
    """``python -m training hier``: train, evaluate, publish, print the serve command."""
    cfg = load_hier_config(config, overrides)
    log.info("config: %s", json.dumps(cfg.dump()))
    run = run_hier(cfg)
    metrics = write_outputs(run, cfg.output_dir)
    catalog = write_catalog(run, cfg.output_dir / "catalog.jsonl")
    print(f"\n{cfg.name}: metrics\n" + metrics_table(metrics), flush=True)
    for st in run.stages:
        print(json.dumps(st), flush=True)
    print(f"total {run.wall_s:.0f} s", flush=True)
    if not publish:
        return 0
    store = store_dir or default_store()
    art = stage_publish(run, cfg.output_dir, metrics, store)
    print(
        f"published {art.version} to {store} as production\n"
        "serve it on its catalogue with:\n"
        f"  CPREC_STORE_DIR={store} CPREC_MODEL=production CPREC_CATALOG_PATH={catalog} "
        "make serve",
        flush=True,
    )
    return 0
