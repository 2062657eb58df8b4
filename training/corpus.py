"""The CPRec behaviour corpus for continual pre-training.

Every behaviour is written with the one template (:mod:`cprec.text`): ``"<domain>: <title>"``,
joined by the template separator. Per training user we write

* **domain-specific** sequences — the user's behaviours in one domain, in time order, one per
  domain the user has at least ``min_items`` behaviours in;
* an **all-domain mixed** sequence — all behaviours in time order (only for users with two or
  more domains; for a single-domain user it would repeat the domain-specific one word for word).

Long sequences are cut into chunks of at most ``context_length`` tokens at behaviour boundaries
(a title is never split; consecutive chunks do not overlap). Every chunk is kept: ``mixed_ratio``
is the share of mixed chunks in CPT *batches* (:func:`sample_batch`); only ``0`` (no mixed
chunks: the domain-only ablation) and ``1`` (no domain-specific ones) drop a kind. On FK-LOO the
kinds differ a lot in size (43k single-domain users give only domain-specific chunks), so a
subsampled corpus would have thrown most of the data away. The order of the output is a seeded
shuffle, so the same config and seed give byte-identical corpora.

Only ``data.train`` is read: for FK-LOO that is ``train.tsv.gz``, whose sequences end before the
valid target, so neither valid nor test targets can leak into pre-training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cprec.text import Behaviour, Template
from training.config import CorpusConfig
from training.data import LoadedData

log = logging.getLogger(__name__)

TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True, slots=True)
class Chunk:
    user_id: str
    kind: str  # "domain" | "mixed"
    domains: list[str]  # distinct domains in the chunk, sorted
    item_ids: list[int]
    text: str
    n_tokens: int


def hf_token_counter(tokenizer) -> TokenCounter:  # type: ignore[no-untyped-def]
    def count(texts: Sequence[str]) -> list[int]:
        enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in enc]

    return count


def whitespace_counter(texts: Sequence[str]) -> list[int]:
    """A tokenizer-free approximation (words), for tests and dry runs."""
    return [len(t.split()) for t in texts]


def _chunk_items(
    ids: list[int], item_tokens: np.ndarray, sep_tokens: int, budget: int
) -> list[list[int]]:
    """Greedy split of ``ids`` into runs whose summed tokens (+ separators) fit ``budget``."""
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in ids:
        need = int(item_tokens[i]) + (sep_tokens if cur else 0)
        if cur and used + need > budget:
            out.append(cur)
            cur, used = [], 0
            need = int(item_tokens[i])
        cur.append(i)
        used += need
    if cur:
        out.append(cur)
    return out


def build_corpus(
    data: LoadedData,
    template: Template,
    cfg: CorpusConfig,
    count_tokens: TokenCounter,
    reserve: int = 1,
) -> tuple[list[Chunk], dict]:
    """Chunks and statistics. ``reserve`` tokens per chunk are kept for BOS/EOS."""
    d = data.data
    budget = cfg.context_length - reserve
    train = list(d.train)
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_users is not None and cfg.max_users < len(train):
        pick = np.sort(rng.choice(len(train), size=cfg.max_users, replace=False))
        train = [train[i] for i in pick]
    used = sorted({i for s in train for i in s.item_ids})
    item_tokens = np.zeros(len(d.items), dtype=np.int64)
    if used:
        item_tokens[used] = count_tokens([data.item_text(i, template) for i in used])
    sep_tokens = max(0, count_tokens([template.separator.strip() or "x"])[0])

    def render(ids: list[int]) -> str:
        return template.render_sequence(
            Behaviour(d.items[i].domain, _title_with_extra(data, i)) for i in ids
        )

    domain_chunks: list[Chunk] = []
    mixed_chunks: list[Chunk] = []
    for s in train:
        doms = sorted(set(s.domains))
        for dom in doms:
            ids = [i for i, x in zip(s.item_ids, s.domains, strict=True) if x == dom]
            if len(ids) < cfg.min_items:
                continue
            for part in _chunk_items(ids, item_tokens, sep_tokens, budget):
                domain_chunks.append(Chunk(s.user_id, "domain", [dom], part, render(part), 0))
        if len(doms) >= 2 and len(s.item_ids) >= cfg.min_items:
            for part in _chunk_items(s.item_ids, item_tokens, sep_tokens, budget):
                pdoms = sorted({d.items[i].domain for i in part})
                mixed_chunks.append(Chunk(s.user_id, "mixed", pdoms, part, render(part), 0))

    domain_chunks, mixed_chunks = _apply_ratio(domain_chunks, mixed_chunks, cfg.mixed_ratio)
    chunks = domain_chunks + mixed_chunks
    counts = count_tokens([c.text for c in chunks]) if chunks else []
    chunks = [
        Chunk(c.user_id, c.kind, c.domains, c.item_ids, c.text, n)
        for c, n in zip(chunks, counts, strict=True)
    ]
    order = rng.permutation(len(chunks))
    chunks = [chunks[i] for i in order]
    stats = corpus_stats(chunks, n_users=len(train))
    return chunks, stats


def _title_with_extra(data: LoadedData, i: int) -> str:
    it = data.data.items[i]
    extra = data.extra_text[i]
    return f"{it.title} {extra}" if extra else it.title


def _apply_ratio(
    dom: list[Chunk], mixed: list[Chunk], ratio: float
) -> tuple[list[Chunk], list[Chunk]]:
    """Only the extremes drop a kind; in between every chunk is kept and the ratio is applied
    when CPT samples batches (:func:`sample_batch`), so no training data is thrown away."""
    if ratio <= 0:
        return dom, []
    if ratio >= 1:
        return [], mixed
    return dom, mixed


def sample_batch(
    pools: dict[str, np.ndarray], ratio: float, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``size`` chunk indices: each is from ``pools["mixed"]`` with probability ``ratio`` (else
    from ``pools["domain"]``), uniform within the kind. An empty kind falls back to the other."""
    dom, mix = pools.get("domain", np.empty(0, int)), pools.get("mixed", np.empty(0, int))
    if dom.size == 0 and mix.size == 0:
        raise ValueError("no corpus chunk to sample from")
    take_mixed = rng.random(size) < ratio
    if mix.size == 0:
        take_mixed[:] = False
    if dom.size == 0:
        take_mixed[:] = True
    out = np.empty(size, dtype=np.int64)
    n_mix = int(take_mixed.sum())
    if n_mix:
        out[take_mixed] = rng.choice(mix, size=n_mix, replace=mix.size < n_mix)
    if size - n_mix:
        out[~take_mixed] = rng.choice(dom, size=size - n_mix, replace=dom.size < size - n_mix)
    return out


