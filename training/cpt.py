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

Distribution and precision go through HF accelerate (``accelerate launch -m training cpt ...`` for
several GPUs; on one CPU it is a no-op). bf16 autocast on CUDA; fp32 master weights.
Batches are drawn with a generator seeded by (seed, step, micro-step, process), so resuming from a
checkpoint replays exactly the batches an uninterrupted run would have seen (MLM masks too).

Sentence-embedding checkpoints such as all-MiniLM-L6-v2 ship without an MLM head. Its transform
(dense + LayerNorm) is then started as the identity rather than at random, so the first steps'
gradients do not scramble the pretrained embedding space the fine-tuning stage starts from; the
decoder is tied to the word embeddings as usual.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from training.config import LoraConfig, TrainConfig
from training.corpus import Chunk, sample_batch
from training.schedule import anneal_start_step, make_scheduler

log = logging.getLogger(__name__)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]


@dataclass
class StageResult:
    model_dir: Path
    summary: dict


def lora_targets(model, lcfg: LoraConfig) -> list[str]:  # type: ignore[no-untyped-def]
    if lcfg.target_modules:
        return list(lcfg.target_modules)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for cand in (LLAMA_TARGETS, BERT_TARGETS, ["c_attn", "c_proj", "c_fc"]):
        found = [t for t in cand if t in names]
        if found:
            return found
    raise ValueError(
        "cannot guess LoRA target modules for this architecture; "
        "set lora.target_modules in the config"
    )


def apply_lora(
    model, lcfg: LoraConfig, task_type: str | None, modules_to_save: list[str] | None = None
):  # type: ignore[no-untyped-def]
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    pc = PeftLora(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=lora_targets(model, lcfg),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, pc)


def count_params(model) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def make_accelerator(device: str, grad_accum: int, precision: str = "auto"):  # type: ignore[no-untyped-def]
    """``precision``: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 / fp32 force it (bf16
    autocast on a CPU with native bf16 trains ~1.5-2x faster; master weights stay fp32)."""
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    mp = {"auto": "no" if cpu else "bf16", "bf16": "bf16", "fp32": "no"}[precision]
    return Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum, mixed_precision=mp)


