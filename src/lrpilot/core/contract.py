"""The autopilot contract: decisions, the signals a pilot receives, and the pilot base class.

Two kinds of pilot exist (see ``docs/ARCHITECTURE.md``):

* **step-level pilots** are ``torch.optim.Optimizer`` subclasses. They change the LR inside ``step()``
  and need nothing from this module except, when they want extra signals (a validation closure), to
  declare them in their registry record.
* **epoch-level pilots** wrap a user's optimizer, subclass :class:`Pilot` here, and are driven by the
  training loop: the loop hands them named signals and gets back a :class:`Decision` it carries out.
  A pilot never touches files or the model's weights itself; it asks the loop to checkpoint, roll back
  or stop, always with a reason.

``optimizer.param_groups[i]["lr"]`` is the one source of truth for the LR: pilots write it (through
decisions), loggers read it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Decision",
    "EpochSignals",
    "MethodParts",
    "PROBE",
    "Pilot",
    "PilotWrapper",
    "Probe",
    "StepSignals",
    "TRAIN_EVAL_LOSS",
    "TRAIN_PASS",
    "TrainPass",
    "current_lrs",
    "set_lrs",
]

#: Signal name: the loss of the current model over the whole training set, in evaluation mode
#: (AALR's J(theta)), on the batches as the loop's ``train_transform`` changes them if it has one (the
#: objective being trained, e.g. FGSM examples). Computing it costs a forward pass over the training
#: data, so the loop only does it for pilots that list it in :attr:`Pilot.needs`.
TRAIN_EVAL_LOSS = "train_eval_loss"

#: Signal name: the outputs of chosen modules on the pilot's :attr:`Pilot.probe` inputs, as a dict
#: ``{module name: tensor (n, ...)}`` (``""`` is the model's output), computed in evaluation mode with
#: forward hooks before ``on_train_begin`` and after every epoch (e.g. the MI pilots' activations).
PROBE = "probe"

#: Signal name: a :data:`TrainPass` over the training data, for pilots that need statistics of the data
#: before they set the first LR (the Lipschitz constants at initialisation). The pass is the loop's, so
#: no pilot walks a loader or saves random state itself.
TRAIN_PASS = "train_pass"

#: ``train_pass(fn)`` calls ``fn(x, y)`` on every training batch (on the model's device, the model in
#: evaluation mode, under ``torch.no_grad()``; ``fn`` may run the model) and leaves every random source as
#: it found it, the global RNGs and a ``DataLoader``'s own generator: it changes neither the training
#: order nor the weights. Provided as the :data:`TRAIN_PASS` signal and by ``BuildContext.train_pass``.
TrainPass = Callable[[Callable[[torch.Tensor, torch.Tensor], None]], None]


@dataclass(frozen=True)
class Probe:
    """Inputs the loop runs the model on for the :data:`PROBE` signal, and the modules it reports.

    Args:
        inputs: ``(n, ...)`` model inputs (moved to the model's device batch by batch).
        modules: names from ``model.named_modules()`` whose outputs to return; ``""`` is the model's
            own output.
        batch_size: inputs per forward pass.
    """

    inputs: torch.Tensor
    modules: tuple[str, ...] = ("",)
    batch_size: int = 1000


@dataclass(frozen=True)
class Decision:
    """What an epoch-level pilot asks the loop to do, always with a reason.

    The loop applies the fields in this order, so one decision can express "reload the checkpoint,
    reset the optimizer, save, then halve the LR":

    1. ``restore``: load the training state (model, optimizer, RNG) saved under this tag. The pilot's own
       state is *not* rolled back: the rollback is the pilot's decision and it must remember making it.
    2. ``reset_optimizer``: reload the optimizer's state as it was before the first step (momentum
       buffers and other per-parameter state cleared).
    3. ``save``: snapshot the current training state under this tag (an earlier one is replaced).
    4. ``lr``: set the LR of every param group (one value per group).
    5. ``stop``: end training after this epoch.

    Args:
        reason: short machine-readable reason, e.g. ``"phase1-worse"``, recorded in telemetry.
        lr: new LR per param group, or ``None`` to leave it unchanged.
        save: checkpoint tag to save, or ``None``.
        restore: checkpoint tag to restore, or ``None``.
        reset_optimizer: reset the optimizer's per-parameter state.
        stop: stop training.
        info: free-form details kept with the decision in telemetry (e.g. the loss compared).
    """

    reason: str
    lr: tuple[float, ...] | None = None
    save: str | None = None
    restore: str | None = None
    reset_optimizer: bool = False
    stop: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError("a Decision needs a reason")
        if self.lr is not None:
            lrs = tuple(float(v) for v in self.lr)
            for v in lrs:
                if not (math.isfinite(v) and v >= 0.0):
                    raise ValueError(f"Decision {self.reason!r} sets a non-finite or negative LR: {lrs}")
            object.__setattr__(self, "lr", lrs)

    @property
    def action(self) -> str:
        """The most drastic thing the decision does: stop, rollback, checkpoint, set-lr or keep."""
        if self.stop:
            return "stop"
        if self.restore is not None:
            return "rollback"
        if self.save is not None:
            return "checkpoint"
        if self.reset_optimizer:
            return "reset-optimizer"
        if self.lr is not None:
            return "set-lr"
        return "keep"

    def with_lr(self, lr: Sequence[float]) -> Decision:
        return dataclasses.replace(self, lr=tuple(lr))


@dataclass(frozen=True)
class StepSignals:
    """Signals after each optimizer step (for per-step schedules)."""

    epoch: int  # 0-based index of the epoch in progress
    step: int  # optimizer steps taken so far, this one included
    loss: float  # the mini-batch training loss of this step


@dataclass(frozen=True)
class EpochSignals:
    """Signals handed to :meth:`Pilot.on_epoch_end`.

    ``epoch`` counts epochs trained so far in the run's budget (1 after the first epoch), rolled-back
    epochs included. ``train_loss`` is the running mean of the epoch's mini-batch losses; it is ``nan``
    when ``nonfinite`` is set (a non-finite loss stopped the epoch early). ``val_loss``/``val_metric``
    are ``nan`` when the weights are not finite. ``extra`` holds the signals the pilot declared in
    :attr:`Pilot.needs` (e.g. :data:`TRAIN_EVAL_LOSS`).
    """

    epoch: int
    step: int
    lr: tuple[float, ...]
    train_loss: float
    val_loss: float
    val_metric: float
    nonfinite: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        """``signals["train_eval_loss"]``: a declared extra signal, with an error naming what to declare."""
        try:
            return self.extra[name]
        except KeyError:
            raise KeyError(
                f"signal {name!r} was not computed: add it to the pilot's `needs` "
                f"(available: {sorted(self.extra)})"
            ) from None


def current_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, ...]:
    """The LR of every param group, in group order."""
    return tuple(float(g["lr"]) for g in optimizer.param_groups)


def set_lrs(optimizer: torch.optim.Optimizer, lrs: Sequence[float]) -> None:
    """Write one LR per param group (the single source of truth)."""
    if len(lrs) != len(optimizer.param_groups):
        raise ValueError(f"got {len(lrs)} LRs for {len(optimizer.param_groups)} param groups")
    for group, lr in zip(optimizer.param_groups, lrs):
        # Keep a tensor LR a tensor (capturable optimizers), otherwise store a float.
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(float(lr))
        else:
            group["lr"] = float(lr)


class Pilot:
    """Base class of epoch-level pilots (and of the schedule adapters): every hook is a no-op.

    Subclasses override what they need. Hooks that return a :class:`Decision` may return ``None`` for
    "nothing to do", or a sequence of decisions, which the loop applies (and records) in order: a pilot
    that wraps another (e.g. :class:`~lrpilot.pilots.safety_net.SafetyNet`) passes the inner pilot's
    decisions on and adds its own. State that must survive a checkpoint goes in :meth:`state_dict`.

    Attributes:
        optimizer: the optimizer whose LR this pilot drives.
        needs: names of extra signals the loop must compute before :meth:`on_epoch_end`
            (e.g. :data:`TRAIN_EVAL_LOSS`). The loop reads it before every epoch end, so a pilot may
            make it a property and ask only when it will use the signal (AALR: at trial ends).
        handles_nonfinite: ``True`` if the pilot recovers from a non-finite loss itself (by a
            rollback). Otherwise the loop stops the run as diverged.
        probe: what the loop evaluates for the :data:`PROBE` signal (needed when ``needs`` lists it).
    """

    needs: frozenset[str] = frozenset()
    handles_nonfinite: bool = False
    probe: Probe | None = None

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer

    # -- hooks -------------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        """Called once before training; a pilot may register forward hooks to observe activations."""

    def on_train_begin(self, signals: EpochSignals) -> Decision | None:
        """Called once before the first epoch (not again on resume), with ``epoch=0`` signals of the
        initial model (``train_loss`` is ``nan``: nothing was trained yet)."""
        return None

    def on_step_end(self, signals: StepSignals) -> None:
        """Called after every optimizer step."""

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        """Called after every epoch's training and evaluation."""
        return None

    def on_train_end(self) -> Decision | None:
        """Called once when the budget is spent; may ask to restore a checkpoint (e.g. the best one)."""
        return None

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, except links to other objects."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)


