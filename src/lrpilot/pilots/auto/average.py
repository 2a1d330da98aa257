"""Iterate averaging for ``auto`` (the ``average`` option): evaluate a polynomial-decay average of the weights.

After every optimizer step ``t = 1, 2, ...`` the average folds in the current weights (Shamir & Zhang 2013,
the averaging DoG prescribes; ``gamma = 8``)::

    xbar_t = (1 - w_t) xbar_{t-1} + w_t x_t,      w_t = (1 + gamma) / (t + gamma)      (w_1 = 1)

over every floating-point entry of the model's ``state_dict`` (BatchNorm statistics included). Its memory
is about the last ``t / (1 + gamma)`` steps: it grows with training, so it needs no horizon of its own.
Evaluation sees the average (:meth:`eval_context` swaps it in, keeping the training weights aside) and
training resumes from the raw weights (:meth:`train`); both are no-ops in the mode they switch to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lrpilot.core.averaging import EvaluatedWeights

__all__ = ["PolynomialAverage"]


class PolynomialAverage(EvaluatedWeights):
    """A polynomial-decay average of ``model``'s weights, swapped in for evaluation."""

    def __init__(self, model: nn.Module, gamma: float = 8.0) -> None:
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        super().__init__(model)
        self.gamma = float(gamma)
        self.t = 0
        state = model.state_dict()
        self.keys = [k for k, v in state.items() if v.is_floating_point()]
        self.average = {k: state[k].detach().clone() for k in self.keys}

    def averaged_state(self) -> Mapping[str, torch.Tensor]:
        return self.average

    @torch.no_grad()
    def update(self) -> None:
        self.check_training()
        self.t += 1
        weight = (1.0 + self.gamma) / (self.t + self.gamma)
        state = self.model.state_dict()
        torch._foreach_lerp_([self.average[k] for k in self.keys], [state[k] for k in self.keys], weight)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "t": self.t, "average": {k: v.clone() for k, v in self.average.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = int(state["t"])
        for k in self.keys:
            self.average[k].copy_(state["average"][k])
        self.load_raw_state_dict(state["raw"])
