"""Pictures of the quality results: ``python -m bench.plots``.

NDCG@10 of ``cprec``, SASRec and popularity on FK-LOO test, split three ways: by history length,
by whether the target's domain differs from the last history item's (a domain switch), and by how
often the target occurs in the training sequences (0 = a cold target); and the training curves of
the headline run (``cprec``). Everything comes from what ``bench/quality.py`` stored: the ranked
lists ``bench/results/fk_loo/<system>.test.jsonl.gz`` (scored here per case, nothing is re-ranked)
and the run's log, so a redraw takes seconds. Writes ``docs/img/*.png`` and the ``plots`` section
of ``docs/benchmarks.md``; ``bench/quality.py`` calls it at the end of every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.dataset import Case, Item, TrainSeq

log = logging.getLogger("bench.plots")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LISTS = RESULTS / "fk_loo"
QUALITY_JSON = RESULTS / "quality.json"
DOCS = REPO / "docs" / "benchmarks.md"
IMG = REPO / "docs" / "img"
# The headline run's log, kept beside its lists: var/runs/ is scratch space, results are kept.
HEADLINE = "cprec"
HEADLINE_LOG = LISTS / f"{HEADLINE}.log.csv"

SYSTEMS = {"cprec": "cprec (hier)", "sasrec": "SASRec", "pop": "Popularity"}
Bucket = tuple[int, int | None]  # inclusive bounds; None = no upper bound
HISTORY_BUCKETS: tuple[Bucket, ...] = ((1, 5), (6, 10), (11, 20), (21, 40), (41, None))
SEEN_BUCKETS: tuple[Bucket, ...] = ((0, 0), (1, 4), (5, 19), (20, 99), (100, None))
SAME, SWITCH = "same domain", "domain switch"


@dataclass(frozen=True)
class Split:
    """One way to split the cases: a label per case, and the labels' display order."""

    name: str
    title: str
    labels: list[str]  # [n_cases]
    order: list[str]


# -- per case ----------------------------------------------------------------------------------
def ndcg_at_10(ranked: Sequence[int], target: int) -> float:
    """1/log2(rank + 1) when the target is in the first 10, else 0 (``training.evaluate``)."""
    for r, item in enumerate(ranked[:10], start=1):
        if item == target:
            return 1.0 / math.log2(r + 1)
    return 0.0


def bucket_label(bucket: Bucket) -> str:
    lo, hi = bucket
    if hi is None:
        return f"{lo}+"
    return str(lo) if lo == hi else f"{lo}-{hi}"


def bucket_of(n: int, buckets: Sequence[Bucket]) -> str:
    for b in buckets:
        if n >= b[0] and (b[1] is None or n <= b[1]):
            return bucket_label(b)
    raise ValueError(f"{n} is in none of {buckets}")


def cold(label: str) -> str:
    return "0 (cold)" if label == "0" else label


def splits(cases: Sequence[Case], items: Sequence[Item], train: Sequence[TrainSeq]) -> list[Split]:
    """History length, domain switch, and target seen-in-training count, per case."""
    seen = Counter(i for s in train for i in s.item_ids)
    switch = [
        SWITCH if c.history and items[c.history[-1]].domain != c.domain else SAME for c in cases
    ]
    return [
        Split(
            "history",
            "NDCG@10 by history length (items)",
            [bucket_of(len(c.history), HISTORY_BUCKETS) for c in cases],
            [bucket_label(b) for b in HISTORY_BUCKETS],
        ),
        Split(
            "switch",
            "NDCG@10 by the last history item's domain vs the target's",
            switch,
            [SAME, SWITCH],
        ),
        Split(
            "seen",
            "NDCG@10 by the target's occurrences in training (0 = cold)",
            [cold(bucket_of(seen.get(c.target, 0), SEEN_BUCKETS)) for c in cases],
            [cold(bucket_label(b)) for b in SEEN_BUCKETS],
        ),
    ]


def ndcg_by_label(
    cases: Sequence[Case], ranked: Sequence[Sequence[int]], labels: Sequence[str]
) -> dict[str, tuple[float, int]]:
    """label -> (mean NDCG@10, number of cases) over the cases that carry it."""
    sums: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for c, lst, label in zip(cases, ranked, labels, strict=True):
        sums[label] = sums.get(label, 0.0) + ndcg_at_10(lst, c.target)
        counts[label] += 1
    return {k: (sums[k] / counts[k], counts[k]) for k in sums}


