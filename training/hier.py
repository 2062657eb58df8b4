"""Training of the hierarchical model (``cprec.hier.HierRec``): CPRec's two stages on text vectors.

Stage 1, continual pre-training: next-item prediction at every position of every sequence of the
behaviour corpus CPRec describes (per user the all-domain mixed sequence and one sequence per
domain), over every dataset configured (items of other datasets live in the same text space), with
the Warmup-Stable-Annealing schedule; during the annealing phase the batches come from the target
dataset only. Stage 2, fine-tuning: the target dataset's mixed sequences with early stopping on
the protocol's valid NDCG@10 (the best epoch's weights are kept).

The LM is frozen here: each item's text vector is computed once (cached on disk), so a training
step costs a small transformer over 64-d vectors plus a full softmax, not an LM forward per target.
Every stage reports targets/s; curves, a log CSV and a metrics table go to ``output_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cprec.hier import HierConfig, HierRec
from training.evaluate import compute_metrics, ndcg_at_10_micro, rank_topk
from training.fkloo import FKLOO, Case, FKItem, TrainSeq, load_fkloo
from training.schedule import make_lambda

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScheduleConfig(_Strict):
    kind: Literal["wsa", "cosine", "constant"] = "wsa"
    warmup_frac: float = Field(default=0.05, ge=0, lt=1)
    anneal_frac: float = Field(default=0.2, ge=0, le=1)
    min_ratio: float = Field(default=0.1, gt=0, le=1)
    shape: Literal["linear", "cosine", "exponential"] = "cosine"


class HierModelConfig(_Strict):
    dim: int = Field(default=64, ge=8)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=2, ge=1)
    ffn: int = Field(default=256, ge=8)
    dropout: float = Field(default=0.5, ge=0, lt=1)
    attn_dropout: float = Field(default=0.5, ge=0, lt=1)
    max_len: int = Field(default=50, ge=2)
    adapter: Literal["linear", "mlp"] = "linear"
    id_residual: bool = Field(
        default=True, description="Learned residual per training item (text vector alone if off)."
    )
    score: Literal["dot", "cosine"] = "dot"
    temperature: float = Field(default=0.07, gt=0)
    softmax: Literal["domain", "catalogue"] = Field(
        default="domain", description="Cross-entropy over the target's domain or all items."
    )


class PretrainConfig(_Strict):
    enabled: bool = True
    datasets: list[str] = Field(
        default_factory=list,
        description="Extra ../shared/data/<name> datasets (their training part) in stage 1.",
    )
    mixed_sequences: bool = True
    domain_sequences: bool = True
    epochs: float = Field(default=4.0, gt=0, description="Passes over the stage-1 corpus.")
    lr: float = Field(default=1e-3, gt=0)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    anneal_target_only: bool = Field(
        default=True, description="Annealing-phase batches come from the target dataset only."
    )


class FinetuneConfig(_Strict):
    enabled: bool = True
    max_epochs: int = Field(default=20, ge=0)
    lr: float = Field(default=5e-4, gt=0)
    patience: int = Field(default=2, ge=1)
    domain_sequences: bool = False


class HierTrainConfig(_Strict):
    name: str = "hier"
    output_dir: Path = Path("var/runs/hier")
    seed: int = 2024
    threads: int | None = None
    target: str = Field(
        default="fkloo",
        description="fkloo; normalized:<name> (leave-one-out on that set); toy (generated over "
        "the demo catalogue, for smoke runs).",
    )
    lm: str = Field(default="minilm-l6", description="Bundled LM name or a local HF folder.")
    lm_max_length: int = 256
    cache_dir: Path = Field(
        default=REPO_ROOT / "var" / "cache" / "quality",
        description="Where LM item vectors are cached (keyed by LM, template, catalogue, dtype).",
    )
    model: HierModelConfig = Field(default_factory=HierModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    batch_targets: int = Field(default=256, ge=1, description="Targets (positions) per step.")
    budget_minutes: float | None = Field(
        default=None, description="Wall cap on stages 1 + 2 (stage 2 stops at the epoch cut)."
    )
    valid_cases: int | None = Field(default=None, description="Valid cases for early stopping.")
    bf16: Literal["auto"] | bool = Field(
        default="auto", description="bf16 autocast of training steps (auto: CPUs with native bf16)."
    )
    progress: bool = True

    def dump(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def load_hier_config(path: Path | str, overrides: Sequence[str] = ()) -> HierTrainConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for ov in overrides:
        key, _, val = ov.partition("=")
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val)
    return HierTrainConfig.model_validate(raw)


# -- the corpus ------------------------------------------------------------------------------


@dataclass
class Source:
    """One dataset's item range in the global table and its stage-1/stage-2 sequences."""

    name: str
    lo: int
    hi: int
    mixed: list[list[int]] = field(default_factory=list)  # global ids
    domain: list[list[int]] = field(default_factory=list)


