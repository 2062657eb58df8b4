"""LLM-Rec dual encoder fine-tuning: one LM encodes user histories and item texts.

User text = ``template.render_history`` of the behaviours before the target; item text = the
template's item text (what the service indexes). Both go through :class:`cprec.lm.TextTokenizer`
and :func:`cprec.lm.embed` (last-token pooling for decoders, mean for encoders), so training and
serving tokenise and pool identically. Score = dot product of unit vectors / temperature.

Loss: InfoNCE. Per batch the candidate set is the (deduplicated) targets of every example plus
``domain_negatives`` items sampled per example from the *target's domain* — in-batch negatives
are cheap but often from the other domain (easy); same-domain ones match the evaluation, which
ranks inside the target domain.

Optional **item-ID residual** (UniSRec's transductive variant): a learned vector per item seen in
training, added to its text vector before normalising; items never seen in training (cold) keep
the text vector. It lives in ``item_residual.safetensors`` beside the model and is
**evaluation-only**: the service encodes items from text and ignores it.

Early stopping: every ``eval_every`` steps, NDCG@10 (micro) on up to ``eval_cases`` valid cases via
:mod:`training.evaluate`; the best trainable state is restored at the end. The steps, rows and
early-stopping bookkeeping are ``training/loop.py``'s; this module is the objective.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cprec.lm import Pooling, TextTokenizer, embed, fit_max_length, is_decoder_config
from cprec.text import Behaviour, Template
from training import loop
from training.config import TrainConfig
from training.data import LoadedData
from training.dataset import Case
from training.evaluate import compute_metrics, ndcg_at_10_micro, rank_topk
from training.schedule import make_scheduler

log = logging.getLogger(__name__)

RESIDUAL_FILE = "item_residual.safetensors"


@dataclass(frozen=True, slots=True)
class Example:
    history: list[int]
    target: int
    domain: str


def make_examples(data: LoadedData, n_per_user: int, seed: int) -> list[Example]:
    """Targets drawn from each training sequence: always its last item, plus ``n_per_user - 1``
    earlier positions (seeded). Only ``data.train`` is read (no valid/test targets)."""
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    for s in data.data.train:
        n = len(s.item_ids)
        if n < 2:
            continue
        positions = {n - 1}
        extra = np.arange(1, n - 1)
        if extra.size and n_per_user > 1:
            positions.update(
                rng.choice(extra, size=min(n_per_user - 1, extra.size), replace=False).tolist()
            )
        for t in sorted(positions):
            out.append(Example(s.item_ids[:t], s.item_ids[t], s.domains[t]))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def build_candidates(
    batch: Sequence[Example], dom_pool: dict[str, np.ndarray], n_neg: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Candidate item ids of one batch and each example's label (column of its target).

    Columns = the batch's distinct targets (in-batch negatives for the other rows) followed by
    ``n_neg`` items per example sampled from its target's domain (never a batch target, so no
    false negative column is created for any row).
    """
    cand: list[int] = []
    col: dict[int, int] = {}
    for ex in batch:
        if ex.target not in col:
            col[ex.target] = len(cand)
            cand.append(ex.target)
    targets = set(col)
    for ex in batch:
        pool = dom_pool.get(ex.domain)
        if pool is None or n_neg == 0:
            continue
        added = 0
        # Draw a few spares so that skipping batch targets still leaves n_neg new ids.
        for j in rng.choice(pool, size=min(n_neg + len(targets), pool.size), replace=False):
            j = int(j)
            if j in targets:
                continue
            if j not in col:
                col[j] = len(cand)
                cand.append(j)
            added += 1
            if added == n_neg:
                break
    return cand, [col[ex.target] for ex in batch]


