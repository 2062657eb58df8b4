"""The data types every dataset is read into, whatever its source.

Readers: ``training/fkloo.py`` (the FK-LOO benchmark files, sha256-checked), ``training/data.py``
(catalogue + interactions files, a ``<shared>/data/<name>/normalized/`` folder, and the FK-LOO
adapter the flat pipeline reads through) and ``training/hier.py`` (``toy_target``: a generated set
for smoke runs). Item ids are ``0..n-1`` (an item's id is its index in ``Dataset.items``), so one
evaluator (``training/evaluate.py``) and one trainer serve every source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Item:
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
class Dataset:
    """Items, training sequences and the valid/test cases of one dataset."""

    items: list[Item]  # index == item_id
    train: list[TrainSeq]
    valid: list[Case]
    test: list[Case]
    root: Path | None = None  # the folder it was read from (None: generated)
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