@dataclass
class Corpus:
    """All items of every dataset in one table (target dataset first, so its ids are global)."""

    items: list[FKItem]  # global; item_id == index
    keys: list[str]  # the id the service knows an item by (target: its catalogue id)
    domains: list[str]
    item_domain: np.ndarray  # [N] index into domains
    sources: list[Source]
    target: FKLOO  # target dataset with global ids (= its own ids: it comes first)

    @property
    def target_source(self) -> Source:
        return self.sources[0]


def domain_subsequences(seqs: Sequence[TrainSeq]) -> list[list[int]]:
    """Per user, one sequence per domain (only for users with more than one domain: a
    single-domain user's sequence already is its domain sequence)."""
    out = []
    for s in seqs:
        doms = sorted(set(s.domains))
        if len(doms) < 2:
            continue
        for d in doms:
            sub = [i for i, dd in zip(s.item_ids, s.domains, strict=True) if dd == d]
            if len(sub) >= 2:
                out.append(sub)
    return out


DEMO_CATALOG = REPO_ROOT / "service" / "data" / "demo_catalog.jsonl"


def toy_target(n_users: int = 400, seed: int = 0) -> tuple[FKLOO, list[str]]:
    """A generated dataset over the shipped demo catalogue, for smoke runs without the shared
    data: each user walks forward through two domains' item lists (a learnable pattern)."""
    from training.data import leave_one_out, read_catalogue

    cat = read_catalogue(DEMO_CATALOG)
    by: dict[str, list[int]] = {}
    for it in cat.items:
        by.setdefault(it.domain, []).append(it.item_id)
    doms = sorted(by)
    rng = np.random.default_rng(seed)
    seqs = []
    for u in range(n_users):
        pick = [doms[i] for i in rng.choice(len(doms), size=2, replace=False)]
        starts = {d: int(rng.integers(0, len(by[d]))) for d in pick}
        ids: list[int] = []
        for k in range(int(rng.integers(5, 12))):
            d = pick[int(rng.integers(0, 2))]
            ids.append(by[d][(starts[d] + k) % len(by[d])])
        ids = list(dict.fromkeys(ids))
        seqs.append(TrainSeq(f"toy{u}", ids, [cat.items[i].domain for i in ids]))
    train, valid, test = leave_one_out(seqs)
    return FKLOO(cat.items, train, valid, test, DEMO_CATALOG.parent), list(cat.external_ids)


def load_target(target: str) -> tuple[FKLOO, list[str]]:
    """The target dataset and each item's catalogue id."""
    if target == "toy":
        return toy_target()
    if target == "fkloo":
        d = load_fkloo()
        return d, [str(it.item_id) for it in d.items]
    if target.startswith("normalized:"):
        from training.data import load_files, normalized_paths

        cat, inter = normalized_paths(target.split(":", 1)[1])
        ld = load_files(cat, inter, source=target)
        return ld.data, [str(x) for x in ld.external_ids]
    raise ValueError(f"unknown target {target!r} (fkloo or normalized:<name>)")