class DualEncoder:
    """Text -> unit vectors with one backbone; optional item-ID residual."""

    def __init__(
        self,
        model,
        tt: TextTokenizer,
        pooling: Pooling,
        data: LoadedData,  # type: ignore[no-untyped-def]
        template: Template,
        history_items: int,
        device: torch.device,
        residual: torch.nn.Embedding | None = None,
        seen: torch.Tensor | None = None,
    ) -> None:
        self.model, self.tt, self.pooling, self.data = model, tt, pooling, data
        self.template, self.history_items, self.device = template, history_items, device
        self.residual, self.seen = residual, seen
        self._item_ids: dict[int, list[int]] = {}

    def user_text(self, history: Sequence[int]) -> str:
        items = self.data.data.items
        beh = [Behaviour(items[i].domain, _title(self.data, i)) for i in history]
        return self.template.render_history(beh, max_items=self.history_items)

    def item_tokens(self, ids: Sequence[int]) -> list[list[int]]:
        missing = [i for i in ids if i not in self._item_ids]
        if missing:
            texts = [self.data.item_text(i, self.template) for i in missing]
            for i, t in zip(missing, self.tt(texts, "item"), strict=True):
                self._item_ids[i] = t
        return [self._item_ids[i] for i in ids]

    def user_tokens(self, histories: Sequence[Sequence[int]]) -> list[list[int]]:
        return self.tt([self.user_text(h) for h in histories], "query")

    def embed(self, toks: list[list[int]]) -> torch.Tensor:
        ids, mask = self.tt.collate(toks)  # [B, T] each
        return embed(self.model, ids.to(self.device), mask.to(self.device), self.pooling)  # [B, D]

    def users(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.embed(self.user_tokens(histories))

    def items(self, ids: Sequence[int]) -> torch.Tensor:
        vec = self.embed(self.item_tokens(ids))  # [M, D] unit
        if self.residual is not None and self.seen is not None:
            idx = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)
            r = self.residual(idx) * self.seen[idx].unsqueeze(-1)  # [M, D]; 0 for cold items
            vec = F.normalize(vec + r, dim=-1)
        return vec

    @torch.no_grad()
    def encode_items(self, ids: Sequence[int], batch: int = 64) -> np.ndarray:
        ids = list(ids)
        lengths = {i: len(t) for i, t in zip(ids, self.item_tokens(ids), strict=True)}  # one call
        return self._batched(ids, self.items, batch, key=lambda i: lengths[i])

    @torch.no_grad()
    def encode_users(self, histories: Sequence[Sequence[int]], batch: int = 32) -> np.ndarray:
        return self._batched(list(histories), self.users, batch, key=len)

    def _batched(self, xs: list, fn, batch: int, key) -> np.ndarray:  # type: ignore[no-untyped-def]
        was = self.model.training
        self.model.eval()
        order = sorted(range(len(xs)), key=lambda i: key(xs[i]))  # length-sorted: less padding
        out: np.ndarray | None = None
        for s in range(0, len(order), batch):
            sel = order[s : s + batch]
            v = fn([xs[i] for i in sel]).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(xs), v.shape[1]), dtype=np.float32)
            out[sel] = v
        self.model.train(was)
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _title(data: LoadedData, i: int) -> str:
    it = data.data.items[i]
    extra = data.extra_text[i]
    return f"{it.title} {extra}" if extra else it.title


def candidate_ids(data: LoadedData) -> np.ndarray:
    """Every item that evaluation ranks (all items of the evaluated domains)."""
    return np.concatenate([data.data.domain_items(d) for d in data.data.domains])


