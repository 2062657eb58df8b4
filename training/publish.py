"""Publish a fine-tuned model into the model store (the only way training hands models over).

The version directory is the merged (LoRA folded in) plain HF backbone + tokenizer, loadable with
``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` as ``service.engine.load_model``
does. The manifest carries what the service needs (pooling, is_decoder, dim, max_length, the
template dump) and what an audit needs (base model, parent, resolved config, data hash, metrics).
Curves, logs and the metrics JSON go in as extra files and the model card gets a metrics table.
The optional item-ID residual is evaluation-only and is *not* published (the service encodes
items from text).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from model_store import ModelStore
from model_store.store import Artifact, Manifest
from training.config import TrainConfig
from training.evaluate import METRICS

log = logging.getLogger(__name__)


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown: one row per (split, domain); ``metrics`` maps split -> compute_metrics output."""
    head = "| split | domain | n | " + " | ".join(METRICS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(METRICS)]
    for split, m in metrics.items():
        inner = m.get("metrics", m)
        for dom, vals in inner.items():
            cells = " | ".join(f"{vals[k]:.4f}" for k in METRICS)
            lines.append(f"| {split} | {dom} | {int(vals['n'])} | {cells} |")
    return "\n".join(lines)


def compact_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """split -> domain -> metric, without the name/list_length wrappers (manifest-sized)."""
    return {
        split: {dom: {k: v for k, v in vals.items()} for dom, vals in m.get("metrics", m).items()}
        for split, m in metrics.items()
    }


def publish_model(
    cfg: TrainConfig,
    model_dir: Path,
    data_hash: str,
    metrics: dict[str, Any],
    stages: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    store_dir: Path | None = None,
) -> Artifact:
    from transformers import AutoConfig

    from cprec.lm import is_decoder_config

    hf = AutoConfig.from_pretrained(model_dir)
    is_dec = is_decoder_config(hf)
    store = ModelStore(store_dir or cfg.publish.resolved_store())
    version = cfg.publish.version or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    aliases = ["latest"] + (["production"] if cfg.publish.production else [])
    manifest = Manifest(
        version=version,
        base_model=cfg.model.base,
        pooling="last" if is_dec else "mean",
        is_decoder=is_dec,
        dim=int(hf.hidden_size),
        max_length=cfg.model.max_length,
        template=cfg.template.model_dump(),
        parent=cfg.publish.parent,
        config=cfg.dump(),
        data_hash=data_hash,
        metrics={"eval": compact_metrics(metrics), "training": _training_numbers(stages)},
    )
    card = [
        "## Evaluation",
        "",
        metrics_table(metrics) if metrics else "(not evaluated)",
        "",
        "## Training",
        "",
        "```json",
        json.dumps(_training_numbers(stages), indent=2),
        "```",
    ]
    files = dict(extra_files or {})
    if "curves/cpt.png" in files:
        card += ["", "![CPT loss and LR](curves/cpt.png)"]
    if "curves/finetune.png" in files:
        card += ["", "![fine-tuning loss, LR, valid NDCG@10](curves/finetune.png)"]
    files = {k: v for k, v in files.items() if Path(v).is_file()}
    # Only serving files go in: weights, config, tokenizer (no optimizer state, no residual).
    art = store.publish(
        model_dir, manifest, aliases=aliases, card_extra="\n".join(card), extra_files=files
    )
    log.info("published %s to %s (aliases %s)", art.version, store.root, ", ".join(aliases))
    return art


def _training_numbers(stages: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "steps",
        "steps_run",
        "tokens",
        "seconds",
        "tokens_per_s",
        "first_loss",
        "final_loss",
        "best_valid_ndcg10",
        "best_step",
        "stopped_early",
        "trainable_params",
        "total_params",
    )
    return {name: {k: s[k] for k in keep if k in s} for name, s in stages.items() if s}
