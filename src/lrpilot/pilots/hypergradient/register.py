"""The hypergradient family's registry records (hd-train, hd-val, rt-hpo) and their builders."""

from __future__ import annotations

from typing import Any

from lrpilot.core.checks import require_bool, require_in
from lrpilot.core.contract import MethodParts
from lrpilot.core.registry import BuildContext, MethodInfo, register
from lrpilot.pilots.cooldown import DEFAULT_FRACTION, cooled
from lrpilot.pilots.hypergradient.optimizers import OBJECTIVES, RTHPO, SGDHD, HypergradientSGD, SGDHDVal
from lrpilot.pilots.safety_net import with_safety_net

# ----------------------------------------------------------------------------------------------------
#: The RT-HPO paper states no values for the initial LR or beta (Table 1 aggregates over grids it does
#: not list). The defaults are ours, from the robustness study (docs/robustness-study.md, issue 15): the
#: paper's additive rule with Baydin et al.'s SGD-HD setting (alpha_0 = beta = 1e-3, vanilla SGD)
#: diverged or stalled on mnist1d-cnn in every seed. The default form is the normalised multiplicative
#: step (LR * exp(beta * cosine), at most x e^0.02 per step, never 0), a tangent decayed by 0.99 per step
#: (~100-step horizon; for the one-step methods an accumulated direction), momentum 0.9 carried in the
#: tangent and SGD's usual LR 0.1. rt-hpo also clips ||z|| (tangent_clip); the one-step horizon has no
#: curvature term that could blow z up, so it has nothing to clip. The paper-literal form:
#: ``PAPER_METHOD_OPTIONS`` (``-o lr_rule=additive -o beta=0.001 -o lr=0.001 -o momentum=0 -o tangent_decay=1
#: -o rollback=false``).
_HD_DEFAULTS: dict[str, Any] = {
    "lr": 0.1,
    "beta": 0.02,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "min_lr": 0.0,
    "max_lr": None,
    "lr_update": "before-step",
    "lr_rule": "multiplicative",
    "tangent_decay": 0.99,
    # The safety net, from the training loss only (initial_from="train": hd-train decides from no held-out
    # data, and the others' decision split is theirs). rt-hpo on digits-mlp, seed 0, raised its LR from 0.1
    # to 0.115, past the edge where plain SGD collapses there too (0.94 -> 0.46 at 0.115, chance at 0.13),
    # and ended at chance; with the net it rolls back once and ends at 0.975 (docs/methods/rt-hpo.md).
    # A run that never diverges is bit for bit the run without it.
    "rollback": True,
    # The last 20 % of the budget's steps shrink linearly to nothing (pilots/cooldown.py): at a short budget
    # on ResNet-20 an LR still near 0.1 at the end left hd-train's seed 2 at 0.30 after 0.70 the epoch before
    # (docs/robustness.md). The LR the method learns is untouched; only its last steps are scaled.
    "cooldown": DEFAULT_FRACTION,
}
#: The safety net's "no progress" line: an epoch whose mean training loss is not 2 % below the untrained
#: model's (training-set) loss is rolled back with the LR halved, like a diverged one (the Lipschitz guard's
#: stall_factor). rt-hpo on the full LeNet-5 task, seed 2 (standard suite), raised its LR early in epoch 1
#: and the network sat at chance from then on: mean training loss 2.2992 against 2.3031 untrained, under the
#: net's default 1.05x "undid all progress" line, so nothing rolled it back (best 0.1000). Among the stored
#: runs of the family only that one and rt-hpo's digits-mlp seed 0 (which the 1.05x line already rolled back
#: in the same epoch) have an epoch above 0.98x: every other run is bit for bit what it was.
STALL_FACTOR = 0.98
#: hd-train and hd-val: the default one-step form keeps its state on one flat buffer (flat.py, issue 19: the
#: step in a handful of kernels); flat=False: the per-tensor path, bit for bit the reference loop's
#: (tests/test_foreach.py). rt-hpo's full horizon has none (per-group tangent stacks; its cost is autograd's).
_ONE_STEP_DEFAULTS: dict[str, Any] = {**_HD_DEFAULTS, "flat": None}
_RT_HPO_DEFAULTS: dict[str, Any] = {**_HD_DEFAULTS, "tangent_clip": True, "objective": "val"}
#: The paper's (and Baydin et al.'s SGD-HD) form of all three methods, selectable with ``-o``. With
#: ``tangent_decay=1`` rt-hpo's clip bound is infinite, so ``tangent_clip`` needs no entry (hd-train and
#: hd-val, whose one-step horizon has nothing to clip, do not take it).
PAPER_OPTIONS: dict[str, Any] = {"lr_rule": "additive", "beta": 1e-3, "lr": 1e-3, "momentum": 0.0, "tangent_decay": 1.0}
#: The paper's form as registry options: the optimizer's, and no safety net.
PAPER_METHOD_OPTIONS: dict[str, Any] = {**PAPER_OPTIONS, "rollback": False, "cooldown": 0.0}
_PAPER = "Majumder, Donini & Chaudhari (shared/papers/002); Baydin et al. 2018"


