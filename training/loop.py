"""The training loop every stage runs, and what the stages share around it.

A stage is an :class:`Objective`: how to build step ``i``'s batch, the loss of a batch (with the
tokens or targets it covers) and, optionally, a score to early-stop on. :func:`run` does the rest:

- one optimiser update a step (:class:`Update`: backward, clipping, the optimiser step, the LR
  schedule stepped once per update; micro-batches accumulated under accelerate);
- a row every ``log_every`` steps (:class:`Meter`): the window's mean loss, the LR, the tokens or
  targets so far and their rate over the time the steps took (evaluations and checkpoints excluded),
  shown on the tqdm bar too;
- evaluation every ``eval_every`` steps and at the end of the run, merged into that step's row,
  with :class:`EarlyStopping`'s best score, best state and patience;
- checkpoints (:class:`Checkpoint`) every ``checkpoint_every`` steps and at the end, for resuming;
- a wall-clock deadline.

Stages: ``training/cpt.py`` (next-token or masked-LM loss), ``training/finetune.py`` (the dual
encoder's InfoNCE) and ``training/hier.py`` (next item at every position). Also here: the
accelerator, LoRA (apply, count, merge), the log CSV and the curves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from training.config import LoraConfig

log = logging.getLogger(__name__)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]


@dataclass
class StageResult:
    """What a stage hands on: its model folder and its summary."""

    model_dir: Path
    summary: dict[str, Any]


def stage_key(obj: dict[str, Any]) -> str:
    """A short hash of what determines a stage's output (resume, reuse, shared folders)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- device, precision, LoRA -------------------------------------------------------------------


def make_accelerator(device: str, grad_accum: int = 1, precision: str = "auto"):  # type: ignore[no-untyped-def]
    """HF accelerate (``accelerate launch`` for several GPUs; on one device a no-op).
    ``precision``: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 / fp32 force it (bf16 pays on a
    CPU with native bf16, docs/decisions/004-flat-training-on-cpu.md); master weights stay fp32."""
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    mp = {"auto": "no" if cpu else "bf16", "bf16": "bf16", "fp32": "no"}[precision]
    return Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum, mixed_precision=mp)


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
    """(trainable, total) parameters."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def save_merged(model, tok, out: Path) -> None:  # type: ignore[no-untyped-def]
    """Merge LoRA (if any) and save a plain HF folder with the tokenizer."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


# -- the objective and the update --------------------------------------------------------------


class Objective:
    """What a stage adds to the loop."""

    def batch(self, step: int, micro: int) -> Any:
        """Step ``step``'s batch (``micro``: its micro-batch under gradient accumulation)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        """The batch's mean loss and how many tokens (or targets) it covers."""
        raise NotImplementedError

    def evaluate(self) -> float | None:
        """A score to early-stop on, higher is better (None: the stage does not evaluate)."""
        return None


@dataclass
class Update:
    """One optimiser update a step. The LR schedule is stepped here, once per update, not prepared
    with accelerate, which would step it once per process and break a step-indexed schedule."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    acc: Any = None  # an accelerate.Accelerator; None: plain backward
    grad_accum: int = 1
    max_grad_norm: float = 0.0
    clip: Sequence[torch.nn.Parameter] = ()  # what max_grad_norm applies to

    def __call__(self, objective: Objective, batch: Any) -> tuple[torch.Tensor, int]:
        acc = self.acc
        with acc.accumulate(self.model) if acc is not None else nullcontext():
            loss, n = objective.loss(batch)
            if acc is not None:
                acc.backward(loss)
            else:
                loss.backward()
            if self.max_grad_norm > 0 and (acc is None or acc.sync_gradients):
                clip = acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_
                clip(self.clip, self.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad()
        return loss, n


# -- rows and the summary ----------------------------------------------------------------------


@dataclass
class Meter:
    """A stage's rows and totals. ``unit``: what a batch's count counts (tokens or targets);
    ``scale``: processes (each counts its own batches)."""

    unit: str = "tokens"
    scale: int = 1
    rows: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    count: int = 0
    train_s: float = 0.0  # time the steps took
    started: float = field(default_factory=time.perf_counter)
    _losses: list[float] = field(default_factory=list)
    _count: int = 0
    _s: float = 0.0

    def add(self, loss: float, n: int) -> None:
        """One (micro-)batch's loss and count."""
        self._losses.append(loss)
        self._count += n
        self.count += n

    def step_done(self, seconds: float) -> None:
        self.steps += 1
        self.train_s += seconds
        self._s += seconds

    @property
    def pending(self) -> bool:
        return bool(self._losses)

    def flush(self, step: int, lr: float) -> dict[str, Any]:
        """Close the window as the row of ``step``."""
        row = {
            "step": step,
            "loss": round(float(np.mean(self._losses)), 5),
            "lr": lr,
            self.unit: self.count * self.scale,
            f"{self.unit}_per_s": round(self._count * self.scale / max(self._s, 1e-9), 1),
        }
        self.rows.append(row)
        self._losses, self._count, self._s = [], 0, 0.0
        return row

    def summary(self) -> dict[str, Any]:
        losses = [r["loss"] for r in self.rows if "loss" in r]
        n = self.count * self.scale
        return {
            "steps": self.steps,
            self.unit: n,
            "seconds": round(time.perf_counter() - self.started, 1),
            "train_s": round(self.train_s, 1),
            f"{self.unit}_per_s": round(n / max(self.train_s, 1e-9), 1),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
        }