def corpus_stats(chunks: list[Chunk], n_users: int) -> dict:
    out: dict = {
        "users": n_users,
        "sequences": len(chunks),
        "tokens": int(sum(c.n_tokens for c in chunks)),
        "by_kind": {},
    }
    for kind in ("domain", "mixed"):
        sel = [c for c in chunks if c.kind == kind]
        out["by_kind"][kind] = {
            "sequences": len(sel),
            "users": len({c.user_id for c in sel}),
            "tokens": int(sum(c.n_tokens for c in sel)),
            "mean_items": round(float(np.mean([len(c.item_ids) for c in sel])), 2) if sel else 0.0,
        }
    return out


def format_stats(stats: dict) -> str:
    lines = [
        f"corpus: {stats['users']} users, {stats['sequences']} sequences, {stats['tokens']} tokens"
    ]
    for kind, s in stats["by_kind"].items():
        lines.append(
            f"  {kind:>6}: {s['sequences']} sequences from {s['users']} users, "
            f"{s['tokens']} tokens, {s['mean_items']} items/sequence"
        )
    return "\n".join(lines)


def write_corpus(chunks: list[Chunk], stats: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
    (out_dir / "corpus_stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return path


def read_corpus(path: Path) -> list[Chunk]:
    with open(path, encoding="utf-8") as fh:
        return [Chunk(**json.loads(line)) for line in fh if line.strip()]
