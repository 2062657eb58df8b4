"""Training of the hierarchical model (``cprec.hier.HierRec``): CPRec's two stages on text vectors.

Stage 1, continual pre-training: next-item prediction at every position of every sequence of the
behaviour corpus CPRec describes (per user the all-domain mixed sequence and one sequence per
domain), over every dataset configured (items of other datasets live in the same text space), with
the Warmup-Stable-Annealing schedule; during the annealing phase the batches come from the target
dataset only. Stage 2, fine-tuning: the target dataset's mixed sequences with early stopping on
the protocol's valid NDCG@10 (the best epoch's weights are kept).

The LM is frozen here: each item's text vector is computed once (cached on disk), so a training
step costs a small transformer over 64-d vectors plus a full softmax, not an LM forward per target.
The steps, rows, early stopping and deadline are ``training/loop.py``'s (:class:`Plan` is the
objective); every stage reports targets/s; curves, a log CSV and a metrics table go to
``output_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from cprec.hier import HierConfig, HierRec
from cprec.lm import LMSource
from training.config import REPO_ROOT, ScheduleConfig, StrictModel, load_config, store_dir
from training.dataset import Case, Dataset, Item, TrainSeq
from training.evaluate import compute_metrics, ndcg_at_10_micro, rank_topk
from training.fkloo import load_fkloo
from training.loop import EarlyStopping, Meter, Objective, Update, run
from training.schedule import make_scheduler

log = logging.getLogger(__name__)

LOG_EVERY = 50  # steps per row of the log


class HierModelConfig(StrictModel):
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


class PretrainConfig(StrictModel):
    enabled: bool = True
    datasets: list[str] = Field(
        default_factory=list,
        description="Extra ../shared/data/<name> datasets (their training part) in stage 1.",
    )
    mixed_sequences: bool = True
    domain_sequences: bool = True
    epochs: float = Field(default=4.0, gt=0, description="Passes over the stage-1 corpus.")
    lr: float = Field(default=1e-3, gt=0)
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(warmup_frac=0.05, anneal_frac=0.2)
    )
    anneal_target_only: bool = Field(
        default=True, description="Annealing-phase batches come from the target dataset only."
    )


class FinetuneConfig(StrictModel):
    enabled: bool = True
    max_epochs: int = Field(default=20, ge=0)
    lr: float = Field(default=5e-4, gt=0)
    patience: int = Field(default=2, ge=1)
    domain_sequences: bool = False


class HierTrainConfig(StrictModel):
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
        default="auto",
        description="bf16 autocast of training steps (auto: CPUs with native bf16, CUDA GPUs "
        "that support it).",
    )
    device: str = Field(
        default="cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="cpu | cuda | cuda:N: where the model, the item tables and every batch "
        "live; the recipe's measured path is CPU.",
    )
    progress: bool = True

    def dump(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def load_hier_config(path: Path | str, overrides: Sequence[str] = ()) -> HierTrainConfig:
    """``training.config.load_config`` for the hier recipe."""
    return load_config(path, overrides, HierTrainConfig)


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

    items: list[Item]  # global; item_id == index
    keys: list[str]  # the id the service knows an item by (target: its catalogue id)
    domains: list[str]
    item_domain: np.ndarray  # [N] index into domains
    sources: list[Source]
    target: Dataset  # target dataset with global ids (= its own ids: it comes first)

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


def toy_target(n_users: int = 400, seed: int = 0) -> tuple[Dataset, list[str]]:
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
    return Dataset(cat.items, train, valid, test, DEMO_CATALOG.parent), list(cat.external_ids)


def load_target(target: str) -> tuple[Dataset, list[str]]:
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
                items.append(Item(off + it.item_id, it.domain, it.title))
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


def lm_source(cfg: HierTrainConfig) -> LMSource:
    """The LM that makes the item text vectors (``cprec.lm.resolve_base_model``)."""
    from cprec.lm import resolve_base_model

    return resolve_base_model(cfg.lm, store_dir())


def text_vectors(
    cfg: HierTrainConfig, items: Sequence[Item], cache_dir: Path
) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, text_dim] LM vectors of the items' template text (cached on disk per catalogue),
    pooled as the service pools them (``cprec.encoder.HFEncoder``)."""
    from cprec.encoder import HFEncoder
    from cprec.text import DEFAULT_TEMPLATE
    from training.baselines import EncodeStats, cached_item_stats, item_vectors

    enc = HFEncoder.from_source(lm_source(cfg), max_length=cfg.lm_max_length, device="cpu")
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
    """Shared pieces of both stages: the item table, the masked softmax, the step.

    ``device``: the model (moved there), the tables and every batch tensor live on it, so a step
    makes no host-device copy but its batch's ids; on the CPU ``.to`` is a no-op."""

    def __init__(
        self,
        model: HierRec,
        corpus: Corpus,
        text: torch.Tensor,
        softmax: str,
        bf16: bool = False,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.corpus = corpus
        self.text = text.to(self.device)  # [N, text_dim]
        self.softmax = softmax
        n = len(corpus.items)
        rows = torch.zeros(n, dtype=torch.long)
        for i, k in enumerate(corpus.keys):
            rows[i] = model.residual_row.get(k, 0)
        self.rows = rows.to(self.device)  # [N]
        # [N] index into corpus.domains
        self.item_dom = torch.from_numpy(corpus.item_domain).to(self.device)
        # corpus domain index -> the model's domain embedding index
        self.dom_map = model.domain_ids(corpus.domains).to(self.device)
        self.bf16 = bf16
        # autocast would cast the whole text matrix to bf16 on every step
        self.text_lp = self.text.to(torch.bfloat16) if bf16 else self.text
        self._slices: dict[int, list[tuple[int, torch.Tensor | slice]]] = {}

    def table(self, lo: int, hi: int, use_residual: bool = True) -> torch.Tensor:
        text = self.text_lp if torch.is_autocast_enabled(self.device.type) else self.text
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
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            table = self.table(src.lo, src.hi)  # [n_src, dim]
            inp = self.to_device(b.inputs)  # [B, T]
            tgt = self.to_device(b.targets)  # [B, T]
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

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        """A batch array as a tensor on the trainer's device (the CPU: shares ``a``'s memory)."""
        return torch.from_numpy(a).to(self.device, non_blocking=True)

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
            ids, lens = ids.to(self.device), lens.to(self.device)  # [B, T], [B]
            u = self.model.encode_histories(
                self.text[ids], self.rows[ids], self.dom_map[self.item_dom[ids]], lens
            )
            out.append(u.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.dim), np.float32)

    @torch.inference_mode()
    def rank(self, cases: Sequence[Case], use_residual: bool = True) -> list[list[int]]:
        self.model.eval()
        src = self.corpus.target_source
        u = self.user_vectors([c.history for c in cases])
        items = self.corpus.target.items
        iv = self.table(src.lo, src.hi, use_residual).float().cpu().numpy()  # [n_tgt, dim]
        return rank_topk(u, iv, cases, items)

    def valid_ndcg(self, cases: Sequence[Case]) -> float:
        ranked = self.rank(cases)
        return ndcg_at_10_micro(compute_metrics(ranked, cases, self.corpus.target.items))


