"""Peers: the learning-rate-free optimizers people use instead of tuning, from their authors' packages.

=====================  ==========================  =============================================================
registry name          package (``lrpilot[peers]``)  what it adapts
=====================  ==========================  =============================================================
``dadapt-sgd``         ``dadaptation``               D-Adaptation (Defazio & Mishchenko 2023): SGD, ``d`` estimates
                                                     the distance to the solution, step ``d * lr / ||g_0||``
``dadapt-adam``        ``dadaptation``               D-Adaptation for Adam, step ``d * lr``
``prodigy``            ``prodigyopt``                Prodigy (Mishchenko & Defazio 2024), Adam, step ``d * lr``
``schedulefree-sgd``   ``schedulefree``              Schedule-Free SGD (Defazio et al. 2024): interpolation and
                                                     averaging instead of a schedule; warm-up only
``schedulefree-adamw`` ``schedulefree``              Schedule-Free AdamW
``dog``                ``dog-optimizer``             DoG (Ivgi, Hinder & Carmon 2023): step
                                                     ``eta = lr * max_t ||x_t - x_0|| / sqrt(sum ||g_t||^2)``,
                                                     polynomial-decay iterate averaging
``ldog``               ``dog-optimizer``             layer-wise DoG (one ``eta`` per parameter tensor)
=====================  ==========================  =============================================================

Every default is the authors' recommendation; ``docs/methods/peers.md`` lists each with its source.

What each needs from the loop is done here, once, through :class:`~lrpilot.core.contract.MethodParts`:

* **Schedule-Free** evaluates at ``x`` but takes gradients at ``y``: ``eval_context`` calls
  ``optimizer.eval()`` (and first refreshes the BatchNorm statistics at ``x`` on training batches, as its
  README prescribes) and leaves it in eval mode; ``train_mode`` calls ``optimizer.train()`` before the next
  training epoch. So checkpoints and ``Trainer.state_dict()`` taken after an evaluation hold the eval-mode
  state (the README's advice), and a resumed run switches to train mode *after* loading it (calling
  ``.train()`` before ``load_state_dict`` is the "not in train mode" failure users report). Switching only
  once per evaluation also keeps runs bit-for-bit reproducible: ``eval()`` and ``train()`` are not exact
  inverses in floating point.
* **DoG** must be combined with iterate averaging (its README): :class:`WeightAverage` runs the package's
  ``PolynomialDecayAverager`` after every step, swaps the averaged weights in for evaluation and the raw
  iterate back for training, and is part of the training state (``MethodParts.extra_state``), so
  checkpoints, rollbacks and resumption carry it.
* **The LR these methods apply** is published through ``MethodParts.effective_lr`` (the functions
  ``*_lr`` below, pure functions of the optimizer's state), so the run record holds ``d * lr``, the
  warmed-up Schedule-Free LR or DoG's ``eta`` instead of the constant ``lr`` multiplier.

The packages are imported only when a method is built, so the registry works without them; a missing one
raises :class:`~lrpilot.core.registry.MissingExtraError` naming ``pip install 'lrpilot[peers]'``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lrpilot.core.averaging import EvaluatedWeights
from lrpilot.core.contract import Pilot, StepSignals
from lrpilot.core.data import split_batch

__all__ = [
    "AveragingPilot",
    "ScheduleFreeModes",
    "has_batchnorm",
    "WeightAverage",
    "dadapt_adam_lr",
    "dadapt_sgd_lr",
    "dog_lr",
    "prodigy_lr",
    "schedulefree_lr",
]

log = logging.getLogger("lrpilot")


# ----------------------------------------------------------------------------------------------------
# The LR each method applies (what telemetry records), from the optimizer's own state
# ----------------------------------------------------------------------------------------------------
def _adam_bias_correction(group: Mapping[str, Any]) -> float:
    """D-Adapt Adam's and Prodigy's optional bias correction at their next step ``k + 1`` (1 when off)."""
    if not group.get("use_bias_correction", False):
        return 1.0
    beta1, beta2 = group["betas"]
    k = group["k"]
    return ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))


def dadapt_sgd_lr(optimizer: torch.optim.Optimizer) -> list[float]:
    """``d * lr / ||g_0||`` per group: the step D-Adapt SGD applies to the gradient at its next step.

    ``nan`` before the first step, where ``||g_0||`` (the first gradient's norm) is not known yet.
    """
    out = []
    for g in optimizer.param_groups:
        g0 = g.get("g0_norm")
        out.append(math.nan if not g0 else float(g["d"]) * float(g["lr"]) / float(g0))
    return out


def dadapt_adam_lr(optimizer: torch.optim.Optimizer) -> list[float]:
    """``layer_scale * d * lr`` (times the bias correction when on) per group: D-Adapt Adam's step on
    ``m / (sqrt(v) + eps)`` at its next step."""
    return [
        float(g["layer_scale"]) * float(g["d"]) * float(g["lr"]) * _adam_bias_correction(g)
        for g in optimizer.param_groups
    ]


def prodigy_lr(optimizer: torch.optim.Optimizer) -> list[float]:
    """``d * lr`` (times the bias correction when on) per group: Prodigy's step on the Adam direction
    ``m / (sqrt(v) + eps)`` at its next step (its ``d`` factors in ``m`` and ``v`` cancel)."""
    return [float(g["d"]) * float(g["lr"]) * _adam_bias_correction(g) for g in optimizer.param_groups]


def schedulefree_lr(optimizer: torch.optim.Optimizer) -> list[float]:
    """``lr * min(1, (k + 1) / warmup_steps)`` per group: the ``scheduled_lr`` of the next step (the
    optimizer sets that field for logging only during the step, one step late for an epoch record)."""
    out = []
    for g in optimizer.param_groups:
        k, warmup = g["k"], g["warmup_steps"]
        sched = (k + 1) / warmup if k < warmup else 1.0
        out.append(float(g["lr"]) * sched)
    return out


def dog_lr(optimizer: torch.optim.Optimizer) -> list[float]:
    """DoG's ``eta = lr * rbar / sqrt(G)`` per group, from the state after its last step.

    That is the step size of the last step (``param_groups[i]["eta"]``) with the group's current ``lr``
    multiplier, so a change of ``lr`` (a safety-net halving) shows at once. L-DoG has one ``eta`` per
    parameter tensor: the record holds their mean weighted by the tensors' sizes. ``nan`` before the
    first step, whose ``eta`` depends on the first gradient.
    """
    out = []
    for g in optimizer.param_groups:
        if "rbar" not in g:
            out.append(math.nan)
            continue
        eta = g["lr"] * g["rbar"] / torch.sqrt(g["G"])
        if eta.ndim == 0:
            out.append(float(eta))
        else:  # L-DoG: one eta per tensor
            sizes = torch.tensor([p.numel() for p in g["params"]], dtype=eta.dtype, device=eta.device)
            out.append(float((eta * sizes).sum() / sizes.sum()))
    return out


# ----------------------------------------------------------------------------------------------------
# Evaluation plumbing
# ----------------------------------------------------------------------------------------------------
def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class ScheduleFreeModes:
    """Schedule-Free's train/eval switch for the loop (``eval_context`` and ``train_mode``).

    Entering ``eval_context`` from train mode calls ``optimizer.eval()`` (the model now holds ``x``, the
    point to evaluate) and, for a model with BatchNorm, runs ``refresh_batches`` training batches through
    it in train mode without gradients, so the running statistics are those of ``x`` rather than of the
    ``y`` sequence the gradients were taken at (the README's recipe). The context leaves the optimizer in
    eval mode; :meth:`train` switches back. Both are no-ops in the mode they switch to.

    Args:
        optimizer: a ``schedulefree`` optimizer (has ``.train()``/``.eval()`` and ``train_mode`` in its
            param groups).
        model: the model it trains.
        loader: the training loader (the batches of the BatchNorm refresh).
        refresh_batches: batches of the refresh (the README uses 50); 0 turns it off.
        device: where the model lives.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, loader: Any, refresh_batches: int,
        device: torch.device,
    ) -> None:
        self.optimizer = optimizer
        self.model = model
        self.loader = loader
        self.refresh_batches = refresh_batches if has_batchnorm(model) else 0
        self.device = device

    @property
    def in_train_mode(self) -> bool:
        return bool(self.optimizer.param_groups[0]["train_mode"])

    def train(self) -> None:
        self.optimizer.train()  # no-op in train mode

    @contextlib.contextmanager
    def eval_context(self) -> Iterator[None]:
        if self.in_train_mode:
            self.optimizer.eval()
            if self.refresh_batches:
                self._refresh_batchnorm()
        yield

    @torch.no_grad()
    def _refresh_batchnorm(self) -> None:
        was_training = self.model.training
        self.model.train()
        try:
            for batch in itertools.islice(self.loader, self.refresh_batches):
                x, _ = split_batch(batch, where="train_loader")
                self.model(x.to(self.device, non_blocking=True))
        finally:
            self.model.train(was_training)


class WeightAverage(EvaluatedWeights):
    """DoG's iterate averaging: the package's ``PolynomialDecayAverager``, evaluated in place of the model.

    After every optimizer step :meth:`update` folds the weights into the average (Shamir & Zhang 2013,
    ``xbar_t = (1 - (1+gamma)/(t+gamma)) xbar_{t-1} + (1+gamma)/(t+gamma) x_t``; every floating-point
    entry of the ``state_dict``, so BatchNorm statistics are averaged too). The swap for evaluation is
    :class:`~lrpilot.core.averaging.EvaluatedWeights`'.
    """

    def __init__(self, model: nn.Module, gamma: float) -> None:
        from dog import PolynomialDecayAverager

        super().__init__(model)
        self.averager = PolynomialDecayAverager(model, gamma=gamma)

    def update(self) -> None:
        self.check_training()
        self.averager.step()

    def averaged_state(self) -> dict[str, torch.Tensor]:
        return self.averager.averaged_model.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "averager": self.averager.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.averager.load_state_dict(state["averager"])
        self.load_raw_state_dict(state["raw"])


class AveragingPilot(Pilot):
    """Updates a :class:`WeightAverage` after every step (its state lives in ``MethodParts.extra_state``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, average: WeightAverage) -> None:
        super().__init__(optimizer)
        self.average = average

    def on_step_end(self, signals: StepSignals) -> None:
        self.average.update()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
