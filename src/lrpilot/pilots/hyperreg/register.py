"""The hyper-regularization family's registry records (4 divergences x 3 algorithms) and their builders."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lrpilot.core.contract import MethodParts
from lrpilot.core.registry import BuildContext, MethodInfo, register
from lrpilot.estimators.phi_divergence import DIVERGENCES
from lrpilot.pilots.cooldown import DEFAULT_FRACTION, cooled
from lrpilot.pilots.hyperreg.optimizer import HyperRegularization

_PAPER = "shared/papers/004_103abf1d96e1d0d8.txt (reproducibility report of Xie et al., ICLR 2019 submission)"
_COMMON = {"lr": 0.1, "growth_clip": 2.0, "warmup_steps": 0, "warmup_lr": None, "weight_decay": 0.0,
           "wd_in_beta": True, "scope": "coordinate",
           # The last 20 % of the budget's steps shrink linearly to nothing (pilots/cooldown.py): 1/beta barely
           # moves from 0.1, and on ResNet-20 at the CPU budget the seed variants lost seeds in their last
           # epoch (docs/robustness.md). The report's method: cooldown=0.
           "cooldown": DEFAULT_FRACTION}  # fmt: skip
_NAMES = {"kl": "KL", "rkl": "reverse KL", "hellinger": "Hellinger", "chi2": "chi-square"}
_ALGORITHMS = {1: "exact", 2: "approximate", 3: "approximate, lagged step"}
_SEED = {("kl", 1), ("rkl", 2), ("chi2", 2)}


def _factory(name: str, divergence: str, algorithm: int) -> Callable[..., MethodParts]:
    def build(ctx: BuildContext, cooldown: float, **options: Any) -> MethodParts:
        opt = HyperRegularization(ctx.params(), divergence=divergence, algorithm=algorithm, **options)
        parts = MethodParts(opt, effective_lr=opt.mean_lr, info={"lr_telemetry": "mean of 1/beta per group"})
        return cooled(parts, ctx, cooldown, method=name)

    return build


def _register_all() -> None:
    bad = (({"growth_clip": 0.5}, r"growth_clip"), ({"warmup_steps": -1}, r"warmup_steps"))
    for div, name in _NAMES.items():
        for alg, how in _ALGORITHMS.items():
            defaults = dict(_COMMON)
            invalid = bad
            if alg != 1 and DIVERGENCES[div].pole < math.inf:
                defaults["pole"] = "infinite"
                invalid = bad + (({"pole": "ignore"}, r"pole"),)
            register(MethodInfo(
                f"hyperreg-{div}-{alg}", "hyperreg",
                f"Hyper-regularization, {name} divergence, algorithm {alg} ({how}): per-coordinate LR 1/beta",
                _factory(f"hyperreg-{div}-{alg}", div, alg), defaults, lr_granularity="step", kind="step-pilot",
                tags=frozenset({"seed-method"} if (div, alg) in _SEED else set()), paper=_PAPER,
                invalid_options=invalid,
            ))  # fmt: skip
    no_clip = {**_COMMON, "growth_clip": None, "cooldown": 0.0}  # the classic methods, as published
    register(MethodInfo(
        "adagrad-diag", "hyperreg",
        "Diagonal AdaGrad as hyper-regularization (Neyman chi-square, exact): beta^2 += g^2, beta_0 = 1/lr",
        _factory("adagrad-diag", "neyman-chi2", 1), no_clip, lr_granularity="step", kind="step-pilot",
        tags=frozenset({"baseline", "special-case"}), paper=_PAPER, invalid_options=bad,
    ))  # fmt: skip
    register(MethodInfo(
        "wngrad", "hyperreg",
        "WNGrad (Wu, Ward & Bottou 2018) as hyper-regularization: b += ||g||^2 / b per group, b_0 = 1/lr",
        _factory("wngrad", "half-chi2", 2), {**no_clip, "scope": "global"}, lr_granularity="step", kind="step-pilot",
        tags=frozenset({"baseline", "special-case"}), paper="Wu, Ward & Bottou 2018, arXiv:1803.02865",
        invalid_options=bad + (({"scope": "layer"}, r"scope"),),
    ))  # fmt: skip


_register_all()
