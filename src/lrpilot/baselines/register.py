"""The baselines family's records: the usual optimizers and schedules the papers compare against, the
grid-tuned references and the LR-free peers from their packages.

Every SGD-based entry uses momentum 0.9 and a default LR of 0.1 (AALR's eta_0 and the usual CIFAR
recipe); adaptive optimizers use their authors' defaults, except RMSprop (1e-3, the Keras/paper
default, where torch's 1e-2 diverges on most of our tasks). ``--lr`` overrides the LR of any entry.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch.optim import lr_scheduler

from lrpilot.baselines.lars import LARS
from lrpilot.baselines.peers import (
    AveragingPilot,
    ScheduleFreeModes,
    WeightAverage,
    dadapt_adam_lr,
    dadapt_sgd_lr,
    dog_lr,
    has_batchnorm,
    prodigy_lr,
    schedulefree_lr,
)
from lrpilot.baselines.schedules import PlateauPilot, SchedulePilot, poly_decay
from lrpilot.baselines.tuned import DEFAULT_GRIDS, grid_search
from lrpilot.core.checks import require_bool, require_in, require_positive
from lrpilot.core.contract import MethodParts, Pilot
from lrpilot.core.registry import BuildContext, MethodInfo, build_method, register

_SGD_DEFAULTS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False}
_BASELINE = frozenset({"baseline"})

log = logging.getLogger("lrpilot")


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
    fold: bool,
) -> MethodParts:
    require_in("decay", decay, ("poly", "none"), method="lars")
    require_bool("fold", fold, method="lars")
    require_positive("power", power, method="lars")
    opt = LARS(
        ctx.params(),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        exclude_1d=exclude_1d,
        fold=fold,
    )
    if decay == "none":
        return MethodParts(opt)
    sched = lr_scheduler.LambdaLR(opt, poly_decay(ctx.total_steps, power))
    return MethodParts(opt, SchedulePilot(opt, sched, per="step", name="poly-decay"))


def _register_torch_methods() -> None:
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
                   tags=_BASELINE, invalid_options=(({"factor": 1.5}, r"factor"),), decision_split=True),
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
                    "exclude_1d": False, "decay": "poly", "power": 2.0,
                    "fold": True},  # False: the multi-tensor path bit for bit the reference loop (lars.py)
                   lr_granularity="step", kind="schedule", tags=_BASELINE, paper="You, Gitman & Ginsburg 2017",
                   invalid_options=(({"trust_coefficient": 0.0}, r"trust_coefficient"), ({"decay": "cos"}, r"decay"))),
    ]
    for info in entries:
        register(info)


_register_torch_methods()


# ==================================================================================================
# Grid-tuned references
# ==================================================================================================
def build_tuned(
    ctx: BuildContext, *, base: str, name: str, grid: Sequence[float], search_epochs: int | None, criterion: str,
    **options: Any,
) -> MethodParts:
    search = grid_search(ctx, base, grid, search_epochs=search_epochs, criterion=criterion, method=name, **options)
    parts = build_method(base, ctx, {**options, "lr": search["chosen"]["lr"]})
    parts.info = {**parts.info, "search": search}
    return parts


#: The base methods' options other than ``lr`` (a test checks they match the base records).
SEARCH_DEFAULTS = {"search_epochs": None, "criterion": "best"}
SGD_COSINE_OPTIONS = {"momentum": 0.9, "weight_decay": 0.0, "nesterov": False, "min_lr_factor": 0.0}
ADAM_COSINE_OPTIONS = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "min_lr_factor": 0.0}


def _register_tuned() -> None:
    tags = frozenset({"baseline", "tuned"})
    bad = (({"grid": ()}, r"grid"), ({"grid": (0.1, -1.0)}, r"grid"), ({"criterion": "median"}, r"criterion"),
           ({"search_epochs": 0}, r"search_epochs"))
    for base, options, test_grid in (("sgd-cosine", SGD_COSINE_OPTIONS, (0.03, 0.1)),
                                     ("adam-cosine", ADAM_COSINE_OPTIONS, (1e-3, 1e-2))):  # fmt: skip
        name = f"{base}-tuned"
        register(MethodInfo(
            name, "tuned",
            f"{base} with its LR chosen by a full-budget grid search on the validation metric "
            f"({len(DEFAULT_GRIDS[base])} runs)",
            partial(build_tuned, base=base, name=name),
            {"grid": DEFAULT_GRIDS[base], **SEARCH_DEFAULTS, **options},
            lr_granularity="step", kind="schedule", tags=tags,
            test_options={"grid": test_grid, "search_epochs": 1}, invalid_options=bad,
        ))  # fmt: skip


_register_tuned()


# ----------------------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------------------
def _quiet(cls: type, *args: Any, **kwargs: Any) -> Any:
    """Construct a package optimizer; its ``print`` calls (e.g. "Using decoupled weight decay") go to the log."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        obj = cls(*args, **kwargs)
    if buf.getvalue().strip():
        log.debug("%s: %s", cls.__name__, buf.getvalue().strip())
    return obj


