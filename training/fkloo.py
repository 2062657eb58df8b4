"""Reader for the FK-LOO split (Amazon 2014 Food/Kitchen, leave-one-out), the quality benchmark.

The protocol lives in ``<shared>/benchmarks/fk_loo/README.md``: mixed users give one valid and one
test case each (target = second-to-last / last item), single-domain users are training-only.
The files are read in place from the shared folder (research-use terms: never copied into the repo)
and checked against the README's sha256 values, so a changed file cannot silently change a result.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# sha256 of the protocol files, from the FK-LOO README (the split is byte-identical on rebuild).
SHA256: dict[str, str] = {
    "train.tsv.gz": "e75f09cf6b8715d102b692a7f9b7be305572d8afcc00c4124d3674956541cd1a",
    "valid.tsv.gz": "94698273d42f9cc335bb3bcabbc19a2a8f6a4d780923df3272ab0dbd59cdb711",
    "test.tsv.gz": "2bb6e0966af23be9db8a961018c935efa3bd87589fef108512aac9ed30df74b4",
    "items.tsv.gz": "fe4410e407de6f2a311d6d71a16031fdbdbaa8200cb8576026fbd8ad3e0f6676",
}
FKLOO_RELPATH = Path("benchmarks") / "fk_loo"
REPO_ROOT = Path(__file__).resolve().parent.parent


class FKLOOError(RuntimeError):
    """The FK-LOO files are missing or not the ones the protocol describes."""


@dataclass(frozen=True)
class FKItem:
    item_id: int
    domain: str
    title: str


@dataclass(frozen=True)
class TrainSeq:
    """One training sequence, chronological; ``domains`` is aligned with ``item_ids``."""

    user_id: str
    item_ids: list[int]
    domains: list[str]


@dataclass(frozen=True)
class Case:
    """One evaluation case: rank all items of ``domain`` (minus ``history``) for ``target``."""

    user_id: str
    history: list[int]
    target: int
    domain: str


@dataclass
class FKLOO:
    items: list[FKItem]  # index == item_id
    train: list[TrainSeq]
    valid: list[Case]
    test: list[Case]
    root: Path
    _domain_cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def domains(self) -> list[str]:
        return sorted({it.domain for it in self.items})

    def domain_items(self, domain: str) -> np.ndarray:
        """Item ids of ``domain``, ascending (int64)."""
        if domain not in self._domain_cache:
            ids = np.array([it.item_id for it in self.items if it.domain == domain], dtype=np.int64)
            if ids.size == 0:
                raise KeyError(f"no items of domain {domain!r}; domains: {self.domains}")
            self._domain_cache[domain] = ids
        return self._domain_cache[domain]


def shared_dir() -> Path:
    """The shared data folder: ``$CPREC_SHARED_DIR``, else ``../shared`` beside the repo."""
    env = os.environ.get("CPREC_SHARED_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT.parent / "shared").resolve()


def fkloo_dir() -> Path:
    return shared_dir() / FKLOO_RELPATH


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(root: Path) -> None:
    """Raise FKLOOError when a protocol file is missing or its sha256 differs from the README."""
    for name, want in SHA256.items():
        path = root / name
        if not path.is_file():
            raise FKLOOError(
                f"FK-LOO file {path} not found; set CPREC_SHARED_DIR to the folder holding "
                f"{FKLOO_RELPATH}/ (currently {shared_dir()})"
            )
        got = _sha256(path)
        if got != want:
            raise FKLOOError(
                f"{path}: sha256 {got} != {want} from the FK-LOO README; the file is not the "
                "published split (rebuild it with build_fk_loo.py or fix CPREC_SHARED_DIR)"
            )


def _rows(path: Path) -> list[dict[str, str]]:
    # items.tsv.gz uses CSV quoting for titles with quotes/newlines: default dialect, tab delimiter.
    with gzip.open(path, "rb") as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        return list(csv.DictReader(text, delimiter="\t"))


def _ids(s: str) -> list[int]:
    return [int(x) for x in s.split(",")] if s else []


def _read_items(path: Path) -> list[FKItem]:
    items = [FKItem(int(r["item_id"]), r["domain"], r["title"]) for r in _rows(path)]
    for i, it in enumerate(items):
        if it.item_id != i:
            raise FKLOOError(
                f"{path}: row {i} has item_id {it.item_id}; ids must be 0..n-1 in order"
            )
    return items


def _read_cases(path: Path) -> list[Case]:
    return [
        Case(
            r["user_id"], _ids(r["history_item_ids"]), int(r["target_item_id"]), r["target_domain"]
        )
        for r in _rows(path)
    ]


def _read_train(path: Path) -> list[TrainSeq]:
    out = []
    for r in _rows(path):
        ids, doms = _ids(r["item_ids"]), r["domains"].split(",") if r["domains"] else []
        if len(ids) != len(doms):
            raise FKLOOError(
                f"{path}: user {r['user_id']} has {len(ids)} ids but {len(doms)} domains"
            )
        out.append(TrainSeq(r["user_id"], ids, doms))
    return out


def subset_users(cases: list[Case], n: int, seed: int = 0) -> set[str]:
    """A deterministic sample of ``n`` user ids (the same for valid and test: same mixed users)."""
    users = sorted(c.user_id for c in cases)
    if n >= len(users):
        return set(users)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(users), size=n, replace=False)
    return {users[i] for i in pick}


def load_fkloo(
    root: Path | None = None, subset: int | None = None, seed: int = 0, check_sha: bool = True
) -> FKLOO:
    """Load the split. ``subset`` keeps ``subset`` mixed users in valid and test (train unchanged,
    file order kept) for CPU budget runs; the sample depends only on ``seed``."""
    root = Path(root) if root is not None else fkloo_dir()
    if check_sha:
        verify(root)
    items = _read_items(root / "items.tsv.gz")
    train = _read_train(root / "train.tsv.gz")
    valid = _read_cases(root / "valid.tsv.gz")
    test = _read_cases(root / "test.tsv.gz")
    if subset is not None:
        keep = subset_users(test, subset, seed)
        valid = [c for c in valid if c.user_id in keep]
        test = [c for c in test if c.user_id in keep]
    return FKLOO(items=items, train=train, valid=valid, test=test, root=root)
