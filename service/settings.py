"""Service settings: one env var per setting (prefix ``CPREC_``), each with its trade-off.

``REDIS_URL`` is read without the prefix because that is the name every platform injects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_CATALOG = Path(__file__).resolve().parent / "data" / "demo_catalog.jsonl"
CPU_MAX_PADDING = 0.25  # batch_max_padding=auto on CPU (bench/serve.py: split vs single)
CPU_MAX_FORWARD_TOKENS = 2048  # batch_max_forward_tokens=auto on CPU (see padding_groups)
CPU_COALESCE_MS = 50.0  # batch_coalesce_ms=auto on CPU (bench/serve.py, issue 5)


def _split_rule(v: float | str, cpu_default: float, device_type: str) -> float | None:
    """A batch-splitting setting: auto = ``cpu_default`` on CPU and off on a GPU (one padded
    forward per batch wins there); none = off; else the value given."""
    if v == "none":
        return None
    if v == "auto":
        return cpu_default if device_type == "cpu" else None
    return float(v)


class Settings(BaseSettings):
    """Resolved once at start and logged with secrets redacted."""

    # hide_input_in_errors: a refused value (e.g. a weak admin token) is never echoed into the
    # validation error that start-up prints.
    model_config = SettingsConfigDict(
        env_prefix="CPREC_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    env: Literal["development", "production"] = Field(
        default="development",
        description="production refuses unsafe settings (e.g. binding 0.0.0.0 without a token).",
    )
    host: str = Field(default="127.0.0.1", description="Bind address; loopback unless deployed.")
    port: int = Field(default=8000, ge=1, le=65535)
    store_dir: Path = Field(
        default=Path("var/store"),
        description="Model store root (versions, aliases, converted bases) and saved indexes.",
    )
    model: str = Field(
        default="production",
        description="Store alias/version to serve. If it does not exist, base_model is served.",
    )
    base_model: str = Field(
        default="minilm-l6",
        description="Fallback encoder: a bundled name (minilm-l6, smollm2-135m) or a local HF dir.",
    )
    zero_shot: Literal["mean", "text"] = Field(
        default="mean",
        description="How base_model is served when no trained model is. mean: a user is the "
        "recency-weighted mean of the history items' LM vectors (the target domain's items when "
        "it has some) and items get a popularity prior (cprec.hier.zero_shot_user / "
        "zero_shot_items); a history given by item_id needs no forward pass, and its kind of "
        "user ranks above text in the zero-shot rows of docs/benchmarks.md. text: the LM "
        "encodes the whole history text, one forward per new history (the flat model's way).",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field(
        default="auto",
        description="auto | float32 | bfloat16 | float16. auto = bf16 on CUDA and on CPUs with "
        "native bf16 (2x faster, cosine 0.9999 to fp32), else fp32.",
    )
    max_length: int = Field(
        default=256, ge=8, le=8192, description="Tokens per text (user or item)."
    )
    history_max_items: int = Field(
        default=20, ge=1, le=1000, description="Most recent history items written into user text."
    )
    catalog_path: Path = Field(
        default=DEMO_CATALOG,
        description="Catalogue (JSONL) indexed at first start when no saved index exists.",
    )
    # Reliability/security (issue 4): the only server-side files a client may name are inside
    # this directory; unset = the reindex "path" option is off (uploads and inline items work).
    catalog_dir: Path | None = Field(
        default=None,
        description="Directory admin reindex requests may read catalogues from by relative path "
        '({"path": "x.jsonl"}); ".." and absolute paths, and symlinks leaving it, are refused.',
    )
    # batching
    batching: bool = Field(
        default=True, description="Coalesce concurrent encodes into one forward."
    )
    max_batch_size: int = Field(default=32, ge=1, le=1024)
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
        "0: off (max_wait_ms instead). auto = 50 on CPU (a cohort of 32 clients needs tens of ms "
        "of event-loop work to come back; bench/serve.py), 0 on a GPU (no core contention there).",
    )
    batch_coalesce_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="With coalescing on, the window is at least this share of the last batch's "
        "device time: clients come back after their searches and responses (tens of ms over a "
        "36k-item catalogue), and one that misses the window waits a whole batch more. A client "
        "that left costs one window, once (bench/serve.py --full, issue 5).",
    )
    batch_token_budget: int = Field(
        default=16384, ge=64, description="Max padded tokens (batch x longest) per forward pass."
    )
    queue_size: int = Field(default=256, ge=1, description="Pending encodes before 429.")
    batch_max_padding: float | Literal["auto", "none"] = Field(
        default="auto",
        description="Padded tokens allowed per forward, as a fraction of the real tokens; a "
        "coalesced batch is then length-sorted and split into forwards that respect it. "
        "none = one padded forward per batch. auto = 0.25 on CPU (cost per token is flat in "
        "batch size there, so padding is pure waste: bench/serve.py measured split forwards "
        "ahead of one padded forward at concurrency 32), none on a GPU (bigger batches win).",
    )

    batch_max_forward_tokens: Annotated[int, Field(ge=1)] | Literal["auto", "none"] = Field(
        default="auto",
        description="Where batches are split (batch_max_padding set), also cut a forward "
        "before rows x width passes this. auto = 2048 on CPU (a forward of many long rows "
        "outgrows the caches, so its cost per row grows and a batch's time follows how many "
        "long histories its cohort holds; see padding_groups), none on a GPU.",
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

    def resolved_coalesce_ms(self, device_type: str) -> float:
        """``batch_coalesce_ms`` for the device the encoder runs on."""
        v = self.batch_coalesce_ms
        if v == "auto":
            return CPU_COALESCE_MS if device_type == "cpu" else 0.0
        return float(v)

    def resolved_search_parallel_calls(self) -> int:
        """``search_parallel_calls`` with auto = the CPUs available to this process."""
        v = self.search_parallel_calls
        return max(1, len(os.sched_getaffinity(0))) if v == "auto" else int(v)

    def resolved_max_padding(self, device_type: str) -> float | None:
        """``batch_max_padding`` for the device the encoder runs on."""
        return _split_rule(self.batch_max_padding, CPU_MAX_PADDING, device_type)

    def resolved_max_forward_tokens(self, device_type: str) -> int | None:
        """``batch_max_forward_tokens`` for the device the encoder runs on."""
        v = _split_rule(self.batch_max_forward_tokens, CPU_MAX_FORWARD_TOKENS, device_type)
        return None if v is None else int(v)

    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="int8 = dynamic per-channel int8 Linear layers (CPU only). Off by default: "
        "it scales activations per batch, so a user's vector (and the cached one) depends on "
        "who shared its batch; its FK-LOO NDCG@10 and speed are in docs/benchmarks.md.",
    )
    # cache
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "CPREC_REDIS_URL"),
        description="Redis for user vectors; unset = in-process LRU.",
    )
    redis_prefix: str = Field(default="cprec", description="Key prefix; keys we own only.")
    redis_timeout_s: float = Field(default=0.05, gt=0, le=10, description="Socket timeout.")
    redis_retry_s: float = Field(
        default=2.0, ge=0, description="After a Redis failure, skip it this long, then retry."
    )
    cache_ttl_s: int = Field(default=3600, ge=1, description="User-vector TTL.")
    lru_size: int = Field(default=10000, ge=0, description="In-process cache entries (no Redis).")
    result_cache_size: int = Field(
        default=10000,
        ge=0,
        description="Ranked lists of recent requests kept in process, per index snapshot: an "
        "identical request is answered without Redis or a search (emptied by a reindex swap). "
        "0 = off.",
    )
    # index
    index_kind: Literal["flat", "hnsw"] = Field(
        default="flat", description="flat = exact; hnsw = approximate for large catalogues."
    )
    hnsw_m: int = Field(default=32, ge=4, le=128)
    hnsw_ef_search: int = Field(default=128, ge=8, le=4096)
    faiss_gpu: bool = Field(default=True, description="Move indexes to the GPU when possible.")
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
        "parallel, one thread each. Right after a batch its clients' searches are all the "
        "next batch waits for. auto = the CPUs this process may use (perf, issue 5).",
    )
    embed_batch_size: int = Field(default=64, ge=1, le=4096, description="Reindex batch size.")
    # request limits
    max_k: int = Field(default=200, ge=1, le=10000)
    max_history: int = Field(default=500, ge=1, description="History entries per request.")
    max_title_chars: int = Field(default=1000, ge=1)
    max_target_domains: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="JSON body limit.")
    max_upload_bytes: int = Field(default=64 << 20, ge=1024, description="Catalogue upload limit.")
    max_upload_rows: int = Field(default=2_000_000, ge=1)
    # admin
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for admin endpoints; unset = admin endpoints off."
    )
    cors_origins: list[str] = Field(default_factory=list, description="Empty = CORS off.")
    log_level: str = Field(default="INFO")
    access_log: bool = Field(
        default=True,
        description="uvicorn's line per request (at INFO). Off, the event loop skips that work "
        "on every request; /metrics counts requests by route and status either way.",
    )

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

    def redacted(self) -> dict[str, object]:
        """The resolved config for the start-up log; secrets and credentials hidden."""
        data = self.model_dump()
        data["admin_token"] = "***" if self.admin_token else None
        if self.redis_url and "@" in self.redis_url:
            scheme, rest = self.redis_url.split("://", 1)
            data["redis_url"] = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
