"""The MI-decay family's registry records (mi-decay, mi-decay-layerwise) and their builder, which runs the range test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lrpilot.core import distributed as dist
from lrpilot.core.checks import require_in, require_positive
from lrpilot.core.contract import MethodParts
from lrpilot.core.registry import RANGE_TEST_TAG, BuildContext, MethodInfo, register
from lrpilot.pilots.mi_decay.pilot import (
    BACKENDS,
    CEILINGS,
    ITY_OUTPUTS,
    STARTS,
    TIME_DECAYS,
    MIDecayPilot,
    MIProbeData,
    estimate_ceiling,
    layer_groups,
    sample_probe,
)
from lrpilot.pilots.mi_decay.range_test import (
    ATTRIBUTES,
    DEFAULT_RRT_LRS,
    INITIALS,
    ON_CRASH,
    RangeTestResult,
    check_lrs,
    run_range_test,
)

# ====================================================================================================
# registry
# ====================================================================================================
_DEFAULTS: dict[str, Any] = {
    # Algorithm 1 (None: from the range test)
    "lr_min": None,
    "lr_max": None,
    "lr_top": None,
    "epsilon": None,
    "start": "top",
    "time_decay": "epsilon",
    # MI
    "ceiling": "auto",
    "ixy": None,
    "mi_samples": 1000,
    "mi_seed": None,
    "k": 3,
    "mi_backend": "auto",
    "ity_output": "logits",
    # SGD (the paper: momentum 0.9)
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    # Algorithm 2
    "rrt_lrs": DEFAULT_RRT_LRS,
    "rrt_trials": 2,
    "rrt_epochs": 3,
    "c1": 10.0,
    "c2": 0.01,
    "rrt_attribute": "auto",
    "rrt_initial": "first-epoch",
    "rrt_on_crash": "restart",
    "stop_on_crash": False,
    "crash_drop": 0.5,
    "reinit_seed": None,
}


def _check_options(name: str, o: Mapping[str, Any]) -> None:
    for key in ("lr_min", "lr_max", "lr_top"):
        if o[key] is not None:
            require_positive(key, o[key], method=name)
    if o["epsilon"] is not None:
        require_positive("epsilon", o["epsilon"], method=name, allow_zero=True)
    if o["lr_min"] is not None and o["lr_max"] is not None and o["lr_min"] > o["lr_max"]:
        raise ValueError(f"option lr_min of method {name!r} must be <= lr_max, got {o['lr_min']} > {o['lr_max']}")
    require_in("start", o["start"], STARTS, method=name)
    require_in("time_decay", o["time_decay"], TIME_DECAYS, method=name)
    require_in("ceiling", o["ceiling"], CEILINGS, method=name)
    require_in("ity_output", o["ity_output"], ITY_OUTPUTS, method=name)
    require_in("mi_backend", o["mi_backend"], BACKENDS, method=name)
    require_in("rrt_attribute", o["rrt_attribute"], ATTRIBUTES, method=name)
    require_in("rrt_initial", o["rrt_initial"], INITIALS, method=name)
    require_in("rrt_on_crash", o["rrt_on_crash"], ON_CRASH, method=name)
    if o["ixy"] is not None:
        require_positive("ixy", o["ixy"], method=name)
    for key in ("mi_samples", "k", "rrt_trials", "rrt_epochs"):
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"option {key} of method {name!r} must be a positive integer, got {v!r}")
    if o["rrt_epochs"] < 2:
        raise ValueError(f"option rrt_epochs of method {name!r} must be >= 2 (d_s needs two trained epochs)")
    for key in ("mi_seed", "reinit_seed"):
        if o[key] is not None and (isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 0):
            raise ValueError(f"option {key} of method {name!r} must be an integer >= 0 or None, got {o[key]!r}")
    require_positive("c1", o["c1"], method=name)
    require_positive("c2", o["c2"], method=name)
    require_positive("momentum", o["momentum"], method=name, allow_zero=True)
    require_positive("weight_decay", o["weight_decay"], method=name, allow_zero=True)
    if not 0 < o["crash_drop"] < 1:
        raise ValueError(f"option crash_drop of method {name!r} must be in (0, 1), got {o['crash_drop']!r}")
    check_lrs(o["rrt_lrs"])


def _task_kind(ctx: BuildContext, probe: MIProbeData) -> str:
    if ctx.task_kind in ("classification", "binary", "regression"):
        return ctx.task_kind
    integral = not torch.is_floating_point(probe.targets) or bool((probe.targets == probe.targets.round()).all())
    return "classification" if integral and probe.targets.ndim == 1 else "regression"


def _reinitialise(model: nn.Module, seed: int) -> None:
    """New initial weights: ``reset_parameters()`` of every module that has one, from ``seed``.

    Torch's default initialisation: a model with a custom one (e.g. ResNet-20's Kaiming normal) gets
    the default instead, and parameters of modules without ``reset_parameters`` keep their values.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def _build(ctx: BuildContext, *, layerwise: bool, **o: Any) -> MethodParts:
    name = "mi-decay-layerwise" if layerwise else "mi-decay"
    _check_options(name, o)
    if o["reinit_seed"] is not None:
        _reinitialise(ctx.model, o["reinit_seed"])
    mi_seed = ctx.seed if o["mi_seed"] is None else o["mi_seed"]
    backend = o["mi_backend"]
    if backend == "auto":
        backend = "torch" if torch.device(ctx.device).type == "cuda" else "numpy"
    # Every rank must probe the same subset: rank 0's (a sharded loader's reservoir would differ).
    probe = dist.broadcast_object(sample_probe(ctx.train_loader, o["mi_samples"], mi_seed))
    kind = _task_kind(ctx, probe)
    if kind == "regression" and o["rrt_attribute"] in ("accuracy", "accuracy+ity"):
        raise ValueError(
            f"option rrt_attribute of method {name!r} cannot be 'accuracy' on a regression task; use 'ity'")
    if kind == "regression" and o["ceiling"] in ("entropy", "ross"):
        raise ValueError(
            f"option ceiling of method {name!r} cannot be {o['ceiling']!r} on a regression task; use 'ksg'")

    if layerwise:
        if ctx.param_groups is not None:
            raise ValueError(f"method {name!r} makes one param group per layer itself; do not pass param_groups")
        layers = layer_groups(ctx.model)
        groups = [{"params": params, "layer": layer} for layer, params in layers]
        modules = [layer for layer, _ in layers]
    else:
        groups = ctx.params()
        modules = None
    sgd = {"momentum": o["momentum"], "nesterov": o["nesterov"], "weight_decay": o["weight_decay"]}
    info: dict[str, Any] = {}
    mi_kw = {"k": o["k"], "mi_seed": mi_seed, "mi_backend": backend, "device": ctx.device}

    needed = ["lr_min", "lr_max", "epsilon"] + (["lr_top"] if o["start"] == "top" else [])
    given = {key: o[key] for key in ("lr_min", "lr_max", "lr_top", "epsilon") if o[key] is not None}
    ixy = o["ixy"]
    if all(key in given for key in needed):
        bounds = {"lr_top": given.get("lr_top", given["lr_max"]), **given}
        info["bounds"] = {**bounds, "source": "given"}
    else:
        # Algorithm 2 first. IXY is its first step; every trial reuses it and the subset.
        mi = {"ixy": ixy, "ceiling": "given"}
        if ixy is None:
            mi = estimate_ceiling(probe, kind=kind, ceiling=o["ceiling"], k=o["k"], mi_seed=mi_seed,
                                  mi_backend=backend, device=ctx.device)
        ixy = mi["ixy"]
        info["mi"] = mi
        result = _range_test(ctx, o, ixy=ixy, mi_seed=mi_seed, kind=kind, sgd=sgd)
        bounds = {**result.bounds(), **given}
        info["bounds"] = {**bounds, "source": "range-test" if not given else "range-test+given"}
        info["range_test"] = result.to_dict(with_runs=False)
        info["search"] = _search_cost(result.runs, mi.get("ixy_s", 0.0))
    if bounds["lr_min"] > bounds["lr_max"]:
        raise ValueError(
            f"method {name!r}: lr_min {bounds['lr_min']} > lr_max {bounds['lr_max']} after the range test")

    optimizer = torch.optim.SGD(groups, lr=bounds["lr_top"], **sgd)
    if modules is None:
        modules = [""] * len(optimizer.param_groups)
    pilot = MIDecayPilot(
        optimizer, probe, modules=modules, epochs=ctx.epochs, task_kind=kind, ixy=ixy, ceiling=o["ceiling"],
        start=o["start"], time_decay=o["time_decay"], loss_fn=ctx.loss_fn, stop_on_crash=o["stop_on_crash"],
        crash_drop=o["crash_drop"], info=info, ity_output=o["ity_output"], **mi_kw, **bounds,
    )
    return MethodParts(optimizer, pilot, info=info)


