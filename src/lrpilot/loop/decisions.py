"""Carrying out a pilot's decisions: checkpoints, rollbacks, optimizer resets and LR changes.

:class:`TrainingState` is the one piece of code that applies a
:class:`~lrpilot.core.contract.Decision` to a model and its optimizer. The loop's
:class:`~lrpilot.loop.fit.Trainer` uses it, and so do the integrations for other loops
(``lrpilot.attach`` for a hand-written loop, the Lightning callback), so a rollback means the same
thing wherever a pilot runs: model, optimizer, the method's extra state and every RNG restored from an
in-memory deep copy; the pilot's own state is not rolled back (the rollback is its decision).

Example:
    >>> import torch
    >>> from lrpilot.core.contract import Decision
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> state.apply(Decision("keep-this", save="good"))
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> state.apply(Decision("undo", restore="good", lr=(0.05,)))
    >>> bool(torch.equal(model.weight, state.checkpoints["good"]["model"]["weight"])), state.optimizer.param_groups[0]["lr"]
    (True, 0.05)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lrpilot.core.contract import Decision, set_lrs
from lrpilot.core.seeding import capture_rng, restore_rng

__all__ = ["TrainingState", "as_decisions"]


def as_decisions(result: Decision | Sequence[Decision] | None) -> list[Decision]:
    """A hook's answer as a list: ``None``, one decision, or a sequence of them (applied in order)."""
    if result is None:
        return []
    if isinstance(result, Decision):
        return [result]
    decisions = list(result)
    for d in decisions:
        if not isinstance(d, Decision):
            raise TypeError(f"a pilot hook returned {type(d).__name__}; expected Decision, a sequence of them, or None")
    return decisions


class TrainingState:
    """The state a rollback restores, and the tagged checkpoints of it.

    Args:
        model: the network (its ``state_dict`` is checkpointed).
        optimizer: the optimizer whose state is checkpointed and whose LR decisions set.
        extra_state: the method's :attr:`~lrpilot.core.contract.MethodParts.extra_state` (objects with
            ``state_dict``/``load_state_dict``, rolled back with the model).

    The optimizer's state as it is now is kept as the state a ``reset_optimizer`` decision returns to,
    so build this before the first step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.extra_state: Mapping[str, Any] = extra_state if extra_state is not None else {}
        self.checkpoints: dict[str, dict[str, Any]] = {}
        self.initial_optimizer_state: dict[str, Any] = copy.deepcopy(optimizer.state_dict())

    def apply(self, decision: Decision) -> None:
        """Carry out ``restore``, ``reset_optimizer``, ``save`` and ``lr``, in that order.

        ``stop`` is the caller's to honour (each loop stops in its own way).
        """
        if decision.restore is not None:
            if decision.restore not in self.checkpoints:
                raise KeyError(
                    f"decision {decision.reason!r} restores checkpoint {decision.restore!r}, which was never saved "
                    f"(saved: {sorted(self.checkpoints)})"
                )
            self.restore(self.checkpoints[decision.restore])
        if decision.reset_optimizer:
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(copy.deepcopy(self.initial_optimizer_state))
            set_lrs(self.optimizer, lrs)  # a reset clears the optimizer's state, not the LR
        if decision.save is not None:
            self.checkpoints[decision.save] = self.snapshot()
        if decision.lr is not None:
            set_lrs(self.optimizer, decision.lr)

    def snapshot(self) -> dict[str, Any]:
        """The training state a rollback restores: model, optimizer, the method's extra state and RNG (not
        the pilot)."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "extra_state": self.extra_state_dict(),
                "rng": capture_rng(),
            }
        )

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        # Deep-copy again: load_state_dict keeps references to the tensors it is given, and the
        # checkpoint must survive the training that follows.
        snapshot = copy.deepcopy(snapshot)
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.load_extra_state(snapshot.get("extra_state", {}))
        restore_rng(snapshot["rng"])

    def extra_state_dict(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.extra_state.items()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.extra_state):
            raise ValueError(
                f"saved extra state {sorted(state)} does not match this method's {sorted(self.extra_state)}"
            )
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state[name])
