"""Continual pre-training (CPT) on the behaviour corpus with the WSA schedule.

``run_cpt(cfg, base_dir, chunks, out_dir)`` trains the base on the corpus chunks, full or LoRA
(peft): a decoder (``AutoModelForCausalLM``) with the next-token loss, an encoder-only base (BERT,
e.g. the bundled MiniLM) with masked-language modelling (``AutoModelForMaskedLM``; 15% of the
non-special tokens, 80/10/10 mask/random/keep). It writes::

    out_dir/model/            plain HF folder (LoRA merged) + tokenizer: the fine-tuning start
    out_dir/checkpoint/       trainable weights, optimizer, scheduler, step (resume)
    out_dir/log.csv           step, loss, lr, tokens, tokens_per_s
    out_dir/curves.png        loss and LR against the step
    out_dir/summary.json      steps, tokens, tokens/s, final loss, seconds

The steps, rows, checkpoints and precision are ``training/loop.py``'s (HF accelerate:
``accelerate launch -m training cpt ...`` for several GPUs; bf16 autocast on CUDA; fp32 master
weights); this module is the objective. Batches are drawn with a generator seeded by (seed, step,
micro-step, process), so resuming from a checkpoint replays exactly the batches an uninterrupted
run would have seen (MLM masks too).

Sentence-embedding checkpoints such as all-MiniLM-L6-v2 ship without an MLM head. Its transform
(dense + LayerNorm) is then started as the identity rather than at random, so the first steps'
gradients do not scramble the pretrained embedding space the fine-tuning stage starts from; the
decoder is tied to the word embeddings as usual.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import loop
from training.config import TrainConfig
from training.corpus import Chunk, sample_batch
from training.schedule import anneal_start_step, make_scheduler

log = logging.getLogger(__name__)


def _tokenise(
    tok, chunks: Sequence[Chunk], context_length: int, mlm: bool = False
) -> list[list[int]]:  # type: ignore[no-untyped-def]
    if mlm:  # [CLS] text [SEP], as the encoder sees text when it embeds
        enc = tok([c.text for c in chunks], truncation=True, max_length=context_length)
        return [list(ids) for ids in enc["input_ids"]]
    enc = tok([c.text for c in chunks], add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    out = []
    for ids in enc:
        ids = list(ids)[: context_length - 1]
        out.append(ids + ([int(eos)] if eos is not None else []))
    return out


MLM_PROB = 0.15


def mask_tokens(
    batch: dict[str, torch.Tensor], tok, gen: torch.Generator, prob: float = MLM_PROB
) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """BERT-style masking of a collated batch: ``prob`` of the real, non-special tokens become
    targets; of those 80% -> [MASK], 10% -> a random token, 10% unchanged. Seeded by ``gen``."""
    ids = batch["input_ids"].clone()  # [B, T]
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in tok.all_special_ids:
        special |= ids == sid
    eligible = (batch["attention_mask"] == 1) & ~special
    pick = (torch.rand(ids.shape, generator=gen) < prob) & eligible
    if not bool(pick.any()):  # at least one target per batch, so the loss is defined
        first = eligible.flatten().nonzero()
        if len(first):
            pick.view(-1)[first[0]] = True
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    ids[pick & (roll < 0.8)] = int(tok.mask_token_id)
    rand = pick & (roll >= 0.8) & (roll < 0.9)
    ids[rand] = torch.randint(len(tok), ids.shape, generator=gen)[rand]
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}


def mlm_loss(acc, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """MLM loss with the vocabulary head applied to the masked positions only: the head's
    [hidden x vocab] product costs about as much as all of MiniLM's layers and 85% of the
    positions carry no target (docs/decisions/004-flat-training-on-cpu.md)."""
    inner = acc.unwrap_model(model)
    if hasattr(inner, "get_base_model"):  # peft: LoRA layers live inside the base model
        inner = inner.get_base_model()
    backbone = getattr(inner, inner.base_model_prefix)
    head = getattr(inner, "cls", None)  # BERT-shaped MLM head
    if head is None:  # other encoders: the model's own loss
        return model(**batch).loss
    with acc.autocast():
        hidden = backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state  # [B, T, H]
        target = batch["labels"] != -100  # [B, T]
        logits = head(hidden[target])  # [N, V]
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"][target])


def _load_mlm(base_dir: Path):  # type: ignore[no-untyped-def]
    """``AutoModelForMaskedLM``; a missing head transform starts as the identity (see above)."""
    from transformers import AutoModelForMaskedLM

    model, info = AutoModelForMaskedLM.from_pretrained(
        base_dir, dtype=torch.float32, output_loading_info=True
    )
    missing = [k for k in info.get("missing_keys", []) if ".transform." in k]
    if missing:
        transform = getattr(getattr(model, "cls", None), "predictions", None)
        transform = getattr(transform, "transform", None)  # BERT: cls.predictions.transform
        if transform is not None and hasattr(transform, "dense"):
            with torch.no_grad():
                transform.dense.weight.copy_(torch.eye(transform.dense.weight.shape[0]))
                transform.dense.bias.zero_()
            log.info("cpt: %s has no MLM head; transform started as the identity", base_dir)
    return model


def _collate(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # no loss on padding (pad may equal EOS)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LMObjective(loop.Objective):
    """Next-token (decoder) or masked-LM (encoder) loss on corpus chunks sampled per step."""

    def __init__(
        self,
        cfg: TrainConfig,
        acc: Any,
        model: Any,
        tok: Any,
        chunks: Sequence[Chunk],
        mlm: bool,
    ) -> None:
        c = cfg.cpt
        self.acc, self.model, self.tok, self.mlm = acc, model, tok, mlm
        self.seed, self.batch_size, self.ratio = c.seed, c.batch_size, cfg.corpus.mixed_ratio
        self.pad = int(tok.pad_token_id)
        self.seqs = _tokenise(tok, chunks, cfg.corpus.context_length, mlm)
        kinds = np.array([ch.kind for ch in chunks])
        self.main_pools = {k: np.flatnonzero(kinds == k) for k in ("domain", "mixed")}
        self.anneal_pools = self.main_pools
        self.switch = c.steps  # never
        if c.anneal_domains:
            keep = set(c.anneal_domains)
            ok = np.array([set(ch.domains) <= keep for ch in chunks])
            self.anneal_pools = {k: np.flatnonzero((kinds == k) & ok) for k in ("domain", "mixed")}
            self.switch = anneal_start_step(c.steps, c.schedule.anneal_frac)
            n_anneal = sum(v.size for v in self.anneal_pools.values())
            if n_anneal == 0:
                raise ValueError(
                    f"cpt.anneal_domains={c.anneal_domains}: no corpus chunk qualifies"
                )
            log.info(
                "cpt: annealing from step %d on %d chunks of %s",
                self.switch,
                n_anneal,
                c.anneal_domains,
            )

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        pools = self.anneal_pools if step >= self.switch else self.main_pools
        rng = np.random.default_rng([self.seed, step, micro, self.acc.process_index])
        pick = sample_batch(pools, self.ratio, self.batch_size, rng)
        batch = _collate([self.seqs[i] for i in pick], self.pad)
        if self.mlm:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            batch = mask_tokens(batch, self.tok, gen)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if self.mlm:
            loss = mlm_loss(self.acc, self.model, batch)
        else:
            loss = self.model(**batch).loss
        return loss, int(batch["attention_mask"].sum())


def run_cpt(
    cfg: TrainConfig, base_dir: Path, chunks: list[Chunk], out_dir: Path
) -> loop.StageResult:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cprec.lm import is_decoder_config

    c = cfg.cpt
    out_dir.mkdir(parents=True, exist_ok=True)
    key = loop.stage_key(
        {
            "cpt": c.model_dump(mode="json"),
            "base": str(base_dir),
            "model": cfg.model.model_dump(mode="json"),
            "n_chunks": len(chunks),
            "first": chunks[0].text if chunks else "",
        }
    )
    done = out_dir / "summary.json"
    if done.is_file() and (out_dir / "model" / "config.json").is_file():
        prev = json.loads(done.read_text())
        if prev.get("key") == key and c.resume:
            log.info("cpt: %s is complete for this config; reusing it", out_dir / "model")
            return loop.StageResult(out_dir / "model", {**prev, "reused": True})
    if not chunks:
        raise ValueError("cpt: the corpus is empty")
    mlm = not is_decoder_config(AutoConfig.from_pretrained(base_dir))

    torch.manual_seed(c.seed)
    acc = loop.make_accelerator(cfg.model.device, c.grad_accum, cfg.model.train_precision)
    tok = AutoTokenizer.from_pretrained(base_dir)
    if mlm and tok.mask_token_id is None:
        raise ValueError(f"cpt: {base_dir} is an encoder without a [MASK] token; MLM needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if mlm:
        model = _load_mlm(base_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        if c.lora.enabled:
            model.enable_input_require_grads()
    if c.lora.enabled:
        # MLM: the head transform stays trainable beside the adapters (it may be fresh)
        model = loop.apply_lora(
            model, c.lora, None if mlm else "CAUSAL_LM", ["transform"] if mlm else None
        )
    n_train, n_total = loop.count_params(model)
    log.info(
        "cpt: %s objective, %d / %d trainable parameters (%s)",
        "MLM" if mlm else "next-token",
        n_train,
        n_total,
        "LoRA" if c.lora.enabled else "full",
    )
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay
    )
    sched = make_scheduler(opt, c.schedule.kind, c.steps, **c.schedule.kwargs())
    model, opt = acc.prepare(model, opt)
    objective = LMObjective(cfg, acc, model, tok, chunks, mlm)

    ckpt = loop.Checkpoint(out_dir / "checkpoint", key, acc, model, opt, sched)
    meter = loop.Meter("tokens", scale=acc.num_processes)
    start = 0
    if c.resume and (resumed := ckpt.restore()) is not None:
        start, meter.rows = resumed
        log.info("cpt: resumed from step %d", start)
    update = loop.Update(
        model,
        opt,
        sched,
        acc=acc,
        grad_accum=c.grad_accum,
        max_grad_norm=c.max_grad_norm,
        clip=list(model.parameters()),
    )
    loop.run(
        objective,
        update,
        meter,
        range(start, c.steps),
        log_every=c.log_every,
        checkpoint=ckpt,  # the last save comes before merging: LoRA layers change shape
        checkpoint_every=c.checkpoint_every,
        desc="cpt",
        progress=acc.is_main_process,
    )
    model_dir = out_dir / "model"
    summary = {
        "key": key,
        **meter.summary(),
        "steps": c.steps,
        "resumed_from": start,
        "trainable_params": n_train,
        "total_params": n_total,
        "schedule": c.schedule.model_dump(),
        "lora": c.lora.enabled,
        "objective": "mlm" if mlm else "next-token",
    }
    if acc.is_main_process:
        loop.write_log(meter.rows, out_dir / "log.csv")
        loop.plot_curves({"cpt": meter.rows}, out_dir / "curves.png", f"CPT ({c.schedule.kind})")
        loop.save_merged(acc.unwrap_model(model), tok, model_dir)
        done.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    acc.wait_for_everyone()
    log.info(
        "cpt: %d steps, %d tokens in %.1fs (%.0f tokens/s), loss %s -> %s",
        c.steps,
        summary["tokens"],
        summary["seconds"],
        summary["tokens_per_s"],
        summary["first_loss"],
        summary["final_loss"],
    )
    return loop.StageResult(model_dir, summary)