def stage_key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_log(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def plot_curves(rows: list[dict], path: Path, title: str, extra: str | None = None) -> None:
    """Loss and LR against the step (and ``extra`` column, e.g. valid NDCG@10, when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    steps = [r["step"] for r in rows]
    panels = 3 if extra and any(r.get(extra) not in (None, "") for r in rows) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.2))
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[1].plot(steps, [r["lr"] for r in rows], color="tab:orange")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    if panels == 3:
        pts = [(r["step"], r[extra]) for r in rows if r.get(extra) not in (None, "")]
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="tab:green")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel(extra)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    [hidden x vocab] product costs about as much as all of MiniLM's layers, and 85% of the
    positions carry no target (~2x faster steps than ``model(**batch).loss``)."""
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


def run_cpt(cfg: TrainConfig, base_dir: Path, chunks: list[Chunk], out_dir: Path) -> StageResult:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cprec.lm import is_decoder_config

    c = cfg.cpt
    out_dir.mkdir(parents=True, exist_ok=True)
    key = stage_key(
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
            return StageResult(out_dir / "model", {**prev, "reused": True})
    if not chunks:
        raise ValueError("cpt: the corpus is empty")
    mlm = not is_decoder_config(AutoConfig.from_pretrained(base_dir))

    torch.manual_seed(c.seed)
    acc = make_accelerator(cfg.model.device, c.grad_accum, cfg.model.train_precision)
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
        model = apply_lora(
            model, c.lora, None if mlm else "CAUSAL_LM", ["transform"] if mlm else None
        )
    n_train, n_total = count_params(model)
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
    # The scheduler is stepped by hand once per optimizer update (not prepared): accelerate
    # would step it once per process, which breaks a step-indexed schedule.
    model, opt = acc.prepare(model, opt)

    seqs = _tokenise(tok, chunks, cfg.corpus.context_length, mlm)
    kinds = np.array([ch.kind for ch in chunks])
    main_pools = {k: np.flatnonzero(kinds == k) for k in ("domain", "mixed")}
    anneal_pools = main_pools
    switch = c.steps  # never
    if c.anneal_domains:
        keep = set(c.anneal_domains)
        ok = np.array([set(ch.domains) <= keep for ch in chunks])
        anneal_pools = {k: np.flatnonzero((kinds == k) & ok) for k in ("domain", "mixed")}
        switch = anneal_start_step(c.steps, c.schedule.anneal_frac)
        n_anneal = sum(v.size for v in anneal_pools.values())
        if n_anneal == 0:
            raise ValueError(f"cpt.anneal_domains={c.anneal_domains}: no corpus chunk qualifies")
        log.info(
            "cpt: annealing from step %d on %d chunks of %s", switch, n_anneal, c.anneal_domains
        )

    ckpt = out_dir / "checkpoint"
    start, rows = 0, []
    if c.resume and (ckpt / "state.json").is_file() and (ckpt / "state.pt").is_file():
        st = json.loads((ckpt / "state.json").read_text())
        if st.get("key") == key:
            _load_checkpoint(acc, model, opt, sched, ckpt)
            start, rows = int(st["step"]), st["rows"]
            log.info("cpt: resumed from step %d", start)

    model.train()
    pad = int(tok.pad_token_id)
    t0 = time.perf_counter()
    tokens = window_tokens = 0
    window_loss: list[float] = []
    window_t = time.perf_counter()
    bar = tqdm(
        range(start, c.steps),
        desc="cpt",
        disable=not acc.is_main_process,
        initial=start,
        total=c.steps,
    )
    for step in bar:
        pools = anneal_pools if step >= switch else main_pools
        for micro in range(c.grad_accum):
            rng = np.random.default_rng([c.seed, step, micro, acc.process_index])
            pick = sample_batch(pools, cfg.corpus.mixed_ratio, c.batch_size, rng)
            batch = _collate([seqs[i] for i in pick], pad)
            if mlm:
                gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
                batch = mask_tokens(batch, tok, gen)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(model):
                loss = mlm_loss(acc, model, batch) if mlm else model(**batch).loss
                acc.backward(loss)
                if acc.sync_gradients and c.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), c.max_grad_norm)
                opt.step()
                opt.zero_grad()
            n = int(batch["attention_mask"].sum())
            tokens += n
            window_tokens += n
            window_loss.append(float(loss.detach()))
        lr = sched.get_last_lr()[0]
        sched.step()
        if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
            now = time.perf_counter()
            row = {
                "step": step + 1,
                "loss": round(float(np.mean(window_loss)), 5),
                "lr": lr,
                "tokens": tokens,
                "tokens_per_s": round(window_tokens * acc.num_processes / (now - window_t), 1),
            }
            rows.append(row)
            bar.set_postfix(loss=row["loss"], lr=f"{lr:.2e}", tok_s=row["tokens_per_s"])
            window_loss, window_tokens, window_t = [], 0, now
        if (step + 1) % c.checkpoint_every == 0 and step + 1 < c.steps:
            _save_checkpoint(acc, model, opt, sched, ckpt, key, step + 1, rows)
    bar.close()
    elapsed = time.perf_counter() - t0
    model_dir = out_dir / "model"
    summary = {
        "key": key,
        "steps": c.steps,
        "resumed_from": start,
        "trainable_params": n_train,
        "total_params": n_total,
        "tokens": tokens * acc.num_processes,
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(tokens * acc.num_processes / max(elapsed, 1e-9), 1),
        "final_loss": rows[-1]["loss"] if rows else None,
        "first_loss": rows[0]["loss"] if rows else None,
        "schedule": c.schedule.model_dump(),
        "lora": c.lora.enabled,
        "objective": "mlm" if mlm else "next-token",
    }
    _save_checkpoint(
        acc, model, opt, sched, ckpt, key, c.steps, rows
    )  # before merging: LoRA layers change shape
    if acc.is_main_process:
        write_log(rows, out_dir / "log.csv")
        plot_curves(rows, out_dir / "curves.png", f"CPT ({c.schedule.kind})")
        save_merged(acc.unwrap_model(model), tok, model_dir)
        done.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    acc.wait_for_everyone()
    log.info(
        "cpt: %d steps, %d tokens in %.1fs (%.0f tokens/s), loss %s -> %s",
        c.steps,
        summary["tokens"],
        elapsed,
        summary["tokens_per_s"],
        summary["first_loss"],
        summary["final_loss"],
    )
    return StageResult(model_dir, summary)


def _save_checkpoint(
    acc,
    model,
    opt,
    sched,
    ckpt: Path,
    key: str,
    step: int,  # type: ignore[no-untyped-def]
    rows: list[dict],
) -> None:
    """Trainable weights (LoRA: only the adapters, MBs not the whole model), optimizer, scheduler
    and step, written to a temp file then renamed (an interrupted save keeps the previous one)."""
    if acc.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
        m = acc.unwrap_model(model)
        state = {
            "model": {n: p.detach().cpu() for n, p in m.named_parameters() if p.requires_grad},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
        }
        torch.save(state, ckpt / "state.pt.tmp")
        (ckpt / "state.pt.tmp").replace(ckpt / "state.pt")
        (ckpt / "state.json").write_text(json.dumps({"key": key, "step": step, "rows": rows}))
    acc.wait_for_everyone()


def _load_checkpoint(acc, model, opt, sched, ckpt: Path) -> None:  # type: ignore[no-untyped-def]
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    missing = acc.unwrap_model(model).load_state_dict(state["model"], strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(
            f"{ckpt}: checkpoint does not match the model: {missing.unexpected_keys[:3]}"
        )
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])


def save_merged(model, tok, out: Path) -> None:  # type: ignore[no-untyped-def]
    """Merge LoRA (if any) and save a plain HF folder with the tokenizer."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
