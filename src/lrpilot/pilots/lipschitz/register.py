"""The LipschitzLR family's registry records (lipschitz, adamo, lipschitz-rmsprop, auto-adam) and their builders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lrpilot.core.checks import is_number, option_error, require_in, require_positive
from lrpilot.core.contract import MethodParts
from lrpilot.core.registry import BuildContext, MethodInfo, defaults_of, register
from lrpilot.estimators.lipschitz import LossSpec, PenultimateMonitor, find_head, has_hidden_layer
from lrpilot.pilots.cooldown import DEFAULT_FRACTION, cooled
from lrpilot.pilots.lipschitz.guard import LipschitzGuard
from lrpilot.pilots.lipschitz.optimizers import AdaMo, AutoAdam, LipschitzOptimizer, LipschitzRMSprop
from lrpilot.pilots.lipschitz.pilot import LastLayerLipschitz, LipschitzPilot, targets_norm


def _loss_spec(ctx: BuildContext, method: str) -> LossSpec:
    head = find_head(ctx.model)
    try:
        return LossSpec.from_loss(
            ctx.loss_fn if ctx.loss_fn is not None else nn.CrossEntropyLoss(), head.out_features
        )
    except ValueError as err:
        raise option_error(method, err) from None


def build_lipschitz(
    ctx: BuildContext,
    initial_lr: float | None,
    momentum: float,
    weight_decay: float,
    mode: str,
    constant: str,
    ls_form: str,
    weight_bound: str,
    backoff: float,
    max_rollbacks: int,
    explode_factor: float | None,
    stall_factor: float | None,
    shrink_factor: float | None,
    max_growth: float | None,
    cooldown: float,
) -> MethodParts:
    name = "lipschitz"
    require_positive("weight_decay", weight_decay, method=name, allow_zero=True)
    if not (is_number(momentum) and 0 <= momentum < 1):
        raise ValueError(f"option momentum of method {name!r} must be in [0, 1), got {momentum!r}")
    if initial_lr is not None:
        require_positive("initial_lr", initial_lr, method=name)
    spec = _loss_spec(ctx, name)
    # The LR is set before the first step (probe or initial_lr); this placeholder is never applied.
    opt = torch.optim.SGD(ctx.params(), lr=initial_lr or 1e-3, momentum=momentum, weight_decay=weight_decay)
    try:
        pilot = LipschitzPilot(
            opt, loss=spec, mode=mode, initial_lr=initial_lr, constant=constant,
            ls_form=ls_form, weight_bound=weight_bound, backoff=backoff, max_rollbacks=max_rollbacks,
            explode_factor=explode_factor, stall_factor=stall_factor, shrink_factor=shrink_factor,
            max_growth=max_growth,
        )  # fmt: skip
    except ValueError as err:
        raise option_error(name, err) from None
    parts = MethodParts(opt, pilot, info={"loss": spec.kind})
    # A classical (convex, no hidden layer) model keeps the paper's fixed 1/L, under which gradient descent
    # converges as it is: the cooldown is for networks, whose LR the pilot re-estimates every epoch.
    network = mode == "network" or (mode == "auto" and has_hidden_layer(ctx.model, find_head(ctx.model)))
    return cooled(parts, ctx, cooldown if network else 0.0, method=name)


def _source(ctx: BuildContext, method: str, ls_form: str, elementwise: bool) -> LastLayerLipschitz:
    spec = _loss_spec(ctx, method)
    require_in("ls_form", ls_form, ("paper", "bound"), method=method)
    y_norm = targets_norm(ctx.train_pass) if spec.kind == "least_squares" else 0.0
    monitor = PenultimateMonitor(ctx.model, elementwise=elementwise, outputs=spec.kind == "least_squares")
    return LastLayerLipschitz(monitor, spec, y_norm, ls_form)


def _step_parts(
    ctx: BuildContext,
    opt: LipschitzOptimizer,
    source: LastLayerLipschitz,
    guard_options: dict[str, Any],
    method: str,
) -> MethodParts:
    try:
        guard = LipschitzGuard(opt, monitor=source.monitor, **guard_options)
    except ValueError as err:
        source.monitor.remove()
        raise option_error(method, err) from None
    return MethodParts(opt, guard, effective_lr=opt.effective_lrs, info={"loss": source.loss.kind})


def _build_optimizer(
    method: str,
    make: Callable[[LastLayerLipschitz], LipschitzOptimizer],
    ctx: BuildContext,
    ls_form: str,
    guard_options: dict[str, Any],
    elementwise: bool = True,
) -> MethodParts:
    source = _source(ctx, method, ls_form, elementwise)
    try:
        opt = make(source)
    except ValueError as err:
        source.monitor.remove()
        raise option_error(method, err) from None
    return _step_parts(ctx, opt, source, guard_options, method)


def _adaptive_builder(method: str, cls: type[LipschitzOptimizer]) -> Callable[..., MethodParts]:
    """The registry builder of a per-step Lipschitz optimizer: the guard's options go to the guard,
    ``ls_form`` to the constant's source, every other option (the registry has checked them against the
    method's defaults) to ``cls`` itself."""

    def build(ctx: BuildContext, ls_form: str, **options: Any) -> MethodParts:
        guard = {name: options.pop(name) for name in _GUARD}
        cooldown = options.pop("cooldown")
        # AdaMo needs only the constant; the adaptive denominators need the element-wise norms too,
        # unless max ||grad^2|| is estimated from the first-order bound alone.
        elementwise = cls is not AdaMo and options.get("grad_sq_estimate") != "first"

        def make(source: LastLayerLipschitz) -> LipschitzOptimizer:
            return cls(ctx.params(), source, steps_per_epoch=ctx.steps_per_epoch, **options)

        parts = _build_optimizer(method, make, ctx, ls_form, guard, elementwise=elementwise)
        return cooled(parts, ctx, cooldown, method=method)

    build.__name__ = build.__qualname__ = f"build_{method.replace('-', '_')}"
    return build


