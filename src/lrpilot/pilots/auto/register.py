"""``auto``'s registry record and builder: the sweep on a copy of the network, then the optimizer, its
schedule and the safety net (docs/methods/auto.md says what each part contributes)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lrpilot.core import distributed as dist
from lrpilot.core.checks import require_bool, require_in, require_positive, require_range
from lrpilot.core.contract import MethodParts
from lrpilot.core.data import carve, split_batch
from lrpilot.core.progress import Progress
from lrpilot.core.registry import (
    BuildContext,
    MethodInfo,
    MissingExtraError,
    get_method,
    register,
    resolve_options,
)
from lrpilot.core.seeding import rng_preserved
from lrpilot.pilots.auto.average import PolynomialAverage
from lrpilot.pilots.auto.race import race_pick
from lrpilot.pilots.auto.schedule import WarmupCosine
from lrpilot.pilots.auto.sweep import SweepResult, run_sweep
from lrpilot.pilots.cooldown import DEFAULT_FRACTION, cooldown_multiplier, cooled
from lrpilot.pilots.safety_net import with_safety_net

#: "wsd": warm-up (optional), a stable LR, then the seed methods' linear cooldown over the last ``cooldown``
#: of the budget (pilots/cooldown.py; round 5 of docs/methods/auto.md).
SCHEDULES = ("cosine", "constant", "wsd", "schedule-free")

#: The step the run takes (round 6 of docs/methods/auto.md): momentum SGD, or AdamW (Loshchilov & Hutter,
#: ICLR 2019) with beta_1 = ``momentum`` and beta_2 = 0.999. Each has its own sweep range and weight decay
#: where the option is left at None: Adam's LRs are two decades below SGD's, and AdamW's decay is decoupled
#: (``w <- w - lr * wd * w``), so 0.05 at Adam's LR shrinks the weights per step as SGD's coupled 5e-4 does
#: at SGD's (1e-3 x 0.05 = 0.1 x 5e-4).
#: Round 8 adds Schedule-Free AdamW (Defazio et al., NeurIPS 2024), the ``schedulefree-adamw`` peer at its
#: own defaults (LR 0.0025, 2 % warm-up, no decay): it needs no sweep and no schedule (its averaging is
#: the schedule), so its sweep range is never used.
SCHEDULE_FREE_ADAMW = "schedulefree-adamw"
OPTIMIZERS: dict[str, dict[str, float]] = {
    "sgd": {"sweep_min_lr": 1e-4, "sweep_max_lr": 10.0, "weight_decay": 5e-4},
    "adamw": {"sweep_min_lr": 1e-6, "sweep_max_lr": 1.0, "weight_decay": 0.05},
    SCHEDULE_FREE_ADAMW: {"sweep_min_lr": 1e-6, "sweep_max_lr": 1.0, "weight_decay": 0.0},
}
ADAM_BETA2 = 0.999
STEP_NAMES = {"sgd": "SGD", "adamw": "AdamW", SCHEDULE_FREE_ADAMW: "Schedule-Free AdamW"}  # for the log

_log = logging.getLogger("lrpilot")

#: Every option and its default; the ablation in docs/methods/auto.md switches them one at a time.
DEFAULTS: dict[str, Any] = {
    "lr": None,  # None: the sweep chooses it; a number skips the sweep
    "optimizer": "race",  # the step that wins a race (round 7 of docs/methods/auto.md); "sgd" (rounds 1-6), "adamw"
    "sweep_steps": 200,
    "sweep_min_lr": None,  # None: the optimizer's (OPTIMIZERS): 1e-4 for SGD, 1e-6 for AdamW
    "sweep_max_lr": None,  # None: 10 for SGD, 1 for AdamW
    "divisor": 2.0,
    "window": 10,
    "smoothing": "centred",
    "pick": "edge",  # the valley's upper edge; "minimum": round 1's rule (docs/methods/auto.md, round 2)
    "edge_fraction": 0.2,
    "edge_rise": 0.5,  # None: round 2's valley, bounded by the start's loss only (round 3)
    "edge_cap": 2.0,  # the edge's LR at most this times the minimum's; None: uncapped (round 4)
    "schedule": "wsd",  # round 5 of docs/methods/auto.md; "cosine": rounds 1-4
    "cooldown": DEFAULT_FRACTION,  # schedule="wsd" only: the share of the budget that decays linearly to ~0
    "warmup_fraction": 0.0,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": None,  # None: 5e-4 for SGD (round 2 of docs/methods/auto.md), 0.05 decoupled for AdamW;
                           # the run's only (the sweep ramps without it)
    "rollback": True,  # the safety net (its L_0 from the training loss only)
    "stall_factor": 1.0,  # the safety net's initial_factor: an epoch above the untrained loss rolls back
    "average": False,  # evaluate a polynomial-decay average of the weights (schedule="cosine" only)
    "average_gamma": 8.0,
    "race_fraction": 0.1,  # optimizer="race": the share of the training data the race is decided on
    "race_budget": 0.15,  # ... the share of the run's budget each candidate trains for
    "race_z": 2.0,  # ... AdamW replaces SGD when McNemar's z on the held-out share exceeds this
    "race_adamw_divisor": 4.0,  # ... AdamW's LR: the Adam sweep's pick over this (round 6's best variant)
    "race_candidates": ("sgd", "adamw", SCHEDULE_FREE_ADAMW),  # ... the steps raced, the first the incumbent
                                                               # (round 8; round 7 raced "sgd+adamw")
    "sf_lr_factor": 10.0,  # schedule-free: its LR is this times the sweep's (y = 0.9 x + 0.1 z steps 1/(1 - 0.9) less)
}


def build_auto(ctx: BuildContext, **o: Any) -> MethodParts:
    require_in("optimizer", o["optimizer"], (*OPTIMIZERS, "race"), method="auto")
    if o["optimizer"] == "race":
        require_range("race_fraction", o["race_fraction"], 0.0, 1.0, open_low=True, open_high=True, method="auto")
        require_range("race_budget", o["race_budget"], 0.0, 1.0, open_low=True, method="auto")
        require_range("race_adamw_divisor", o["race_adamw_divisor"], 1.0, math.inf, open_high=True, method="auto")
        require_positive("race_z", o["race_z"], method="auto", allow_zero=True)
        o = {**o, "race_candidates": _race_candidates(o["race_candidates"])}
        if o["lr"] is not None or o["nesterov"] or o["schedule"] == "schedule-free":
            # An LR given is SGD's (rounds 1-6: `lrpilot train --lr`), and the other two are SGD's options:
            # nothing is left to race.
            o = {**o, "optimizer": "sgd"}
    race = o["optimizer"] == "race"
    if not race:
        o = _resolved(o)
    require_in("schedule", o["schedule"], SCHEDULES, method="auto")
    require_range("warmup_fraction", o["warmup_fraction"], 0.0, 1.0, open_high=True, method="auto")
    require_range("cooldown", o["cooldown"], 0.0, 1.0, method="auto")
    require_range("momentum", o["momentum"], 0.0, 1.0, open_high=True, method="auto")
    if o["weight_decay"] is not None:
        require_positive("weight_decay", o["weight_decay"], method="auto", allow_zero=True)
    require_positive("sf_lr_factor", o["sf_lr_factor"], method="auto")
    require_bool("rollback", o["rollback"], method="auto")
    require_range("stall_factor", o["stall_factor"], 1.0, float("inf"), method="auto")
    require_bool("nesterov", o["nesterov"], method="auto")
    require_bool("average", o["average"], method="auto")
    require_positive("average_gamma", o["average_gamma"], method="auto", allow_zero=True)
    if o["optimizer"] not in ("sgd", "race") and (o["nesterov"] or o["schedule"] == "schedule-free"):
        raise ValueError(f"method 'auto': optimizer={o['optimizer']!r} takes neither nesterov=True nor "
                         "schedule='schedule-free' (use optimizer='sgd' for those)")
    if o["average"] and o["schedule"] != "cosine":
        raise ValueError(f"method 'auto': average=True needs schedule='cosine' (got {o['schedule']!r}; "
                         "schedule-free averages by itself)")
    info: dict[str, Any] = {}
    if race:
        started = time.perf_counter()
        o, lr, info["race"] = _race(ctx, o)
        if o["optimizer"] in info["race"]["sweeps"]:  # Schedule-Free AdamW has none
            info["sweep"] = info["race"]["sweeps"][o["optimizer"]]
        steps = info["race"]["search_steps"]
        info["search"] = {"runs": [], "total_steps": steps, "total_epochs": steps / ctx.steps_per_epoch,
                          "total_train_s": time.perf_counter() - started}
    elif o["optimizer"] == SCHEDULE_FREE_ADAMW:  # nothing to search: the peer's LR unless one is given
        lr = float(o["lr"]) if o["lr"] is not None else _schedulefree_adamw_lr()
    elif o["lr"] is None:
        started = time.perf_counter()
        result = _sweep(ctx, o)
        info["sweep"] = result.to_dict()
        info["search"] = {"runs": [], "total_steps": result.steps, "total_epochs": result.steps / ctx.steps_per_epoch,
                          "total_train_s": time.perf_counter() - started}
        lr = result.lr
    else:
        require_positive("lr", o["lr"], method="auto")
        lr = float(o["lr"])
    info["lr"] = lr
    info["optimizer"] = o["optimizer"]

    if o["optimizer"] == SCHEDULE_FREE_ADAMW:
        parts = _schedulefree_adamw(ctx, lr, o["weight_decay"])
    elif o["schedule"] == "schedule-free":
        sf = get_method("schedulefree-sgd")
        sf.check_available()
        options = resolve_options(sf, {"lr": o["sf_lr_factor"] * lr, "momentum": o["momentum"],
                                       "weight_decay": o["weight_decay"], "warmup_fraction": o["warmup_fraction"]})
        parts = sf.build(ctx, **options)
    else:
        opt = _optimizer(o, ctx.params(), lr, weight_decay=o["weight_decay"])
        pilot, average = None, None
        warmup = min(round(o["warmup_fraction"] * ctx.total_steps), ctx.total_steps - 1)
        if o["schedule"] == "cosine":
            if o["average"]:
                average = PolynomialAverage(getattr(ctx.model, "module", ctx.model), o["average_gamma"])
            pilot = WarmupCosine(opt, ctx.total_steps, warmup, after_step=None if average is None else average.update)
        elif warmup > 0:  # "constant" and "wsd": the warm-up, then the LR held (wsd's cooldown is applied below)
            pilot = WarmupCosine(opt, ctx.total_steps, warmup, anneal=False)
        parts = MethodParts(opt, pilot)
        if average is not None:
            parts = dataclasses.replace(parts, eval_context=average.eval_context, train_mode=average.train,
                                        extra_state={"average": average})
    if o["rollback"]:  # its L_0 from the training loss only: auto never reads a validation split
        parts = with_safety_net(parts, initial_from="train", initial_factor=o["stall_factor"])
    if o["schedule"] == "wsd" and o["optimizer"] != SCHEDULE_FREE_ADAMW:
        # outside the net, as every cooled method: a rollback does not move its clock
        parts = cooled(parts, ctx, o["cooldown"], method="auto")
    return dataclasses.replace(parts, info={**(parts.info or {}), **info})


def _race_candidates(value: Any) -> tuple[str, ...]:
    """``race_candidates`` as a tuple of step names (a sequence, or one string joined with ``+``)."""
    names = tuple(value.split("+")) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(names) < 2 or len(set(names)) < len(names) or not set(names) <= set(OPTIMIZERS):
        raise ValueError(f"method 'auto': race_candidates must be two or more distinct steps of {list(OPTIMIZERS)}, "
                         f"the first the incumbent (e.g. 'sgd+adamw'), got {value!r}")
    return names


def _schedulefree_available() -> bool:
    try:
        get_method(SCHEDULE_FREE_ADAMW).check_available()
    except MissingExtraError:
        return False
    return True


def _schedulefree_adamw_lr() -> float:
    return float(get_method(SCHEDULE_FREE_ADAMW).defaults["lr"])


def _schedulefree_adamw(ctx: BuildContext, lr: float, weight_decay: float) -> MethodParts:
    """The ``schedulefree-adamw`` peer as its registry builds it, at ``lr`` and ``weight_decay`` (its own
    defaults otherwise): with the same LR and decay, ``auto``'s run is the peer's."""
    sf = get_method(SCHEDULE_FREE_ADAMW)
    sf.check_available()
    return sf.build(ctx, **resolve_options(sf, {"lr": lr, "weight_decay": weight_decay}))


def _optimizer(o: Mapping[str, Any], params: Any, lr: float, *, weight_decay: float) -> torch.optim.Optimizer:
    """The step of the sweep (``weight_decay=0``) and of the run: ``o["optimizer"]``'s torch optimizer
    (SGD or AdamW; Schedule-Free AdamW is built by its peer's entry, :func:`_schedulefree_adamw`)."""
    if o["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(o["momentum"], ADAM_BETA2), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=o["momentum"], nesterov=o["nesterov"], weight_decay=weight_decay)


class _CopyTrainer:
    """Trains a copy of the run's network outside the run, as the run would train it: the sweep's ramp and
    the race's candidates. Under torch.distributed every rank steps its copy with the loss and gradients
    averaged over the ranks, as DDP does for the run, so every rank measures and decides the same."""

    def __init__(self, ctx: BuildContext, o: Mapping[str, Any], batches: Iterator[Any], *, lr: float,
                 weight_decay: float, steps: int = 1, loader: Any = None) -> None:
        self.ctx = ctx
        self.model = copy.deepcopy(getattr(ctx.model, "module", ctx.model))  # a DDP wrapper's module: we sync here
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.loss_fn = ctx.loss_fn if ctx.loss_fn is not None else torch.nn.CrossEntropyLoss()
        self.eval_context: Any = contextlib.nullcontext
        if o["optimizer"] == SCHEDULE_FREE_ADAMW:
            # The peer's own build on the copy, as if its budget were the ``steps`` it trains here (its warm-up
            # a share of them); it is scored at its averaged point, its BatchNorm statistics refreshed on
            # ``loader``'s batches, as the run's evaluation would be.
            copy_ctx = dataclasses.replace(ctx, model=self.model, epochs=1, steps_per_epoch=steps,
                                           train_loader=loader, param_groups=None)
            parts = _schedulefree_adamw(copy_ctx, lr, weight_decay)
            self.opt = parts.optimizer
            if parts.train_mode is not None:
                parts.train_mode()
            if parts.eval_context is not None:
                self.eval_context = parts.eval_context
        else:
            self.opt = _optimizer(o, self.params, lr, weight_decay=weight_decay)
        self.batches = batches
        self.distributed = dist.is_distributed()
        self.nonfinite = 0

    def step(self, lr: float) -> float:
        """One optimizer step at ``lr``; the step's loss (before it). A non-finite loss takes no step."""
        x, y = split_batch(next(self.batches), where="train_loader")
        x, y = x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=False)
        loss = self.loss_fn(self.model(x), y)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        value = loss.detach().reshape(1)
        if self.distributed:  # what DDP does for the run: the ranks' mean loss and, when finite, mean gradient
            dist.all_reduce_mean_([value])
            finite = bool(torch.isfinite(value))
            if finite:
                dist.all_reduce_mean_([p.grad for p in self.params])
        if finite:
            self.opt.step()
        else:
            self.nonfinite += 1
        return float(value)

    @torch.no_grad()
    def correct(self, loader: Any) -> torch.Tensor:
        """Per sample of ``loader`` (unsharded: every rank sees all of it), whether the copy's top class is
        the target, in evaluation mode."""
        with self.eval_context():
            return self._correct(loader)

    def _correct(self, loader: Any) -> torch.Tensor:
        self.model.eval()
        try:
            hits = []
            for batch in loader:
                x, y = split_batch(batch, where="the race's held-out split")
                x, y = x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)
                hits.append((self.model(x).argmax(dim=1) == y).cpu())
            return torch.cat(hits)
        finally:
            self.model.train()