# -- inputs ------------------------------------------------------------------------------------
def load_lists(cases: Sequence[Case], systems: Sequence[str]) -> dict[str, list[list[int]]]:
    """Each system's stored full-test lists, in case order; a system without a file covering
    every case is left out (logged), not half-plotted."""
    from training.evaluate import read_topk_jsonl

    out = {}
    for s in systems:
        path = LISTS / f"{s}.test.jsonl.gz"
        if not path.is_file():
            log.warning("%s: no list file %s", s, path.relative_to(REPO))
            continue
        by_user = read_topk_jsonl(path)
        missing = sum(c.user_id not in by_user for c in cases)
        if missing:
            log.warning("%s: %s misses %d test cases", s, path.name, missing)
            continue
        out[s] = [by_user[c.user_id] for c in cases]
    return out


def keep_headline_log(quality: dict[str, Any]) -> Path | None:
    """Copy the headline run's ``log.csv`` (written under the config's ``output_dir``, beside
    the curves its row names) next to its lists, so the curves can be redrawn later."""
    row = quality.get("runs", {}).get("full", {}).get("rows", {}).get(HEADLINE, {})
    if row.get("curves"):
        src = Path(row["curves"]).with_name("log.csv")
        src = src if src.is_absolute() else REPO / src
        if src.is_file():
            HEADLINE_LOG.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, HEADLINE_LOG)
    return HEADLINE_LOG if HEADLINE_LOG.is_file() else None


