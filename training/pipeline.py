"""The flat pipeline from one config: data -> corpus -> CPT -> fine-tune -> evaluate -> publish.
Each stage writes under ``cfg.output_dir`` and can also be run alone (``python -m training
<stage>``); a completed CPT with the same config is reused, not recomputed (with
``shared_cpt_dir`` set, across runs: the benchmark rows of ``bench/flat_systems.py`` share it).

``run_pipeline(cfg, data, cases)`` returns a :class:`SystemResult`::

    res.ranked["test"]                        # list[list[int]]: 50 ids per data.data.test case
    res.metrics["test"]                       # training.evaluate.compute_metrics(...) output
    res.stages["cpt"]["tokens_per_s"]         # throughput per stage (cpt is {} when skipped)

``cases`` lists can be passed to rank other cases than the data's valid/test (e.g. a subset).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cprec.lm import LMSource, is_decoder_config, resolve_base_model
from cprec.recommender import RecommenderConfig, save_pretrained
from model_store import Artifact
from training.config import TrainConfig
from training.corpus import build_corpus, format_stats, hf_token_counter, read_corpus, write_corpus
from training.cpt import run_cpt
from training.data import LoadedData, load_data
from training.dataset import Case
from training.evaluate import write_topk_jsonl
from training.finetune import RESIDUAL_FILE, evaluate_cases, load_dual_encoder, run_finetune
from training.loop import stage_key
from training.publish import metrics_table, publish, training_numbers

log = logging.getLogger(__name__)


@dataclass
class SystemResult:
    name: str
    model_dir: Path
    ranked: dict[str, list[list[int]]]
    metrics: dict[str, Any]
    stages: dict[str, Any] = field(default_factory=dict)
    artifact_version: str | None = None


def setup(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


def base_model(cfg: TrainConfig) -> LMSource:
    """The base model (``cprec.lm.resolve_base_model``; a bundled base that needs converting is
    converted into the model store once)."""
    return resolve_base_model(cfg.model.base, cfg.publish.resolved_store())


def cpt_dir(cfg: TrainConfig) -> Path:
    """``output_dir/cpt``; with ``shared_cpt_dir``, a folder there keyed by what determines CPT."""
    if cfg.shared_cpt_dir is None:
        return cfg.output_dir / "cpt"
    key = stage_key(
        {
            "cpt": cfg.cpt.model_dump(mode="json"),
            "corpus": cfg.corpus.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "template": cfg.template.model_dump(),
            "data": cfg.data.model_dump(mode="json"),
        }
    )
    return cfg.shared_cpt_dir / key


# -- stages ---------------------------------------------------------------------------------------


def stage_corpus(cfg: TrainConfig, data: LoadedData, out_dir: Path | None = None) -> Path:
    from cprec.lm import load_tokenizer

    out_dir = out_dir or cfg.output_dir / "corpus"
    tok = load_tokenizer(base_model(cfg).path)
    chunks, stats = build_corpus(data, cfg.template, cfg.corpus, hf_token_counter(tok))
    path = write_corpus(chunks, stats, out_dir)
    print(format_stats(stats), flush=True)
    return path


def stage_cpt(cfg: TrainConfig, data: LoadedData) -> tuple[Path, dict]:
    base = base_model(cfg).path
    if not cfg.cpt.enabled:
        return base, {}
    out = cpt_dir(cfg)
    corpus_path = stage_corpus(cfg, data, out / "corpus")
    res = run_cpt(cfg, base, read_corpus(corpus_path), out)
    return res.model_dir, res.summary


def stage_finetune(cfg: TrainConfig, data: LoadedData, start: Path) -> tuple[Path, dict]:
    res = run_finetune(cfg, start, data, cfg.output_dir / "finetune")
    save_recommender(cfg, res.model_dir)
    return res.model_dir, res.summary


def stage_evaluate(
    cfg: TrainConfig,
    data: LoadedData,
    model_dir: Path,
    cases: dict[str, Sequence[Case]] | None = None,
) -> tuple[dict[str, Any], dict[str, list[list[int]]]]:
    """Metrics JSON and top-50 JSONL (gz) per split under ``output_dir/eval``."""
    enc = load_dual_encoder(model_dir, data, cfg, residual_path=model_dir.parent / RESIDUAL_FILE)
    splits = cases or {s: getattr(data.data, s) for s in cfg.evaluate.splits}
    out = cfg.output_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    ranked: dict[str, list[list[int]]] = {}
    item_vecs = None
    for split, cs in splits.items():
        cs = list(cs)
        if cfg.evaluate.max_cases is not None:
            cs = cs[: cfg.evaluate.max_cases]
        t0 = time.perf_counter()
        m, r, item_vecs = evaluate_cases(
            enc, cs, split, cfg.name, cfg.evaluate.batch_size, item_vecs
        )
        m["seconds"] = round(time.perf_counter() - t0, 1)
        metrics[split], ranked[split] = m, r
        (out / f"{split}.metrics.json").write_text(json.dumps(m, indent=2), encoding="utf-8")
        ext = (
            [[int(data.external_ids[i]) for i in lst] for lst in r]
            if data.source.startswith("fkloo")
            else r
        )  # FK-LOO ids for the shared scorer; internal ids otherwise
        write_topk_jsonl(out / f"{split}.jsonl.gz", cs, ext)
        om = m["metrics"]["overall_micro"]
        log.info(
            "evaluate %s: %d cases, NDCG@10 %.4f, Recall@10 %.4f (%.1fs)",
            split,
            len(cs),
            om["NDCG@10"],
            om["Recall@10"],
            m["seconds"],
        )
    (out / "metrics.md").write_text(metrics_table(metrics) + "\n", encoding="utf-8")
    return metrics, ranked


def write_catalog(data: LoadedData, path: Path) -> Path:
    """The data's catalogue as the service's JSONL (popularity = training interactions)."""
    from collections import Counter

    pop = Counter(i for s in data.data.train for i in s.item_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for it in data.data.items:
            row: dict[str, Any] = {
                "item_id": data.external_ids[it.item_id],
                "domain": it.domain,
                "title": it.title,
                "popularity": pop.get(it.item_id, 0),
            }
            if data.extra_text[it.item_id]:
                row["extra_text"] = data.extra_text[it.item_id]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def save_recommender(cfg: TrainConfig, model_dir: Path) -> Path:
    """``model_dir`` as a ``flat`` recommender folder (``cprec.recommender``): its
    ``recommender.json`` is written beside the weights; a folder that is not this run's own (the
    base or a shared CPT, when nothing was fine-tuned) is copied to ``output_dir/model`` first."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir)
    is_dec = is_decoder_config(hf)
    config = RecommenderConfig(
        kind="flat",
        base_model=cfg.model.base,
        pooling="last" if is_dec else "mean",
        is_decoder=is_dec,
        dim=int(hf.hidden_size),
        max_length=cfg.model.max_length,
        template=cfg.template.model_dump(),
    )
    own = model_dir.resolve().is_relative_to(cfg.output_dir.resolve())
    return save_pretrained(model_dir if own else cfg.output_dir / "model", model_dir, config)


