"""Learning-rate schedules as ``torch.optim.lr_scheduler.LambdaLR`` factories.

Warmup-Stable-Annealing (WSA, CPRec; the same shape as MiniCPM's "WSD"):

* **warmup** — linear from 0 to the peak LR over ``warmup_frac`` of the steps;
* **stable** — the peak LR, held flat;
* **annealing** — the last ``anneal_frac`` of the steps decay to ``min_ratio * peak`` with a
  ``linear``, ``cosine`` or ``exponential`` shape.

CPRec does not publish its values. Defaults follow MiniCPM (Hu et al., 2024) and the WSD
literature: a short warmup (2 %), annealing on the last 15 % (MiniCPM reports ~10 % of the steps
suffice; 10-20 % is the common range) down to 0.1x the peak with an exponential-like shape.
We default to ``cosine`` for the annealing tail because it is bounded and smooth at both ends;
``exponential`` is MiniCPM's exact form.  WSA's practical point is that the stable phase can be
cut at any step and annealed (e.g. on a different data mix, see ``CptConfig.anneal_domains``),
which a cosine schedule cannot do.

``cosine`` (the ablation) is the usual warmup + half-cosine decay to ``min_ratio`` over the
whole run. ``constant`` is warmup then flat (for fine-tuning, where early stopping cuts the run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

Shape = Literal["linear", "cosine", "exponential"]
Kind = Literal["wsa", "cosine", "constant"]


def wsa_lambda(
    total_steps: int,
    warmup_frac: float = 0.02,
    anneal_frac: float = 0.15,
    min_ratio: float = 0.1,
    shape: Shape = "cosine",
) -> Callable[[int], float]:
    """LR multiplier of optimizer step ``step`` (0-based; ``step == total_steps`` is the end)."""
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    if not (0 <= warmup_frac < 1 and 0 <= anneal_frac <= 1 and warmup_frac + anneal_frac <= 1):
        raise ValueError(
            "need 0 <= warmup_frac, 0 <= anneal_frac and warmup_frac + anneal_frac <= 1"
        )
    if not 0 < min_ratio <= 1:
        raise ValueError("min_ratio must be in (0, 1]")
    warmup = int(round(warmup_frac * total_steps))
    anneal = int(round(anneal_frac * total_steps))
    anneal_start = total_steps - anneal

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # reaches 1.0 at the last warmup step
        if step < anneal_start or anneal == 0:
            return 1.0
        # progress in (0, 1]: 1.0 at the final step (step == total_steps)
        p = min(1.0, (step - anneal_start + 1) / anneal)
        return anneal_multiplier(p, min_ratio, shape)

    return f


def anneal_multiplier(p: float, min_ratio: float, shape: Shape) -> float:
    """Multiplier at annealing progress ``p`` in [0, 1]: 1.0 at p=0, ``min_ratio`` at p=1."""
    if shape == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    if shape == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "exponential":
        return float(min_ratio**p)
    raise ValueError(f"unknown annealing shape {shape!r}; use linear, cosine or exponential")


def cosine_lambda(
    total_steps: int, warmup_frac: float = 0.02, min_ratio: float = 0.1
) -> Callable[[int], float]:
    """Warmup, then half-cosine from the peak to ``min_ratio`` over all remaining steps."""
    warmup = int(round(warmup_frac * total_steps))
    decay = max(1, total_steps - warmup)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup + 1) / decay)
        return anneal_multiplier(p, min_ratio, "cosine")

    return f


def constant_lambda(total_steps: int, warmup_frac: float = 0.02) -> Callable[[int], float]:
    warmup = int(round(warmup_frac * total_steps))
    return lambda step: (step + 1) / warmup if step < warmup else 1.0


def make_lambda(
    kind: Kind,
    total_steps: int,
    warmup_frac: float = 0.02,
    anneal_frac: float = 0.15,
    min_ratio: float = 0.1,
    shape: Shape = "cosine",
) -> Callable[[int], float]:
    if kind == "wsa":
        return wsa_lambda(total_steps, warmup_frac, anneal_frac, min_ratio, shape)
    if kind == "cosine":
        return cosine_lambda(total_steps, warmup_frac, min_ratio)
    if kind == "constant":
        return constant_lambda(total_steps, warmup_frac)
    raise ValueError(f"unknown schedule {kind!r}; use wsa, cosine or constant")


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: Kind, total_steps: int, **kw: float | str
) -> torch.optim.lr_scheduler.LambdaLR:
    """The optimizer's LR becomes ``peak * lambda(step)``; call ``.step()`` once per update."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        make_lambda(kind, total_steps, **kw),  # type: ignore[arg-type]
    )


def anneal_start_step(total_steps: int, anneal_frac: float) -> int:
    """First step of the annealing phase (used to switch the data mix)."""
    return total_steps - int(round(anneal_frac * total_steps))
