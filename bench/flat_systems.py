"""The flat dual encoder's rows of the quality table (``bench/quality.py``), beside the hier rows'
``bench/hier_systems.py``. Each system is a change of the training pipeline's config
(``training/pipeline.py``, ``--train-config``, default ``configs/quality-<mode>.yaml``):

* ``finetune-only``      — no CPT; the base model fine-tuned as a dual encoder;
* ``cprec``              — CPT (mixed + domain-specific corpus, WSA schedule) then fine-tune;
* ``cprec-cosine``       — the same with a cosine CPT schedule (ablation);
* ``cprec-domain-only``  — CPT on domain-specific sequences only (``corpus.mixed_ratio=0``);
* ``cprec-idres``        — ``cprec`` plus the item-ID residual (evaluation-only, see finetune.py).

``run_system(name, cfg, data)`` runs ``name`` under ``<cfg.output_dir>/<name>/``; CPT goes to
``<cfg.output_dir>/_cpt/<hash of the CPT settings>`` (``TrainConfig.shared_cpt_dir``), so
``cprec`` and ``cprec-idres`` share one CPT run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from training.config import TrainConfig

if TYPE_CHECKING:  # the pipeline (torch, transformers) is imported when a row runs
    from training.data import LoadedData
    from training.dataset import Case
    from training.pipeline import SystemResult


def _finetune_only(c: TrainConfig) -> None:
    c.cpt.enabled = False


def _cprec(c: TrainConfig) -> None:
    c.cpt.enabled = True


def _cosine(c: TrainConfig) -> None:
    c.cpt.enabled = True
    c.cpt.schedule.kind = "cosine"


def _domain_only(c: TrainConfig) -> None:
    c.cpt.enabled = True
    c.corpus.mixed_ratio = 0.0


def _idres(c: TrainConfig) -> None:
    c.cpt.enabled = True
    c.finetune.item_id_residual = True


SYSTEMS: dict[str, Callable[[TrainConfig], None]] = {
    "finetune-only": _finetune_only,
    "cprec": _cprec,
    "cprec-cosine": _cosine,
    "cprec-domain-only": _domain_only,
    "cprec-idres": _idres,
}
# The quality table's row name -> its system.
ROWS = {
    "flat-finetune-only": "finetune-only",
    "flat": "cprec",
    "flat-cosine": "cprec-cosine",
    "flat-domain-only": "cprec-domain-only",
    "flat-idres": "cprec-idres",
}


def system_config(name: str, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with system ``name``'s change, named after it, under ``cfg.output_dir/name``
    (``cfg`` itself is not changed)."""
    if name not in SYSTEMS:
        raise KeyError(f"unknown system {name!r}; known: {sorted(SYSTEMS)}")
    c = cfg.model_copy(deep=True)
    SYSTEMS[name](c)
    c.name = name
    c.output_dir = cfg.output_dir / name
    c.shared_cpt_dir = cfg.output_dir / "_cpt"
    return c


def run_system(
    name: str,
    cfg: TrainConfig,
    data: LoadedData | None = None,
    cases: dict[str, Sequence[Case]] | None = None,
    publish: bool = False,
) -> SystemResult:
    """Train and evaluate one row (see the module docstring)."""
    from training.pipeline import run_pipeline

    c = system_config(name, cfg)
    c.publish.enabled = publish
    return run_pipeline(c, data, cases)
