"""Toy data and tiny random models for the training tests (no weights downloaded, seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import testutil

from training.config import TrainConfig, load_config
from training.data import LoadedData
from training.dataset import Case, Dataset, Item, TrainSeq

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny-test.yaml"

# Each domain has 4 "taste" clusters; a title is cluster words + a serial word, so titles are
# unique and users who stay inside a cluster give a learnable signal.
FOOD = [
    ["coffee", "roast", "beans"],
    ["tea", "green", "leaf"],
    ["honey", "raw", "jar"],
    ["oat", "milk", "carton"],
]
KITCHEN = [
    ["pan", "steel", "skillet"],
    ["knife", "chef", "blade"],
    ["mug", "ceramic", "cup"],
    ["kettle", "electric", "boil"],
]
SERIAL = [f"n{i}" for i in range(40)]


def toy_items(per_cluster: int = 16) -> list[Item]:
    items: list[Item] = []
    for dom, clusters in (("Food", FOOD), ("Kitchen", KITCHEN)):
        for c, words in enumerate(clusters):
            for j in range(per_cluster):
                title = f"{words[j % 3]} {words[(j + 1) % 3]} {SERIAL[j]} c{c}"
                items.append(Item(len(items), dom, title))
    return items


def toy_data(n_users: int = 24, seed: int = 0, per_cluster: int = 16) -> LoadedData:
    """Mixed users (both domains) with a valid and a test case each, FK-LOO style."""
    rng = np.random.default_rng(seed)
    items = toy_items(per_cluster)
    by = {(it.domain, it.title.split()[-1]): [] for it in items}
    for it in items:
        by[(it.domain, it.title.split()[-1])].append(it.item_id)
    train, valid, test = [], [], []
    for u in range(n_users):
        c = f"c{u % 4}"
        pool = by[("Food", c)] + by[("Kitchen", c)]
        seq = [int(x) for x in rng.choice(pool, size=8, replace=False)]
        doms = [items[i].domain for i in seq]
        if len(set(doms[:-2])) < 2:  # make sure the training part is mixed
            seq[0] = by[("Food", c)][0] if doms[0] == "Kitchen" else by[("Kitchen", c)][0]
            if seq[0] in seq[1:]:
                continue
            doms = [items[i].domain for i in seq]
        uid = f"u{u}"
        train.append(TrainSeq(uid, seq[:-2], doms[:-2]))
        valid.append(Case(uid, seq[:-2], seq[-2], doms[-2]))
        test.append(Case(uid, seq[:-1], seq[-1], doms[-1]))
    data = Dataset(items=items, train=train, valid=valid, test=test, root=Path("."))
    return LoadedData(
        data,
        [str(it.item_id) for it in items],
        [""] * len(items),
        "toy",
        "toyhash",
        {"users": len(train)},
    )


def vocab_words() -> list[str]:
    words = {w for cl in FOOD + KITCHEN for w in cl} | set(SERIAL) | {f"c{i}" for i in range(4)}
    return sorted(words) + ["Food", "Kitchen", ":", ";"]


def build_tiny_llama(out: Path) -> Path:
    """2-layer random Llama (hidden 32) with a word-level tokenizer over the toy vocabulary."""
    return testutil.build_tiny_llama(out, vocab_words())


def build_tiny_bert(out: Path) -> Path:
    """2-layer random BERT (hidden 32) with the bundled MiniLM tokenizer."""
    from cprec.lm import bundled_dir

    return testutil.build_tiny_bert(out, bundled_dir("minilm-l6", out.parent))


def tiny_config(tmp: Path, base: Path, *overrides: str, **raw: Any) -> TrainConfig:
    cfg = load_config(
        TINY_CONFIG,
        [
            f"model.base={base}",
            f"output_dir={tmp / 'run'}",
            f"publish.store_dir={tmp / 'store'}",
            *overrides,
        ],
    )
    return cfg
