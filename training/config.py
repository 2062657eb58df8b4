"""Training configuration: one YAML file validated by pydantic, overridable from the CLI.

``load_config("configs/cpu-small.yaml", ["cpt.steps=20", "finetune.lora.r=4"])`` reads the file,
applies each ``dotted.key=value`` override (values parsed as YAML, so ``true``, ``3``, ``[a, b]``
work), and validates the result. Unknown keys are errors (a typo never silently does nothing).
The resolved config is dumped into every artifact's manifest. :class:`TrainConfig` is the flat
pipeline's; the hier recipe's (``training.hier.HierTrainConfig``) loads through the same function
and shares :class:`ScheduleConfig`.

Paths: ``CPREC_SHARED_DIR`` (default ``<repo>/../shared``) locates the shared data; the model
store is ``publish.store_dir`` or ``$CPREC_STORE_DIR`` (default ``var/store``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cprec.text import Template

REPO_ROOT = Path(__file__).resolve().parent.parent


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config never silently does nothing."""

    model_config = ConfigDict(extra="forbid")


class DataConfig(StrictModel):
    source: Literal["fkloo", "files", "normalized"] = Field(
        default="fkloo",
        description="fkloo: the fixed FK-LOO benchmark split; files: catalogue + interactions "
        "files (see training/data.py); normalized: ../shared/data/<name>/normalized/.",
    )
    fkloo_root: Path | None = Field(default=None, description="FK-LOO folder; default shared.")
    subset: int | None = Field(
        default=None,
        ge=1,
        description="FK-LOO: keep this many evaluation users (and the training users needed; "
        "see training.fkloo). None = the full benchmark.",
    )
    restrict_items: bool = Field(
        default=False,
        description="Rank only over items that occur in the (subset) data instead of the whole "
        "domain. Makes CPU smoke runs fast; NOT the benchmark protocol.",
    )
    catalog: Path | None = Field(default=None, description="files: catalogue path.")
    interactions: Path | None = Field(default=None, description="files: interactions path.")
    normalized: str | None = Field(default=None, description="normalized: dataset folder name.")
    max_users: int | None = Field(default=None, ge=1, description="files/normalized: cap users.")
    skip_bad_rows: bool = Field(default=False, description="Skip (and count) invalid rows.")
    seed: int = 0


class ModelConfig(StrictModel):
    base: str = Field(
        default="smollm2-135m",
        description="Bundled name (minilm-l6, smollm2-135m) or a local HF folder.",
    )
    max_length: int = Field(default=128, ge=8, le=8192, description="Tokens per user/item text.")
    dtype: str = Field(
        default="auto", description="auto (bf16 on CUDA, else fp32) | float32 | bf16"
    )
    device: str = Field(default="auto", description="auto | cpu | cuda")
    train_precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="Training autocast: auto = bf16 on CUDA, fp32 on CPU; bf16 also on a CPU with "
        "native bf16 (faster there; fp32 master weights either way).",
    )
    gradient_checkpointing: bool = False


class LoraConfig(StrictModel):
    enabled: bool = True
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        default=None,
        description="None = by architecture: Llama q/k/v/o/gate/up/down_proj; "
        "BERT query/key/value/dense.",
    )


class ScheduleConfig(StrictModel):
    kind: Literal["wsa", "cosine", "constant"] = "wsa"
    warmup_frac: float = Field(default=0.02, ge=0, lt=1)
    anneal_frac: float = Field(default=0.15, ge=0, le=1)
    anneal_shape: Literal["linear", "cosine", "exponential"] = "cosine"
    min_ratio: float = Field(default=0.1, gt=0, le=1)

    def kwargs(self) -> dict[str, Any]:
        return {
            "warmup_frac": self.warmup_frac,
            "anneal_frac": self.anneal_frac,
            "min_ratio": self.min_ratio,
            "shape": self.anneal_shape,
        }


class CorpusConfig(StrictModel):
    context_length: int = Field(default=256, ge=16, description="Tokens per corpus chunk.")
    mixed_ratio: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Share of all-domain mixed sequences in CPT batches (each example is a mixed "
        "chunk with this probability, else a domain-specific one). The corpus keeps every chunk; "
        "0 = no mixed chunks at all (the domain-only ablation), 1 = no domain-specific ones.",
    )
    min_items: int = Field(default=2, ge=1, description="Shorter sequences are not written.")
    max_users: int | None = Field(default=None, ge=1, description="Cap users (seeded sample).")
    seed: int = 0