class PilotWrapper(Pilot):
    """A pilot that wraps another (or none) and adds its own decisions: the safety net, the cooldown.

    It forwards what the loop reads from a pilot (:attr:`needs`, :attr:`handles_nonfinite`,
    :attr:`probe`) and every hook to ``inner``; a subclass overrides the hooks it adds to and calls
    these. ``role`` names the wrapper in its errors.
    """

    role = "wrapper"

    def __init__(self, optimizer: torch.optim.Optimizer, inner: Pilot | None) -> None:
        super().__init__(optimizer)
        if inner is not None and inner.optimizer is not optimizer:
            raise ValueError(f"the {self.role} and the pilot it wraps must drive the same optimizer")
        self.inner = inner

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return self.inner.needs if self.inner is not None else frozenset()

    @property
    def handles_nonfinite(self) -> bool:  # type: ignore[override]
        return self.inner is not None and self.inner.handles_nonfinite

    @property
    def probe(self) -> Probe | None:  # type: ignore[override]
        return self.inner.probe if self.inner is not None else None

    def attach(self, model: torch.nn.Module) -> None:
        if self.inner is not None:
            self.inner.attach(model)

    def on_train_begin(self, signals: EpochSignals) -> Decision | Sequence[Decision] | None:  # type: ignore[override]
        return self.inner.on_train_begin(signals) if self.inner is not None else None

    def on_step_end(self, signals: StepSignals) -> None:
        if self.inner is not None:
            self.inner.on_step_end(signals)

    def on_epoch_end(self, signals: EpochSignals) -> Decision | Sequence[Decision] | None:  # type: ignore[override]
        return self.inner.on_epoch_end(signals) if self.inner is not None else None

    def on_train_end(self) -> Decision | Sequence[Decision] | None:  # type: ignore[override]
        return self.inner.on_train_end() if self.inner is not None else None


