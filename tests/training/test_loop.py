"""training/loop.py on a one-parameter objective: rows, evaluation, early stopping, deadline."""

from __future__ import annotations

import time

import pytest
import torch

from training.loop import EarlyStopping, Meter, Objective, Update, run, write_log


class Toy(Objective):
    """Loss (w - 3)^2 over 2 "tokens" a step; ``scores`` are handed out one per evaluation."""

    def __init__(self, scores: list[float] | None = None, sleep: float = 0.0) -> None:
        self.w = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.w.weight)
        self.scores, self.sleep, self.evals = list(scores or []), sleep, 0

    def batch(self, step: int, micro: int) -> int:
        time.sleep(self.sleep)
        return step

    def loss(self, batch: int) -> tuple[torch.Tensor, int]:
        return (self.w.weight.sum() - 3.0) ** 2, 2

    def evaluate(self) -> float | None:
        self.evals += 1
        return self.scores.pop(0) if self.scores else None


def update_of(obj: Toy) -> Update:
    opt = torch.optim.SGD(obj.w.parameters(), lr=0.1)
    return Update(obj.w, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)))


def test_rows_lr_and_summary() -> None:
    obj = Toy()
    meter = Meter("tokens")
    out = run(obj, update_of(obj), meter, range(7), log_every=3, progress=False)
    assert out.steps == 7 and not out.cut and not out.stopped
    assert [r["step"] for r in meter.rows] == [3, 6, 7]  # every 3 steps and the last
    assert [r["lr"] for r in meter.rows] == pytest.approx([0.1 / 3, 0.1 / 6, 0.1 / 7])
    assert [r["tokens"] for r in meter.rows] == [6, 12, 14]
    assert meter.rows[0]["loss"] > meter.rows[-1]["loss"]  # it learns
    s = meter.summary()
    assert s["steps"] == 7 and s["tokens"] == 14 and s["first_loss"] == meter.rows[0]["loss"]


def test_evaluation_early_stopping_keeps_the_best() -> None:
    obj = Toy(scores=[0.1, 0.3, 0.2, 0.25, 0.9])
    meter = Meter("tokens")
    stop = EarlyStopping(2, snapshot=lambda: obj.w.weight.item())
    out = run(
        obj,
        update_of(obj),
        meter,
        range(10),
        log_every=1,
        eval_every=2,
        stopping=stop,
        progress=False,
    )
    # evaluations after steps 2, 4, 6, 8; two without gain after the best (step 4) stop it
    assert out.stopped and out.steps == 8 and obj.evals == 4
    assert (stop.best, stop.best_step) == (0.3, 4)
    assert [r.get("valid_ndcg10") for r in meter.rows] == [
        None,
        0.1,
        None,
        0.3,
        None,
        0.2,
        None,
        0.25,
    ]


def test_the_deadline_ends_the_run_with_a_row_and_a_score() -> None:
    obj = Toy(scores=[0.5], sleep=0.02)
    meter = Meter("targets")
    out = run(
        obj,
        update_of(obj),
        meter,
        range(1000),
        log_every=50,
        deadline=time.perf_counter() + 0.2,
        progress=False,
    )
    assert out.cut and 0 < out.steps < 1000 and out.score == 0.5
    assert meter.rows[-1]["step"] == out.steps and meter.rows[-1]["valid_ndcg10"] == 0.5


def test_log_keeps_every_column(tmp_path) -> None:
    write_log(
        [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "valid": 0.5}], tmp_path / "l.csv"
    )
    assert (tmp_path / "l.csv").read_text().splitlines() == [
        "step,loss,valid",
        "1,2.0,",
        "2,1.0,0.5",
    ]