def build_corpus(cfg: HierTrainConfig) -> Corpus:
    from training.data import load_files, normalized_paths

    tgt, keys = load_target(cfg.target)
    items = list(tgt.items)
    keys = list(keys)
    src = Source(cfg.target, 0, len(items))
    src.mixed = [list(s.item_ids) for s in tgt.train]
    src.domain = domain_subsequences(tgt.train)
    sources = [src]
    if cfg.pretrain.enabled:
        for name in cfg.pretrain.datasets:
            if f"normalized:{name}" == cfg.target:
                continue
            cat, inter = normalized_paths(name)
            ld = load_files(cat, inter, source=name)
            off = len(items)
            for it in ld.data.items:
                items.append(FKItem(off + it.item_id, it.domain, it.title))
                keys.append(f"{name}:{ld.external_ids[it.item_id]}")
            s = Source(name, off, len(items))
            # Only the training part (valid/test targets held out), as for the target.
            s.mixed = [[off + i for i in t.item_ids] for t in ld.data.train]
            s.domain = [[off + i for i in q] for q in domain_subsequences(ld.data.train)]
            sources.append(s)
    domains = sorted({it.domain for it in items})
    dix = {d: i for i, d in enumerate(domains)}
    item_domain = np.array([dix[it.domain] for it in items], dtype=np.int64)
    return Corpus(items, keys, domains, item_domain, sources, tgt)


def text_vectors(
    cfg: HierTrainConfig, items: Sequence[FKItem], cache_dir: Path
) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, text_dim] LM vectors of the items' template text (cached on disk per catalogue)."""
    from cprec.lm import BUNDLED
    from training.baselines import (
        DEFAULT_TEMPLATE,
        EncodeStats,
        cached_item_stats,
        item_vectors,
        load_encoder,
    )

    if cfg.lm in BUNDLED:
        enc = load_encoder(cfg.lm, REPO_ROOT / "var" / "store", max_length=cfg.lm_max_length)
    else:  # a local HF folder, pooled as the service pools it
        from transformers import AutoConfig

        from cprec.lm import detect_pooling, is_decoder_config
        from service.encoder import HFEncoder

        path = Path(cfg.lm)
        enc = HFEncoder(
            path,
            pooling=detect_pooling(path),
            is_decoder=is_decoder_config(AutoConfig.from_pretrained(path)),
            max_length=cfg.lm_max_length,
            name=f"local-{path.name}",
        )
    st = EncodeStats(f"{cfg.lm} item texts")
    vecs, cached = item_vectors(
        enc, items, DEFAULT_TEMPLATE, cache_dir, st, cfg.lm_max_length, cfg.progress
    )
    if cached:
        meta = cached_item_stats(enc, items, DEFAULT_TEMPLATE, cache_dir, cfg.lm_max_length)
        return vecs, {"stage": st.name, "from_cache": True, "cached_run": meta}
    return vecs, st.as_dict()


# -- batches ---------------------------------------------------------------------------------


