"""The one behaviour-text template (CPRec's unified prompt) used by training and serving.

A behaviour is (domain, title). Items are rendered as ``"<domain>: <title>"`` so the domain is
visible to the LM; a user history is the last ``max_items`` behaviours, oldest first, joined by
``separator``. The template travels inside every model artifact's manifest, so a model trained
with one template is served with the same one.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field


@dataclass(frozen=True, slots=True)
class Behaviour:
    """One interaction written as text: the item's domain and title."""

    domain: str
    title: str


def normalise_title(title: str) -> str:
    """NFC, control characters removed, whitespace collapsed: equal titles give equal text.

    Runs for every history entry of every request on the event loop: ``str.isprintable`` (false
    for any category C character) skips the per-character pass for the usual clean title (the
    fast path is tested against the definition).
    """
    if not unicodedata.is_normalized("NFC", title):
        title = unicodedata.normalize("NFC", title)
    if not title.isprintable():
        title = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in title)
    return " ".join(title.split())


class Template(BaseModel):
    """How behaviours become text; stored in artifact manifests. Defaults: CPRec-style prompt."""

    item_format: str = Field(
        default="{domain}: {title}",
        description="Format of one behaviour; must contain {domain} and {title}.",
    )
    separator: str = Field(default="; ", description="Joins behaviours of one history.")
    history_prefix: str = Field(
        default="",
        description="Text put before a history (e.g. an instruction for an instruct LLM).",
    )
    max_items: int = Field(default=20, ge=1, le=1000, description="Most recent behaviours kept.")

    def render_item(self, domain: str, title: str) -> str:
        """Text of one item, as encoded into the item index (and as one step of a history)."""
        return self.item_format.format(domain=domain, title=normalise_title(title))

    def render_history(self, behaviours: Sequence[Behaviour], max_items: int | None = None) -> str:
        """Text of a user history: the most recent ``max_items`` behaviours, oldest first."""
        n = self.max_items if max_items is None else max_items
        recent = behaviours[-n:] if n > 0 else []
        body = self.separator.join(self.render_item(b.domain, b.title) for b in recent)
        return f"{self.history_prefix}{body}"

    def render_sequence(self, behaviours: Iterable[Behaviour]) -> str:
        """A whole behaviour sequence for the pre-training corpus (no truncation)."""
        body = self.separator.join(self.render_item(b.domain, b.title) for b in behaviours)
        return f"{self.history_prefix}{body}"

    def fingerprint(self) -> str:
        """Short stable hash; part of cache keys so a template change never reuses old vectors."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


DEFAULT_TEMPLATE = Template()
