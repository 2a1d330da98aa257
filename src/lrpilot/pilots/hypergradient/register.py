"""The hypergradient family's registry records (hd-train, hd-val, rt-hpo) and their builders."""

from __future__ import annotations

from typing import Any

from lrpilot.core.checks import require_in
from lrpilot.core.contract import MethodParts
from lrpilot.core.registry import BuildContext, MethodInfo, register
from lrpilot.pilots.hypergradient.optimizers import OBJECTIVES, RTHPO, SGDHD, HypergradientSGD, SGDHDVal

# ----------------------------------------------------------------------------------------------------
#: The RT-HPO paper states no values for the initial LR or beta (Table 1 aggregates over grids it does
#: not list). Its First-order (Train) baseline is Baydin et al. 2018, whose SGD-HD setting is
#: alpha_0 = 1e-3 and beta = 1e-3 (section 5 and the authors' run.sh); we use it for all three methods.
_HD_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "beta": 1e-3,
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "min_lr": 0.0,
    "max_lr": None,
    "lr_update": "before-step",
}
_PAPER = "Majumder, Donini & Chaudhari (shared/papers/002); Baydin et al. 2018"


def _parts(opt: HypergradientSGD) -> MethodParts:
    signals = frozenset({"val_closure"}) if opt.needs_val_closure else frozenset()
    return MethodParts(opt, step_kwargs=signals, needs_closure=opt.needs_closure)


def build_hd_train(ctx: BuildContext, **options: Any) -> MethodParts:
    return _parts(SGDHD(ctx.params(), **options))


def build_hd_val(ctx: BuildContext, **options: Any) -> MethodParts:
    return _parts(SGDHDVal(ctx.params(), **options))


def build_rt_hpo(ctx: BuildContext, objective: str, **options: Any) -> MethodParts:
    require_in("objective", objective, OBJECTIVES, method="rt-hpo")
    return _parts(RTHPO(ctx.params(), objective=objective, **options))


def _register_all() -> None:
    tags = frozenset({"seed-method"})
    test = {"lr": 0.05, "beta": 1e-3}
    bad = (({"beta": -1.0}, r"beta"), ({"momentum": 1.5}, r"momentum"), ({"lr_update": "x"}, r"lr_update"))
    common: dict[str, Any] = {
        "lr_granularity": "step", "kind": "step-pilot", "tags": tags, "paper": _PAPER, "test_options": test
    }
    for info in (
        MethodInfo("hd-train", "hypergradient",
                   "First-order (Train): SGD-HD, LR += beta <g_prev, g> every step (Baydin et al. 2018)",
                   build_hd_train, _HD_DEFAULTS, invalid_options=bad, **common),
        MethodInfo("hd-val", "hypergradient",
                   "First-order (Val): LR += beta <g_prev, validation gradient> every step",
                   build_hd_val, _HD_DEFAULTS, invalid_options=bad, decision_split=True, **common),
        MethodInfo("rt-hpo", "hypergradient",
                   "RT-HPO: LR follows the validation hypergradient, forward-mode tangent with HVPs (eq. 5)",
                   build_rt_hpo, {**_HD_DEFAULTS, "objective": "val"},
                   invalid_options=(*bad, ({"objective": "test"}, r"objective")),
                   decision_split=lambda o: o["objective"] == "val", **common),
    ):
        register(info)


_register_all()
