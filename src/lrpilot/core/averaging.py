"""Weights evaluated in place of the model's own: the swap that iterate averaging needs.

An averaging method trains the raw iterate and is scored on an average of it. :class:`EvaluatedWeights`
is that swap, once for every such method (DoG's averaging in ``baselines/peers.py``, ``auto``'s
``average`` option): :meth:`eval_context` (a ``MethodParts.eval_context``) keeps the training weights
aside and loads :meth:`averaged_state`; :meth:`train` (a ``MethodParts.train_mode``) puts them back. Both
are no-ops in the mode they switch to, and the weights kept aside are part of :meth:`state_dict`, so a
checkpoint taken after an evaluation resumes exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["EvaluatedWeights"]


class EvaluatedWeights:
    """Swaps :meth:`averaged_state` (a subclass's) into ``model`` for evaluation, the raw weights back for training."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._raw: dict[str, torch.Tensor] | None = None  # the training weights while the average is in

    def averaged_state(self) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError

    def check_training(self) -> None:
        """Raise if the average is loaded (an average folded into itself would be silently wrong)."""
        if self._raw is not None:
            raise RuntimeError("the averaged weights are loaded: call train() before training steps")

    @contextlib.contextmanager
    def eval_context(self) -> Iterator[None]:
        if self._raw is None:
            averaged = self.averaged_state()
            state = self.model.state_dict()
            self._raw = {k: state[k].detach().clone() for k in averaged}
            self.model.load_state_dict(averaged, strict=False)
        yield

    def train(self) -> None:
        if self._raw is not None:
            self.model.load_state_dict(self._raw, strict=False)
            self._raw = None

    def raw_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None if self._raw is None else {k: v.clone() for k, v in self._raw.items()}

    def load_raw_state_dict(self, raw: Mapping[str, torch.Tensor] | None) -> None:
        self._raw = None if raw is None else {k: v.detach().clone() for k, v in raw.items()}

    def state_dict(self) -> dict[str, Any]:  # subclasses add their own state
        return {"raw": self.raw_state_dict()}