def _parts(ctx: BuildContext, opt: HypergradientSGD, rollback: bool, cooldown: float, method: str) -> MethodParts:
    require_bool("rollback", rollback, method=method)
    signals = frozenset({"val_closure"}) if opt.needs_val_closure else frozenset()
    parts = MethodParts(opt, step_kwargs=signals, needs_closure=opt.needs_closure)
    if rollback:
        parts = with_safety_net(parts, initial_from="train", initial_factor=STALL_FACTOR)
    return cooled(parts, ctx, cooldown, method=method)


def build_hd_train(ctx: BuildContext, rollback: bool, cooldown: float, **options: Any) -> MethodParts:
    return _parts(ctx, SGDHD(ctx.params(), **options), rollback, cooldown, "hd-train")


def build_hd_val(ctx: BuildContext, rollback: bool, cooldown: float, **options: Any) -> MethodParts:
    return _parts(ctx, SGDHDVal(ctx.params(), **options), rollback, cooldown, "hd-val")


def build_rt_hpo(ctx: BuildContext, objective: str, rollback: bool, cooldown: float, **options: Any) -> MethodParts:
    require_in("objective", objective, OBJECTIVES, method="rt-hpo")
    return _parts(ctx, RTHPO(ctx.params(), objective=objective, **options), rollback, cooldown, "rt-hpo")


def _register_all() -> None:
    tags = frozenset({"seed-method"})
    test = {"lr": 0.05, "beta": 0.02}
    bad = (({"beta": -1.0}, r"beta"), ({"momentum": 1.5}, r"momentum"), ({"lr_update": "x"}, r"lr_update"),
           ({"lr_rule": "x"}, r"lr_rule"), ({"tangent_decay": 0.0}, r"tangent_decay"), ({"rollback": 1}, r"rollback"),
           ({"cooldown": 1.5}, r"cooldown"))
    common: dict[str, Any] = {
        "lr_granularity": "step", "kind": "step-pilot", "tags": tags, "paper": _PAPER, "test_options": test
    }
    for info in (
        MethodInfo("hd-train", "hypergradient",
                   "First-order (Train): SGD-HD, LR *= exp(beta cos(g, decayed past directions)) every step "
                   "(-o lr_rule=additive: Baydin et al. 2018's LR += beta <g_prev, g>)",
                   build_hd_train, _ONE_STEP_DEFAULTS, invalid_options=bad, **common),
        MethodInfo("hd-val", "hypergradient",
                   "First-order (Val): LR *= exp(beta cos(validation gradient, decayed past directions)) "
                   "every step (-o lr_rule=additive: LR += beta <g_prev, validation gradient>)",
                   build_hd_val, _ONE_STEP_DEFAULTS, invalid_options=bad, decision_split=True, **common),
        MethodInfo("rt-hpo", "hypergradient",
                   "RT-HPO: LR follows the validation hypergradient, forward-mode tangent with HVPs (eq. 5); "
                   "multiplicative step, decayed and clipped tangent (-o lr_rule=additive ...: the paper)",
                   build_rt_hpo, _RT_HPO_DEFAULTS,
                   invalid_options=(*bad, ({"objective": "test"}, r"objective")),
                   decision_split=lambda o: o["objective"] == "val", **common),
    ):
        register(info)


_register_all()