@dataclass
class EarlyStopping:
    """The best score so far, its step and state (``snapshot()`` taken when it improves), and
    the evaluations since: the run stops after ``patience`` without gain."""

    patience: int
    snapshot: Callable[[], Any]
    best: float = -math.inf
    best_step: int = 0
    bad: int = 0
    state: Any = None

    def update(self, score: float, step: int) -> bool:
        """Record an evaluation; True when the run should stop."""
        if score > self.best:
            self.best, self.best_step, self.bad = score, step, 0
            self.state = self.snapshot()
        else:
            self.bad += 1
        return self.bad >= self.patience


# -- checkpoints -------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Trainable weights (LoRA: only the adapters, MBs not the whole model), optimiser, scheduler,
    step and rows of the run ``key``, in ``folder``."""

    folder: Path
    key: str
    acc: Any
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler

    def save(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Written to a temp file then renamed: an interrupted save keeps the previous one."""
        if self.acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            m = self.acc.unwrap_model(self.model)
            state = {
                "model": {n: p.detach().cpu() for n, p in m.named_parameters() if p.requires_grad},
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
            }
            torch.save(state, self.folder / "state.pt.tmp")
            (self.folder / "state.pt.tmp").replace(self.folder / "state.pt")
            meta = {"key": self.key, "step": step, "rows": rows}
            (self.folder / "state.json").write_text(json.dumps(meta))
        self.acc.wait_for_everyone()

    def restore(self) -> tuple[int, list[dict[str, Any]]] | None:
        """(step, rows) of a checkpoint of this run, loaded into the model, optimiser and
        scheduler; None when there is none (or it is another config's)."""
        meta, pt = self.folder / "state.json", self.folder / "state.pt"
        if not (meta.is_file() and pt.is_file()):
            return None
        st = json.loads(meta.read_text())
        if st.get("key") != self.key:
            return None
        state = torch.load(pt, map_location="cpu", weights_only=False)
        missing = self.acc.unwrap_model(self.model).load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(
                f"{self.folder}: checkpoint does not match the model: {missing.unexpected_keys[:3]}"
            )
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        return int(st["step"]), list(st["rows"])


# -- the loop ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    steps: int = 0  # steps this run did
    cut: bool = False  # stopped by the deadline
    stopped: bool = False  # stopped early (patience)
    score: float | None = None  # the last evaluation's
    eval_s: float = 0.0  # the last evaluation's time


