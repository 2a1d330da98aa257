"""Registry entries for the usual optimizers and schedules the papers compare against.

Every SGD-based entry uses momentum 0.9 and a default LR of 0.1 (AALR's eta_0 and the usual CIFAR
recipe); adaptive optimizers use their authors' defaults, except RMSprop (1e-3, the Keras/paper
default, where torch's 1e-2 diverges on most of our tasks). ``--lr`` overrides the LR of any entry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import lr_scheduler

from lrpilot.baselines.lars import LARS
from lrpilot.baselines.schedules import PlateauPilot, SchedulePilot, poly_decay
from lrpilot.pilots.base import MethodParts
from lrpilot.registry import BuildContext, MethodInfo, register, require_in, require_positive

_SGD_DEFAULTS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False}
_BASELINE = frozenset({"baseline"})


def _sgd(ctx: BuildContext, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.SGD:
    return torch.optim.SGD(ctx.params(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def _steps(ctx: BuildContext, epochs: float) -> int:
    """A duration in epochs as a whole number of steps (at least one)."""
    return max(1, round(epochs * ctx.steps_per_epoch))


def build_sgd(ctx: BuildContext, **o: Any) -> MethodParts:
    return MethodParts(_sgd(ctx, **o))


def build_sgd_step(ctx: BuildContext, milestones: tuple[float, ...], gamma: float, **o: Any) -> MethodParts:
    for m in milestones:
        if not 0 < m < 1:
            raise ValueError(f"option milestones of method 'sgd-step' are fractions of the budget in (0, 1), got {m!r}")
    require_positive("gamma", gamma, method="sgd-step")
    opt = _sgd(ctx, **o)
    epochs = sorted({max(1, round(m * ctx.epochs)) for m in milestones})
    sched = lr_scheduler.MultiStepLR(opt, milestones=epochs, gamma=gamma)
    return MethodParts(opt, SchedulePilot(opt, sched, per="epoch", name="step-decay"))


def build_sgd_exp(ctx: BuildContext, final_factor: float, **o: Any) -> MethodParts:
    require_positive("final_factor", final_factor, method="sgd-exp")
    opt = _sgd(ctx, **o)
    # gamma per epoch such that the LR after the whole budget is lr * final_factor.
    gamma = final_factor ** (1.0 / max(ctx.epochs, 1))
    sched = lr_scheduler.ExponentialLR(opt, gamma=gamma)
    return MethodParts(opt, SchedulePilot(opt, sched, per="epoch", name="exp-decay"))


def build_sgd_cosine(ctx: BuildContext, min_lr_factor: float, **o: Any) -> MethodParts:
    require_positive("min_lr_factor", min_lr_factor, method="sgd-cosine", allow_zero=True)
    opt = _sgd(ctx, **o)
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=ctx.total_steps, eta_min=o["lr"] * min_lr_factor)
    return MethodParts(opt, SchedulePilot(opt, sched, per="step", name="cosine"))


def build_sgdr(ctx: BuildContext, t0_epochs: float, t_mult: int, **o: Any) -> MethodParts:
    require_positive("t0_epochs", t0_epochs, method="sgdr")
    if not (isinstance(t_mult, int) and t_mult >= 1):
        raise ValueError(f"option t_mult of method 'sgdr' must be an integer >= 1, got {t_mult!r}")
    opt = _sgd(ctx, **o)
    sched = lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=_steps(ctx, t0_epochs), T_mult=t_mult)
    return MethodParts(opt, SchedulePilot(opt, sched, per="step", name="sgdr"))


def build_clr(ctx: BuildContext, base_lr_factor: float, half_cycle_epochs: float, **o: Any) -> MethodParts:
    if not 0 < base_lr_factor < 1:
        raise ValueError(f"option base_lr_factor of method 'clr' must be in (0, 1), got {base_lr_factor!r}")
    require_positive("half_cycle_epochs", half_cycle_epochs, method="clr")
    opt = _sgd(ctx, **o)
    sched = lr_scheduler.CyclicLR(
        opt,
        base_lr=o["lr"] * base_lr_factor,
        max_lr=o["lr"],
        step_size_up=_steps(ctx, half_cycle_epochs),
        mode="triangular",
        cycle_momentum=False,  # Smith 2017 cycles the LR only
    )
    return MethodParts(opt, SchedulePilot(opt, sched, per="step", name="clr"))


def build_onecycle(ctx: BuildContext, pct_start: float, div_factor: float, final_div_factor: float, **o: Any) -> MethodParts:
    if not 0 < pct_start < 1:
        raise ValueError(f"option pct_start of method 'onecycle' must be in (0, 1), got {pct_start!r}")
    require_positive("div_factor", div_factor, method="onecycle")
    require_positive("final_div_factor", final_div_factor, method="onecycle")
    opt = _sgd(ctx, **o)
    sched = lr_scheduler.OneCycleLR(
        opt,
        max_lr=o["lr"],
        total_steps=ctx.total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=o["momentum"] > 0,
    )
    return MethodParts(opt, SchedulePilot(opt, sched, per="step", name="onecycle"))


def build_plateau(ctx: BuildContext, factor: float, patience: int, **o: Any) -> MethodParts:
    if not 0 < factor < 1:
        raise ValueError(f"option factor of method 'plateau' must be in (0, 1), got {factor!r}")
    if not (isinstance(patience, int) and patience >= 0):
        raise ValueError(f"option patience of method 'plateau' must be an integer >= 0, got {patience!r}")
    opt = _sgd(ctx, **o)
    return MethodParts(opt, PlateauPilot(opt, factor=factor, patience=patience))


def build_adam(ctx: BuildContext, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> MethodParts:
    return MethodParts(torch.optim.Adam(ctx.params(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay))


def build_adam_cosine(
    ctx: BuildContext, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, min_lr_factor: float
) -> MethodParts:
    require_positive("min_lr_factor", min_lr_factor, method="adam-cosine", allow_zero=True)
    opt = torch.optim.Adam(ctx.params(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=ctx.total_steps, eta_min=lr * min_lr_factor)
    return MethodParts(opt, SchedulePilot(opt, sched, per="step", name="cosine"))


def build_rmsprop(ctx: BuildContext, lr: float, alpha: float, eps: float, momentum: float, weight_decay: float) -> MethodParts:
    return MethodParts(
        torch.optim.RMSprop(ctx.params(), lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay)
    )


def build_adadelta(ctx: BuildContext, lr: float, rho: float, eps: float, weight_decay: float) -> MethodParts:
    return MethodParts(torch.optim.Adadelta(ctx.params(), lr=lr, rho=rho, eps=eps, weight_decay=weight_decay))


def build_adagrad(ctx: BuildContext, lr: float, eps: float, weight_decay: float) -> MethodParts:
    return MethodParts(torch.optim.Adagrad(ctx.params(), lr=lr, eps=eps, weight_decay=weight_decay))


def build_lars(
    ctx: BuildContext,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    exclude_1d: bool,
    decay: str,
    power: float,
) -> MethodParts:
    require_in("decay", decay, ("poly", "none"), method="lars")
    require_positive("power", power, method="lars")
    opt = LARS(
        ctx.params(),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        exclude_1d=exclude_1d,
    )
    if decay == "none":
        return MethodParts(opt)
    sched = lr_scheduler.LambdaLR(opt, poly_decay(ctx.total_steps, power))
    return MethodParts(opt, SchedulePilot(opt, sched, per="step", name="poly-decay"))


def _register_all() -> None:
    sgd_bad = (({"momentum": -0.5}, r"momentum"),)
    entries = [
        MethodInfo("sgd", "baseline", "SGD, constant LR, momentum 0.9", build_sgd, _SGD_DEFAULTS,
                   tags=_BASELINE | {"main-baseline"}, invalid_options=sgd_bad),
        MethodInfo("sgd-step", "baseline", "SGD with step decay (x0.1 at 50% and 75% of the budget)", build_sgd_step,
                   {**_SGD_DEFAULTS, "milestones": (0.5, 0.75), "gamma": 0.1}, lr_granularity="epoch",
                   kind="schedule", tags=_BASELINE | {"main-baseline"},
                   invalid_options=(({"milestones": (1.5,)}, r"milestones"), ({"gamma": 0}, r"gamma"))),
        MethodInfo("sgd-exp", "baseline", "SGD with per-epoch exponential decay to lr*final_factor", build_sgd_exp,
                   {**_SGD_DEFAULTS, "final_factor": 0.01}, lr_granularity="epoch", kind="schedule", tags=_BASELINE,
                   invalid_options=(({"final_factor": -1}, r"final_factor"),)),
        MethodInfo("sgd-cosine", "baseline", "SGD with per-step cosine annealing over the budget", build_sgd_cosine,
                   {**_SGD_DEFAULTS, "min_lr_factor": 0.0}, lr_granularity="step", kind="schedule",
                   tags=_BASELINE | {"main-baseline"}, invalid_options=(({"min_lr_factor": -1}, r"min_lr_factor"),)),
        MethodInfo("sgdr", "baseline", "SGD with cosine warm restarts (Loshchilov & Hutter 2017)", build_sgdr,
                   {**_SGD_DEFAULTS, "t0_epochs": 10.0, "t_mult": 2}, lr_granularity="step", kind="schedule",
                   tags=_BASELINE, invalid_options=(({"t_mult": 0}, r"t_mult"),)),
        MethodInfo("clr", "baseline", "SGD with a triangular cyclic LR (Smith 2017)", build_clr,
                   {**_SGD_DEFAULTS, "base_lr_factor": 0.1, "half_cycle_epochs": 4.0}, lr_granularity="step",
                   kind="schedule", tags=_BASELINE, invalid_options=(({"base_lr_factor": 2.0}, r"base_lr_factor"),)),
        MethodInfo("onecycle", "baseline", "SGD with the one-cycle policy (Smith & Topin 2019)", build_onecycle,
                   {**_SGD_DEFAULTS, "pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4},
                   lr_granularity="step", kind="schedule", tags=_BASELINE | {"main-baseline"},
                   invalid_options=(({"pct_start": 1.5}, r"pct_start"),)),
        MethodInfo("plateau", "baseline", "SGD, LR x0.1 when the validation loss plateaus (5 epochs)", build_plateau,
                   {**_SGD_DEFAULTS, "factor": 0.1, "patience": 5}, lr_granularity="epoch", kind="schedule",
                   tags=_BASELINE, invalid_options=(({"factor": 1.5}, r"factor"),)),
        MethodInfo("adam", "baseline", "Adam (Kingma & Ba 2015), LR 1e-3", build_adam,
                   {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
                   tags=_BASELINE | {"main-baseline"}, invalid_options=(({"beta1": 1.5}, r"beta"),)),
        MethodInfo("adam-cosine", "baseline", "Adam with per-step cosine annealing over the budget, LR 1e-3",
                   build_adam_cosine,
                   {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "min_lr_factor": 0.0},
                   lr_granularity="step", kind="schedule", tags=_BASELINE,
                   invalid_options=(({"min_lr_factor": -1}, r"min_lr_factor"), ({"beta2": 1.5}, r"beta"))),
        MethodInfo("rmsprop", "baseline", "RMSprop, LR 1e-3", build_rmsprop,
                   {"lr": 1e-3, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0}, tags=_BASELINE,
                   invalid_options=(({"alpha": -1.0}, r"alpha"),)),
        MethodInfo("adadelta", "baseline", "Adadelta (Zeiler 2012), LR 1.0", build_adadelta,
                   {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}, tags=_BASELINE,
                   invalid_options=(({"rho": 2.0}, r"rho"),)),
        MethodInfo("adagrad", "baseline", "Adagrad (Duchi et al. 2011), LR 0.01", build_adagrad,
                   {"lr": 0.01, "eps": 1e-10, "weight_decay": 0.0}, tags=_BASELINE,
                   invalid_options=(({"eps": -1.0}, r"epsilon|eps"),)),
        MethodInfo("lars", "baseline", "LARS (You et al. 2017): per-layer trust ratio, polynomial decay", build_lars,
                   {"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.001,
                    "exclude_1d": False, "decay": "poly", "power": 2.0},
                   lr_granularity="step", kind="schedule", tags=_BASELINE, paper="You, Gitman & Ginsburg 2017",
                   invalid_options=(({"trust_coefficient": 0.0}, r"trust_coefficient"), ({"decay": "cos"}, r"decay"))),
    ]
    for info in entries:
        register(info)


_register_all()