def _check_unit(name: str, value: Any, method: str, *, closed_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and 0 <= value and (value <= 1 if closed_high else value < 1)
    if not ok:
        raise ValueError(f"option {name} of method {method!r} must be in [0, 1{']' if closed_high else ')'}, got {value!r}")


def _check_growth(growth_rate: Any, method: str) -> None:
    ok = isinstance(growth_rate, (int, float)) and not isinstance(growth_rate, bool) and growth_rate >= 1
    if not ok:  # inf (the default) means unbounded
        raise ValueError(f"option growth_rate of method {method!r} must be a number >= 1 (inf: unbounded), got {growth_rate!r}")


def _schedule(ctx: BuildContext, optimizer: torch.optim.Optimizer, schedule: str, method: str) -> Pilot | None:
    """The LR schedule the D-Adaptation/Prodigy authors recommend using on top: per-step cosine to 0."""
    require_in("schedule", schedule, ("cosine", "none"), method=method)
    if schedule == "none":
        return None
    sched = lr_scheduler.CosineAnnealingLR(optimizer, T_max=ctx.total_steps)
    return SchedulePilot(optimizer, sched, per="step", name="cosine")


def build_dadapt_sgd(
    ctx: BuildContext, lr: float, momentum: float, weight_decay: float, d0: float, growth_rate: float, schedule: str,
) -> MethodParts:
    from dadaptation import DAdaptSGD

    _check_unit("momentum", momentum, "dadapt-sgd")
    _check_growth(growth_rate, "dadapt-sgd")
    require_positive("weight_decay", weight_decay, method="dadapt-sgd", allow_zero=True)
    opt = _quiet(DAdaptSGD, ctx.params(), lr=lr, momentum=momentum, weight_decay=weight_decay, d0=d0,
                 growth_rate=growth_rate)
    return MethodParts(opt, _schedule(ctx, opt, schedule, "dadapt-sgd"), effective_lr=partial(dadapt_sgd_lr, opt))


def build_dadapt_adam(
    ctx: BuildContext, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decouple: bool,
    use_bias_correction: bool, d0: float, growth_rate: float, schedule: str,
) -> MethodParts:
    from dadaptation import DAdaptAdam

    _check_growth(growth_rate, "dadapt-adam")
    opt = _quiet(DAdaptAdam, ctx.params(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                 decouple=decouple, use_bias_correction=use_bias_correction, d0=d0, growth_rate=growth_rate)
    return MethodParts(opt, _schedule(ctx, opt, schedule, "dadapt-adam"), effective_lr=partial(dadapt_adam_lr, opt))


def build_prodigy(
    ctx: BuildContext, lr: float, beta1: float, beta2: float, beta3: float | None, eps: float, weight_decay: float,
    decouple: bool, use_bias_correction: bool, safeguard_warmup: bool, d0: float, d_coef: float,
    growth_rate: float, slice_p: int, schedule: str,
) -> MethodParts:
    from prodigyopt import Prodigy

    _check_growth(growth_rate, "prodigy")
    require_positive("d_coef", d_coef, method="prodigy")
    if beta3 is not None:
        _check_unit("beta3", beta3, "prodigy")
    if not (isinstance(slice_p, int) and not isinstance(slice_p, bool) and slice_p >= 1):
        raise ValueError(f"option slice_p of method 'prodigy' must be an integer >= 1, got {slice_p!r}")
    opt = _quiet(Prodigy, ctx.params(), lr=lr, betas=(beta1, beta2), beta3=beta3, eps=eps, weight_decay=weight_decay,
                 decouple=decouple, use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup,
                 d0=d0, d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p)
    return MethodParts(opt, _schedule(ctx, opt, schedule, "prodigy"), effective_lr=partial(prodigy_lr, opt))


def _schedulefree_parts(ctx: BuildContext, opt: torch.optim.Optimizer, bn_refresh_batches: int, method: str) -> MethodParts:
    if not (isinstance(bn_refresh_batches, int) and not isinstance(bn_refresh_batches, bool) and bn_refresh_batches >= 0):
        raise ValueError(f"option bn_refresh_batches of method {method!r} must be an integer >= 0, got {bn_refresh_batches!r}")
    modes = ScheduleFreeModes(opt, ctx.model, ctx.train_loader, bn_refresh_batches, ctx.device)
    return MethodParts(opt, eval_context=modes.eval_context, train_mode=modes.train,
                       effective_lr=partial(schedulefree_lr, opt))


def _warmup_steps(ctx: BuildContext, warmup_fraction: float, method: str) -> int:
    _check_unit("warmup_fraction", warmup_fraction, method)
    return round(warmup_fraction * ctx.total_steps)


def build_schedulefree_sgd(
    ctx: BuildContext, lr: float, momentum: float, weight_decay: float, warmup_fraction: float, r: float,
    weight_lr_power: float, bn_refresh_batches: int,
) -> MethodParts:
    from schedulefree import SGDScheduleFree

    require_positive("weight_lr_power", weight_lr_power, method="schedulefree-sgd", allow_zero=True)
    opt = SGDScheduleFree(ctx.params(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          warmup_steps=_warmup_steps(ctx, warmup_fraction, "schedulefree-sgd"), r=r,
                          weight_lr_power=weight_lr_power)
    return _schedulefree_parts(ctx, opt, bn_refresh_batches, "schedulefree-sgd")


def build_schedulefree_adamw(
    ctx: BuildContext, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, warmup_fraction: float,
    r: float, weight_lr_power: float, bn_refresh_batches: int,
) -> MethodParts:
    from schedulefree import AdamWScheduleFree

    # The package checks none of these; a beta1 of 0 would divide by zero in eval().
    _check_unit("beta2", beta2, "schedulefree-adamw")
    if not (isinstance(beta1, (int, float)) and 0 < beta1 < 1):
        raise ValueError(f"option beta1 of method 'schedulefree-adamw' must be in (0, 1), got {beta1!r}")
    require_positive("eps", eps, method="schedulefree-adamw")
    require_positive("weight_decay", weight_decay, method="schedulefree-adamw", allow_zero=True)
    require_positive("weight_lr_power", weight_lr_power, method="schedulefree-adamw", allow_zero=True)
    opt = AdamWScheduleFree(ctx.params(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                            warmup_steps=_warmup_steps(ctx, warmup_fraction, "schedulefree-adamw"), r=r,
                            weight_lr_power=weight_lr_power)
    return _schedulefree_parts(ctx, opt, bn_refresh_batches, "schedulefree-adamw")


@functools.cache
def _dog_class(layerwise: bool) -> type:
    """The package's ``DoG``/``LDoG`` with ``load_state_dict`` keeping the state on the parameters' device.

    The package's ``load_state_dict`` moves every tensor of a param group except ``init_buffer`` to the
    CPU, so on a GPU the first step after a resume or a rollback mixes devices (``G += ...`` on a CPU
    tensor; L-DoG's per-tensor ``rbar`` in ``torch.maximum``). Moving ``rbar``, ``G`` and ``eta`` back
    to the parameters' device fixes it; on the CPU it changes nothing.
    """
    from dog import DoG, LDoG

    base = LDoG if layerwise else DoG

    class DeviceSafe(base):  # type: ignore[misc, valid-type]
        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                device = group["params"][0].device
                for key in ("rbar", "G"):
                    if isinstance(group.get(key), torch.Tensor):
                        group[key] = group[key].to(device)
                if isinstance(group.get("eta"), list):
                    group["eta"] = [e.to(device) if isinstance(e, torch.Tensor) else e for e in group["eta"]]

    DeviceSafe.__name__ = DeviceSafe.__qualname__ = base.__name__
    return DeviceSafe


def _build_dog(
    ctx: BuildContext, lr: float, reps_rel: float | None, weight_decay: float, eps: float, init_eta: float | None,
    average: bool, gamma: float, *, layerwise: bool,
) -> MethodParts:
    method = "ldog" if layerwise else "dog"
    require_positive("gamma", gamma, method=method, allow_zero=True)
    if not isinstance(average, bool):
        raise ValueError(f"option average of method {method!r} must be True or False, got {average!r}")
    if reps_rel is None:  # the README: 1e-6, or 1e-4 for models with batch normalisation
        reps_rel = 1e-4 if has_batchnorm(ctx.model) else 1e-6
    opt = _dog_class(layerwise)(ctx.params(), reps_rel=reps_rel, lr=lr, weight_decay=weight_decay, eps=eps, init_eta=init_eta)
    effective = partial(dog_lr, opt)
    if not average:
        return MethodParts(opt, effective_lr=effective)
    avg = WeightAverage(ctx.model, gamma)
    return MethodParts(opt, AveragingPilot(opt, avg), eval_context=avg.eval_context, train_mode=avg.train,
                       effective_lr=effective, extra_state={"average": avg})


build_dog = partial(_build_dog, layerwise=False)
build_ldog = partial(_build_dog, layerwise=True)


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------
_PEER = frozenset({"peer"})
_DADAPT = {"d0": 1e-6, "growth_rate": math.inf, "schedule": "cosine"}
_SF = {"r": 0.0, "weight_lr_power": 2.0, "warmup_fraction": 0.02, "bn_refresh_batches": 50}
_DOG = {"lr": 1.0, "reps_rel": None, "weight_decay": 0.0, "eps": 1e-8, "init_eta": None, "average": True, "gamma": 8.0}


def _register_peers() -> None:
    common = dict(lr_granularity="step", kind="step-pilot", tags=_PEER, extra="peers")
    entries = [
        MethodInfo("dadapt-sgd", "peers", "D-Adaptation SGD (Defazio & Mishchenko 2023), momentum 0.9, cosine",
                   build_dadapt_sgd, {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, **_DADAPT},
                   requires=("dadaptation",), paper="Defazio & Mishchenko, ICML 2023",
                   invalid_options=(({"d0": 0.0}, r"d0"), ({"schedule": "step"}, r"schedule"),
                                    ({"momentum": 1.0}, r"momentum")), **common),
        MethodInfo("dadapt-adam", "peers", "D-Adaptation Adam (Defazio & Mishchenko 2023), cosine", build_dadapt_adam,
                   {"lr": 1.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "decouple": False,
                    "use_bias_correction": False, **_DADAPT},
                   requires=("dadaptation",), paper="Defazio & Mishchenko, ICML 2023",
                   invalid_options=(({"beta1": 1.5}, r"beta"), ({"growth_rate": 0.5}, r"growth_rate")), **common),
        MethodInfo("prodigy", "peers", "Prodigy (Mishchenko & Defazio 2024), Adam-based, cosine", build_prodigy,
                   {"lr": 1.0, "beta1": 0.9, "beta2": 0.999, "beta3": None, "eps": 1e-8, "weight_decay": 0.0,
                    "decouple": True, "use_bias_correction": False, "safeguard_warmup": False, "d0": 1e-6,
                    "d_coef": 1.0, "growth_rate": math.inf, "slice_p": 1, "schedule": "cosine"},
                   requires=("prodigyopt",), paper="Mishchenko & Defazio, ICML 2024",
                   invalid_options=(({"d_coef": 0.0}, r"d_coef"), ({"d0": -1.0}, r"d0")), **common),
        MethodInfo("schedulefree-sgd", "peers", "Schedule-Free SGD (Defazio et al. 2024), lr 1.0, 2% warm-up",
                   build_schedulefree_sgd, {"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0, **_SF},
                   requires=("schedulefree",), paper="Defazio et al., NeurIPS 2024",
                   invalid_options=(({"momentum": 1.0}, r"[Mm]omentum"), ({"warmup_fraction": 1.5}, r"warmup_fraction"),
                                    ({"bn_refresh_batches": -1}, r"bn_refresh_batches")), **common),
        MethodInfo("schedulefree-adamw", "peers", "Schedule-Free AdamW (Defazio et al. 2024), lr 0.0025, 2% warm-up",
                   build_schedulefree_adamw,
                   {"lr": 0.0025, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, **_SF},
                   requires=("schedulefree",), paper="Defazio et al., NeurIPS 2024",
                   invalid_options=(({"beta1": 0.0}, r"beta1"), ({"warmup_fraction": -0.1}, r"warmup_fraction")),
                   **common),
        MethodInfo("dog", "peers", "DoG (Ivgi, Hinder & Carmon 2023) with polynomial-decay averaging", build_dog,
                   dict(_DOG), requires=("dog",), paper="Ivgi, Hinder & Carmon, ICML 2023",
                   invalid_options=(({"reps_rel": -1.0}, r"reps_rel"), ({"gamma": -1.0}, r"gamma")), **common),
        MethodInfo("ldog", "peers", "Layer-wise DoG (Ivgi, Hinder & Carmon 2023) with polynomial-decay averaging",
                   build_ldog, dict(_DOG), requires=("dog",), paper="Ivgi, Hinder & Carmon, ICML 2023",
                   invalid_options=(({"reps_rel": -1.0}, r"reps_rel"), ({"average": "yes"}, r"average")), **common),
    ]
    for info in entries:
        register(info)


_register_peers()