def windows(seqs: Sequence[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """SASRec's packing of every (prefix -> next item) pair (``training.sasrec.build_windows``)
    with unshifted ids: ``inputs`` [W, max_len] global ids (-1 = padding), ``targets``
    [W, max_len] (-1 = no target)."""
    from training.sasrec import build_windows

    inp, tgt, _ = build_windows(seqs, max_len)
    return inp - 1, tgt


@dataclass
class Batch:
    source: int
    inputs: np.ndarray  # [B, T]
    targets: np.ndarray  # [B, T]


def make_batches(
    inp: np.ndarray, tgt: np.ndarray, source: int, batch_targets: int, rng: np.random.Generator
) -> list[Batch]:
    """Shuffled windows grouped until a batch holds ``batch_targets`` targets, trimmed to the
    batch's longest window."""
    order = rng.permutation(len(inp))
    n_t = (tgt >= 0).sum(1)
    used = np.where(tgt >= 0, np.arange(tgt.shape[1])[None] + 1, 0).max(1)
    out, start, acc = [], 0, 0
    for i, w in enumerate(order.tolist()):
        acc += int(n_t[w])
        if acc >= batch_targets or i == len(order) - 1:
            idx = order[start : i + 1]
            t = int(used[idx].max())
            out.append(Batch(source, inp[idx, :t], tgt[idx, :t]))
            start, acc = i + 1, 0
    return out


# -- the model's training step ---------------------------------------------------------------


class Trainer:
    """Shared pieces of both stages: the item table, the masked softmax, the step."""

    def __init__(
        self, model: HierRec, corpus: Corpus, text: torch.Tensor, softmax: str, bf16: bool = False
    ):
        self.model = model
        self.corpus = corpus
        self.text = text  # [N, text_dim]
        self.softmax = softmax
        n = len(corpus.items)
        rows = torch.zeros(n, dtype=torch.long)
        for i, k in enumerate(corpus.keys):
            rows[i] = model.residual_row.get(k, 0)
        self.rows = rows
        self.item_dom = torch.from_numpy(corpus.item_domain)  # [N] index into corpus.domains
        # corpus domain index -> the model's domain embedding index
        self.dom_map = model.domain_ids(corpus.domains)
        self.bf16 = bf16
        # autocast would cast the whole text matrix to bf16 on every step
        self.text_lp = text.to(torch.bfloat16) if bf16 else text
        self._slices: dict[int, list[tuple[int, torch.Tensor | slice]]] = {}

    def table(self, lo: int, hi: int, use_residual: bool = True) -> torch.Tensor:
        text = self.text_lp if torch.is_autocast_enabled("cpu") else self.text
        return self.model.item_vectors(text[lo:hi], self.rows[lo:hi], use_residual)

    def _domain_slices(self, si: int) -> list[tuple[int, torch.Tensor | slice]]:
        """Per domain of source ``si``: (domain, the local columns of its items), a slice when
        the domain's items are contiguous (as in every catalogue loaded here)."""
        if si not in self._slices:
            src = self.corpus.sources[si]
            idom = self.item_dom[src.lo : src.hi]
            out: list[tuple[int, torch.Tensor | slice]] = []
            for d in torch.unique(idom).tolist():
                cols = torch.nonzero(idom == d).flatten()
                lo, hi = int(cols[0]), int(cols[-1]) + 1
                out.append((d, slice(lo, hi) if hi - lo == len(cols) else cols))
            self._slices[si] = out
        return self._slices[si]

    def loss(self, b: Batch) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy of every target in the batch over its domain's items (or the
        source's whole catalogue). Computed per domain on that domain's columns only, which is
        far cheaper than masking a [targets, all items] matrix (decisions/002-hier-recipe.md)."""
        src = self.corpus.sources[b.source]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            table = self.table(src.lo, src.hi)  # [n_src, dim]
            inp = torch.from_numpy(b.inputs)
            tgt = torch.from_numpy(b.targets)
            pad = inp < 0
            local = (inp - src.lo).clamp(min=0)
            x = table[local] * (~pad).unsqueeze(-1).to(table.dtype)  # [B, T, dim]
            dom = self.dom_map[self.item_dom[inp.clamp(min=0)]].masked_fill(pad, 0)
            states = self.model.states(x, dom)
            mask = tgt >= 0
            s = self.model.output(states[mask])  # [P, dim]
            y = tgt[mask] - src.lo  # [P] local ids
            scale = self.model.logit_scale()
            if self.softmax == "catalogue":
                total = F.cross_entropy((s @ table.T).float() * scale, y, reduction="sum")
            else:
                ydom = self.item_dom[src.lo + y]
                total = s.new_zeros((), dtype=torch.float32)
                for d, cols in self._domain_slices(b.source):
                    sel = ydom == d
                    if not bool(sel.any()):
                        continue
                    if isinstance(cols, slice):
                        yy = y[sel] - cols.start
                    else:
                        yy = torch.searchsorted(cols, y[sel])
                    lg = (s[sel] @ table[cols].T).float() * scale
                    total = total + F.cross_entropy(lg, yy, reduction="sum")
        n = int(mask.sum())
        return total / max(n, 1), n

    @torch.inference_mode()
    def user_vectors(self, histories: Sequence[Sequence[int]], batch: int = 1024) -> np.ndarray:
        """User vectors of histories (global ids; the last max_len items) through
        ``HierRec.encode_histories``, the path the service takes."""
        self.model.eval()
        out = []
        ml = self.model.cfg.max_len
        for s in range(0, len(histories), batch):
            chunk = [list(h)[-ml:] for h in histories[s : s + batch]]
            lens = torch.tensor([len(h) for h in chunk])
            ids = torch.zeros((len(chunk), int(lens.max())), dtype=torch.long)
            for r, h in enumerate(chunk):
                ids[r, : len(h)] = torch.tensor(h)
            u = self.model.encode_histories(
                self.text[ids], self.rows[ids], self.dom_map[self.item_dom[ids]], lens
            )
            out.append(u.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.dim), np.float32)

    @torch.inference_mode()
    def rank(self, cases: Sequence[Case], use_residual: bool = True) -> list[list[int]]:
        self.model.eval()
        src = self.corpus.target_source
        u = self.user_vectors([c.history for c in cases])
        items = self.corpus.target.items
        iv = self.table(src.lo, src.hi, use_residual).float().numpy()
        return rank_topk(u, iv, cases, items)

    def valid_ndcg(self, cases: Sequence[Case]) -> float:
        ranked = self.rank(cases)
        return ndcg_at_10_micro(compute_metrics(ranked, cases, self.corpus.target.items))


# -- the stages ------------------------------------------------------------------------------


@dataclass
class StageLog:
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: int = 0
    steps: int = 0
    train_s: float = 0.0

    def summary(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "stage": name,
            "steps": self.steps,
            "targets": self.targets,
            "train_s": round(self.train_s, 1),
            "targets_per_s": round(self.targets / max(self.train_s, 1e-9), 1),
            "first_loss": next((r["loss"] for r in self.rows if "loss" in r), None),
            "final_loss": next((r["loss"] for r in reversed(self.rows) if "loss" in r), None),
            **extra,
        }


def run_steps(
    trainer: Trainer,
    batches: Sequence[Batch],
    opt: torch.optim.Optimizer,
    lr_of: Callable[[int], float],
    base_lr: float,
    slog: StageLog,
    desc: str,
    progress: bool,
    deadline: float | None,
    step0: int = 0,
    log_every: int = 50,
) -> tuple[int, bool]:
    """One pass over ``batches``; returns (steps done, stopped by the deadline)."""
    model = trainer.model
    model.train()
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False, mininterval=2.0)
    win, wn = 0.0, 0
    for i, b in enumerate(bar):
        if deadline is not None and time.perf_counter() > deadline:
            return i, True
        lr = base_lr * lr_of(step0 + i)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss, n = trainer.loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        slog.train_s += time.perf_counter() - t0
        slog.targets += n
        slog.steps += 1
        win += float(loss.detach())
        wn += 1
        if wn == log_every:
            slog.rows.append({"step": step0 + i + 1, "loss": round(win / wn, 5), "lr": lr})
            bar.set_postfix(loss=f"{win / wn:.3f}")
            win, wn = 0.0, 0
    if wn:
        slog.rows.append({"step": step0 + len(batches), "loss": round(win / wn, 5), "lr": lr})
    return len(batches), False


@dataclass
class HierResult:
    model: HierRec
    trainer: Trainer
    stages: dict[str, Any]
    history: list[dict[str, Any]]
    best_valid: float
    curves: dict[str, list[dict[str, Any]]]


def new_model(cfg: HierTrainConfig, corpus: Corpus, text: torch.Tensor) -> HierRec:
    m = cfg.model
    tgt = corpus.target_source
    seen = sorted({i for s in tgt.mixed for i in s})  # residual rows: target training items
    ids = [corpus.keys[i] for i in seen] if m.id_residual else []
    hc = HierConfig(
        text_dim=int(text.shape[1]),
        dim=m.dim,
        layers=m.layers,
        heads=m.heads,
        ffn=m.ffn,
        dropout=m.dropout,
        attn_dropout=m.attn_dropout,
        max_len=m.max_len,
        domains=list(corpus.domains),
        residual_rows=len(ids) + 1 if ids else 0,
        adapter=m.adapter,
        score=m.score,
        temperature=m.temperature,
    )
    model = HierRec(hc, ids)
    model.init_adapter_pca(text)
    return model


def train_hier(
    cfg: HierTrainConfig,
    corpus: Corpus,
    text: np.ndarray,
    valid: Sequence[Case],
) -> HierResult:
    """Stage 1 (if enabled) then stage 2 with early stopping on ``valid``."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tt = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32))
    model = new_model(cfg, corpus, tt)
    trainer = Trainer(model, corpus, tt, cfg.model.softmax, bf16=resolve_bf16(cfg.bf16))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr, fused=True)
    t_start = time.perf_counter()
    deadline = t_start + cfg.budget_minutes * 60 if cfg.budget_minutes else None
    stages: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    history: list[dict[str, Any]] = []
    ml = cfg.model.max_len

    # stage 1 ------------------------------------------------------------------------------
    if cfg.pretrain.enabled:
        p = cfg.pretrain
        mix: list[tuple[int, np.ndarray, np.ndarray]] = []
        for si, s in enumerate(corpus.sources):
            seqs = (s.mixed if p.mixed_sequences else []) + (s.domain if p.domain_sequences else [])
            if seqs:
                mix.append((si, *windows(seqs, ml)))
        per_epoch = sum(len(make_batches(i, t, si, cfg.batch_targets, rng)) for si, i, t in mix)
        total = max(1, int(per_epoch * p.epochs))
        anneal = int(round(total * p.schedule.anneal_frac)) if p.schedule.kind == "wsa" else 0
        lr_of = make_lambda(
            p.schedule.kind,
            total,
            warmup_frac=p.schedule.warmup_frac,
            anneal_frac=p.schedule.anneal_frac,
            min_ratio=p.schedule.min_ratio,
            shape=p.schedule.shape,
        )
        plan: list[Batch] = []
        while len(plan) < total - anneal:  # stable phase: the whole mixture, shuffled per epoch
            ep = [b for si, i, t in mix for b in make_batches(i, t, si, cfg.batch_targets, rng)]
            plan += [ep[j] for j in rng.permutation(len(ep))]
        plan = plan[: total - anneal]
        tail: list[Batch] = []
        target_only = [(si, i, t) for si, i, t in mix if si == 0] if p.anneal_target_only else mix
        while len(tail) < anneal:  # annealing: the target dataset only (CPRec's data switch)
            ep = [
                b
                for si, i, t in target_only
                for b in make_batches(i, t, si, cfg.batch_targets, rng)
            ]
            tail += [ep[j] for j in rng.permutation(len(ep))]
        plan += tail[:anneal]
        slog = StageLog()
        done, cut = run_steps(
            trainer, plan, opt, lr_of, p.lr, slog, "stage 1 (CPT)", cfg.progress, deadline
        )
        v = trainer.valid_ndcg(valid)
        stages["pretrain"] = slog.summary(
            "stage 1: CPT (" + p.schedule.kind + ")",
            planned_steps=total,
            steps_run=done,
            anneal_steps=anneal,
            stopped_by_budget=cut,
            sources={s.name: len(s.mixed) + len(s.domain) for s in corpus.sources},
            valid_ndcg10=round(v, 5),
        )
        history.append({"stage": "pretrain", "valid_ndcg10": v, "steps": done})
        curves["pretrain"] = slog.rows
        log.info("stage 1: %s", stages["pretrain"])

    # stage 2 ------------------------------------------------------------------------------
    best_state, best, bad = None, float("-inf"), 0
    if history:
        best, best_state = history[-1]["valid_ndcg10"], copy.deepcopy(model.state_dict())
    if cfg.finetune.enabled and cfg.finetune.max_epochs > 0:
        f = cfg.finetune
        tgt = corpus.target_source
        seqs = tgt.mixed + (tgt.domain if f.domain_sequences else [])
        inp, tg = windows(seqs, ml)
        opt2 = torch.optim.Adam(model.parameters(), lr=f.lr, fused=True)
        if not cfg.pretrain.enabled:
            opt2 = opt  # same optimiser (and lr) a single-stage run would use
        slog = StageLog()
        step = 0
        for ep in range(f.max_epochs):
            batches = make_batches(inp, tg, 0, cfg.batch_targets, rng)
            n, cut = run_steps(
                trainer,
                batches,
                opt2,
                lambda _s: 1.0,
                f.lr if cfg.pretrain.enabled else cfg.pretrain.lr,
                slog,
                f"stage 2 epoch {ep}",
                cfg.progress,
                deadline,
                step0=step,
            )
            step += n
            if n == 0:
                break
            t0 = time.perf_counter()
            v = trainer.valid_ndcg(valid)
            row = {
                "stage": "finetune",
                "epoch": ep,
                "steps": n,
                "valid_ndcg10": v,
                "eval_s": round(time.perf_counter() - t0, 1),
                "partial": cut,
            }
            history.append(row)
            slog.rows.append({"step": step, "valid_ndcg10": round(v, 5)})
            log.info("stage 2: %s", row)
            if cfg.progress:
                tqdm.write(f"hier {row}")
            if v > best:
                best, best_state, bad = v, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
            if bad >= f.patience or cut:
                break
        stages["finetune"] = slog.summary(
            "stage 2: fine-tune",
            epochs=len([h for h in history if h["stage"] == "finetune"]),
            best_valid_ndcg10=round(best, 5),
        )
        curves["finetune"] = slog.rows
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    stages["total_train_s"] = round(time.perf_counter() - t_start, 1)
    return HierResult(model, trainer, stages, history, best, curves)


# -- outputs ---------------------------------------------------------------------------------


def plot_hier_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Loss and LR of each stage against the step, and stage 2's valid NDCG@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.2))
    off = 0
    for name, rows in curves.items():
        lr = [r for r in rows if "loss" in r]
        if lr:
            axes[0].plot([off + r["step"] for r in lr], [r["loss"] for r in lr], label=name)
            axes[1].plot([off + r["step"] for r in lr], [r["lr"] for r in lr], label=name)
        vr = [r for r in rows if "valid_ndcg10" in r]
        if vr:
            axes[2].plot([off + r["step"] for r in vr], [r["valid_ndcg10"] for r in vr], "o-")
        off += max((r["step"] for r in rows), default=0)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("learning rate")
    axes[2].set_ylabel("valid NDCG@10")
    for a in axes:
        a.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pretrain_mix_sizes(corpus: Corpus) -> dict[str, int]:
    return {s.name: sum(len(q) for q in s.mixed + s.domain) for s in corpus.sources}


def cold_cases(corpus: Corpus, cases: Sequence[Case]) -> list[int]:
    """Indices of the cases whose target never occurs in the target's training sequences."""
    seen = {i for s in corpus.target.train for i in s.item_ids}
    return [k for k, c in enumerate(cases) if c.target not in seen]


def resolve_bf16(pref: str | bool) -> bool:
    if pref == "auto":
        from cprec.lm import cpu_has_fast_bf16

        return cpu_has_fast_bf16()
    return bool(pref)
