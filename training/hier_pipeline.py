"""The ``hier`` recipe end to end: corpus -> LM item vectors -> stage 1 (CPT, WSA) -> stage 2
(fine-tune, early stopping) -> evaluation -> publish. ``make train`` runs it on FK-LOO.

``python -m training hier --config configs/hier-cpu.yaml [--set key=value] [--no-publish]``
writes under ``output_dir``: ``model/`` (``HierRec.save_pretrained``), ``curves.png`` (loss, LR,
valid NDCG@10), ``log.csv``, ``metrics.json`` and ``catalog.jsonl`` (the target catalogue as the
service reads it), then publishes a ``hier`` artifact (the LM folder at the root, the model under
``hier/``) as ``latest`` and ``production`` and prints the command that serves it.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cprec.hier import HierRec
from training.evaluate import compute_metrics
from training.fkloo import Case
from training.hier import (
    REPO_ROOT,
    Corpus,
    HierResult,
    HierTrainConfig,
    build_corpus,
    plot_hier_curves,
    text_vectors,
    train_hier,
)

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


def write_outputs(run: HierRun, out_dir: Path) -> dict[str, Any]:
    """Model folder, curves, log and the metrics of valid and test."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(out_dir / "model")
    plot_hier_curves(run.result.curves, out_dir / "curves.png")
    rows = [{"stage": k, **r} for k, rs in run.result.curves.items() for r in rs]
    keys = sorted({k for r in rows for k in r})
    with open(out_dir / "log.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
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


def lm_folder(name: str) -> tuple[Path, str, bool]:
    """(HF folder, pooling, is_decoder) of the LM that made the item vectors."""
    from cprec.lm import BUNDLED, bundled_dir, detect_pooling, is_decoder_config

    if name in BUNDLED:
        spec = BUNDLED[name]
        return bundled_dir(name, REPO_ROOT / "var" / "store"), spec.pooling, spec.is_decoder
    from transformers import AutoConfig

    path = Path(name)
    return path, detect_pooling(path), is_decoder_config(AutoConfig.from_pretrained(path))


def publish_hier(
    run: HierRun,
    out_dir: Path,
    metrics: dict[str, Any],
    store_dir: Path,
    production: bool = True,
    version: str | None = None,
):  # type: ignore[no-untyped-def]
    """A ``hier`` artifact: the LM folder (for new items and unmatched titles) at the root and
    the model under ``hier/``; the manifest records the kind and both dimensions."""
    from cprec.text import Template
    from model_store.store import Manifest, ModelStore
    from training.publish import compact_metrics, metrics_table

    lm_dir, pooling, is_dec = lm_folder(run.cfg.lm)
    store = ModelStore(store_dir)
    version = version or f"{run.cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    cfg = run.model.cfg
    manifest = Manifest(
        version=version,
        kind="hier",
        base_model=run.cfg.lm,
        pooling=pooling,
        is_decoder=is_dec,
        dim=cfg.dim,
        max_length=run.cfg.lm_max_length,
        template=Template().model_dump(),
        config={"train": run.cfg.dump(), "hier": cfg.to_dict()},
        data_hash=None,
        metrics={"eval": compact_metrics(metrics), "training": {"stages": run.stages}},
    )
    extra = {f"hier/{p.name}": p for p in (out_dir / "model").iterdir() if p.is_file()}
    extra |= {"curves/hier.png": out_dir / "curves.png", "logs/hier.csv": out_dir / "log.csv"}
    card = [
        "## Model",
        "",
        f"Kind `hier`: {run.cfg.lm} item text vectors ({cfg.text_dim}-d) -> {cfg.adapter} adapter "
        f"-> {cfg.dim}-d item vectors (+ learned residual for {max(cfg.residual_rows - 1, 0)} "
        f"training items); user = {cfg.layers}-layer causal transformer over the last "
        f"{cfg.max_len} items; score = {cfg.score}.",
        "",
        "## Evaluation",
        "",
        metrics_table(metrics),
        "",
        "## Training",
        "",
        "```json",
        json.dumps(run.stages, indent=2),
        "```",
        "",
        "![loss, LR, valid NDCG@10](curves/hier.png)",
    ]
    aliases = ["latest"] + (["production"] if production else [])
    art = store.publish(
        lm_dir, manifest, aliases=aliases, card_extra="\n".join(card), extra_files=extra
    )
    log.info("published %s to %s (%s)", art.version, store.root, ", ".join(aliases))
    return art


def main_hier(
    config: Path, overrides: Sequence[str], publish: bool = True, store_dir: Path | None = None
) -> int:
    """``python -m training hier``: train, evaluate, publish, print the serve command."""
    import os

    from training.hier import load_hier_config
    from training.publish import metrics_table

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
    store = Path(store_dir or os.environ.get("CPREC_STORE_DIR") or REPO_ROOT / "var" / "store")
    art = publish_hier(run, cfg.output_dir, metrics, store)
    print(
        f"published {art.version} to {store} as production\n"
        "serve it on its catalogue with:\n"
        f"  CPREC_STORE_DIR={store} CPREC_MODEL=production CPREC_CATALOG_PATH={catalog} "
        "make serve",
        flush=True,
    )
    return 0