def saved_stages(cfg: TrainConfig) -> dict[str, Any]:
    """The CPT and fine-tuning summaries a previous run left (``{}`` for a stage it did not run)."""
    out: dict[str, Any] = {}
    for name, path in (
        ("finetune", cfg.output_dir / "finetune" / "summary.json"),
        ("cpt", cpt_dir(cfg) / "summary.json"),
    ):
        ok = path.is_file() and (name != "cpt" or cfg.cpt.enabled)
        out[name] = json.loads(path.read_text()) if ok else {}
    return out


def stage_publish(
    cfg: TrainConfig,
    data: LoadedData,
    model_dir: Path,
    metrics: dict[str, Any],
    stages: dict[str, Any],
) -> Artifact:
    """Write the catalogue beside the run and publish ``model_dir`` with curves, logs, metrics."""
    write_catalog(data, cfg.output_dir / "catalog.jsonl")
    ft = cfg.output_dir / "finetune"
    cp = cpt_dir(cfg)
    extra = {"curves/finetune.png": ft / "curves.png", "logs/finetune.csv": ft / "log.csv"}
    if cfg.cpt.enabled:
        extra |= {
            "curves/cpt.png": cp / "curves.png",
            "logs/cpt.csv": cp / "log.csv",
            "logs/corpus_stats.json": cp / "corpus" / "corpus_stats.json",
        }
    mpath = cfg.output_dir / "eval" / "metrics.json"
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    extra["metrics.json"] = mpath
    return publish(
        save_recommender(cfg, model_dir),
        cfg.publish.resolved_store(),
        name=cfg.name,
        version=cfg.publish.version,
        production=cfg.publish.production,
        parent=cfg.publish.parent,
        train_config=cfg.dump(),
        data_hash=data.data_hash,
        metrics=metrics,
        training=training_numbers(stages),
        extra_files=extra,
    )


# -- entry points ---------------------------------------------------------------------------------


def run_pipeline(
    cfg: TrainConfig,
    data: LoadedData | None = None,
    cases: dict[str, Sequence[Case]] | None = None,
) -> SystemResult:
    setup(cfg)
    t0 = time.perf_counter()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.output_dir / "config.json").write_text(json.dumps(cfg.dump(), indent=2), encoding="utf-8")
    data = data or load_data(cfg.data)
    stages: dict[str, Any] = {"data": data.stats}
    start, stages["cpt"] = stage_cpt(cfg, data)
    if cfg.finetune.enabled:
        model_dir, stages["finetune"] = stage_finetune(cfg, data, start)
    else:
        model_dir = start
    t_eval = time.perf_counter()
    metrics, ranked = stage_evaluate(cfg, data, model_dir, cases)
    stages["evaluate"] = {"seconds": round(time.perf_counter() - t_eval, 1)}
    version = None
    if cfg.publish.enabled:
        art = stage_publish(cfg, data, model_dir, metrics, stages)
        version = art.version
    stages["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary = {
        "name": cfg.name,
        "model_dir": str(model_dir),
        "version": version,
        "stages": stages,
        "metrics": {s: m["metrics"]["overall_micro"] for s, m in metrics.items()},
    }
    (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"\n{cfg.name}: metrics\n" + metrics_table(metrics), flush=True)
    for st in ("cpt", "finetune"):
        if stages.get(st):
            s = stages[st]
            print(
                f"{st}: {s.get('steps_run', s.get('steps'))} steps, {s['tokens']} tokens, "
                f"{s['seconds']}s, {s['tokens_per_s']} tokens/s",
                flush=True,
            )
    if version:
        print(
            f"published {version} to {cfg.publish.resolved_store()} "
            f"(catalogue for the service: {cfg.output_dir / 'catalog.jsonl'})",
            flush=True,
        )
    print(f"total {stages['total_seconds']}s", flush=True)
    return SystemResult(cfg.name, model_dir, ranked, metrics, stages, version)
