"""A safety net for any method: roll back to the best epoch and halve the LR when training diverges.

AALR (Algorithm 1, the "NaN handling" of phase 2) rolls back to its last checkpoint and halves its LR when
the loss becomes non-finite. :class:`SafetyNet` generalises that rule to every method of the registry by
composition: it wraps the method's own pilot (a schedule, an epoch-level pilot, or none at all for plain
and step-level optimizers), passes every hook on to it, and adds its own checkpoint and rollback
decisions. The loop only chooses the wrapper (``Trainer(..., safety_net=True)``); nothing in it knows
about safety nets.

The rule, after every epoch with mean training loss ``L`` (``L_0``: the untrained model's loss, the larger
of its validation loss and its loss over the training set, both computed before the first epoch;
``L_ref``: the training loss of the checkpoint, ``L_0`` for the initial one)::

    diverged   <=>  L (or the weights) not finite   or   L > threshold
    threshold   =   min(explode_factor * max(L_ref, floor * L_0),  initial_factor * L_0)

"Exploding" is thus a mean training loss that doubled in one epoch (``explode_factor = 2``), or that rose
above the untrained model's loss (by 5 %: ``initial_factor = 1.05``), i.e. training undid all its
progress. The second clause is what catches the usual way a too-large LR kills a small network: one
huge spike, then the ReLUs are dead and the loss sits near its starting value, where "doubling" never
fires. ``floor`` keeps a loss near zero from "exploding" by a harmless doubling. Measured on MNIST-1D
(``docs/methods/peers.md``): no healthy run of the registry has an epoch above ``1.0 * L_0``. ``L_0``
takes the training-set loss into account because on small splits the two differ by more than the 5 %
margin (diabetes: the training loss starts 13-22 % above the validation loss); computing it costs one
forward pass over the training set, once (the net asks the loop for :data:`TRAIN_EVAL_LOSS` only until
training begins).

* an epoch that did not diverge and did not raise the training loss above ``L_ref`` is checkpointed
  (model, optimizer, the method's extra state, RNG; and, here, the inner pilot's state) under the tag
  ``"safety-net"``: the checkpoint is the best state so far, as in AALR, not merely the last one (a
  network can die in an epoch whose loss rises by only a third, as Prodigy's does on MNIST-1D with
  ``d_coef=100``; the last state would then be a dead one);
* a diverged epoch restores that checkpoint and multiplies the LR scale ``s`` by ``factor`` (default 1/2).

**How the halving takes effect and persists, whoever owns the LR.** The net keeps one scale ``s`` and
keeps ``param_groups[i]["lr"] = s * (the LR the method wants)``. The wrapped pilot never sees ``s``: around
each of its hooks the net writes the unscaled LR back (the exact value the pilot last set) and rescales
whatever the pilot wrote. So a schedule, recursive (cosine, step decay) or closed-form (one-cycle,
cyclic), keeps computing its own trajectory and every value it produces is applied times ``s``; a step-
level optimizer whose LR lives in its state (D-Adaptation's ``d``, DoG's distance and gradient sums) is
restored by the rollback with that state, and its ``lr`` multiplier is halved. While ``s == 1`` the net
touches no LR: a run that never diverges is bit-for-bit the run without it.

**What a rollback undoes.** Everything about the bad epoch except the budget it cost: the loop restores
the weights, optimizer state, extra state and RNG, and the net restores the inner pilot's state as it was
at the checkpoint (the bad epoch is never shown to it). A budget-based schedule therefore resumes where
it was: after ``k`` rollbacks it ends ``k`` epochs short of its end (its last LRs are not reached).

A method that rolls back on its own (its decision restores a checkpoint, e.g. AALR) is left to do so;
the net then re-checkpoints after that restore. After ``max_rollbacks`` rollbacks the net stands aside:
a further non-finite loss ends the run as ``diverged`` as it would without it.

Example:
    >>> import lrpilot, torch
    >>> from lrpilot.core.data import TensorLoader
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> hist = lrpilot.fit(torch.nn.Linear(4, 3), TensorLoader(x, y, 16), TensorLoader(x, y, 64, shuffle=False),
    ...                    method="sgd", lr=1e4, epochs=3, safety_net=True, progress=False)
    >>> hist.status, [d.reason for d in hist.decisions][:2]
    ('completed', ['safety-net-checkpoint', 'safety-net-rollback'])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lrpilot.core.checks import require_in, require_int, require_range
from lrpilot.core.contract import (
    TRAIN_EVAL_LOSS,
    Decision,
    EpochSignals,
    MethodParts,
    Pilot,
    PilotWrapper,
    StepSignals,
    current_lrs,
    set_lrs,
)
from lrpilot.core.rollback import Rollback

__all__ = ["CHECKPOINT_TAG", "SafetyNet", "with_safety_net"]

#: The checkpoint tag the net saves and restores.
CHECKPOINT_TAG = "safety-net"


class SafetyNet(PilotWrapper):
    """Wraps a method's pilot: checkpoints the best epoch; on divergence rolls back to it and scales the LR.

    Args:
        optimizer: the method's optimizer.
        inner: the method's own pilot, or ``None``.
        factor: the LR scale is multiplied by this on every rollback, in (0, 1) (default 0.5; a power
            of two keeps the scaled LRs exact).
        explode_factor: a finite epoch loss above ``explode_factor`` times the reference is "exploding"
            (default 2.0: the mean training loss doubled in one epoch), > 1.
        initial_factor: an epoch loss above ``initial_factor`` times the loss before training is
            "exploding" too (default 1.05; ``inf`` turns the clause off, e.g. to fine-tune from a model
            whose loss is already low), > 0 (``auto`` uses 1: an epoch that ends above the untrained loss
            made no progress at all, e.g. LeNet-5 stuck at chance after a too-large first step; the
            hypergradient family 0.98, below 1: an epoch that did not get 2 % below it is stalled, as the
            Lipschitz guard's ``stall_factor``; ``rt-hpo`` on LeNet-5 sat at 2.2992 against 2.3031).
        floor: the reference is at least ``floor`` times the loss before training, so that a loss that
            is already near zero cannot "explode" by doubling (default 0.1), in [0, 1].
        max_rollbacks: rollbacks allowed before the net stands aside (default 10), >= 0.
        initial_from: where the loss before training ``L_0`` comes from: ``"max"`` (default), the larger
            of the validation loss and the training-set loss; ``"train"``, the training-set loss only,
            for a method that must not read the validation split at all (``auto``).
    """

    role = "safety net"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        inner: Pilot | None = None,
        *,
        factor: float = 0.5,
        explode_factor: float = 2.0,
        initial_factor: float = 1.05,
        floor: float = 0.1,
        max_rollbacks: int = 10,
        initial_from: str = "max",
    ) -> None:
        super().__init__(optimizer, inner)
        net = "safety net"
        require_range("factor", factor, 0.0, 1.0, open_low=True, open_high=True, owner=net)
        require_range("explode_factor", explode_factor, 1.0, math.inf, open_low=True, open_high=True, owner=net)
        require_range("initial_factor", initial_factor, 0.0, math.inf, open_low=True, owner=net)
        require_range("floor", floor, 0.0, 1.0, owner=net)
        require_int("max_rollbacks", max_rollbacks, owner=net)
        require_in("initial_from", initial_from, ("max", "train"), owner=net)
        # The checkpoint it restores, the rollbacks left, the LR scale s, and the inner pilot's state then.
        self.rollback = Rollback(CHECKPOINT_TAG, factor=factor, max_rollbacks=max_rollbacks)
        self.explode_factor = float(explode_factor)
        self.initial_factor = float(initial_factor)
        self.floor = float(floor)
        self.initial_from = initial_from
        self.initial_loss = math.nan
        self.ref_loss = math.nan
        self._inner_lr: tuple[float, ...] = current_lrs(optimizer)  # the LR as the method set it
        self._stored_lr: tuple[float, ...] = self._inner_lr  # what we wrote into param_groups
        self._begun = False

    # -- what the loop reads -----------------------------------------------------------------------
    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        inner = super().needs
        return inner if self._begun else inner | {TRAIN_EVAL_LOSS}  # the training loss before training, once

    @property
    def handles_nonfinite(self) -> bool:  # type: ignore[override]
        return super().handles_nonfinite or not self.rollback.exhausted

    # -- hooks ---------------------------------------------------------------------------------------
    def on_train_begin(self, signals: EpochSignals) -> list[Decision]:  # type: ignore[override]
        self._begun = True
        seen = (signals.extra.get(TRAIN_EVAL_LOSS, math.nan),)
        if self.initial_from == "max":
            seen += (signals.val_loss,)
        losses = [v for v in seen if math.isfinite(v)]
        self.initial_loss = self.ref_loss = max(losses) if losses else math.nan
        decisions = self._call_inner("on_train_begin", signals)
        return decisions + self._save(decisions)

    def on_step_end(self, signals: StepSignals) -> None:
        if self.inner is not None:
            self._call_inner("on_step_end", signals)

    def on_epoch_end(self, signals: EpochSignals) -> list[Decision]:  # type: ignore[override]
        why = self.diverged(signals.train_loss, signals.nonfinite)
        decisions = self._call_inner("on_epoch_end", signals)
        if any(d.restore is not None for d in decisions):
            # The method rolls back by itself (e.g. AALR): let it, and checkpoint what it restores. That
            # state's loss is unknown here: measure from the untrained model's until the next best epoch.
            self.ref_loss = self.initial_loss
            return decisions + self._save(decisions)
        if why is not None and not self.rollback.exhausted:
            return [self._rollback(why, signals.train_loss)]  # the inner pilot is rewound: drop its answer
        if why is None and not signals.train_loss > self.ref_loss:  # no worse than the checkpoint: the new best
            self.ref_loss = signals.train_loss
            return decisions + self._save(decisions)
        return decisions  # worse but not diverged (keep the checkpoint), or out of rollbacks (stand aside)

    def on_train_end(self) -> list[Decision]:  # type: ignore[override]
        return self._call_inner("on_train_end", None)

    # -- the rule -------------------------------------------------------------------------------------
    def threshold(self) -> float:
        """The training loss above which an epoch counts as exploding (``inf`` without a finite reference)."""
        l0 = self.initial_loss if math.isfinite(self.initial_loss) and self.initial_loss > 0 else math.nan
        floor = self.floor * l0 if math.isfinite(l0) else 0.0
        ref = max(self.ref_loss, floor) if math.isfinite(self.ref_loss) else floor
        doubled = self.explode_factor * ref if ref > 0 else math.inf
        return min(doubled, self.initial_factor * l0) if math.isfinite(l0) else doubled

    def diverged(self, train_loss: float, nonfinite: bool = False) -> str | None:
        """``"nonfinite"``, ``"exploding"``, ``"stalled"`` or ``None`` for an epoch with mean training loss
        ``train_loss``. Stalled: over the threshold only by the untrained-loss clause with ``initial_factor
        < 1``, i.e. neither doubled nor above the untrained loss, just not below ``initial_factor * L_0``."""
        if nonfinite or not math.isfinite(train_loss):
            return "nonfinite"
        if not train_loss > self.threshold():
            return None
        l0 = self.initial_loss
        below_untrained = self.initial_factor < 1 and math.isfinite(l0) and train_loss <= l0
        doubled = train_loss > self.explode_factor * max(self.ref_loss, self.floor * l0)
        return "stalled" if below_untrained and not doubled else "exploding"

    # -- decisions ------------------------------------------------------------------------------------
    def _save(self, inner_decisions: Sequence[Decision]) -> list[Decision]:
        # The LR the method will have once its decisions are applied, in its own (unscaled) units.
        inner_lr = self._unscaled()
        for d in inner_decisions:
            if d.lr is not None:
                inner_lr = tuple(v / self.scale for v in d.lr) if self.scale != 1.0 else d.lr
        self._inner_lr = inner_lr
        self._stored_lr = tuple(v * self.scale for v in inner_lr)
        inner_state = self.inner.state_dict() if self.inner is not None else None
        checkpoint = self.rollback.checkpoint(
            "safety-net-checkpoint", pilot_state={"inner": inner_state, "inner_lr": inner_lr}
        )
        return [checkpoint] if checkpoint is not None else []

    def _rollback(self, why: str, train_loss: float) -> Decision:
        saved = self.rollback.saved_pilot_state
        assert saved is not None, "on_train_begin saves the first checkpoint"
        if self.inner is not None:
            self.inner.load_state_dict(saved["inner"])
        self._inner_lr = tuple(saved["inner_lr"])
        self._stored_lr = tuple(v * (self.scale * self.rollback.factor) for v in self._inner_lr)
        return self.rollback.roll_back(
            "safety-net-rollback",
            lr=self._stored_lr,
            persist=True,  # s <- s * factor, for good
            info=lambda rb: {
                "why": why,
                "train_loss": train_loss,
                "threshold": self.threshold(),
                "scale": rb.scale,
                "rollbacks": rb.rollbacks,
            },
        )

    @property
    def scale(self) -> float:
        """The LR scale ``s``: the product of the factors of every rollback so far."""
        return self.rollback.scale

    @property
    def rollbacks(self) -> int:
        return self.rollback.rollbacks

    def _call_inner(self, hook: str, signals: Any) -> list[Decision]:
        """Call the inner pilot's ``hook`` with the LR it set in ``param_groups``; rescale what it sets."""
        if self.inner is None:
            return []
        fn: Callable[..., Any] = getattr(self.inner, hook)
        if self.scale == 1.0:  # nothing to hide: the net is transparent until its first rollback
            result = fn() if signals is None else fn(signals)
            self._inner_lr = self._stored_lr = current_lrs(self.optimizer)
            return _as_list(result)
        set_lrs(self.optimizer, self._unscaled())
        if isinstance(signals, EpochSignals):
            signals = _replace_lr(signals, tuple(v / self.scale for v in signals.lr))
        try:
            result = fn() if signals is None else fn(signals)
        finally:
            self._inner_lr = current_lrs(self.optimizer)
            self._stored_lr = tuple(v * self.scale for v in self._inner_lr)
            set_lrs(self.optimizer, self._stored_lr)
        return [d if d.lr is None else d.with_lr([v * self.scale for v in d.lr]) for d in _as_list(result)]

    def _unscaled(self) -> tuple[float, ...]:
        """The LR in ``param_groups`` in the method's own units: the exact value it set if nothing changed
        it since we scaled it, else the stored value divided by the scale (e.g. an optimizer that moves its
        own LR inside ``step()``)."""
        stored = current_lrs(self.optimizer)
        if stored == self._stored_lr:
            return self._inner_lr
        return stored if self.scale == 1.0 else tuple(v / self.scale for v in stored)

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict() if self.inner is not None else None,
            "rollback": self.rollback.state_dict(),
            "initial_loss": self.initial_loss,
            "ref_loss": self.ref_loss,
            "inner_lr": self._inner_lr,
            "stored_lr": self._stored_lr,
            "begun": self._begun,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "rollback" not in state or "inner_lr" not in state:
            raise ValueError("this state was not saved by a SafetyNet: build the trainer with the same safety_net")
        if self.inner is not None:
            self.inner.load_state_dict(state["inner"])
        self.rollback.load_state_dict(state["rollback"])
        self.initial_loss, self.ref_loss = state["initial_loss"], state["ref_loss"]
        self._inner_lr, self._stored_lr = tuple(state["inner_lr"]), tuple(state["stored_lr"])
        self._begun = state["begun"]


def _has_safety_net(pilot: Pilot | None) -> bool:
    """A safety net anywhere in the chain of wrappers (a cooled method wears its net inside the cooldown)."""
    while pilot is not None:
        if isinstance(pilot, SafetyNet):
            return True
        pilot = pilot.inner if isinstance(pilot, PilotWrapper) else None
    return False


def with_safety_net(parts: MethodParts, **options: Any) -> MethodParts:
    """``parts`` with its pilot wrapped in a :class:`SafetyNet` (options: see the class)."""
    if _has_safety_net(parts.pilot):
        raise ValueError("this method already has a safety net in its default form: drop safety_net=True (or "
                         "pass the method's option rollback=False to wrap it in one with your options)")
    valid = tuple(inspect.signature(SafetyNet).parameters)[2:]  # after optimizer and inner
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown safety net option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}"
        )
    import dataclasses

    return dataclasses.replace(parts, pilot=SafetyNet(parts.optimizer, parts.pilot, **options))


def _as_list(result: Decision | Sequence[Decision] | None) -> list[Decision]:
    if result is None:
        return []
    return [result] if isinstance(result, Decision) else list(result)


def _replace_lr(signals: EpochSignals, lr: tuple[float, ...]) -> EpochSignals:
    import dataclasses

    return dataclasses.replace(signals, lr=lr)
