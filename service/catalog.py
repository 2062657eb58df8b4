"""The catalogue: its item type, and parsing JSONL or CSV as data only, with file:line errors and
no silent drops."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from service.errors import Forbidden, PayloadTooLarge, ValidationFailed
from service.protocol import CatalogItem


@dataclass(frozen=True, slots=True)
class Item:
    """One catalogue item; ``popularity`` orders cold-start answers and the zero-shot prior."""

    item_id: str
    domain: str
    title: str
    extra_text: str | None = None
    popularity: float = 0.0

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {
            "item_id": self.item_id,
            "domain": self.domain,
            "title": self.title,
            "popularity": self.popularity,
        }
        if self.extra_text:
            d["extra_text"] = self.extra_text
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Item:
        extra = d.get("extra_text")
        return cls(
            str(d["item_id"]),
            str(d["domain"]),
            str(d["title"]),
            str(extra) if extra else None,
            float(d.get("popularity", 0.0)),  # type: ignore[arg-type]
        )


def _bad(source: str, line: int, reason: str) -> ValidationFailed:
    # "field" as in every other 4xx envelope: items[i] for inline items, else the file's line.
    field = f"items[{line - 1}]" if source == "items" else f"{source}:{line}"
    return ValidationFailed(
        f"{source}:{line}: {reason}",
        details={"field": field, "source": source, "line": line, "reason": reason},
    )


def _item(source: str, line: int, raw: object) -> Item:
    if not isinstance(raw, dict):
        raise _bad(source, line, "a row must be an object with item_id, domain and title")
    try:
        c = CatalogItem.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "row"
        raise _bad(source, line, f"{field}: {err['msg']}") from None
    return Item(c.item_id, c.domain, c.title, c.extra_text, c.popularity)


def check_unique(items: Iterable[Item], source: str = "items") -> None:
    seen: dict[str, int] = {}
    for n, it in enumerate(items, start=1):
        if it.item_id in seen:
            raise _bad(source, n, f"duplicate item_id {it.item_id!r} (first at {seen[it.item_id]})")
        seen[it.item_id] = n


def parse_catalog(
    data: bytes, fmt: str, source: str = "upload", max_rows: int = 2_000_000
) -> list[Item]:
    """Parse an uploaded catalogue. ``fmt`` is ``jsonl`` or ``csv`` (header: item_id, domain,
    title[, extra_text][, popularity]). Raises ValidationFailed naming the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _bad(source, line, "invalid UTF-8") from None
    items: list[Item] = []
    if fmt == "jsonl":
        # split on "\n" only: str.splitlines would also cut at U+2028/U+0085 inside a title.
        for n, row_text in enumerate(text.split("\n"), start=1):
            if not row_text.strip():
                continue
            try:
                raw = json.loads(row_text)
            except json.JSONDecodeError as exc:
                raise _bad(source, n, f"invalid JSON ({exc.msg})") from None
            items.append(_item(source, n, raw))
            if len(items) > max_rows:
                raise PayloadTooLarge(f"catalogue has more than {max_rows} rows (max_upload_rows)")
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"item_id", "domain", "title"} - set(reader.fieldnames or [])
        if missing:
            raise _bad(source, 1, f"CSV header lacks {sorted(missing)}")
        for row in reader:
            n = reader.line_num
            if None in row:
                raise _bad(source, n, "more fields than the header")
            clean = {k: v for k, v in row.items() if v not in (None, "") or k == "title"}
            items.append(_item(source, n, clean))
            if len(items) > max_rows:
                raise PayloadTooLarge(f"catalogue has more than {max_rows} rows (max_upload_rows)")
    else:
        raise ValidationFailed(
            f"unknown catalogue format {fmt!r}; use jsonl or csv", details={"field": "format"}
        )
    if not items:
        raise _bad(source, 1, "catalogue is empty")
    check_unique(items, source)
    return items


def resolve_catalog_path(base: Path | None, rel: str, max_bytes: int) -> Path:
    """A client-named catalogue file, only if it lies inside ``base`` (``CPREC_CATALOG_DIR``).

    Refused: the option when no directory is configured (403), absolute paths, ``..`` parts, and
    anything whose real path (symlinks followed) leaves ``base`` (422); missing files (422);
    files over ``max_bytes`` (413). The error never echoes the resolved server path.
    """
    if base is None:
        raise Forbidden(
            "reading catalogues by path is disabled: set CPREC_CATALOG_DIR to a "
            "directory to allow it",
            details={"field": "path"},
        )

    def bad(reason: str) -> ValidationFailed:
        return ValidationFailed(f"path: {reason}", details={"field": "path", "reason": reason})

    if "\x00" in rel:
        raise bad("contains a NUL byte")
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")):
        raise bad("must be relative to CPREC_CATALOG_DIR, not absolute")
    if ".." in p.parts or ".." in rel.replace("\\", "/").split("/"):
        raise bad("must not contain '..'")
    try:
        root = Path(base).resolve()
        target = (root / p).resolve()
        if not target.is_relative_to(root):
            raise bad("resolves outside CPREC_CATALOG_DIR (symlink)")
        if not target.is_file():
            raise bad("no such catalogue file in CPREC_CATALOG_DIR")
        size = target.stat().st_size
    except OSError as exc:  # e.g. a name too long, a symlink loop: the client's mistake
        raise bad(f"cannot be opened ({exc.strerror or type(exc).__name__})") from None
    if size > max_bytes:
        raise PayloadTooLarge(
            f"path: file exceeds {max_bytes} bytes (max_upload_bytes)",
            details={"field": "path", "limit": max_bytes},
        )
    return target


def load_catalog_file(path: Path) -> list[Item]:
    fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    return parse_catalog(path.read_bytes(), fmt, source=str(path))
