"""A cooldown for any method: the last steps of the budget take linearly shrinking steps, down to none.

Why (issue 15, ``docs/robustness.md``): a method that holds its LR near 0.1 to the end of a short budget
ends on a noisy last iterate, and a batch-normalised network's running statistics lag weights that still
move fast. On ResNet-20 at the robustness suite's CPU budget (120 steps) plain SGD at 0.1 scored 0.698
after its second epoch and 0.143 after its third while its training loss fell (0.83 -> 0.56); the
hypergradient, Lipschitz, AALR and hyper-regularization pilots, whose LRs stay at 0.09-0.2 there, lost a
seed or two the same way. Every method that anneals to zero by the end (tuned cosine SGD, ``auto``, the MI
decay) ended at its best on every seed. A linear decay over the last part of a known budget is the
remedy the literature gives for a constant-LR run: the "cooldown" of warmup-stable-decay schedules
(Zhai et al. 2022, Hägele et al. 2024: a 20 % linear cooldown matches a cosine schedule), and the last-
iterate analysis of Defazio et al. 2023 (linear decay to zero is the schedule the worst-case bound asks for).

**The rule.** With ``T`` the budget in optimizer steps and ``C = ceil(fraction * T)`` cooldown steps,
step ``k`` (1-based) applies ``m_k`` times the update the method computed::

    m_k = 1                        for k <= T - C
    m_k = (T - k + 1) / (C + 1)    for k >  T - C      (C/(C+1), ..., 1/(C+1): never a wasted step)

    w_k = w_{k-1} + m_k * (step_k(w_{k-1}) - w_{k-1})

The method's own state (momentum, Adam moments, a hypergradient LR, a Lipschitz estimate) evolves as it
would without the cooldown; only the weights it writes are pulled back towards where they were. For SGD
with momentum and for Adam (whose buffers hold gradients, not scaled steps) this is exactly the method
with its LR multiplied by ``m_k``; unlike writing ``m_k * lr`` into ``param_groups``, it means the same
for every method, whether its LR lives in ``param_groups`` (a schedule), in its own state (a
hypergradient LR that ``step()`` updates from ``param_groups["lr"]``) or nowhere (the Lipschitz step,
the hyper-regularization beta).

**How.** Two hooks on the optimizer (``register_step_pre_hook`` / ``register_step_post_hook``). For
``torch.optim.SGD``, ``Adam`` and ``AdamW`` themselves, whose step is the LR times a direction computed
from gradients and their own buffers, the hooks write ``m_k * lr`` into ``param_groups`` for the step and
put the LR back after it: the rule above exactly, at no cost (AALR and the Lipschitz pilot drive these).
For any other optimizer the weights are copied before a cooldown step and interpolated back after it
(``_foreach_lerp_``): one copy and one interpolation of the weights per cooldown step
(``benchmarks/cooldown_overhead.py``, quiet machine: a cooling step 1.11x / 1.14x an SGD step on the
MNIST-1D / Fashion-MNIST MLPs, 1.02x / 1.03x over a run; the LR path 1.02x / 1.00x a step). Steps before
the cooldown cost one comparison.
The step index ``k`` is the position in the budget: the ``j``-th step of epoch ``e`` (0-based, rolled-back
epochs counted, as the loop's budget counts them) is ``k = e * steps_per_epoch + j``, re-synchronised at
every epoch end, so an epoch that a non-finite loss cut short still spends its whole share and the
budget ends at ``m = 1/(C+1)`` whatever was rolled back. (Counting optimizer steps instead would shift
the cooldown past the end of the budget by every step an aborted epoch did not take: the Lipschitz pilot
on LeNet-5, whose first epochs diverge and are rolled back, took 500-662 of its 752 budgeted steps, so one
seed never reached its cooldown and another ended it at ``m = 0.6`` instead of 1/152.) The cooldown wraps the method's own pilot (including
its safety net) and passes every hook on; nothing in the loop knows about it.

Example:
    >>> import torch
    >>> from lrpilot.core.contract import MethodParts
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> parts = with_cooldown(MethodParts(torch.optim.SGD([w], lr=1.0)), total_steps=4, fraction=0.5)
    >>> parts.pilot.attach(torch.nn.Module())  # the training loop does this
    >>> for k in range(1, 5):  # a constant gradient of -1: each step moves w by lr * m_k
    ...     w.grad = torch.tensor([-1.0]); parts.optimizer.step()
    >>> round(float(w), 4)  # 1 + 1 + 2/3 + 1/3
    3.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lrpilot.core.checks import require_int, require_range
from lrpilot.core.contract import Decision, EpochSignals, MethodParts, Pilot, PilotWrapper, StepSignals

__all__ = ["Cooldown", "cooldown_multiplier", "with_cooldown"]


#: Optimizers whose step is exactly ``lr`` times an LR-free direction (their buffers hold gradients): the
#: cooldown scales their LR for the step instead of interpolating the weights. Exact types: a subclass may
#: use ``lr`` otherwise (the hypergradient optimizers update it inside ``step``).
_LR_LINEAR = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def cooldown_multiplier(step: int, total_steps: int, cooldown_steps: int) -> float:
    """``m_k`` of the rule above for 1-based step ``step`` of ``total_steps``; 1 outside the cooldown.

    Steps past the budget (a user who trains on) keep the last multiplier, ``1/(C+1)``.
    """
    start = total_steps - cooldown_steps
    if cooldown_steps <= 0 or step <= start:
        return 1.0
    return max(total_steps - step + 1, 1) / (cooldown_steps + 1)


class Cooldown(PilotWrapper):
    """Wraps a method's pilot; scales its last ``fraction`` of the budget's steps linearly down.

    Args:
        optimizer: the method's optimizer.
        inner: the method's own pilot (its safety net, a schedule), or ``None``.
        total_steps: the run's budget in optimizer steps, >= 1.
        fraction: the share of the budget that cools down, in [0, 1] (0: off; 0.2 is the usual choice).
        steps_per_epoch: the budget's steps per epoch: the clock is re-set to ``epoch * steps_per_epoch``
            at every epoch end. ``None``: the clock counts the steps taken (a loop without epochs).
    """

    role = "cooldown"

    def __init__(self, optimizer: torch.optim.Optimizer, inner: Pilot | None = None, *,
                 total_steps: int, fraction: float = 0.2, steps_per_epoch: int | None = None) -> None:
        super().__init__(optimizer, inner)
        require_range("fraction", fraction, 0.0, 1.0, owner="cooldown")
        require_int("total_steps", total_steps, minimum=1, owner="cooldown")
        self.total_steps = total_steps
        self.fraction = float(fraction)
        self.cooldown_steps = math.ceil(self.fraction * total_steps)
        if steps_per_epoch is not None:
            require_int("steps_per_epoch", steps_per_epoch, minimum=1, owner="cooldown")
        self.steps_per_epoch = steps_per_epoch
        self.steps_done = 0  # the position in the budget: steps of the budget spent so far
        self._before: list[torch.Tensor] | None = None  # the weights before a cooldown step
        self._cooling: float | None = None  # m_k of the step in progress, when it cools down
        self._hooks: list[Any] = []  # the optimizer hooks' handles, registered by attach()
        self._lrs: list[float] | None = None  # the LRs put back after a cooldown step that scaled them

    def multiplier(self, step: int | None = None) -> float:
        """``m_k`` for step ``step`` (default: the next one)."""
        return cooldown_multiplier(self.steps_done + 1 if step is None else step, self.total_steps, self.cooldown_steps)

    # -- the optimizer hooks ------------------------------------------------------------------------
    def _scales_lr(self, optimizer: torch.optim.Optimizer) -> bool:
        """The step is ``lr`` times a direction that does not depend on ``lr``: scaling the LR is exact."""
        return type(optimizer) in _LR_LINEAR and all(isinstance(g["lr"], float) for g in optimizer.param_groups)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        m = self.multiplier()
        if m == 1.0:
            return
        self._cooling = m
        if self._scales_lr(optimizer):
            self._lrs = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * m
            return
        params = [p.detach() for g in optimizer.param_groups for p in g["params"]]
        if self._before is None or len(self._before) != len(params):
            self._before = [torch.empty_like(p) for p in params]  # allocated once, at the first cooldown step
        torch._foreach_copy_(self._before, params)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        m, self._cooling = self._cooling, None
        if self._lrs is not None:  # the LR path: put the LRs back
            for g, lr in zip(optimizer.param_groups, self._lrs):
                g["lr"] = lr
            self._lrs = None
        elif m is not None:  # the weights path: w <- w + (1 - m) (w_before - w) = w_before + m (w - w_before)
            params = [p.detach() for g in optimizer.param_groups for p in g["params"]]
            with torch.no_grad():
                torch._foreach_lerp_(params, self._before, 1.0 - m)
        self.steps_done += 1  # re-synchronised with the budget at every epoch end

    # -- hooks, passed on ---------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        """Hook the optimizer (here, not when built: ``lrpilot.attach`` may first point the pilot at the
        user's own optimizer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = [self.optimizer.register_step_pre_hook(self._before_step),
                       self.optimizer.register_step_post_hook(self._after_step)]
        super().attach(model)

    def on_step_end(self, signals: StepSignals) -> None:
        if self.steps_per_epoch is None:
            self.steps_done = signals.step  # the loop's count of steps taken
        super().on_step_end(signals)

    def on_epoch_end(self, signals: EpochSignals) -> Sequence[Decision] | Decision | None:  # type: ignore[override]
        if self.steps_per_epoch is not None:
            self.steps_done = signals.epoch * self.steps_per_epoch  # a cut-short epoch spent its share too
        return super().on_epoch_end(signals)

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict() if self.inner is not None else None,
            "total_steps": self.total_steps,
            "fraction": self.fraction,
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "steps_done" not in state or "fraction" not in state:
            raise ValueError("this state was not saved by a Cooldown: build the trainer with the same cooldown option")
        if (state["total_steps"], state["fraction"]) != (self.total_steps, self.fraction):
            raise ValueError(
                f"this state is from a cooldown over {state['total_steps']} steps (fraction {state['fraction']}), "
                f"this one is over {self.total_steps} (fraction {self.fraction}): resume with the same budget"
            )
        if self.inner is not None:
            self.inner.load_state_dict(state["inner"])
        self.steps_done = int(state["steps_done"])