_PAPER = "Yedida & Saha, LipschitzLR (shared/papers/003_8119a118a538bf06.txt)"
_GUARD = defaults_of(LipschitzGuard, exclude=("monitor",))  # backoff, max_rollbacks, explode_factor
#: Auto-Adam's and Lipschitz-RMSprop's update through torch's fused Adam kernel (issue 19: one pass per tensor
#: instead of seven; 1.38-1.43x -> 1.09-1.14x SGD on fmnist-mlp, docs/performance.md). Not bit for bit the
#: reference (another rounding order, ~2e-7 on the weights after 6 steps); fused=False: the multi-tensor path,
#: bit for bit the reference loop and the runs stored before 2026-12-05.
_FUSED = {"fused": True}
_ADAPTIVE = {
    "weight_decay": 0.0,
    "update": "step",
    "initial_lr": None,
    "bias_correction": "none",
    "ls_form": "paper",
    **_GUARD,
    "cooldown": DEFAULT_FRACTION,  # see build_lipschitz's record
}


def _register_all() -> None:
    seed = frozenset({"seed-method"})
    # No decision split: the divergence test compares training losses only (see lipschitz.pilot.initial_loss).
    step_level: dict[str, Any] = {"lr_granularity": "step", "kind": "step-pilot", "paper": _PAPER, "handles_nonfinite": True}
    entries = [
        MethodInfo(
            "lipschitz",
            "lipschitz",
            "SGD with LR = 1/L, the loss's closed-form Lipschitz constant (per epoch for networks, fixed for classical models)",
            build_lipschitz,
            {
                "initial_lr": None,
                "momentum": 0.0,
                "weight_decay": 0.0,
                "mode": "auto",
                "constant": "paper",
                "ls_form": "paper",
                "weight_bound": "all",
                **_GUARD,
                # The conv-net guard (docs/robustness-study.md); the paper: all three None.
                "stall_factor": 0.98,
                "shrink_factor": 0.1,
                "max_growth": 1.25,
                # The last 20 % of the budget's steps shrink linearly to nothing (pilots/cooldown.py): the
                # family's LRs stay at 0.1-0.8 to the end, and on ResNet-20 at the CPU budget lipschitz and
                # adamo lost seeds in their last epoch (docs/robustness.md). The paper: cooldown=0.
                "cooldown": DEFAULT_FRACTION,
            },
            lr_granularity="epoch",
            kind="epoch-pilot",
            tags=seed,
            paper=_PAPER,
            handles_nonfinite=True,
            invalid_options=(
                ({"mode": "deep"}, r"mode"),
                ({"initial_lr": -1.0}, r"initial_lr"),
                ({"backoff": 1.5}, r"backoff"),
                ({"momentum": 1.0}, r"momentum"),
                ({"max_growth": 0.5}, r"max_growth"),
                ({"shrink_factor": 1.0}, r"shrink_factor"),
                ({"stall_factor": -1.0}, r"stall_factor"),
            ),
        ),
        MethodInfo(
            "adamo",
            "lipschitz",
            "AdaMo: momentum SGD with LR = 1/EMA of per-batch Lipschitz constants (Algorithm 1)",
            _adaptive_builder("adamo", AdaMo),
            # K starts at 1/initial_lr: no x94 LR jump after the first epoch (docs/methods/lipschitz.md);
            # section 7.3.1 read literally: k1_start="paper".
            {"lr": 1.0, "beta": 0.9, **_ADAPTIVE, "initial_lr": 0.1, "k1_start": "continuous"},
            tags=seed,
            **step_level,
            invalid_options=(
                ({"beta": 1.0}, r"beta"),
                ({"update": "batch"}, r"update"),
                ({"initial_lr": -0.1}, r"initial_lr"),
                ({"bias_correction": True}, r"bias_correction"),
                ({"update": "epoch", "initial_lr": None}, r"initial_lr"),
                ({"k1_start": "x"}, r"k1_start"),
            ),
        ),
        MethodInfo(
            "lipschitz-rmsprop",
            "lipschitz",
            "Adaptive RMSprop: LR = (sqrt(K2)+eps)/L from Lipschitz averages (section 6.2)",
            _adaptive_builder("lipschitz-rmsprop", LipschitzRMSprop),
            {
                "lr": 1.0,
                "rho": 0.9,
                "eps": 1e-8,
                "eps_inside_sqrt": True,
                "grad_sq_estimate": "remedy",
                "k2_init": 0.0,
                "max_lr": None,
                "max_lr_growth": None,
                "denominator": "kz",
                **_ADAPTIVE,
                **_FUSED,
            },
            **step_level,
            invalid_options=(
                ({"rho": 1.5}, r"rho"),
                ({"grad_sq_estimate": "third"}, r"grad_sq_estimate"),
                ({"denominator": "k1"}, r"denominator"),
            ),
        ),
        MethodInfo(
            "auto-adam",
            "lipschitz",
            "Auto-Adam: Adam with LR = (sqrt(K2)+eps)/K1 from Lipschitz averages (Algorithm 3)",
            _adaptive_builder("auto-adam", AutoAdam),
            {
                "lr": 1.0,
                "beta1": 0.9,
                "beta2": 0.999,
                "eps": 1e-8,
                "eps_inside_sqrt": True,
                "grad_sq_estimate": "remedy",
                # Section 9's initial values and the study's caps (docs/robustness-study.md); Algorithm 3
                # as printed: k1_init=0, k2_init=0, max_lr=None, max_lr_growth=None.
                "k1_init": 1.0,
                "k2_init": 1e-6,
                "max_lr": 0.01,
                "max_lr_growth": 0.01,
                **_ADAPTIVE,
                **_FUSED,
            },
            tags=seed,
            **step_level,
            invalid_options=(
                ({"beta2": 1.0}, r"beta2"),
                ({"k1_init": -1.0}, r"k1_init"),
                ({"eps": -1.0}, r"eps"),
                ({"max_lr": 0.0}, r"max_lr"),
                ({"max_lr_growth": -0.5}, r"max_lr_growth"),
            ),
        ),
    ]
    for info in entries:
        register(info)


_register_all()
