"""Training input: a validated catalogue + interactions format, and the FK-LOO adapter.

Input format (documented in docs/training.md)
---------------------------------------------
*Catalogue* — one row per item, columns:

====================  ========  ==========================================================
``item_id``           required  any non-empty string, unique
``domain``            required  non-empty (e.g. ``Food``)
``title``             required  non-empty after whitespace/control-character normalisation
``extra_text``        optional  appended to the item text (the service does the same)
====================  ========  ==========================================================

*Interactions* — one row per behaviour, columns ``user_id`` and ``item_id`` (required; the item
must be in the catalogue), ``domain`` (optional; must equal the catalogue's domain when given),
and ``timestamp`` and/or ``position`` (alias ``pos``; optional numbers). A user's sequence is
ordered by (timestamp, position, row order), a stable sort, so files without either column keep
their row order.

Files may be ``.tsv``, ``.csv``, ``.jsonl`` (each optionally ``.gz``) or ``.parquet`` (needs
``pandas`` + ``pyarrow``, not installed by default). TSV/CSV have a header and use CSV quoting.

Errors: every bad row is reported as ``file:line: reason``. Loading fails with a
:class:`DataError` listing them, unless ``skip_bad_rows`` is set, in which case the rows are
skipped and *counted* (``LoadedData.stats["bad_rows"]``) and the first few are logged. Nothing is
dropped silently.

Split for catalogue/interaction data (the FK-LOO rule): users with >= 3 behaviours give one
valid case (target = second-to-last item) and one test case (target = last item; history =
everything before it); their training sequence is everything before the valid target. Users with
fewer behaviours, or whose target already occurs earlier in their sequence, are training-only.

Everything is mapped onto :mod:`training.dataset`'s types (integer item ids ``0..n-1``) so one
evaluator serves every source; ``LoadedData.external_ids`` maps back to the source ids. The FK-LOO
files themselves are read by :mod:`training.fkloo`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cprec.text import Template, normalise_title
from training.config import DataConfig, shared_dir
from training.dataset import Case, Dataset, Item, TrainSeq
from training.fkloo import SHA256, load_fkloo

log = logging.getLogger(__name__)

MAX_REPORTED = 20


@dataclass(frozen=True, slots=True)
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class DataError(ValueError):
    """Invalid input; ``bad_rows`` holds every problem found (file:line: reason)."""

    def __init__(self, message: str, bad_rows: list[BadRow] | None = None) -> None:
        self.bad_rows = bad_rows or []
        shown = "\n".join(f"  {b}" for b in self.bad_rows[:MAX_REPORTED])
        more = len(self.bad_rows) - MAX_REPORTED
        if more > 0:
            shown += f"\n  ... and {more} more"
        hint = "\n(use --skip-bad-rows to skip and count them)" if self.bad_rows else ""
        super().__init__(f"{message}\n{shown}{hint}" if shown else message)


@dataclass
class LoadedData:
    """A dataset ready for corpus building, training and evaluation."""

    data: Dataset
    external_ids: list[str]
    extra_text: list[str]
    source: str
    data_hash: str
    stats: dict[str, Any] = field(default_factory=dict)

    def item_text(self, item_id: int, template: Template) -> str:
        """Exactly the text the service indexes: template item text, then extra text."""
        it = self.data.items[item_id]
        text = template.render_item(it.domain, it.title)
        extra = self.extra_text[item_id]
        return f"{text} {extra}" if extra else text


# -- low-level readers --------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115


def _format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for ext in ("tsv", "csv", "jsonl", "parquet"):
        if name.endswith("." + ext):
            return ext
    raise DataError(
        f"{path}: unknown file type; use .tsv, .csv, .jsonl (optionally .gz) or .parquet"
    )


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield ``(line, row, error)``; ``row`` is None when the line itself is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    fmt = _format(path)
    if fmt == "parquet":
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise DataError(f"{path}: reading Parquet needs `pip install pandas pyarrow`") from exc
        frame = pd.read_parquet(path)
        for n, rec in enumerate(frame.to_dict(orient="records"), start=2):  # "line" = row + header
            yield n, {k: (None if _isnan(v) else v) for k, v in rec.items()}, None
        return
    with _open_text(path) as fh:
        if fmt == "jsonl":
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, None, f"invalid JSON ({exc.msg})"
                    continue
                if not isinstance(rec, dict):
                    yield n, None, "a line must be a JSON object"
                    continue
                yield n, rec, None
        else:
            reader = csv.DictReader(fh, delimiter="\t" if fmt == "tsv" else ",")
            start = 2
            for rec in reader:
                line = start  # first physical line of this record
                start = reader.line_num + 1
                if None in rec:
                    yield (
                        line,
                        None,
                        f"more fields than the header ({len(reader.fieldnames or [])})",
                    )
                    continue
                if any(v is None for v in rec.values()):
                    yield line, None, "fewer fields than the header"
                    continue
                yield line, rec, None


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _text(v: Any) -> str:
    return "" if v is None else str(v).strip()


def _number(v: Any) -> float | None:
    s = _text(v)
    if s == "":
        return None
    x = float(s)  # ValueError for non-numbers, handled by the caller
    if math.isnan(x) or math.isinf(x):
        raise ValueError(s)
    return x


class _Problems:
    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.rows: list[BadRow] = []

    def add(self, file: Path, line: int, reason: str) -> None:
        self.rows.append(BadRow(str(file), line, reason))

    def finish(self, what: str) -> int:
        if self.rows and not self.skip:
            raise DataError(f"{len(self.rows)} bad row(s) in the {what}:", self.rows)
        for b in self.rows[:MAX_REPORTED]:
            log.warning("skipped bad row %s", b)
        if len(self.rows) > MAX_REPORTED:
            log.warning("... and %d more skipped bad rows", len(self.rows) - MAX_REPORTED)
        return len(self.rows)


# -- catalogue + interactions ---------------------------------------------------------------------


@dataclass
class Catalogue:
    items: list[Item]
    external_ids: list[str]
    extra_text: list[str]
    index: dict[str, int]
    bad_rows: int = 0


def read_catalogue(path: Path, skip_bad_rows: bool = False) -> Catalogue:
    probs = _Problems(skip_bad_rows)
    items: list[Item] = []
    ext: list[str] = []
    extra: list[str] = []
    index: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for line, rec, err in iter_rows(path):
        if rec is None:
            probs.add(path, line, err or "unreadable row")
            continue
        missing = [c for c in ("item_id", "domain", "title") if c not in rec]
        if missing:
            probs.add(path, line, f"missing column(s) {missing}")
            continue
        iid, dom = _text(rec["item_id"]), _text(rec["domain"])
        title = normalise_title(_text(rec["title"]))
        if not iid:
            probs.add(path, line, "empty item_id")
        elif not dom:
            probs.add(path, line, "empty domain")
        elif not title:
            probs.add(path, line, "empty title")
        elif iid in index:
            probs.add(path, line, f"duplicate item_id {iid!r} (first at line {first_line[iid]})")
        else:
            index[iid] = len(items)
            first_line[iid] = line
            items.append(Item(len(items), dom, title))
            ext.append(iid)
            extra.append(normalise_title(_text(rec.get("extra_text"))))
    bad = probs.finish(f"catalogue {path}")
    if not items:
        raise DataError(f"{path}: the catalogue has no valid item")
    return Catalogue(items, ext, extra, index, bad)


def read_interactions(
    path: Path, cat: Catalogue, skip_bad_rows: bool = False, max_users: int | None = None
) -> tuple[list[TrainSeq], int]:
    """Per-user chronological sequences (users in order of first appearance) and the bad count."""
    probs = _Problems(skip_bad_rows)
    per_user: dict[str, list[tuple[float, float, int, int]]] = {}
    for line, rec, err in iter_rows(path):
        if rec is None:
            probs.add(path, line, err or "unreadable row")
            continue
        missing = [c for c in ("user_id", "item_id") if c not in rec]
        if missing:
            probs.add(path, line, f"missing column(s) {missing}")
            continue
        uid, iid = _text(rec["user_id"]), _text(rec["item_id"])
        if not uid:
            probs.add(path, line, "empty user_id")
            continue
        idx = cat.index.get(iid)
        if idx is None:
            probs.add(path, line, f"item_id {iid!r} is not in the catalogue")
            continue
        dom = _text(rec.get("domain"))
        if dom and dom != cat.items[idx].domain:
            probs.add(
                path,
                line,
                f"domain {dom!r} differs from the catalogue's "
                f"{cat.items[idx].domain!r} for item {iid!r}",
            )
            continue
        try:
            ts = _number(rec.get("timestamp"))
            pos = _number(rec.get("position", rec.get("pos")))
        except ValueError:
            probs.add(path, line, "timestamp/position must be a number")
            continue
        per_user.setdefault(uid, []).append(
            (ts if ts is not None else 0.0, pos if pos is not None else 0.0, line, idx)
        )
    bad = probs.finish(f"interactions {path}")
    seqs: list[TrainSeq] = []
    for uid, rows in per_user.items():
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        ids = [r[3] for r in rows]
        seqs.append(TrainSeq(uid, ids, [cat.items[i].domain for i in ids]))
        if max_users is not None and len(seqs) >= max_users:
            break
    return seqs, bad


def leave_one_out(seqs: list[TrainSeq]) -> tuple[list[TrainSeq], list[Case], list[Case]]:
    """The FK-LOO rule applied to arbitrary sequences (see the module docstring)."""
    train: list[TrainSeq] = []
    valid: list[Case] = []
    test: list[Case] = []
    for s in seqs:
        ids = s.item_ids
        ok = len(ids) >= 3 and ids[-1] not in ids[:-1] and ids[-2] not in ids[:-2]
        if not ok:
            train.append(s)
            continue
        train.append(TrainSeq(s.user_id, ids[:-2], s.domains[:-2]))
        valid.append(Case(s.user_id, list(ids[:-2]), ids[-2], s.domains[-2]))
        test.append(Case(s.user_id, list(ids[:-1]), ids[-1], s.domains[-1]))
    return train, valid, test


def _hash_files(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                h.update(chunk)
    h.update(extra.encode())
    return h.hexdigest()[:16]


def load_files(
    catalog: Path,
    interactions: Path,
    skip_bad_rows: bool = False,
    max_users: int | None = None,
    source: str = "files",
) -> LoadedData:
    cat = read_catalogue(catalog, skip_bad_rows)
    seqs, bad = read_interactions(interactions, cat, skip_bad_rows, max_users)
    train, valid, test = leave_one_out(seqs)
    data = Dataset(items=cat.items, train=train, valid=valid, test=test, root=Path(catalog).parent)
    stats = {
        "items": len(cat.items),
        "users": len(seqs),
        "eval_users": len(test),
        "interactions": sum(len(s.item_ids) for s in seqs),
        "bad_rows": {"catalogue": cat.bad_rows, "interactions": bad},
    }
    return LoadedData(
        data,
        cat.external_ids,
        cat.extra_text,
        source,
        _hash_files([catalog, interactions], f"max_users={max_users}"),
        stats,
    )


def normalized_paths(name: str) -> tuple[Path, Path]:
    """``<shared>/data/<name>/normalized/{items,interactions}.tsv.gz``."""
    root = shared_dir() / "data" / name / "normalized"
    cat, inter = root / "items.tsv.gz", root / "interactions.tsv.gz"
    if not cat.is_file():
        raise DataError(f"{cat} not found; set CPREC_SHARED_DIR (now {shared_dir()})")
    return cat, inter


# -- FK-LOO ---------------------------------------------------------------------------------------


def restrict_to_subset(d: Dataset) -> tuple[Dataset, list[int]]:
    """Keep only the evaluation users' own training sequences and the items that occur in them
    (histories and targets), renumbered ``0..m-1``; returns the data and new id -> FK-LOO id.
    Ranking is then over the kept items of the domain only: a CPU smoke-test mode, not the
    benchmark protocol (its numbers are not comparable to full-ranking ones)."""
    users = {c.user_id for c in d.test} | {c.user_id for c in d.valid}
    train = [s for s in d.train if s.user_id in users]
    used: set[int] = set()
    for s in train:
        used.update(s.item_ids)
    for c in d.valid + d.test:
        used.update(c.history)
        used.add(c.target)
    old = sorted(used)
    new = {o: n for n, o in enumerate(old)}
    items = [Item(n, d.items[o].domain, d.items[o].title) for n, o in enumerate(old)]

    def cases(cs: list[Case]) -> list[Case]:
        return [Case(c.user_id, [new[i] for i in c.history], new[c.target], c.domain) for c in cs]

    train = [TrainSeq(s.user_id, [new[i] for i in s.item_ids], list(s.domains)) for s in train]
    return Dataset(
        items=items, train=train, valid=cases(d.valid), test=cases(d.test), root=d.root
    ), old


def load_fkloo_data(cfg: DataConfig) -> LoadedData:
    d = load_fkloo(cfg.fkloo_root, subset=cfg.subset, seed=cfg.seed)
    ext = [it.item_id for it in d.items]
    if cfg.restrict_items:
        d, ext = restrict_to_subset(d)
    h = hashlib.sha256(json.dumps(SHA256, sort_keys=True).encode())
    h.update(f"subset={cfg.subset},seed={cfg.seed},restrict={cfg.restrict_items}".encode())
    n_cand = sum(int(d.domain_items(x).size) for x in d.domains)
    stats = {
        "items": len(d.items),
        "candidates": n_cand,
        "train_users": len(d.train),
        "valid_cases": len(d.valid),
        "test_cases": len(d.test),
        "interactions": sum(len(s.item_ids) for s in d.train),
        "bad_rows": 0,
    }
    source = "fkloo-restricted" if cfg.restrict_items else "fkloo"
    return LoadedData(
        d, [str(i) for i in ext], [""] * len(d.items), source, h.hexdigest()[:16], stats
    )


def load_data(cfg: DataConfig) -> LoadedData:
    """The dataset a config names (see :class:`training.config.DataConfig`)."""
    if cfg.source == "fkloo":
        out = load_fkloo_data(cfg)
    elif cfg.source == "files":
        assert cfg.catalog is not None and cfg.interactions is not None
        out = load_files(cfg.catalog, cfg.interactions, cfg.skip_bad_rows, cfg.max_users)
    else:
        assert cfg.normalized is not None
        cat, inter = normalized_paths(cfg.normalized)
        out = load_files(
            cat, inter, cfg.skip_bad_rows, cfg.max_users, source=f"normalized:{cfg.normalized}"
        )
    log.info("data %s: %s", out.source, out.stats)
    return out
