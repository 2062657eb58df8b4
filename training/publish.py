"""Publish a recommender folder into the model store: the only way training hands a model over.

The folder is what ``cprec.recommender.save_pretrained`` writes (the LM's HF files, ``hier/`` for a
``hier`` model, ``recommender.json``) and what ``Recommender.from_pretrained`` reads back. The
manifest takes the model's fields from ``recommender.json`` (kind, base model, pooling,
is_decoder, dim, max_length, template) and adds what an audit needs (parent, resolved config, data
hash, metrics). Curves, logs and the metrics JSON go in as extra files and the model card gets a
metrics table. The flat pipeline's item-ID residual is evaluation-only and is *not* published (the
service encodes items from text).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cprec.recommender import read_config
from model_store import Artifact, Manifest, ModelStore
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
        split: {dom: dict(vals) for dom, vals in m.get("metrics", m).items()}
        for split, m in metrics.items()
    }


def publish(
    folder: Path,
    store: Path,
    *,
    name: str,
    train_config: dict[str, Any],
    metrics: dict[str, Any],
    training: dict[str, Any],
    version: str | None = None,
    production: bool = False,
    parent: str | None = None,
    data_hash: str | None = None,
    extra_files: Mapping[str, Path] | None = None,
    card: Sequence[str] = (),
) -> Artifact:
    """Publish the recommender ``folder`` into the store at ``store`` as ``version`` (default
    ``<name>-<UTC time>``), moving ``latest`` (and ``production``). ``metrics``: split ->
    ``compute_metrics`` output; ``training``: the stages' numbers; ``card``: lines that open the
    model card (e.g. a ``## Model`` section). Extra files that do not exist are left out."""
    config, _ = read_config(folder)
    version = version or f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    manifest = Manifest(
        **config.manifest_fields(),
        version=version,
        parent=parent,
        config=train_config,
        data_hash=data_hash,
        metrics={"eval": compact_metrics(metrics), "training": training},
    )
    files = {k: Path(v) for k, v in (extra_files or {}).items() if Path(v).is_file()}
    lines = [
        *card,
        "## Evaluation",
        "",
        metrics_table(metrics) if metrics else "(not evaluated)",
        "",
        "## Training",
        "",
        "```json",
        json.dumps(training, indent=2),
        "```",
    ]
    for rel in files:
        if rel.startswith("curves/"):
            lines += [
                "",
                f"![{Path(rel).stem}: loss, LR and valid NDCG@10 against the step]({rel})",
            ]
    aliases = ["latest"] + (["production"] if production else [])
    art = ModelStore(store).publish(
        folder, manifest, aliases=aliases, card_extra="\n".join(lines), extra_files=files
    )
    log.info("published %s to %s (aliases %s)", art.version, store, ", ".join(aliases))
    return art


def training_numbers(stages: dict[str, Any]) -> dict[str, Any]:
    """The flat pipeline's stage summaries, cut to what a manifest keeps."""
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