class CptConfig(StrictModel):
    enabled: bool = True
    steps: int = Field(default=200, ge=1, description="Optimizer updates.")
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=2e-4, gt=0, description="Peak LR (LoRA); ~2e-5 for full tuning.")
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    anneal_domains: list[str] | None = Field(
        default=None,
        description="During annealing sample only chunks whose domains are all in this list "
        "(e.g. the target domains). None = the same mix throughout.",
    )
    checkpoint_every: int = Field(default=100, ge=1, description="Steps between checkpoints.")
    resume: bool = Field(default=True, description="Continue from the last checkpoint if present.")
    log_every: int = Field(default=5, ge=1)
    seed: int = 0


class FinetuneConfig(StrictModel):
    enabled: bool = True
    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    residual_lr: float = Field(default=1e-3, gt=0, description="LR of the item-ID residual.")
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = Field(default=5, ge=1)
    temperature: float = Field(default=0.05, gt=0)
    domain_negatives: int = Field(
        default=4, ge=0, description="Sampled same-domain negatives per example (besides in-batch)."
    )
    history_items: int = Field(default=20, ge=1, description="Most recent items in user text.")
    samples_per_user: int = Field(default=3, ge=1, description="Targets drawn per training user.")
    freeze_layers: int = Field(
        default=0,
        ge=0,
        description="Full fine-tuning only: keep the embeddings and the bottom N transformer "
        "layers fixed; backward stops there, so steps are cheaper "
        "(docs/decisions/004-flat-training-on-cpu.md).",
    )
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(kind="constant", warmup_frac=0.05)
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    item_id_residual: bool = Field(
        default=False,
        description="Learn a per-item vector added to the text vector of items seen in training "
        "(cold items use text alone). Evaluation-only: the service encodes items from text.",
    )
    early_stopping: bool = Field(
        default=True, description="Evaluate on valid during training, stop early, keep the best."
    )
    eval_every: int = Field(default=100, ge=1, description="Steps between valid evaluations.")
    eval_cases: int | None = Field(default=500, ge=1, description="Valid cases for early stopping.")
    patience: int = Field(default=3, ge=1, description="Evaluations without improvement.")
    seed: int = 0


class EvaluateConfig(StrictModel):
    splits: list[Literal["valid", "test"]] = Field(default_factory=lambda: ["valid", "test"])
    batch_size: int = Field(default=64, ge=1)
    max_cases: int | None = Field(default=None, ge=1, description="Cap cases per split.")


class PublishConfig(StrictModel):
    enabled: bool = True
    store_dir: Path | None = Field(
        default=None, description="Default $CPREC_STORE_DIR or var/store."
    )
    version: str | None = Field(default=None, description="Default: timestamped.")
    production: bool = Field(default=False, description="Also move the production alias.")
    parent: str | None = None

    def resolved_store(self) -> Path:
        return self.store_dir if self.store_dir is not None else store_dir()


class TrainConfig(StrictModel):
    name: str = "cprec"
    output_dir: Path = Field(default=Path("var/runs/cprec"), description="Run outputs.")
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    template: Template = Field(default_factory=Template)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    cpt: CptConfig = Field(default_factory=CptConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    shared_cpt_dir: Path | None = Field(
        default=None,
        description="Share CPT runs between runs: CPT goes to <shared_cpt_dir>/<hash of the cpt, "
        "corpus, model, template and data settings>, so runs that differ only after CPT (e.g. "
        "benchmark rows) train it once. None: output_dir/cpt.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.data.source == "files" and (
            self.data.catalog is None or self.data.interactions is None
        ):
            raise ValueError("data.source=files needs data.catalog and data.interactions")
        if self.data.source == "normalized" and not self.data.normalized:
            raise ValueError("data.source=normalized needs data.normalized (a folder name)")
        return self

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``a.b.c=value`` -> raw["a"]["b"]["c"] = yaml.safe_load(value)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(value) if value != "" else None


Config = TypeVar("Config", bound=BaseModel)


def load_config(
    path: Path | str | None,
    overrides: Sequence[str] | None = None,
    cls: type[Config] = TrainConfig,  # type: ignore[assignment]
) -> Config:
    """A YAML file plus ``dotted.key=value`` overrides, validated as ``cls``."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config must be a mapping")
    for item in overrides or []:
        apply_override(raw, item)
    return cls.model_validate(raw)


def shared_dir() -> Path:
    """The shared data folder: ``$CPREC_SHARED_DIR``, else ``../shared`` beside the repo."""
    env = os.environ.get("CPREC_SHARED_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT.parent / "shared").resolve()


def store_dir() -> Path:
    """The model store: ``$CPREC_STORE_DIR``, else ``var/store`` (also where a bundled base that
    needs converting, SmolLM2, is converted once)."""
    return Path(os.environ.get("CPREC_STORE_DIR") or REPO_ROOT / "var" / "store")
