"""The divergence guard of the step-level Lipschitz optimizers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lrpilot.core.contract import TRAIN_EVAL_LOSS, Decision, EpochSignals, Pilot
from lrpilot.core.rollback import Rollback, check_backoff, exploded
from lrpilot.estimators.lipschitz import (
    PenultimateMonitor,
)
from lrpilot.pilots.lipschitz.pilot import CHECKPOINT_TAG, initial_loss

__all__ = ["LipschitzGuard"]


# ====================================================================================================
# The divergence guard of the step-level methods
# ====================================================================================================
class LipschitzGuard(Pilot):
    """Rolls a step-level Lipschitz optimizer back when an epoch diverges (the paper's section 8 warning).

    After every good epoch it asks the loop to checkpoint. After a non-finite epoch, an exploded one (mean
    training loss above ``explode_factor`` times the untrained model's loss over the training set) or a
    collapsed one (every
    penultimate activation zero: the constant, hence the LR, is undefined), it restores the last
    checkpoint (weights and the optimizer's averages) and multiplies the optimizer's ``lr`` (the step-size
    multiplier) by ``backoff``; the multiplier persists. After ``max_rollbacks`` it gives up and the run
    stops (as diverged for a non-finite loss). It removes the activation hook when training ends.
    """

    handles_nonfinite = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        backoff: float = 0.1,
        max_rollbacks: int = 3,
        explode_factor: float | None = 10.0,
        monitor: PenultimateMonitor | None = None,
    ) -> None:
        super().__init__(optimizer)
        check_backoff(backoff, max_rollbacks, explode_factor)
        self.rollback = Rollback(CHECKPOINT_TAG, factor=backoff, max_rollbacks=max_rollbacks)
        self.explode_factor = explode_factor
        self.initial_loss = math.nan
        self.monitor = monitor

    @property
    def rollbacks(self) -> int:
        return self.rollback.rollbacks

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """The loss over the training set, once, before training: the yardstick of an explosion."""
        return frozenset({TRAIN_EVAL_LOSS}) if math.isnan(self.initial_loss) else frozenset()

    def on_train_begin(self, signals: EpochSignals) -> Decision | None:
        self.initial_loss = initial_loss(signals)
        return self._checkpoint()

    def _checkpoint(self) -> Decision | None:
        return self.rollback.checkpoint("lipschitz-checkpoint")  # none (and no copy) when rollbacks are off

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        stats = self.monitor.epoch() if self.monitor is not None else None
        if self.monitor is not None:
            self.monitor.reset()
        if signals.nonfinite:
            reason = "lipschitz-diverged-rollback"
        elif exploded((signals.train_loss, signals.val_loss), self.initial_loss, self.explode_factor):
            reason = "lipschitz-exploded-rollback"
        elif stats is not None and stats.k_z == 0:
            reason = "lipschitz-collapsed-rollback"
        else:
            return self._checkpoint()
        if self.rollback.exhausted:
            return None if signals.nonfinite else Decision(reason.replace("-rollback", ""), stop=True)
        # The restored optimizer state carries the old multipliers: set them after the restore.
        multipliers = tuple(float(g["lr"]) * self.rollback.factor for g in self.optimizer.param_groups)
        return self.rollback.roll_back(reason, lr=multipliers, info=lambda rb: {"rollbacks": rb.rollbacks})

    def on_train_end(self) -> Decision | None:
        if self.monitor is not None:
            self.monitor.remove()
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollback.rollbacks, "initial_loss": self.initial_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollback.load_state_dict(state)
        self.initial_loss = state.get("initial_loss", math.nan)


# ====================================================================================================
# Registry
