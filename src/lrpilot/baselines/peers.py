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

What each needs from the loop is done here, once, through :class:`~lrpilot.pilots.base.MethodParts`:

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
raises :class:`~lrpilot.registry.MissingExtraError` naming ``pip install 'lrpilot[peers]'``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from lrpilot.baselines.schedules import SchedulePilot
from lrpilot.loop.data import split_batch
from lrpilot.pilots.base import MethodParts, Pilot, StepSignals
from lrpilot.registry import BuildContext, MethodInfo, register, require_in, require_positive

__all__ = [
    "ScheduleFreeModes",
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


class WeightAverage:
    """DoG's iterate averaging: the package's ``PolynomialDecayAverager``, evaluated in place of the model.

    After every optimizer step :meth:`update` folds the weights into the average (Shamir & Zhang 2013,
    ``xbar_t = (1 - (1+gamma)/(t+gamma)) xbar_{t-1} + (1+gamma)/(t+gamma) x_t``; every floating-point
    entry of the ``state_dict``, so BatchNorm statistics are averaged too). ``eval_context`` loads the
    average into the model and keeps the raw iterate aside; :meth:`train` puts the iterate back. Both
    are no-ops in the mode they switch to; the raw iterate kept aside is part of :meth:`state_dict`.
    """

    def __init__(self, model: nn.Module, gamma: float) -> None:
        from dog import PolynomialDecayAverager

        self.model = model
        self.averager = PolynomialDecayAverager(model, gamma=gamma)
        self._raw: dict[str, torch.Tensor] | None = None  # the training iterate while the average is in

    def update(self) -> None:
        if self._raw is not None:
            raise RuntimeError("the averaged weights are loaded: call train() before training steps")
        self.averager.step()

    @property
    def averaged_state(self) -> dict[str, torch.Tensor]:
        return self.averager.averaged_model.state_dict()

    @contextlib.contextmanager
    def eval_context(self) -> Iterator[None]:
        if self._raw is None:
            self._raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.averaged_state)
        yield

    def train(self) -> None:
        if self._raw is not None:
            self.model.load_state_dict(self._raw)
            self._raw = None

    def state_dict(self) -> dict[str, Any]:
        return {"averager": self.averager.state_dict(), "raw": self._raw}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.averager.load_state_dict(state["averager"])
        raw = state["raw"]
        self._raw = None if raw is None else {k: v.detach().clone() for k, v in raw.items()}


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


def _register_all() -> None:
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


_register_all()
