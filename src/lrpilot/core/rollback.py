"""Checkpoint and back off: the one rollback mechanism that pilots compose.

A pilot that recovers from a bad epoch (the safety net, the LipschitzLR family, AALR's non-finite
trials) does two things: after a good epoch it asks the loop to checkpoint the training state, and after
a bad one it asks the loop to restore that checkpoint with a smaller LR. The loop does the copying
(model, optimizer, the method's extra state and every RNG, see :class:`~lrpilot.core.contract.Decision`);
:class:`Rollback` holds the policy's own bookkeeping so no pilot writes it again:

* the checkpoint tag, and whether rollbacks are enabled at all (``max_rollbacks=0`` also skips the
  checkpoints and their deep copies);
* the count of rollbacks made, against ``max_rollbacks`` (``None``: unlimited);
* the backoff ``factor`` and the persistent LR ``scale`` (the product of the factors of the rollbacks
  that asked to persist);
* optionally, the state of a wrapped pilot at the checkpoint, so a wrapper can rewind it with the model
  (the loop's checkpoints never hold pilot state: a rollback is the pilot's decision and the pilot
  must remember having made it).

The divergence tests shared by those pilots are here too (:func:`exploded`).

Example:
    >>> rb = Rollback("good", factor=0.5, max_rollbacks=2)
    >>> rb.checkpoint("epoch-ok").save
    'good'
    >>> d = rb.roll_back("diverged", lr=(0.05,), persist=True)
    >>> (d.restore, d.lr, rb.rollbacks, rb.scale)
    ('good', (0.05,), 1, 0.5)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lrpilot.core.checks import is_number, require_int, require_range
from lrpilot.core.contract import Decision

__all__ = ["Rollback", "check_backoff", "exploded"]


def check_backoff(
    backoff: Any, max_rollbacks: Any, explode_factor: Any = None, *, owner: str | None = None
) -> None:
    """The options of a roll-back-and-back-off policy: ``backoff`` in (0, 1), ``max_rollbacks`` an integer
    >= 0, ``explode_factor`` ``None`` or a number > 1."""
    require_range("backoff", backoff, 0.0, 1.0, open_low=True, open_high=True, owner=owner)
    require_int("max_rollbacks", max_rollbacks, owner=owner)
    if explode_factor is not None and not (is_number(explode_factor) and explode_factor > 1):
        raise ValueError(f"explode_factor must be None or a number > 1, got {explode_factor!r}")


def exploded(losses: Iterable[float], initial_loss: float, factor: float | None) -> bool:
    """Any finite loss of ``losses`` above ``factor`` times ``initial_loss`` (the loss before training):
    the weights are worse than random ones, though no loss was non-finite. ``False`` without a factor or
    a positive finite ``initial_loss``."""
    if factor is None or not (math.isfinite(initial_loss) and initial_loss > 0):
        return False
    limit = factor * initial_loss
    return any(math.isfinite(v) and v > limit for v in losses)


class Rollback:
    """The bookkeeping of "checkpoint after a good epoch, restore it and back off after a bad one".

    Args:
        tag: the checkpoint tag this policy saves and restores.
        factor: the LR factor of a rollback, in (0, 1).
        max_rollbacks: rollbacks allowed (``None``: unlimited); ``0`` disables rollbacks and with them
            the checkpoints (:meth:`checkpoint` then returns ``None``).

    Attributes:
        rollbacks: rollbacks made so far.
        scale: the product of ``factor`` over the rollbacks made with ``persist=True``.
    """

    def __init__(self, tag: str, *, factor: float, max_rollbacks: int | None = None) -> None:
        if not tag:
            raise ValueError("a Rollback needs a checkpoint tag")
        require_range("factor", factor, 0.0, 1.0, open_low=True, open_high=True)
        if max_rollbacks is not None:
            require_int("max_rollbacks", max_rollbacks)
        self.tag = tag
        self.factor = float(factor)
        self.max_rollbacks = max_rollbacks
        self.rollbacks = 0
        self.scale = 1.0
        self._pilot_state: Any = None

    @property
    def enabled(self) -> bool:
        return self.max_rollbacks is None or self.max_rollbacks > 0

    @property
    def exhausted(self) -> bool:
        """No rollback is left."""
        return self.max_rollbacks is not None and self.rollbacks >= self.max_rollbacks

    def checkpoint(
        self,
        reason: str,
        *,
        lr: tuple[float, ...] | None = None,
        info: Mapping[str, Any] | None = None,
        pilot_state: Any = None,
    ) -> Decision | None:
        """Ask the loop to checkpoint under :attr:`tag` (and set ``lr``, if given); keep a deep copy of
        ``pilot_state`` for :attr:`saved_pilot_state`. With rollbacks disabled: only the LR change, or
        ``None``."""
        if not self.enabled:
            return Decision(reason, lr=lr, info=info or {}) if lr is not None else None
        if pilot_state is not None:
            self._pilot_state = copy.deepcopy(pilot_state)
        return Decision(reason, lr=lr, save=self.tag, info=info or {})

    @property
    def saved_pilot_state(self) -> Any:
        """A deep copy of the ``pilot_state`` of the last :meth:`checkpoint` that gave one."""
        return copy.deepcopy(self._pilot_state)

    def roll_back(
        self,
        reason: str,
        *,
        lr: tuple[float, ...],
        info: Mapping[str, Any] | Callable[[Rollback], Mapping[str, Any]] | None = None,
        reset_optimizer: bool = False,
        persist: bool = False,
    ) -> Decision:
        """Count a rollback and ask the loop to restore :attr:`tag`, then set ``lr`` (the caller's LR after
        backing off). ``persist`` multiplies :attr:`scale` by :attr:`factor` first. ``info`` is the
        decision's details, or a function of this policy that makes them once the rollback is counted.
        Check :attr:`exhausted` before calling."""
        if self.exhausted:
            raise RuntimeError(f"no rollback left ({self.rollbacks} of {self.max_rollbacks} made)")
        self.rollbacks += 1
        if persist:
            self.scale *= self.factor
        details = info(self) if callable(info) else info
        return Decision(reason, restore=self.tag, reset_optimizer=reset_optimizer, lr=lr, info=details or {})

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "scale": self.scale, "pilot_state": self._pilot_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))
        self.scale = float(state.get("scale", 1.0))
        self._pilot_state = state.get("pilot_state")