def _range_test(ctx: BuildContext, o: Mapping[str, Any], *, ixy: float, mi_seed: int, kind: str,
                sgd: Mapping[str, Any]) -> RangeTestResult:
    """Algorithm 2 through ``ctx.trial``: each trial is network-level ``mi-decay`` pinned at one LR."""
    attribute = o["rrt_attribute"]
    if attribute == "auto":
        attribute = "accuracy" if kind in ("classification", "binary") else "ity"

    def trial(lr: float, t: int) -> dict[str, Any]:
        # LR_min = LR_max = LR_top = lr pins Algorithm 1 at lr: the trial is Algorithm 1's bookkeeping
        # (ITY, d_p, d_s every epoch) at a constant LR, as Algorithm 2 prescribes. Trial 0 starts from the
        # run's own initial weights; every later trial from new ones ("Initialize and save initial model").
        seed = ctx.seed + t
        trainer = ctx.trial(
            "mi-decay", epochs=o["rrt_epochs"], seed=seed, lr_min=lr, lr_max=lr, lr_top=lr, epsilon=0.0,
            ixy=ixy, mi_samples=o["mi_samples"], mi_seed=mi_seed, k=o["k"], mi_backend=o["mi_backend"],
            stop_on_crash=True, crash_drop=o["crash_drop"], reinit_seed=None if t == 0 else seed,
            ity_output=o["ity_output"], **sgd,
        )
        hist = trainer.history
        crashed = hist.status == "diverged" or (hist.status == "stopped" and hist.status_reason == "rrt-crash")
        records = []
        for rec in trainer.pilot.records:
            ity = rec.get("ity")
            records.append({
                "epoch": rec["epoch"], "d_p": rec.get("d_p"), "d_s": rec.get("d_s"),
                "ity": ity[0] if ity else None, "accuracy": rec.get("accuracy"), "loss": rec.get("loss"),
                "train_loss": rec.get("train_loss"),
            })
        return {
            "lr": lr, "trial": t, "seed": seed, "status": "crashed" if crashed else "completed",
            "reason": hist.status_reason if crashed else "", "epochs": len(hist.epochs), "steps": hist.steps,
            "train_s": hist.epochs[-1].train_s if hist.epochs else 0.0, "records": records,
        }

    return run_range_test(trial, o["rrt_lrs"], trials=o["rrt_trials"], on_crash=o["rrt_on_crash"],
                          c1=o["c1"], c2=o["c2"], attribute=attribute, initial=o["rrt_initial"])