def rank_cases(
    enc: DualEncoder, cases: Sequence[Case], batch: int = 64, item_vecs: np.ndarray | None = None
) -> tuple[list[list[int]], np.ndarray]:
    """Top-50 lists for ``cases`` (and the [n_items, D] item matrix, reusable across splits)."""
    items = enc.data.data.items
    if item_vecs is None:
        ids = candidate_ids(enc.data)
        vecs = enc.encode_items(ids, batch)
        item_vecs = np.zeros((len(items), vecs.shape[1]), dtype=np.float32)
        item_vecs[ids] = vecs
    users = enc.encode_users([c.history for c in cases], max(1, batch // 2))
    return rank_topk(users, item_vecs, cases, items), item_vecs


def evaluate_cases(
    enc: DualEncoder,
    cases: Sequence[Case],
    split: str,
    name: str,
    batch: int = 64,
    item_vecs: np.ndarray | None = None,
) -> tuple[dict, list[list[int]], np.ndarray]:
    ranked, item_vecs = rank_cases(enc, cases, batch, item_vecs)
    return (
        compute_metrics(ranked, cases, enc.data.data.items, name=name, split=split),
        ranked,
        item_vecs,
    )


def load_dual_encoder(
    model_dir: Path,
    data: LoadedData,
    cfg: TrainConfig,
    device: torch.device | None = None,
    residual_path: Path | None = None,
) -> DualEncoder:
    """A saved (merged) model as a frozen dual encoder, for evaluation."""
    from transformers import AutoModel

    from cprec.lm import load_tokenizer, resolve_device, resolve_dtype

    device = device or resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)  # auto: bf16 on CUDA, as the service does
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    is_dec = is_decoder_config(model.config)
    tt = TextTokenizer(
        load_tokenizer(model_dir), fit_max_length(cfg.model.max_length, model.config), is_dec
    )
    residual = seen = None
    if residual_path is not None and residual_path.is_file():
        from safetensors.torch import load_file

        st = load_file(str(residual_path))
        residual = torch.nn.Embedding.from_pretrained(st["residual"].to(device), freeze=True)
        seen = st["seen"].to(device)
    return DualEncoder(
        model,
        tt,
        "last" if is_dec else "mean",
        data,
        cfg.template,
        cfg.finetune.history_items,
        device,
        residual,
        seen,
    )


class ContrastiveObjective(loop.Objective):
    """InfoNCE of user histories against their targets, in-batch and same-domain negatives;
    evaluation: valid NDCG@10 (micro) on the early-stopping cases."""

    def __init__(
        self,
        cfg: TrainConfig,
        enc: DualEncoder,
        acc: Any,
        examples: list[Example],
        valid: list[Case],
    ) -> None:
        data = enc.data.data
        self.f, self.enc, self.acc, self.examples, self.valid = (
            cfg.finetune,
            enc,
            acc,
            examples,
            valid,
        )
        self.eval_batch = cfg.evaluate.batch_size
        self.dom_pool = {d: data.domain_items(d) for d in data.domains}
        self.rng = np.random.default_rng(cfg.finetune.seed + 1)

    def batch(self, step: int, micro: int) -> tuple[list[Example], list[int], list[int]]:
        f, n = self.f, len(self.examples)
        # each process (DDP through accelerate) takes its own slice of the example stream
        s0 = ((step * self.acc.num_processes + self.acc.process_index) * f.batch_size) % n
        batch = [self.examples[(s0 + j) % n] for j in range(f.batch_size)]
        cand, labels = build_candidates(batch, self.dom_pool, f.domain_negatives, self.rng)
        return batch, cand, labels

    def loss(self, b: tuple[list[Example], list[int], list[int]]) -> tuple[torch.Tensor, int]:
        batch, cand, labels = b
        q = self.enc.user_tokens([ex.history for ex in batch])
        users = self.enc.embed(q)  # [B, D]
        items = self.enc.items(cand)  # [M, D]
        logits = users.float() @ items.float().T / self.f.temperature  # [B, M]; fp32 under autocast
        loss = F.cross_entropy(logits, torch.tensor(labels, device=self.enc.device))
        n_tok = sum(len(x) for x in q) + sum(len(x) for x in self.enc.item_tokens(cand))
        return loss, n_tok

    def evaluate(self) -> float | None:
        if not self.valid:
            return None
        m, _, _ = evaluate_cases(self.enc, self.valid, "valid", "finetune", self.eval_batch)
        return ndcg_at_10_micro(m)


def run_finetune(
    cfg: TrainConfig, base_dir: Path, data: LoadedData, out_dir: Path
) -> loop.StageResult:
    from transformers import AutoModel

    from cprec.lm import load_tokenizer

    f = cfg.finetune
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(f.seed)
    acc = loop.make_accelerator(cfg.model.device, 1, cfg.model.train_precision)
    device = acc.device
    tok = load_tokenizer(base_dir)
    model = AutoModel.from_pretrained(base_dir, dtype=torch.float32)
    is_dec = is_decoder_config(model.config)
    pooling: Pooling = "last" if is_dec else "mean"
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if f.lora.enabled:
            model.enable_input_require_grads()
    if f.lora.enabled:
        model = loop.apply_lora(model, f.lora, "FEATURE_EXTRACTION")
    elif f.freeze_layers:
        freeze_bottom(model, f.freeze_layers)
    n_train, n_total = loop.count_params(model)
    residual = seen = None
    params: list[dict[str, Any]] = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": f.lr}
    ]
    n_items = len(data.data.items)
    if f.item_id_residual:
        dim = int(model.config.hidden_size)
        residual = torch.nn.Embedding(n_items, dim)
        torch.nn.init.zeros_(residual.weight)  # starts as the pure text model
        seen_ids = sorted({i for s in data.data.train for i in s.item_ids})
        seen = torch.zeros(n_items)
        seen[seen_ids] = 1.0
        params.append({"params": list(residual.parameters()), "lr": f.residual_lr})
    opt = torch.optim.AdamW(params, weight_decay=f.weight_decay)
    sched = make_scheduler(opt, f.schedule.kind, f.steps, **f.schedule.kwargs())
    max_length = fit_max_length(cfg.model.max_length, model.config)  # before any wrapper
    if residual is not None:
        model, residual, opt = acc.prepare(model, residual, opt)
        seen = seen.to(device)  # type: ignore[union-attr]
    else:
        model, opt = acc.prepare(model, opt)
    tt = TextTokenizer(tok, max_length, is_dec)
    enc = DualEncoder(
        model, tt, pooling, data, cfg.template, f.history_items, device, residual, seen
    )
    log.info(
        "finetune: %s, pooling=%s, %d / %d trainable parameters%s",
        base_dir,
        pooling,
        n_train,
        n_total,
        " + item-ID residual" if residual is not None else "",
    )

    examples = make_examples(data, f.samples_per_user, f.seed)
    if not examples:
        raise ValueError("finetune: no training example (every training sequence has < 2 items)")
    valid = list(data.data.valid) if f.early_stopping else []
    if f.eval_cases is not None and len(valid) > f.eval_cases:
        pick = np.sort(
            np.random.default_rng(f.seed).choice(len(valid), f.eval_cases, replace=False)
        )
        valid = [valid[i] for i in pick]

    objective = ContrastiveObjective(cfg, enc, acc, examples, valid)
    update = loop.Update(
        model,
        opt,
        sched,
        acc=acc,
        max_grad_norm=f.max_grad_norm,
        clip=[p for g in params for p in g["params"]],
    )
    stopping = loop.EarlyStopping(f.patience, lambda: _trainable_state(model, residual))
    meter = loop.Meter("tokens", scale=acc.num_processes)
    out = loop.run(
        objective,
        update,
        meter,
        range(f.steps),
        log_every=f.log_every,
        eval_every=f.eval_every,
        stopping=stopping,
        desc="finetune",
        progress=acc.is_main_process,
    )
    if out.stopped:
        log.info(
            "finetune: early stop at step %d (best NDCG@10 %.4f at %d)",
            meter.rows[-1]["step"],
            stopping.best,
            stopping.best_step,
        )
    if stopping.state is not None:
        _load_trainable_state(model, residual, stopping.state)
    model_dir = out_dir / "model"
    unwrapped = acc.unwrap_model(model)
    loop.save_merged(unwrapped, tok, model_dir)
    if residual is not None:
        from safetensors.torch import save_file

        save_file(
            {
                "residual": acc.unwrap_model(residual).weight.detach().cpu().contiguous(),
                "seen": seen.detach().cpu(),
            },  # type: ignore[union-attr]
            str(out_dir / RESIDUAL_FILE),
        )
    summary = {
        **meter.summary(),
        "steps_run": meter.rows[-1]["step"] if meter.rows else 0,
        "steps": f.steps,
        "stopped_early": out.stopped,
        "best_valid_ndcg10": stopping.best if stopping.state is not None else None,
        "best_step": stopping.best_step,
        "valid_cases": len(valid),
        "examples": len(examples),
        "trainable_params": n_train,
        "total_params": n_total,
        "item_id_residual": residual is not None,
        "pooling": pooling,
        "is_decoder": is_dec,
    }
    loop.write_log(meter.rows, out_dir / "log.csv")
    loop.plot_curves({"finetune": meter.rows}, out_dir / "curves.png", "fine-tuning")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log.info(
        "finetune: %d steps in %.1fs (%.0f tokens/s), loss %s -> %s, best valid NDCG@10 %s",
        summary["steps_run"],
        summary["seconds"],
        summary["tokens_per_s"],
        summary["first_loss"],
        summary["final_loss"],
        summary["best_valid_ndcg10"],
    )
    return loop.StageResult(model_dir, summary)


_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.")


def freeze_bottom(model, n: int) -> int:  # type: ignore[no-untyped-def]
    """Fix the embeddings and transformer layers 0..n-1 (BERT ``encoder.layer.i``, Llama
    ``layers.i``, GPT ``h.i``); returns how many parameters were frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        if ("embed" in name and m is None) or (m is not None and int(m.group(1)) < n):
            p.requires_grad_(False)
            frozen += p.numel()
    if frozen == 0:
        raise ValueError(f"finetune.freeze_layers={n}: no embedding or layer parameter matched")
    return frozen


def _trainable_state(model, residual) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    st = {f"m.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if residual is not None:
        st["residual"] = residual.weight.detach().clone()
    return st


@torch.no_grad()
def _load_trainable_state(model, residual, st: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    for n, p in model.named_parameters():
        if f"m.{n}" in st:
            p.copy_(st[f"m.{n}"])
    if residual is not None:
        residual.weight.copy_(st["residual"])
