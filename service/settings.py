"""Service settings, in two tiers: what a user sets (one ``CPREC_`` variable each, with its
trade-off) and ``tuning``, the batching, search and retry knobs that the benchmarks set and a
user rarely does (``CPREC_TUNING__<NAME>``). Knobs whose best value depends on the device say
``auto``, resolved by one policy (:meth:`Tuning.for_device`).

``REDIS_URL`` is read without the prefix because that is the name every platform injects. A
setting that cannot take effect is refused at start with the reason, never ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_CATALOG = Path(__file__).resolve().parent / "data" / "demo_catalog.jsonl"

# The per-device policy of the ``auto`` tuning knobs; docs/decisions/003-serving-on-two-cores.md
# says why CPU and GPU differ (on a CPU a forward's cost per token is flat in the batch size and
# two cores are shared with the event loop; a GPU wants one big padded forward).
DEVICE_POLICY: dict[str, dict[str, Any]] = {
    "cpu": {"batch_coalesce_ms": 50.0, "batch_max_padding": 0.25, "batch_max_forward_tokens": 2048},
    "cuda": {"batch_coalesce_ms": 0.0, "batch_max_padding": None, "batch_max_forward_tokens": None},
}


_BASE_ONLY = (
    "base_model only: a store model's manifest fixes its own, and setting this while one is "
    "served is refused at start."
)


class Tuning(BaseModel):
    """Knobs of the batcher, the search and the Redis client; the defaults are the measured
    choice for each device (``auto``) and the benchmarks' baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=32, ge=1, le=1024, description="Requests per batch.")
    max_wait_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        description="With batch_coalesce_ms=0: how long the first request of a batch waits "
        "for company; adds at most this much latency when idle.",
    )
    batch_coalesce_ms: float | Literal["auto"] = Field(
        default="auto",
        description="How long a batch may wait to reach the concurrency the batcher last saw (the "
        "last batch plus what queued behind it); once reached it goes at once, so a lone client "
        "never waits. Under load the clients' requests then share one forward instead of "
        "alternating cohorts, and their HTTP work runs between forwards instead of beside them. "
        "0: off (max_wait_ms instead). auto: 50 on CPU (a cohort of clients needs tens of ms of "
        "event-loop work to come back), 0 on a GPU.",
    )
    batch_coalesce_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="With coalescing on, the window is at least this share of the last batch's "
        "device time: clients come back after their searches and responses, which grow with "
        "the catalogue, and one that misses the window waits a whole batch more. A client that "
        "left costs one window, once.",
    )
    batch_token_budget: int = Field(
        default=16384, ge=64, description="Max padded tokens (batch x longest) per forward pass."
    )
    queue_size: int = Field(default=256, ge=1, description="Pending encodes before 429.")
    batch_max_padding: float | Literal["auto", "none"] = Field(
        default="auto",
        description="Padded tokens allowed per forward, as a fraction of the real tokens; a "
        "coalesced batch is then length-sorted and split into forwards that respect it. "
        "none: one padded forward per batch. auto: 0.25 on CPU (a forward's cost per token is "
        "flat in batch size there, so padding is pure waste), none on a GPU.",
    )
    batch_max_forward_tokens: Annotated[int, Field(ge=1)] | Literal["auto", "none"] = Field(
        default="auto",
        description="Where batches are split (batch_max_padding set), also cut a forward "
        "before rows x width passes this. auto: 2048 on CPU (a forward of many long rows "
        "outgrows the caches and its cost per row grows), none on a GPU.",
    )
    faiss_search_threads: int = Field(
        default=1,
        ge=0,
        le=1024,
        description="OpenMP threads per search call (0 = faiss default, all cores). One keeps a "
        "single-user search from fighting the encoder's threads for the same cores.",
    )
    search_parallel_calls: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Concurrent requests' searches run as one faiss call per domain; a block "
        "of 16 or more is cut into blocks of at least 8, up to this many calls that run in "
        "parallel, one thread each. auto: the CPUs this process may use.",
    )
    embed_batch_size: int = Field(default=64, ge=1, le=4096, description="Reindex batch size.")
    hnsw_m: int = Field(default=32, ge=4, le=128, description="index_kind=hnsw: graph degree.")
    hnsw_ef_search: int = Field(
        default=128, ge=8, le=4096, description="index_kind=hnsw: search breadth."
    )
    redis_timeout_s: float = Field(default=0.05, gt=0, le=10, description="Socket timeout.")
    redis_retry_s: float = Field(
        default=2.0, ge=0, description="After a Redis failure, skip it this long, then retry."
    )

    @field_validator("batch_max_padding")
    @classmethod
    def _padding_not_negative(cls, v: float | str) -> float | str:
        if isinstance(v, float) and v < 0:
            raise ValueError("must be >= 0, auto or none")
        return v

    @field_validator("batch_coalesce_ms")
    @classmethod
    def _coalesce_range(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0 <= v <= 1000:
            raise ValueError("must be between 0 and 1000 ms, or auto")
        return v

    def for_device(self, device_type: str) -> Resolved:
        """The knobs with every ``auto`` replaced by ``DEVICE_POLICY`` for ``device_type``
        (``cpu``, or ``cuda`` for any GPU) and ``none`` by None."""
        policy = DEVICE_POLICY["cpu" if device_type == "cpu" else "cuda"]
        values = self.model_dump()
        for name, default in policy.items():
            v = values[name]
            values[name] = default if v == "auto" else (None if v == "none" else v)
        if values["search_parallel_calls"] == "auto":
            values["search_parallel_calls"] = max(1, len(os.sched_getaffinity(0)))
        return Resolved(**values)


class Resolved(BaseModel):
    """``Tuning`` for one device: every value concrete (None = that split is off)."""

    model_config = ConfigDict(frozen=True)

    max_batch_size: int
    max_wait_ms: float
    batch_coalesce_ms: float
    batch_coalesce_share: float
    batch_token_budget: int
    queue_size: int
    batch_max_padding: float | None
    batch_max_forward_tokens: int | None
    faiss_search_threads: int
    search_parallel_calls: int
    embed_batch_size: int
    hnsw_m: int
    hnsw_ef_search: int
    redis_timeout_s: float
    redis_retry_s: float


class Settings(BaseSettings):
    """Resolved once at start and logged with secrets redacted."""

    # hide_input_in_errors: a refused value (e.g. a weak admin token) is never echoed into the
    # validation error that start-up prints.
    model_config = SettingsConfigDict(
        env_prefix="CPREC_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    # -- the service --------------------------------------------------------------------------
    env: Literal["development", "production"] = Field(
        default="development",
        description="production refuses unsafe settings (e.g. a default admin token).",
    )
    host: str = Field(default="127.0.0.1", description="Bind address; loopback unless deployed.")
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = Field(default="INFO")
    access_log: bool = Field(
        default=True,
        description="uvicorn's line per request (at INFO). Off, the event loop skips that work "
        "on every request; /metrics counts requests by route and status either way.",
    )
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        default="auto",
        description="Service processes on one port (one model, index and event loop each); "
        "they share the store, the saved index snapshots and Redis. auto = one per CPU core "
        "on a CPU, one on a GPU (docs/scaling.md).",
    )
    index_sync_s: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="How often a process checks the store for an index snapshot or a model "
        "switch (SERVING) that another process (a worker or a replica) published, and swaps it "
        "in; 0 = never.",
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for admin endpoints; unset = admin endpoints off."
    )
    cors_origins: list[str] = Field(default_factory=list, description="Empty = CORS off.")
    demo_page: bool = Field(default=True, description="The try-it page at / and /demo/.")
    # -- the model ----------------------------------------------------------------------------
    store_dir: Path = Field(
        default=Path("var/store"),
        description="Model store root (versions, aliases, converted bases) and saved indexes.",
    )
    model: str = Field(
        default="production",
        description="Store alias/version to serve. If it does not exist, base_model is served.",
    )
    model_watch_s: float = Field(
        default=0.0,
        ge=0,
        le=86400,
        description="How often to check where `model` (an alias) points and roll its version "
        "out when it has moved (as POST /models/reload would); 0 = never. After a rollback, or "
        "a version that failed to roll out, the watcher waits until the alias moves again.",
    )
    base_model: str = Field(
        default="minilm-l6",
        description="Served zero-shot without `model`: minilm-l6, smollm2-135m or an HF folder.",
    )
    zero_shot: Literal["mean", "text"] = Field(
        default="mean",
        description="How base_model is served zero-shot. mean: a user is the recency-weighted "
        "mean of the history items' LM vectors (the target domain's items when it has some) and "
        "items get a popularity prior (cprec.hier.zero_shot_query / zero_shot_items); a history "
        "given by item_id needs no forward pass (docs/decisions/001-zero-shot-default.md). text: "
        "the LM encodes the whole history text, one forward per new history (the flat model's).",
    )
    max_length: int = Field(
        default=256, ge=8, le=8192, description=f"Tokens per text (user or item). {_BASE_ONLY}"
    )
    history_max_items: int = Field(
        default=20,
        ge=1,
        le=1000,
        description=f"Most recent history items a user is made of. {_BASE_ONLY}",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field(
        default="auto",
        description="auto | float32 | bfloat16 | float16. auto = bf16 on CUDA and on CPUs with "
        "native bf16 instructions, else fp32 (emulated bf16 is slower).",
    )
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="int8 = dynamic per-channel int8 Linear layers (CPU only). Off by default: "
        "it scales activations per batch, so a user's vector (and the cached one) depends on "
        "who shared its batch; its FK-LOO NDCG@10 and speed are in docs/benchmarks.md.",
    )
    batching: bool = Field(
        default=True, description="Coalesce concurrent encodes into one forward."
    )
    # -- the catalogue and its index ----------------------------------------------------------
    catalog_path: Path = Field(
        default=DEMO_CATALOG,
        description="Catalogue (JSONL) indexed at first start when no saved index exists.",
    )
    catalog_dir: Path | None = Field(
        default=None,
        description="Directory admin reindex requests may read catalogues from by relative path "
        '({"path": "x.jsonl"}); ".." and absolute paths, and symlinks leaving it, are refused. '
        "Unset: the path option is off (uploads and inline items work).",
    )
    index_kind: Literal["flat", "hnsw"] = Field(
        default="flat", description="flat = exact; hnsw = approximate for large catalogues."
    )
    faiss_gpu: bool = Field(default=True, description="Move indexes to the GPU when possible.")
    # -- caches -------------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "CPREC_REDIS_URL"),
        description="Redis for user vectors; unset = in-process LRU.",
    )
    redis_prefix: str = Field(default="cprec", description="Key prefix; keys we own only.")
    cache_ttl_s: int = Field(default=3600, ge=1, description="User-vector TTL.")
    lru_size: int = Field(default=10000, ge=0, description="In-process cache entries (no Redis).")
    result_cache_size: int = Field(
        default=10000,
        ge=0,
        description="Ranked lists of recent requests kept in process, per index snapshot: an "
        "identical request is answered without Redis or a search (emptied by a reindex swap). "
        "0 = off.",
    )
    title_cache_size: int = Field(
        default=20000,
        ge=0,
        description="LM vectors of history titles that are not catalogue items (hier and "
        "mean scorers), kept in process by text: a title many users name is encoded once "
        "per process. 0 = off.",
    )
    # -- request limits -----------------------------------------------------------------------
    max_k: int = Field(default=200, ge=1, le=10000, description="Items per target domain.")
    max_history: int = Field(default=500, ge=1, description="History entries per request.")
    max_title_chars: int = Field(default=1000, ge=1)
    max_target_domains: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="JSON body limit.")
    max_upload_bytes: int = Field(default=64 << 20, ge=1024, description="Catalogue upload limit.")
    max_upload_rows: int = Field(default=2_000_000, ge=1)
    # -- the second tier ----------------------------------------------------------------------
    tuning: Tuning = Field(default_factory=Tuning, description="CPREC_TUNING__<NAME>.")

    @model_validator(mode="before")
    @classmethod
    def _moved_to_tuning(cls, data: Any) -> Any:
        """A knob given under its old flat name would be ignored: refuse it, naming the new one."""
        given = set(data) if isinstance(data, dict) else set()
        moved = [n for n in Tuning.model_fields if n in given or f"CPREC_{n.upper()}" in os.environ]
        if moved:
            raise ValueError(
                "tuning settings are read as CPREC_TUNING__<NAME> (tuning=... in code): rename "
                + ", ".join(f"CPREC_{n.upper()} to CPREC_TUNING__{n.upper()}" for n in moved)
            )
        return data

    @field_validator("admin_token")
    @classmethod
    def _token_strength(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() == "":
            return None
        if v is not None and len(v.get_secret_value()) < 8:
            raise ValueError("admin token must be at least 8 characters")
        return v

    @model_validator(mode="after")
    def _production_safety(self) -> Settings:
        if self.env == "production" and self.admin_token is not None:
            if self.admin_token.get_secret_value() in {"changeme", "change-me", "password"}:
                raise ValueError("refusing a default admin token in production")
        return self

    def check_store_model(self, version: str) -> None:
        """Refuse the base-model settings when a store model is served: its manifest fixes them,
        so that what was evaluated is what is served."""
        fixed = sorted(self.model_fields_set & {"max_length", "history_max_items"})
        if fixed:
            names = ", ".join(f"CPREC_{n.upper()}" for n in fixed)
            raise ValueError(
                f"{names} cannot take effect: the store model {version!r} fixes its own "
                f"(its manifest); unset {names}, or serve the base model with "
                "CPREC_MODEL=<a name not in the store>"
            )

    def worker_count(self) -> int:
        """``workers`` resolved: ``auto`` is one per usable CPU core, or one when the model
        runs on a GPU (one device, one process feeding it)."""
        if self.workers != "auto":
            return self.workers
        if self.device.startswith("cuda") or (self.device == "auto" and _cuda_available()):
            return 1
        return max(1, len(os.sched_getaffinity(0)))

    def redacted(self) -> dict[str, object]:
        """The resolved config for the start-up log; secrets and credentials hidden."""
        data = self.model_dump()
        data["admin_token"] = "***" if self.admin_token else None
        if self.redis_url and "@" in self.redis_url:
            scheme, rest = self.redis_url.split("://", 1)
            data["redis_url"] = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
