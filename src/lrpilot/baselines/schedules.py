"""Adapters that let the loop drive a torch LR scheduler like any other pilot."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lrpilot.core.contract import Decision, EpochSignals, Pilot, StepSignals, current_lrs

__all__ = ["PlateauPilot", "SchedulePilot", "poly_decay"]


class SchedulePilot(Pilot):
    """Steps a ``torch.optim.lr_scheduler`` after every optimizer step or after every epoch.

    Per-epoch schedules report an LR change as a decision with reason ``"<name>"``; per-step schedules
    move the LR every step, which the loop records in the per-step LR trajectory instead.

    Args:
        optimizer: the optimizer the scheduler drives.
        scheduler: a torch LR scheduler built on ``optimizer``.
        per: ``"step"`` or ``"epoch"``.
        name: the reason recorded with each change (e.g. ``"step-decay"``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, *, per: str, name: str) -> None:
        super().__init__(optimizer)
        if per not in ("step", "epoch"):
            raise ValueError(f"per must be 'step' or 'epoch', got {per!r}")
        self.scheduler = scheduler
        self.per = per
        self.name = name

    def on_step_end(self, signals: StepSignals) -> None:
        if self.per == "step":
            self.scheduler.step()

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        if self.per != "epoch":
            return None
        before = current_lrs(self.optimizer)
        self.scheduler.step()
        after = current_lrs(self.optimizer)
        if after != before:
            return Decision(reason=self.name, lr=after)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "per": self.per, "name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


class PlateauPilot(Pilot):
    """``ReduceLROnPlateau`` on the validation loss (a non-finite loss counts as no improvement)."""

    def __init__(self, optimizer: torch.optim.Optimizer, **plateau_options: Any) -> None:
        super().__init__(optimizer)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", **plateau_options)

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        before = current_lrs(self.optimizer)
        value = signals.val_loss if math.isfinite(signals.val_loss) else math.inf
        self.scheduler.step(value)
        after = current_lrs(self.optimizer)
        if after != before:
            return Decision(reason="plateau-reduce", lr=after, info={"val_loss": signals.val_loss})
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


def poly_decay(total_steps: int, power: float) -> Callable[[int], float]:
    """LR multiplier ``(1 - t/T)^power`` (LARS's polynomial decay), floored at 0."""

    def factor(t: int) -> float:
        return max(0.0, 1.0 - t / max(total_steps, 1)) ** power

    return factor