def _epochs(loader: Any) -> Iterator[Any]:
    """The batches of ``loader``, epoch after epoch, each epoch in its own order (``set_epoch``)."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def _sweep(ctx: BuildContext, o: Mapping[str, Any]) -> SweepResult:
    """Run the LR sweep on a copy of the network over the training batches, leaving every random source
    the run depends on as it was (every rank chooses the same LR: :class:`_CopyTrainer`)."""
    # No weight decay in the sweep: over its 200 steps decay's pull (lr * wd * w a step) is nothing next to
    # the gradient, yet with it the ramp meets other batch noise and LeNet-5's jagged curve moved its pick
    # from 0.185 to 0.029 (seed 101, docs/methods/auto.md round 2): the sweep measures the step size the
    # network tolerates, the same whatever the decay.
    with rng_preserved(ctx.train_loader):
        batches = itertools.chain.from_iterable(itertools.repeat(ctx.train_loader))
        copy_ = _CopyTrainer(ctx, o, batches, lr=o["sweep_min_lr"], weight_decay=0.0)

        # The sweep trains up to sweep_steps steps before the run (a minute on a CPU ResNet-20): show it.
        with Progress(o["sweep_steps"], "auto LR sweep", unit="step", log_every=20) as progress:

            def shown(lr: float) -> float:
                loss = copy_.step(lr)
                progress.update(f"lr {lr:.3g} loss {loss:.4g}")
                return loss

            return run_sweep(shown, min_lr=o["sweep_min_lr"], max_lr=o["sweep_max_lr"], steps=o["sweep_steps"],
                             divisor=o["divisor"], window=o["window"], smoothing=o["smoothing"], pick=o["pick"],
                             edge_fraction=o["edge_fraction"], edge_rise=o["edge_rise"], edge_cap=o["edge_cap"])


def _race(ctx: BuildContext, o: Mapping[str, Any]) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """Rounds 7-8 (pilots/auto/race.py): sweep each step that needs it, race the steps on the training data
    less a held-out fraction, and return the winner's options, its LR and the record (``info["race"]``)."""
    divisors = {"sgd": o["divisor"], "adamw": o["race_adamw_divisor"]}
    names = list(o["race_candidates"])
    dropped = None
    if SCHEDULE_FREE_ADAMW in names and names[0] != SCHEDULE_FREE_ADAMW and not _schedulefree_available():
        # An optional package (lrpilot[peers]): without it the race is run without that step, and says so.
        names.remove(SCHEDULE_FREE_ADAMW)
        dropped = f"{SCHEDULE_FREE_ADAMW} is not installed (pip install 'lrpilot[peers]'): raced without it"
        _log.info("auto: %s", dropped)
    candidates = {name: _resolved({**o, "optimizer": name, "divisor": divisors.get(name, o["divisor"])})
                  for name in names}
    sweeps = {name: _sweep(ctx, oc) for name, oc in candidates.items() if name != SCHEDULE_FREE_ADAMW}
    lrs = {name: sweeps[name].lr if name in sweeps else _schedulefree_adamw_lr() for name in candidates}
    incumbent = next(iter(candidates))
    record: dict[str, Any] = {"sweeps": {name: r.to_dict() for name, r in sweeps.items()},
                              "search_steps": sum(r.steps for r in sweeps.values())}
    if dropped is not None:
        record["dropped"] = dropped
    skip = None
    if len(candidates) < 2:
        skip = f"no challenger is left: it trains with {STEP_NAMES[incumbent]}"
    elif ctx.task_kind != "classification":
        skip = f"the race compares top-1 predictions: a {ctx.task_kind} task trains with {STEP_NAMES[incumbent]}"
    else:
        try:
            rest, held = carve(ctx.train_loader, o["race_fraction"], ctx.seed + 15_485_863)  # a stream of its own
        except TypeError as err:
            skip = f"{err}: the race needs a held-out split; it trains with {STEP_NAMES[incumbent]}"
    if skip is not None:
        # Not a mistake of the user's (auto is what fit runs by default): said in the log and the run record.
        _log.info("auto: %s", skip)
        record.update(winner=incumbent, skipped=skip)
        return candidates[incumbent], lrs[incumbent], record
    steps = max(1, math.ceil(o["race_budget"] * ctx.total_steps))
    cool = math.ceil(o["cooldown"] * steps)
    correct = {}
    with rng_preserved(ctx.train_loader), Progress(len(candidates) * steps, f"auto race ({', '.join(candidates)})",
                                                   unit="step", log_every=max(1, steps // 5)) as progress:
        for name, oc in candidates.items():
            lr, schedule_free = lrs[name], name == SCHEDULE_FREE_ADAMW
            racer = _CopyTrainer(ctx, oc, _epochs(rest), lr=lr, weight_decay=oc["weight_decay"], steps=steps,
                                 loader=rest)
            for k in range(1, steps + 1):  # the run's schedule compressed to the race: held, then cooled
                loss = racer.step(lr if schedule_free else lr * cooldown_multiplier(k, steps, cool))
                progress.update(f"{name} loss {loss:.4g}")
            hits = racer.correct(held)
            # A copy that met a non-finite loss is out of the race (it would have rolled back in the run).
            correct[name] = hits if racer.nonfinite == 0 else torch.zeros_like(hits)
            record[name] = {"lr": lr, "steps": steps, "nonfinite": racer.nonfinite,
                            "held_out_accuracy": float(correct[name].float().mean())}
    winner, tests = race_pick(correct, o["race_z"])
    if dist.is_distributed():  # the same held-out split everywhere; agree on the decision all the same
        winner = dist.broadcast_object(winner)
    record.update(winner=winner, tests=tests, held_out=int(correct[incumbent].numel()),
                  search_steps=record["search_steps"] + len(candidates) * steps)
    if "adamw" in tests:  # round 7's record: AdamW against the incumbent
        record.update(z=tests["adamw"]["z"], adamw_only=tests["adamw"]["b"], sgd_only=tests["adamw"]["c"])
    return candidates[winner], lrs[winner], record


def _resolved(o: Mapping[str, Any]) -> dict[str, Any]:
    """``o`` with the options left at None filled from its optimizer's (OPTIMIZERS)."""
    return {**o, **{k: v for k, v in OPTIMIZERS[o["optimizer"]].items() if o[k] is None}}


def _register() -> None:
    register(MethodInfo(
        "auto", "auto",
        "lrpilot's own autopilot: momentum SGD, AdamW or Schedule-Free AdamW, whichever wins a short race on a held-out tenth of the training data, SGD and AdamW at the LR their sweeps place, held and then cooled over the last 20 % of the budget; the safety net",
        build_auto, DEFAULTS, lr_granularity="step", kind="schedule", tags=frozenset({"auto"}),
        paper="Smith, WACV 2017 (the sweep); Hägele et al. 2024 (warmup-stable-decay); Defazio et al. 2024 (Schedule-Free); McNemar 1947 (the race); see docs/methods/auto.md",
        handles_nonfinite=True,
        test_options={"sweep_steps": 20},
        invalid_options=(
            ({"schedule": "step"}, r"schedule"),
            ({"divisor": 0.5}, r"divisor"),
            ({"smoothing": "gaussian"}, r"smoothing"),
            ({"pick": "median"}, r"pick"),
            ({"edge_fraction": 0.0}, r"edge_fraction"),
            ({"edge_rise": -0.5}, r"edge_rise"),
            ({"edge_cap": 0.5}, r"edge_cap"),
            ({"sweep_max_lr": 1e-5}, r"max_lr"),
            ({"lr": -1.0}, r"lr"),
            ({"warmup_fraction": 1.0}, r"warmup_fraction"),
            ({"cooldown": 1.5}, r"cooldown"),
            ({"optimizer": "lion"}, r"optimizer"),
            ({"optimizer": "adamw", "nesterov": True}, r"adamw"),
            ({"optimizer": "race", "race_fraction": 1.0}, r"race_fraction"),
            ({"optimizer": "race", "race_budget": 0.0}, r"race_budget"),
        ),
    ))


_register()
