"""The per-step schedules ``auto`` can run after its sweep: linear warm-up, then cosine annealing to zero
(``schedule="cosine"``, rounds 1-4 of docs/methods/auto.md), or the warm-up alone (``"constant"``, and
``"wsd"``, whose cooldown is ``pilots/cooldown.py``'s wrapper: the default since round 5).

Cosine annealing over the known budget (Loshchilov & Hutter 2017) is what the tuned reference of the bench
uses; the warm-up (Goyal et al. 2017) is an option of ``auto`` (its ablation is in docs/methods/auto.md)::

    factor(t) = (t + 1) / W                                       t < W  (W warm-up steps)
    factor(t) = 1/2 * (1 + cos(pi * (t - W) / (T - W)))            W <= t < T
    lr(t)     = lr * factor(t)

With ``anneal=False`` the factor stays 1 after the warm-up (``auto``'s "constant" and "wsd" schedules).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lrpilot.core.contract import Pilot, StepSignals, current_lrs, set_lrs

__all__ = ["WarmupCosine", "warmup_cosine"]


def warmup_cosine(total_steps: int, warmup_steps: int = 0, anneal: bool = True) -> Callable[[int], float]:
    """``factor(t)``, the multiplier of the base LR at step ``t`` (for ``torch.optim.lr_scheduler.LambdaLR``);
    ``anneal=False``: 1 after the warm-up."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}), got {warmup_steps!r}")
    decay = total_steps - warmup_steps

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        if not anneal:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(t - warmup_steps, decay) / decay))

    return factor


class WarmupCosine(Pilot):
    """Drives ``optimizer``'s LRs by :func:`warmup_cosine` after every step: ``lr_i(t) = base_i * factor(t)``
    (``anneal=False``: the warm-up only).

    ``base_i`` are the group LRs when the pilot is built; the step count is its state, so a checkpoint
    or a rollback resumes the trajectory where it was. ``after_step`` (e.g. an iterate average's update)
    is called after every step, before the LR moves.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 after_step: Callable[[], None] | None = None, anneal: bool = True) -> None:
        super().__init__(optimizer)
        self.after_step = after_step
        self.factor = warmup_cosine(total_steps, warmup_steps, anneal)
        self.base_lrs = current_lrs(optimizer)
        self.t = 0
        set_lrs(optimizer, [base * self.factor(0) for base in self.base_lrs])

    def on_step_end(self, signals: StepSignals) -> None:
        if self.after_step is not None:
            self.after_step()
        self.t += 1
        set_lrs(self.optimizer, [base * self.factor(self.t) for base in self.base_lrs])

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = int(state["t"])
        self.base_lrs = tuple(float(v) for v in state["base_lrs"])