@dataclass
class MethodParts:
    """What a registry factory builds for one run: an optimizer and whatever drives or wraps it.

    Args:
        optimizer: the torch optimizer (a step-level pilot is one).
        pilot: the epoch-level pilot or schedule adapter driving ``optimizer``'s LR, if any.
        eval_context: returns a context manager the loop enters around every evaluation (e.g.
            Schedule-Free's eval mode, DoG's averaged weights). It may leave the method in its
            evaluation mode on exit; ``train_mode`` then switches back before the next training epoch,
            so every checkpoint taken after an evaluation holds the evaluation-mode state.
        train_mode: called by the loop before every training epoch: puts the method back in training
            mode after ``eval_context`` (Schedule-Free's ``optimizer.train()``, DoG's raw weights). Must
            be a no-op when already in training mode.
        effective_lr: the LR the method actually applies, per group, for telemetry (e.g. D-Adaptation's
            ``d * lr``). Default: ``param_groups[i]["lr"]``.
        step_kwargs: names of the keyword signals ``optimizer.step`` requires (e.g. ``"val_closure"``).
        needs_closure: ``optimizer.step`` must be given a closure that re-evaluates the training loss.
        extra_state: named objects with ``state_dict()``/``load_state_dict()`` that belong to the
            training state beside the model and the optimizer (e.g. DoG's weight average): saved by
            ``Trainer.state_dict`` and in every checkpoint, and rolled back with the model.
        info: what the method reports about itself (e.g. a grid search: ``info["search"]``); the run
            record carries it under ``info.method``.
    """

    optimizer: torch.optim.Optimizer
    pilot: Pilot | None = None
    eval_context: Callable[[], AbstractContextManager[Any]] | None = None
    effective_lr: Callable[[], Sequence[float]] | None = None
    step_kwargs: frozenset[str] = frozenset()
    needs_closure: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    train_mode: Callable[[], None] | None = None
    extra_state: dict[str, Any] = field(default_factory=dict)

    def lrs(self) -> tuple[float, ...]:
        """The LR in force per group: the effective LR where the method defines one."""
        if self.effective_lr is not None:
            return tuple(float(v) for v in self.effective_lr())
        return current_lrs(self.optimizer)