# -- the stages ------------------------------------------------------------------------------


@dataclass
class Plan(Objective):
    """A run over a list of batches (step ``start + i`` is ``batches[i]``), scored on ``valid``."""

    trainer: Trainer
    batches: Sequence[Batch]
    valid: Sequence[Case]
    start: int = 0

    def batch(self, step: int, micro: int) -> Batch:
        return self.batches[step - self.start]

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        return self.trainer.loss(batch)

    def evaluate(self) -> float:
        return self.trainer.valid_ndcg(self.valid)


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
    # The shape and scoring fields have the same names in both configs.
    shared = m.model_dump(include=set(HierConfig.__dataclass_fields__))
    hc = HierConfig(
        text_dim=int(text.shape[1]),
        domains=list(corpus.domains),
        residual_rows=len(ids) + 1 if ids else 0,
        **shared,
    )
    model = HierRec(hc, ids)
    model.init_adapter_pca(text)  # on the CPU whatever the device: the same start everywhere
    return model.to(cfg.device)


def pretrain_plan(
    cfg: HierTrainConfig, corpus: Corpus, rng: np.random.Generator
) -> tuple[list[Batch], int]:
    """Stage 1's batches and how many of them anneal: the whole mixture (every source's mixed and
    per-domain sequences), shuffled per epoch, then the annealing phase's from the target dataset
    only (CPRec's switch of the data mix)."""
    p, ml = cfg.pretrain, cfg.model.max_len
    mix: list[tuple[int, np.ndarray, np.ndarray]] = []
    for si, s in enumerate(corpus.sources):
        seqs = (s.mixed if p.mixed_sequences else []) + (s.domain if p.domain_sequences else [])
        if seqs:
            mix.append((si, *windows(seqs, ml)))
    per_epoch = sum(len(make_batches(i, t, si, cfg.batch_targets, rng)) for si, i, t in mix)
    total = max(1, int(per_epoch * p.epochs))
    anneal = int(round(total * p.schedule.anneal_frac)) if p.schedule.kind == "wsa" else 0
    plan: list[Batch] = []
    while len(plan) < total - anneal:  # stable phase: the whole mixture, shuffled per epoch
        ep = [b for si, i, t in mix for b in make_batches(i, t, si, cfg.batch_targets, rng)]
        plan += [ep[j] for j in rng.permutation(len(ep))]
    plan = plan[: total - anneal]
    tail: list[Batch] = []
    target_only = [(si, i, t) for si, i, t in mix if si == 0] if p.anneal_target_only else mix
    while len(tail) < anneal:
        ep = [b for si, i, t in target_only for b in make_batches(i, t, si, cfg.batch_targets, rng)]
        tail += [ep[j] for j in rng.permutation(len(ep))]
    return plan + tail[:anneal], anneal