def _search_cost(runs: Sequence[Mapping[str, Any]], ixy_s: float) -> dict[str, Any]:
    """The range test's cost in the bench's common ``search`` shape (IXY's estimate counted as training)."""
    return {
        "runs": [dict(r) for r in runs],
        "total_epochs": sum(r["epochs"] for r in runs),
        "total_steps": sum(r["steps"] for r in runs),
        "total_train_s": sum(r["train_s"] for r in runs) + ixy_s,
    }


def _runs_range_test(o: Mapping[str, Any]) -> bool:
    """The range test runs (its trials are compared by a validation metric) unless the bounds are given."""
    needed = ["lr_min", "lr_max", "epsilon"] + (["lr_top"] if o["start"] == "top" else [])
    return any(o[key] is None for key in needed)


def _register_all() -> None:
    paper = "Vasudevan, Entropy 22(5) 560 (2020)"
    test_options = {"lr_min": 0.01, "lr_max": 0.5, "lr_top": 0.2, "epsilon": 0.05, "mi_samples": 96}
    invalid = (
        ({"c1": 0}, r"c1"),
        ({"start": "low"}, r"start"),
        ({"lr_min": 0.5, "lr_max": 0.1}, r"lr_min"),
        ({"rrt_lrs": (0.1, 0.01)}, r"rrt_lrs"),
        ({"ceiling": "h"}, r"ceiling"),
    )
    common = {"defaults": _DEFAULTS, "lr_granularity": "epoch", "kind": "epoch-pilot", "paper": paper,
              "decision_split": _runs_range_test,
              "test_options": test_options, "invalid_options": invalid}
    register(MethodInfo(
        "mi-decay", "mi-decay",
        "SGD whose LR decays with the MI between network output and labels, after an LR range test (Vasudevan 2020)",
        lambda ctx, **o: _build(ctx, layerwise=False, **o), tags=frozenset({"seed-method", RANGE_TEST_TAG}), **common))
    register(MethodInfo(
        "mi-decay-layerwise", "mi-decay",
        "MI-driven LR decay with one LR per layer from each layer's MI with the labels (Vasudevan 2020)",
        lambda ctx, **o: _build(ctx, layerwise=True, **o), tags=frozenset({"seed-method", RANGE_TEST_TAG}), **common))


_register_all()