def run(
    objective: Objective,
    update: Update,
    meter: Meter,
    steps: range,
    *,
    log_every: int,
    log_from: int = 0,
    eval_every: int | None = None,
    stopping: EarlyStopping | None = None,
    score_name: str = "valid_ndcg10",
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int | None = None,
    deadline: float | None = None,
    desc: str = "train",
    progress: bool = True,
    leave: bool = True,
) -> Outcome:
    """Run ``steps`` (absolute step numbers: a resumed or later run starts past 0).

    A row is written at every step ``s`` with ``(s + 1 - log_from) % log_every == 0``, at every
    evaluation and at the run's last step; an evaluation (``objective.evaluate``) every
    ``eval_every`` steps and after the last step (or the last before the deadline) adds its score
    to that row as ``score_name`` and, with ``stopping``, may end the run.
    """
    out = Outcome()
    update.model.train()
    bar = tqdm(
        steps,
        desc=desc,
        disable=not progress,
        leave=leave,
        initial=steps.start,
        total=steps.stop,
        mininterval=1.0,
    )
    lr, done = 0.0, None  # done: the last step completed
    evaluated = None  # the step the last evaluation was made at
    for step in bar:
        if deadline is not None and time.perf_counter() > deadline:
            out.cut = True
            break
        t0 = time.perf_counter()
        for micro in range(update.grad_accum):
            loss, n = update(objective, objective.batch(step, micro))
            meter.add(float(loss.detach()), n)
        lr = float(update.sched.get_last_lr()[0])
        update.sched.step()
        meter.step_done(time.perf_counter() - t0)
        out.steps += 1
        done = step
        due = eval_every is not None and (step + 1) % eval_every == 0
        last = step + 1 == steps.stop
        if (step + 1 - log_from) % log_every == 0 or due or last:
            row = meter.flush(step + 1, lr)
            bar.set_postfix(
                loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", rate=row[f"{meter.unit}_per_s"]
            )
        if due or last:
            evaluated = step
            if _evaluate(objective, meter, step, out, stopping, score_name, bar):
                out.stopped = True
                break
        if checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and not last:
            checkpoint.save(step + 1, meter.rows)
    bar.close()
    if done is not None and meter.pending:  # cut by the deadline
        meter.flush(done + 1, lr)
    if done is not None and evaluated != done:  # cut by the deadline: score what was trained
        out.stopped = _evaluate(objective, meter, done, out, stopping, score_name, None)
    if checkpoint and done is not None:
        checkpoint.save(done + 1, meter.rows)
    return out


def _evaluate(
    objective: Objective,
    meter: Meter,
    step: int,
    out: Outcome,
    stopping: EarlyStopping | None,
    score_name: str,
    bar: Any,
) -> bool:
    """Score the model after ``step`` into its row; True when early stopping ends the run."""
    t0 = time.perf_counter()
    score = objective.evaluate()
    if score is None:
        return False
    out.score, out.eval_s = score, time.perf_counter() - t0
    meter.rows[-1][score_name] = round(score, 5)  # the row of this step, flushed just before
    stop = stopping.update(score, step + 1) if stopping is not None else False
    if bar is not None:
        best = f"{stopping.best:.4f}" if stopping is not None else ""
        bar.set_postfix(loss=f"{meter.rows[-1]['loss']:.3f}", score=f"{score:.4f}", best=best)
    return stop


# -- outputs -----------------------------------------------------------------------------------


def write_log(rows: Iterable[Mapping[str, Any]], path: Path) -> None:
    """Rows as CSV: the columns of every row in first-seen order, blank where a row has none."""
    rows = list(rows)
    if not rows:
        return
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(keys), restval="")
        w.writeheader()
        w.writerows(rows)


def plot_curves(
    stages: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Path,
    title: str = "",
    extra: str = "valid_ndcg10",
) -> None:
    """Loss and LR against the step, one line per stage (each starting where the previous one
    ended), and the ``extra`` column (e.g. valid NDCG@10) where any row has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(stages.values()):
        return
    has_extra = any(r.get(extra) not in (None, "") for rows in stages.values() for r in rows)
    panels = 3 if has_extra else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.2))
    off = 0
    for name, rows in stages.items():
        lr = [r for r in rows if "loss" in r]
        if lr:
            axes[0].plot([off + r["step"] for r in lr], [r["loss"] for r in lr], label=name)
            axes[1].plot([off + r["step"] for r in lr], [r["lr"] for r in lr], label=name)
        if has_extra:
            pts = [(off + r["step"], r[extra]) for r in rows if r.get(extra) not in (None, "")]
            if pts:
                axes[2].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        off += max((r["step"] for r in rows), default=0)
    for ax, label in zip(axes, ["loss", "learning rate", extra], strict=False):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    if len(stages) > 1:
        axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
