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

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["PolynomialAverage"]


class PolynomialAverage:
    """A polynomial-decay average of ``model``'s weights, swapped in for evaluation."""

    def __init__(self, model: nn.Module, gamma: float = 8.0) -> None:
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.model = model
        self.gamma = float(gamma)
        self.t = 0
        state = model.state_dict()
        self.keys = [k for k, v in state.items() if v.is_floating_point()]
        self.average = {k: state[k].detach().clone() for k in self.keys}
        self._raw: dict[str, torch.Tensor] | None = None  # the training weights while the average is in

    @torch.no_grad()
    def update(self) -> None:
        if self._raw is not None:
            raise RuntimeError("the averaged weights are loaded: call train() before training steps")
        self.t += 1
        weight = (1.0 + self.gamma) / (self.t + self.gamma)
        state = self.model.state_dict()
        torch._foreach_lerp_([self.average[k] for k in self.keys], [state[k] for k in self.keys], weight)

    @contextlib.contextmanager
    def eval_context(self) -> Iterator[None]:
        if self._raw is None:
            state = self.model.state_dict()
            self._raw = {k: state[k].detach().clone() for k in self.keys}
            self.model.load_state_dict(self.average, strict=False)
        yield

    def train(self) -> None:
        if self._raw is not None:
            self.model.load_state_dict(self._raw, strict=False)
            self._raw = None

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "average": {k: v.clone() for k, v in self.average.items()},
                "raw": None if self._raw is None else {k: v.clone() for k, v in self._raw.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = int(state["t"])
        for k in self.keys:
            self.average[k].copy_(state["average"][k])
        raw = state["raw"]
        self._raw = None if raw is None else {k: v.detach().clone() for k, v in raw.items()}