def with_cooldown(parts: MethodParts, *, total_steps: int, fraction: float = 0.2,
                  steps_per_epoch: int | None = None) -> MethodParts:
    """``parts`` with its pilot wrapped in a :class:`Cooldown` (``fraction == 0``: ``parts`` unchanged).

    The reported LR (``parts.lrs()``, the run's LR telemetry) is multiplied by the next step's ``m_k``.
    Where the method reports its LR from ``param_groups`` (no ``effective_lr`` of its own), the report
    follows the optimizer the cooldown drives, so ``lrpilot.attach`` may rebind it to the user's.
    """
    if fraction == 0:
        return parts
    cooldown = Cooldown(parts.optimizer, parts.pilot, total_steps=total_steps, fraction=fraction,
                        steps_per_epoch=steps_per_epoch)
    method_lr = parts.effective_lr

    def effective_lr() -> tuple[float, ...]:
        lrs = method_lr() if method_lr is not None else [g["lr"] for g in cooldown.optimizer.param_groups]
        m = cooldown.multiplier()
        return tuple(float(v) * m for v in lrs)

    effective_lr.follows_optimizer = method_lr is None  # type: ignore[attr-defined]
    return dataclasses.replace(parts, pilot=cooldown, effective_lr=effective_lr)


#: The cooldown of the seed methods' default forms (``-o cooldown=0`` is the paper's method, without one).
DEFAULT_FRACTION = 0.2


def cooled(parts: MethodParts, ctx: Any, fraction: Any, *, method: str) -> MethodParts:
    """A family builder's last line: ``parts`` with the registry option ``cooldown`` (a fraction of the
    run's budget, ``ctx.total_steps``) applied; a bad value raises naming the method."""
    require_range("cooldown", fraction, 0.0, 1.0, method=method)  # a share of the budget; 0: the paper's form
    return with_cooldown(parts, total_steps=ctx.total_steps, fraction=float(fraction),
                         steps_per_epoch=ctx.steps_per_epoch)
