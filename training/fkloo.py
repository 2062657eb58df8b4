"""Reader for the FK-LOO split (Amazon 2014 Food/Kitchen, leave-one-out), the quality benchmark,
into ``training.dataset``'s types.

The protocol lives in ``<shared>/benchmarks/fk_loo/README.md``: mixed users give one valid and one
test case each (target = second-to-last / last item), single-domain users are training-only.
The files are read in place from the shared folder (research-use terms: never copied into the repo)
and checked against the README's sha256 values, so a changed file cannot silently change a result.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np

from model_store import sha256_file
from training.config import shared_dir
from training.dataset import Case, Dataset, Item, TrainSeq

# sha256 of the protocol files, from the FK-LOO README (the split is byte-identical on rebuild).
SHA256: dict[str, str] = {
    "train.tsv.gz": "e75f09cf6b8715d102b692a7f9b7be305572d8afcc00c4124d3674956541cd1a",
    "valid.tsv.gz": "94698273d42f9cc335bb3bcabbc19a2a8f6a4d780923df3272ab0dbd59cdb711",
    "test.tsv.gz": "2bb6e0966af23be9db8a961018c935efa3bd87589fef108512aac9ed30df74b4",
    "items.tsv.gz": "fe4410e407de6f2a311d6d71a16031fdbdbaa8200cb8576026fbd8ad3e0f6676",
}
FKLOO_RELPATH = Path("benchmarks") / "fk_loo"


class FKLOOError(RuntimeError):
    """The FK-LOO files are missing or not the ones the protocol describes."""


def fkloo_dir() -> Path:
    return shared_dir() / FKLOO_RELPATH


def verify(root: Path) -> None:
    """Raise FKLOOError when a protocol file is missing or its sha256 differs from the README."""
    for name, want in SHA256.items():
        path = root / name
        if not path.is_file():
            raise FKLOOError(
                f"FK-LOO file {path} not found; set CPREC_SHARED_DIR to the folder holding "
                f"{FKLOO_RELPATH}/ (currently {shared_dir()})"
            )
        got = sha256_file(path)
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


def _read_items(path: Path) -> list[Item]:
    items = [Item(int(r["item_id"]), r["domain"], r["title"]) for r in _rows(path)]
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
) -> Dataset:
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
    return Dataset(items=items, train=train, valid=valid, test=test, root=root)
