"""Request models and the error envelope of the API (pydantic); limits come from settings at
runtime. The engine takes these requests as they are: they validate a library call too."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class TitleEntry(_Strict):
    """A history entry given as text: any title, known to the catalogue or not."""

    title: str = Field(min_length=1, description="Item title as the user saw it.")
    domain: str = Field(min_length=1, description="Domain of the item, e.g. Groceries.")


class IdEntry(_Strict):
    """A history entry given as a catalogue id; resolved to its title and domain."""

    item_id: str = Field(min_length=1)


class RecommendRequest(_Strict):
    user_id: str | None = Field(default=None, max_length=256, description="Optional, for logs.")
    history: list[TitleEntry | IdEntry] = Field(
        default_factory=list, description="Interactions, oldest first; mixed domains allowed."
    )
    target_domains: list[str] | None = Field(
        default=None, description="Domains to recommend in; default: every domain."
    )
    k: int = Field(default=10, ge=1, description="Items per target domain, at most max_k (200).")
    exclude_history: bool = Field(default=True, description="Never recommend a history item.")

    @model_validator(mode="after")
    def _unique_domains(self) -> RecommendRequest:
        if self.target_domains is not None:
            if len(self.target_domains) == 0:
                raise ValueError("target_domains must be omitted or non-empty")
            if len(set(self.target_domains)) != len(self.target_domains):
                raise ValueError("target_domains contains duplicates")
        return self


class CatalogItem(_Strict):
    item_id: str = Field(min_length=1, max_length=256)
    domain: str = Field(min_length=1, max_length=128)
    title: str = Field(min_length=1)
    extra_text: str | None = Field(default=None, description="Optional extra item text.")
    popularity: float = Field(default=0.0, ge=0, description="For cold-start answers.")


class ReindexRequest(_Strict):
    mode: Literal["full", "upsert", "delete"] = "full"
    items: list[CatalogItem] | None = Field(default=None, description="For full and upsert.")
    item_ids: list[str] | None = Field(default=None, description="For delete.")
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="For full and upsert instead of items: a JSONL/CSV file relative to the "
        "server's CPREC_CATALOG_DIR (off unless configured).",
    )

    @model_validator(mode="after")
    def _payload_matches_mode(self) -> ReindexRequest:
        if self.mode == "delete":
            if not self.item_ids:
                raise ValueError("mode 'delete' needs a non-empty item_ids list")
        elif self.items and self.path is not None:
            raise ValueError("give either items or path, not both")
        elif not self.items and self.path is None:
            raise ValueError(f"mode {self.mode!r} needs a non-empty items list (or a path)")
        return self


class ReloadRequest(_Strict):
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="A store alias or version to serve; default: CPREC_MODEL (e.g. production).",
    )


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. validation_error.")
    message: str = Field(description="What went wrong and, where possible, how to fix it.")
    details: Any = Field(default=None, description="The field(s) and reason(s), limits, ids.")


class ErrorEnvelope(BaseModel):
    """Every non-2xx response: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorBody


# Declared on every route so the OpenAPI schema describes the responses clients really get (and
# a schema fuzz can check them); replaces FastAPI's default 422 body, which this API never sends.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": why}
    for status, why in (
        (401, "Missing bearer token (admin routes)."),
        (403, "Wrong token, or admin routes disabled (no CPREC_ADMIN_TOKEN)."),
        (404, "Unknown job, model version or route."),
        (409, "Another reindex or model job is queued or running, or nothing to roll back."),
        (413, "A size limit was exceeded; the message names the setting."),
        (422, "Invalid input; details name the field and the reason."),
        (429, "The encoder queue is full; retry after Retry-After seconds."),
        (503, "Loading or draining."),
    )
}