def train_hier(
    cfg: HierTrainConfig,
    corpus: Corpus,
    text: np.ndarray,
    valid: Sequence[Case],
) -> HierResult:
    """Stage 1 (if enabled) then stage 2 with early stopping on ``valid``; stage 1's result is a
    candidate for the best state."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tt = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32))
    model = new_model(cfg, corpus, tt)
    bf16 = resolve_bf16(cfg.bf16, cfg.device)
    trainer = Trainer(model, corpus, tt, cfg.model.softmax, bf16=bf16, device=cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr, fused=True)
    t_start = time.perf_counter()
    deadline = t_start + cfg.budget_minutes * 60 if cfg.budget_minutes else None
    stopping = EarlyStopping(cfg.finetune.patience, lambda: copy.deepcopy(model.state_dict()))
    stages: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    history: list[dict[str, Any]] = []

    if cfg.pretrain.enabled:
        p = cfg.pretrain
        plan, anneal = pretrain_plan(cfg, corpus, rng)
        sched = make_scheduler(opt, p.schedule.kind, len(plan), **p.schedule.kwargs())
        meter = Meter("targets")
        out = run(
            Plan(trainer, plan, valid),
            Update(model, opt, sched),
            meter,
            range(len(plan)),
            log_every=LOG_EVERY,
            stopping=stopping,
            deadline=deadline,
            desc="stage 1 (CPT)",
            progress=cfg.progress,
            leave=False,
        )
        stages["pretrain"] = {
            "stage": f"stage 1: CPT ({p.schedule.kind})",
            **meter.summary(),
            "planned_steps": len(plan),
            "steps_run": out.steps,
            "anneal_steps": anneal,
            "stopped_by_budget": out.cut,
            "sources": {s.name: len(s.mixed) + len(s.domain) for s in corpus.sources},
            "valid_ndcg10": None if out.score is None else round(out.score, 5),
        }
        history.append({"stage": "pretrain", "valid_ndcg10": out.score, "steps": out.steps})
        curves["pretrain"] = meter.rows
        log.info("stage 1: %s", stages["pretrain"])

    if cfg.finetune.enabled and cfg.finetune.max_epochs > 0:
        f = cfg.finetune
        tgt = corpus.target_source
        inp, tg = windows(tgt.mixed + (tgt.domain if f.domain_sequences else []), cfg.model.max_len)
        # without stage 1, the optimiser (and LR) a single-stage run would use
        opt2 = opt
        if cfg.pretrain.enabled:
            opt2 = torch.optim.Adam(model.parameters(), lr=f.lr, fused=True)
        update = Update(model, opt2, make_scheduler(opt2, "constant", 1, warmup_frac=0.0))
        meter = Meter("targets")
        step = 0
        for ep in range(f.max_epochs):
            batches = make_batches(inp, tg, 0, cfg.batch_targets, rng)
            out = run(
                Plan(trainer, batches, valid, start=step),
                update,
                meter,
                range(step, step + len(batches)),
                log_every=LOG_EVERY,
                log_from=step,
                stopping=stopping,
                deadline=deadline,
                desc=f"stage 2 epoch {ep}",
                progress=cfg.progress,
                leave=False,
            )
            step += out.steps
            if out.steps == 0:
                break
            row = {
                "stage": "finetune",
                "epoch": ep,
                "steps": out.steps,
                "valid_ndcg10": out.score,
                "eval_s": round(out.eval_s, 1),
                "partial": out.cut,
            }
            history.append(row)
            log.info("stage 2: %s", row)
            if cfg.progress:
                tqdm.write(f"hier {row}")
            if out.stopped or out.cut:
                break
        stages["finetune"] = {
            "stage": "stage 2: fine-tune",
            **meter.summary(),
            "epochs": len([h for h in history if h["stage"] == "finetune"]),
            "best_valid_ndcg10": round(stopping.best, 5),
        }
        curves["finetune"] = meter.rows
    if stopping.state is not None:
        model.load_state_dict(stopping.state)
    model.eval()
    stages["total_train_s"] = round(time.perf_counter() - t_start, 1)
    return HierResult(model, trainer, stages, history, stopping.best, curves)


# -- outputs ---------------------------------------------------------------------------------


def pretrain_mix_sizes(corpus: Corpus) -> dict[str, int]:
    return {s.name: sum(len(q) for q in s.mixed + s.domain) for s in corpus.sources}


def cold_cases(corpus: Corpus, cases: Sequence[Case]) -> list[int]:
    """Indices of the cases whose target never occurs in the target's training sequences."""
    seen = {i for s in corpus.target.train for i in s.item_ids}
    return [k for k, c in enumerate(cases) if c.target not in seen]


def resolve_bf16(pref: str | bool, device: str | torch.device = "cpu") -> bool:
    """``auto``: bf16 where ``device`` computes it natively (the host CPU's bf16 says nothing of a
    GPU's)."""
    if pref == "auto":
        if torch.device(device).type == "cuda":
            return torch.cuda.is_bf16_supported()
        from cprec.lm import cpu_has_fast_bf16

        return cpu_has_fast_bf16()
    return bool(pref)
