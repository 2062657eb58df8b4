"""SASRec, the ID-based sequential baseline of the quality table (the FK-LOO anchor's recipe).

RecBole's SASRec defaults: 2 layers, hidden 64, 2 heads, FFN 256, GELU, post-LayerNorm, learned
positions, max length 50, dropout 0.5 (hidden) / 0.5 (attention), N(0, 0.02) init. Trained with
full-softmax cross-entropy over every item on each (prefix -> next item) pair of the training
sequences (at most 50 history items: RecBole's augmentation), Adam 1e-3, 256 pairs a batch, early
stopping on the protocol's valid NDCG@10 (micro) with the best epoch's weights kept.

Unlike RecBole, pairs are not padded one by one to 50 positions: a sequence is fed once and every
position's state is its pair's state (causal mask, positions counted from the oldest item), see
:func:`build_windows`; a step takes windows until it holds ``batch_size`` (256) pairs. Same pairs,
model and loss as the anchor, for a small fraction of the encoder's work
(docs/decisions/005-sequence-windows.md). (Pairs of one user now share a batch; the anchor
shuffled pairs independently.)
Sequences are left-aligned and right-padded; with a causal mask a real position never attends to
padding, so no key-padding mask is needed.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cprec.hier import Block
from training.dataset import Case, Item
from training.evaluate import compute_metrics, ndcg_at_10_micro, rank_from_scores

log = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    max_len: int = 50
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 30
    patience: int = 3
    seed: int = 2024
    eval_batch: int = 512
    progress: bool = True
    # Wall-clock cap on training (None = none): the epoch in progress stops early, is evaluated,
    # and training ends. For CPU budget runs only; recorded in the history as a partial epoch.
    max_train_s: float | None = None


class SASRec(nn.Module):
    """Item ids are shifted by one inside the model: 0 is padding."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_items = n_items
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.hidden, cfg.heads, cfg.ffn, cfg.dropout, cfg.attn_dropout)
            for _ in range(cfg.layers)
        )
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_all(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` [B, T] shifted ids, left-aligned -> states at every position [B, T, H];
        position t has seen items 0..t only (causal)."""
        t = seq.shape[1]
        pos = torch.arange(t, device=seq.device)
        x = self.drop(self.ln(self.item_emb(seq) + self.pos_emb(pos)[None]))  # [B, T, H]
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``seq`` [B, T] shifted ids, left-aligned; ``lengths`` [B] -> user states [B, H]."""
        x = self.forward_all(seq)
        return x[torch.arange(seq.shape[0], device=seq.device), lengths - 1]  # [B, H]

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, n_items] scores over real items (column = item id)."""
        return state @ self.item_emb.weight[1:].T


def build_pairs(
    seqs: Sequence[Sequence[int]], max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (prefix -> next item) pair: ``hist`` [P, max_len] shifted ids (left-aligned, 0-padded),
    ``lengths`` [P], ``targets`` [P] (unshifted item ids)."""
    n = sum(max(len(s) - 1, 0) for s in seqs)
    hist = np.zeros((n, max_len), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    targets = np.zeros(n, dtype=np.int64)
    p = 0
    for s in seqs:
        arr = np.asarray(s, dtype=np.int64) + 1
        for t in range(1, len(arr)):
            h = arr[max(0, t - max_len) : t]
            hist[p, : len(h)] = h
            lengths[p] = len(h)
            targets[p] = arr[t] - 1
            p += 1
    return hist, lengths, targets


def build_windows(
    seqs: Sequence[Sequence[int]], max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same pairs as :func:`build_pairs`, packed into windows so one forward serves many.

    With a causal mask and left-aligned positions, the state at position t of a window that
    starts at the sequence's first item IS the state of the pair (items 0..t -> item t+1). So a
    sequence of L <= max_len + 1 items is one window with L - 1 targets; a longer one adds one
    window per later pair (its last ``max_len`` items, one target), as RecBole's truncation does.
    Returns ``inputs`` [W, max_len] shifted ids (0-padded), ``targets`` [W, max_len] item ids
    (-1 = no target at that position) and ``n_targets`` [W].
    """
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for s in seqs:
        arr = np.asarray(s, dtype=np.int64)
        if len(arr) < 2:
            continue
        head = arr[: max_len + 1]
        rows.append((head[:-1] + 1, head[1:]))
        for t in range(max_len + 1, len(arr)):  # pairs whose prefix was cut to max_len items
            tg = np.full(max_len, -1, dtype=np.int64)
            tg[-1] = arr[t]
            rows.append((arr[t - max_len : t] + 1, tg))
    inputs = np.zeros((len(rows), max_len), dtype=np.int64)
    targets = np.full((len(rows), max_len), -1, dtype=np.int64)
    for w, (x, y) in enumerate(rows):
        inputs[w, : len(x)] = x
        targets[w, : len(y)] = y
    return inputs, targets, (targets >= 0).sum(1)


def pack_batches(n_targets: np.ndarray, order: np.ndarray, batch_targets: int) -> list[np.ndarray]:
    """Consecutive windows of ``order`` grouped until each batch holds >= ``batch_targets`` pairs
    (the last may hold fewer): the step size of a ``batch_targets``-pair batch, as the anchor."""
    batches, start, acc = [], 0, 0
    counts = n_targets[order]
    for i, n in enumerate(counts.tolist()):
        acc += n
        if acc >= batch_targets:
            batches.append(order[start : i + 1])
            start, acc = i + 1, 0
    if start < len(order):
        batches.append(order[start:])
    return batches


def encode_histories(
    histories: Sequence[Sequence[int]], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last ``max_len`` items of each history -> (seq [B, T] trimmed to the longest, lens [B])."""
    lens = [min(len(h), max_len) for h in histories]
    if min(lens, default=1) < 1:
        raise ValueError("SASRec needs at least one history item per case")
    seq = torch.zeros((len(histories), max(lens)), dtype=torch.long)
    for i, h in enumerate(histories):
        tail = list(h)[-max_len:]
        seq[i, : len(tail)] = torch.tensor(tail, dtype=torch.long) + 1
    return seq, torch.tensor(lens, dtype=torch.long)


@torch.inference_mode()
def score_cases(model: SASRec, cases: Sequence[Case]) -> torch.Tensor:
    """[B, n_items] scores for a batch of cases (input = the last max_len history items)."""
    model.eval()
    seq, lens = encode_histories([c.history for c in cases], model.cfg.max_len)
    return model.logits(model(seq, lens))


def rank_sasrec(
    model: SASRec, cases: Sequence[Case], items: Sequence[Item], k: int = 50, batch: int = 512
) -> list[list[int]]:
    return rank_from_scores(lambda b: score_cases(model, b), cases, items, k=k, batch=batch)


@dataclass
class FitResult:
    model: SASRec
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_valid: float = float("-inf")
    train_s: float = 0.0
    pairs: int = 0
    pairs_seen: int = 0  # training pairs processed over all epochs (throughput)
    train_only_s: float = 0.0  # training steps only, without the per-epoch evaluations
    config: dict[str, Any] = field(default_factory=dict)


def fit(
    seqs: Sequence[Sequence[int]],
    n_items: int,
    cfg: SASRecConfig,
    eval_fn: Callable[[SASRec], float] | None = None,
) -> FitResult:
    """Train on ``seqs`` (item-id lists); ``eval_fn(model) -> valid score`` (higher is better)
    drives early stopping and best-weight selection; without it the last epoch is kept."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    inputs, targets, n_targets = build_windows(seqs, cfg.max_len)
    t_len = np.where(targets >= 0, np.arange(cfg.max_len)[None] + 1, 0).max(1)  # [W] used length
    model = SASRec(n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    res = FitResult(model=model, pairs=int(n_targets.sum()), config=asdict(cfg))
    best_state = None
    bad = 0
    t_all = time.perf_counter()
    for epoch in range(cfg.max_epochs):
        model.train()
        t0 = time.perf_counter()
        batches = pack_batches(n_targets, rng.permutation(len(n_targets)), cfg.batch_size)
        total, nb = 0.0, 0
        bar = tqdm(
            batches,
            desc=f"sasrec epoch {epoch}",
            disable=not cfg.progress,
            leave=False,
            mininterval=2.0,
        )
        partial = False
        for idx in bar:
            if cfg.max_train_s is not None and time.perf_counter() - t_all > cfg.max_train_s:
                partial = True
                break
            t_max = int(t_len[idx].max())
            seq = torch.from_numpy(inputs[idx, :t_max])  # [B, T], trimmed to the longest window
            tgt = torch.from_numpy(targets[idx, :t_max])  # [B, T], -1 = no pair here
            mask = tgt >= 0
            states = model.forward_all(seq)[mask]  # [N_pairs, H]
            loss = F.cross_entropy(model.logits(states), tgt[mask])  # mean over the batch's pairs
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            nb += 1
            res.pairs_seen += int(mask.sum())
            if nb % 50 == 0:
                bar.set_postfix(loss=f"{total / nb:.4f}")
        if partial and nb == 0:
            break  # the cap was reached by the previous epoch's evaluation
        train_s = time.perf_counter() - t0
        res.train_only_s += train_s
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": total / max(nb, 1),
            "train_s": round(train_s, 1),
            "batches": nb,
        }
        if partial:
            row["partial_epoch"] = f"{nb}/{len(batches)} batches (max_train_s reached)"
        if eval_fn is not None:
            t1 = time.perf_counter()
            score = eval_fn(model)
            row.update(valid_ndcg10=score, eval_s=round(time.perf_counter() - t1, 1))
            if score > res.best_valid:
                res.best_valid, res.best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
        else:
            res.best_epoch = epoch
        res.history.append(row)
        log.info("sasrec %s", row)
        if cfg.progress:
            tqdm.write(f"sasrec {row}")
        if (eval_fn is not None and bad >= cfg.patience) or partial:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    res.train_s = time.perf_counter() - t_all
    return res


def valid_ndcg_fn(
    cases: Sequence[Case], items: Sequence[Item], batch: int = 512
) -> Callable[[SASRec], float]:
    """The protocol's valid NDCG@10 (micro, target domain only, history masked)."""

    def run(model: SASRec) -> float:
        ranked = rank_sasrec(model, cases, items, batch=batch)
        return ndcg_at_10_micro(compute_metrics(ranked, cases, items))

    return run