def read_log(path: Path) -> dict[str, list[dict[str, Any]]]:
    """``log.csv`` of a hier run (a ``stage`` column, then ``training.loop`` rows) -> rows per
    stage, numbers parsed, blanks and rows without a step dropped."""
    stages: dict[str, list[dict[str, Any]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k == "stage" or v in (None, ""):
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    row[k] = v
            if isinstance(row.get("step"), float):  # plot_curves places every row by its step
                stages.setdefault(raw.get("stage") or "train", []).append(row)
    return stages


# -- pictures ----------------------------------------------------------------------------------
def bar_chart(split: Split, results: dict[str, dict[str, tuple[float, int]]], path: Path) -> None:
    """Grouped bars: one group per label (its case count under it), one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [g for g in split.order if any(g in r for r in results.values())]
    n_of = {g: next(r[g][1] for r in results.values() if g in r) for g in order}
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(order) + 2), 3.4))
    for k, (system, res) in enumerate(results.items()):
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(order))]
        ax.bar(xs, [res.get(g, (0.0, 0))[0] for g in order], width, label=SYSTEMS[system])
    ax.set_xticks(range(len(order)), [f"{g}\n(n={n_of[g]:,})" for g in order])
    ax.set_ylabel("NDCG@10")
    ax.set_title(split.title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)


def curves_chart(log_path: Path, path: Path) -> bool:
    """The run's loss, LR and valid NDCG@10 per step (``training.loop.plot_curves``)."""
    from training.loop import plot_curves

    stages = read_log(log_path)
    if not any(stages.values()):
        return False
    plot_curves(stages, path, f"{HEADLINE}: CPT then fine-tuning")
    return path.is_file()


# -- docs --------------------------------------------------------------------------------------
def markdown(
    tables: dict[str, tuple[Split, dict[str, dict[str, tuple[float, int]]]]],
    overall: dict[str, float],
    n_cases: int,
    curves: Path | None,
    history: list[dict[str, Any]],
) -> str:
    lines = [
        "## Where the quality comes from (plots)",
        "",
        f"NDCG@10 of each FK-LOO test case ({n_cases:,} cases), from the stored lists of the "
        "full-mode rows (`bench/results/fk_loo/<system>.test.jsonl.gz`), averaged per group; "
        "`n` is the number of cases in a group. Over all cases: "
        + ", ".join(f"{SYSTEMS[s]} {v:.4f}" for s, v in overall.items())
        + " (the table's `N@10 full test`).",
        "",
    ]
    for name, (split, results) in tables.items():
        order = [g for g in split.order if any(g in r for r in results.values())]
        lines += [
            f"### {split.title}",
            "",
            f"![{split.title}](img/ndcg_by_{name}.png)",
            "",
            "| group | n | " + " | ".join(SYSTEMS[s] for s in results) + " |",
            "|---|---:|" + "---:|" * len(results),
        ]
        for g in order:
            n = next(r[g][1] for r in results.values() if g in r)
            vals = " | ".join(f"{r[g][0]:.4f}" if g in r else "-" for r in results.values())
            lines.append(f"| {g} | {n:,} | {vals} |")
        lines.append("")
    lines += ["### Training curves of the headline run (`cprec`)", ""]
    if curves is not None:
        lines += [
            f"Loss, learning rate and valid NDCG@10 against the step, from "
            f"`{HEADLINE_LOG.relative_to(REPO)}` (the run's `log.csv`, kept by "
            "`bench/quality.py`).",
            "",
            f"![training curves of cprec](img/{curves.name})",
        ]
    else:
        lines += [
            f"Not drawn: the run's log (`{HEADLINE_LOG.relative_to(REPO)}`, copied from "
            "`<output_dir>/bench-cprec/log.csv` by `bench/quality.py`) is not in this checkout; "
            "`python -m bench.quality --full --systems cprec` writes it.",
        ]
        if history:
            lines += [
                "",
                "What `bench/results/quality.json` recorded of that run, valid NDCG@10 after "
                "each stage or epoch: "
                + "; ".join(
                    f"{h.get('stage')}"
                    + (f" epoch {h['epoch']}" if "epoch" in h else "")
                    + f" {h['valid_ndcg10']:.4f}"
                    for h in history
                    if isinstance(h.get("valid_ndcg10"), float)
                )
                + ".",
            ]
    return "\n".join(lines) + "\n"


def agreement(quality: dict[str, Any], overall: dict[str, float]) -> str:
    """A line when a list file no longer matches its row in quality.json (a later run of the
    same system in the other mode rewrote it), so the pictures and the table never disagree
    silently."""
    rows = quality.get("runs", {}).get("full", {}).get("rows", {})
    off = []
    for s, v in overall.items():
        want = rows.get(s, {}).get("test_full", {}).get("overall_micro", {}).get("NDCG@10")
        if want is not None and abs(want - v) > 1e-6:
            off.append(f"{SYSTEMS[s]} {v:.4f} here, {want:.4f} in the table")
    if not off:
        return ""
    log.warning("lists and quality.json disagree: %s", off)
    return "\nThe stored lists differ from the table's full-mode rows: " + "; ".join(off) + ".\n"


def write_all(systems: Sequence[str] = tuple(SYSTEMS), write_docs: bool = True) -> list[Path]:
    """Redraw every picture from the stored results; returns the files written."""
    from bench.common import write_section
    from training.fkloo import load_fkloo

    data = load_fkloo()
    cases = data.test
    lists = load_lists(cases, systems)
    if not lists:
        log.warning("no list file covers the test split: nothing to plot")
        return []
    written = []
    tables = {}
    for split in splits(cases, data.items, data.train):
        results = {s: ndcg_by_label(cases, ranked, split.labels) for s, ranked in lists.items()}
        path = IMG / f"ndcg_by_{split.name}.png"
        bar_chart(split, results, path)
        written.append(path)
        tables[split.name] = (split, results)
    overall = {
        s: sum(ndcg_at_10(r, c.target) for r, c in zip(ranked, cases, strict=True)) / len(cases)
        for s, ranked in lists.items()
    }
    quality = json.loads(QUALITY_JSON.read_text()) if QUALITY_JSON.is_file() else {}
    log_path = keep_headline_log(quality)
    curves = IMG / f"{HEADLINE}_curves.png"
    drawn = log_path is not None and curves_chart(log_path, curves)
    if drawn:
        written.append(curves)
    if write_docs:
        row = quality.get("runs", {}).get("full", {}).get("rows", {}).get(HEADLINE, {})
        body = markdown(
            tables, overall, len(cases), curves if drawn else None, row.get("history") or []
        )
        body += agreement(quality, overall)
        write_section("plots", body, "python -m bench.plots", DOCS)
        written.append(DOCS)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"from {list(SYSTEMS)}")
    ap.add_argument("--no-docs", action="store_true", help="the PNGs only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {list(SYSTEMS)}")
    for p in write_all(systems, write_docs=not args.no_docs):
        print(f"wrote {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
