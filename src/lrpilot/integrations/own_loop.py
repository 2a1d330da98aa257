"""Any registry method in a training loop of your own: :func:`attach` and :class:`AttachedPilot`.

Most people who would try an LR autopilot train with a loop they wrote. The step-level methods are
torch optimizers and need nothing, but the epoch-level ones (AALR, MI decay, the Lipschitz pilot, the
schedules) talk to a loop through signals and :class:`~lrpilot.core.contract.Decision` objects. An
:class:`AttachedPilot` is that loop's half of the contract, for a loop it does not own::

    pilot = lrpilot.attach("aalr", model, train_loader=train, val_loader=val, epochs=20)
    for epoch in range(20):
        for x, y in train:
            pilot.optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            pilot.optimizer.step()
            pilot.step(loss)                       # after every optimizer step
        decision = pilot.end_epoch(val_accuracy)   # may roll the model and optimizer back, in place
        if pilot.should_stop:
            break

Decisions are carried out by :class:`~lrpilot.loop.decisions.TrainingState`, the code the loop's own
``Trainer`` uses: a rollback restores the model's weights, the optimizer's state, the method's extra
state and every RNG, in place, from an in-memory copy. The Lightning callback
(:mod:`lrpilot.integrations.lightning`) drives the same class.

Signals the user's loop does not compute are taken from the documented arguments: the loss over the
training set (:data:`~lrpilot.core.contract.TRAIN_EVAL_LOSS`, AALR's J) from ``train_loader`` and
``loss_fn``, the MI pilots' probe from the model itself, validation mini-batches for ``hd-val`` and
``rt-hpo`` from ``val_loader`` (:meth:`AttachedPilot.step_kwargs`). When one is missing, :func:`attach`
(or, for a signal a pilot asks for only later, :meth:`AttachedPilot.end_epoch`) says which argument
to pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lrpilot.core import distributed as dist
from lrpilot.core.contract import (
    PROBE,
    TRAIN_EVAL_LOSS,
    TRAIN_PASS,
    Decision,
    EpochSignals,
    MethodParts,
    StepSignals,
)
from lrpilot.core.data import split_batch
from lrpilot.core.registry import BuildContext, build_method, get_method
from lrpilot.core.seeding import rng_preserved, seed_everything
from lrpilot.loop.decisions import TrainingState, as_decisions
from lrpilot.loop.fit import Trainer, infer_task_kind, resolve_metric, train_pass
from lrpilot.loop.history import DecisionRecord, EpochRecord, History
from lrpilot.loop.metrics import Metric
from lrpilot.loop.probe import probe_signal

__all__ = ["AttachedPilot", "attach", "build_parts", "evaluate"]

log = logging.getLogger("lrpilot")

#: Version of :meth:`AttachedPilot.state_dict`.
STATE_FORMAT = 1


def evaluate(
    model: nn.Module,
    loader: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metric: Metric,
    *,
    device: torch.device | None = None,
    eval_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> tuple[float, float]:
    """Mean loss and metric of ``model`` over ``loader`` in evaluation mode (the loop's arithmetic).

    Under ``torch.distributed`` the sums are reduced over ranks when the loader gives each rank its own
    share (a ``DistributedSampler``), so every rank gets the metric of the whole split.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    loss_sum, metric_sum, n = 0.0, 0.0, 0
    try:
        with torch.no_grad(), (eval_context() if eval_context is not None else contextlib.nullcontext()):
            for batch in loader:
                x, y = split_batch(batch, where="the evaluation loader")
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss_sum += float(loss_fn(out, y)) * len(y)
                metric_sum += metric.batch_sum(out, y)
                n += len(y)
    finally:
        model.train(was_training)
    if dist.is_distributed() and _is_sharded(loader):
        loss_sum, metric_sum, n = dist.all_reduce_sum([loss_sum, metric_sum, n])
    if n == 0:
        raise ValueError("the evaluation loader yielded no batches")
    return loss_sum / n, metric_sum / n * metric.scale


def build_parts(
    method: str,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None,
    epochs: int,
    steps_per_epoch: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metric: Metric,
    task_kind: str,
    train_loader: Any,
    val_loader: Any,
    seed: int,
    device: torch.device,
    param_groups: list[dict[str, Any]] | None,
    options: Mapping[str, Any],
    where: str = "attach",
) -> MethodParts:
    """Build registry method ``method`` for a loop other than ours (the integrations share this).

    With ``optimizer``, the method's pilot is re-pointed at it (epoch-level pilots only: they drive the
    LR of any optimizer); the optimizer the method would have built is dropped. Searches before training
    (MI decay's range test) train copies of ``model`` with :class:`~lrpilot.loop.fit.Trainer` on
    ``train_loader``/``val_loader``.
    """
    info = get_method(method)
    if optimizer is not None and info.kind != "epoch-pilot":
        what = "builds its schedule on its own optimizer" if info.kind == "schedule" else "is its own optimizer"
        raise ValueError(
            f"method {method!r} {what} and cannot drive yours. Drop the optimizer ({where}) and step the one "
            "lrpilot builds (`.optimizer`); only epoch-level methods (e.g. aalr, mi-decay, lipschitz) drive yours."
        )

    run_seed = seed

    def trial(trial_method: Any, *, epochs: int, seed: int | None = None, **trial_options: Any) -> Trainer:
        if train_loader is None or val_loader is None:
            raise ValueError(
                f"method {method!r} trains trial runs before training (a search): pass train_loader= and "
                f"val_loader= to {where}, or the options that skip the search (see docs/methods/)"
            )
        with rng_preserved(train_loader, val_loader):
            trainer = Trainer(
                copy.deepcopy(model), train_loader, val_loader, method=trial_method, epochs=epochs, loss_fn=loss_fn,
                metric=metric, seed=run_seed if seed is None else seed, device=device, progress=False,
                task_kind=task_kind, method_options=trial_options,
            )  # fmt: skip
            trainer.run()
        return trainer

    def data_pass(fn: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        if train_loader is None:
            raise ValueError(f"method {method!r} reads the training data before training: pass train_loader= to {where}")
        train_pass(model, train_loader, fn, device=device)

    ctx = BuildContext(
        model=model, epochs=epochs, steps_per_epoch=steps_per_epoch, task_kind=task_kind, loss_fn=loss_fn,
        train_loader=train_loader, val_loader=val_loader, seed=seed, device=device, param_groups=param_groups,
        metric=metric, trial_runner=trial, data_pass=data_pass,
    )  # fmt: skip
    try:
        parts = build_method(method, ctx, dict(options))
    except (AttributeError, TypeError) as err:
        if train_loader is None:
            raise ValueError(
                f"building method {method!r} failed without training data ({err}): pass train_loader= to {where}"
            ) from err
        raise
    if optimizer is not None:
        _rebind(parts, optimizer, method)
    return parts


def _rebind(parts: MethodParts, optimizer: torch.optim.Optimizer, method: str) -> None:
    """Point an epoch-level method's pilot at the user's optimizer instead of the one it built."""
    built = parts.optimizer
    if len(optimizer.param_groups) != len(built.param_groups):
        raise ValueError(
            f"method {method!r} drives {len(built.param_groups)} param group(s); your optimizer has "
            f"{len(optimizer.param_groups)}. Pass an optimizer with that many groups, or none."
        )
    own_lr = parts.effective_lr is not None and not getattr(parts.effective_lr, "follows_optimizer", False)
    if own_lr or parts.extra_state or parts.step_kwargs or parts.needs_closure:
        raise ValueError(f"method {method!r} reads its own optimizer's state: drop the optimizer and use `.optimizer`")
    pilot = parts.pilot
    while pilot is not None:
        if getattr(pilot, "optimizer", None) is built:
            pilot.optimizer = optimizer
        pilot = getattr(pilot, "inner", None)
    parts.optimizer = optimizer


class AttachedPilot:
    """A method's pilot driven by a loop that is not ours; build it with :func:`attach`.

    Call :meth:`step` after every optimizer step and :meth:`end_epoch` at the end of every epoch; the
    decisions are carried out on the model and :attr:`optimizer` in place. :attr:`history` is the same
    telemetry ``lrpilot.fit`` returns (per-epoch LRs, every decision with its reason, per-step LRs for
    the methods whose LR moves every step).

    Attributes:
        optimizer: the optimizer to step (the method's, or yours when you passed one).
        parts: the method's :class:`~lrpilot.core.contract.MethodParts`.
        pilot: its epoch-level pilot, or ``None`` (plain optimizers and step-level methods).
        history: the run's :class:`~lrpilot.loop.history.History`.
        epoch: epochs ended so far (the budget counter); step: optimizer steps counted.
    """

    def __init__(
        self,
        parts: MethodParts,
        model: nn.Module,
        *,
        method_name: str,
        epochs: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        metric: Metric,
        train_loader: Any = None,
        val_loader: Any = None,
        device: torch.device | None = None,
        where: str = "attach",
    ) -> None:
        self.parts = parts
        self.model = model
        self.optimizer = parts.optimizer
        self.pilot = parts.pilot
        self.method_name = method_name
        self.epochs = epochs
        self.loss_fn = loss_fn
        self.metric = metric
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = device
        self.where = where
        try:
            self._lr_per_step = get_method(method_name).lr_granularity == "step"
        except ValueError:
            self._lr_per_step = False
        self.state = TrainingState(model, self.optimizer, parts.extra_state)
        self.history = History(metric_name=metric.name, higher_is_better=metric.higher_is_better)
        self.epoch = 0
        self.step_count = 0
        self.began = False
        self.stopped = False
        self.finished = False
        self._reset_epoch()
        self._val_iter: Iterator[Any] | None = None
        if self.pilot is not None:
            self.pilot.attach(model)
        if parts.needs_closure:
            log.info(
                "method %s needs a closure: call optimizer.step(closure, **pilot.step_kwargs()) where "
                "closure(backward=True) zeroes the gradients, computes the loss and backpropagates, and "
                "closure(backward=False) returns the loss with its graph", method_name,
            )  # fmt: skip

    # ------------------------------------------------------------------------------------------------
    @property
    def should_stop(self) -> bool:
        """The pilot stopped the run, or the budget of ``epochs`` is spent."""
        return self.stopped or self.epoch >= self.epochs

    @property
    def epoch_nonfinite(self) -> bool:
        """A non-finite loss was seen in the epoch in progress (its later steps are not counted)."""
        return self._nonfinite

    def begin(self, *, val_loss: float | None = None, val_metric: float | None = None, **extra: Any) -> Decision | None:
        """Hand the pilot the untrained model's signals (``on_train_begin``); :func:`attach` calls it.

        ``val_loss``/``val_metric`` default to an evaluation on ``val_loader`` when there is one.
        """
        if self.began:
            raise RuntimeError("begin() was already called (attach calls it unless start=False)")
        self.began = True
        val_loss, val_metric = self._val_signals(val_loss, val_metric)
        self.history.info["initial"] = {"val_loss": val_loss, "val_metric": val_metric}
        applied: list[Decision] = []
        if self.pilot is not None:
            signals = EpochSignals(
                epoch=0, step=0, lr=self.parts.lrs(), train_loss=math.nan, val_loss=val_loss,
                val_metric=val_metric, extra=self._extra_signals(extra),
            )  # fmt: skip
            applied = self._apply_all(as_decisions(self.pilot.on_train_begin(signals)))
        if self._lr_per_step:
            self.history.record_step_lr(0, self.parts.lrs())
        self._train_mode()
        return applied[-1] if applied else None

    def step(self, loss: float | torch.Tensor, *, batch_size: int | None = None) -> None:
        """Record one optimizer step and its mini-batch ``loss`` (``pilot.on_step_end``).

        A non-finite loss ends the epoch for the pilot, as in the loop: later steps of the epoch are
        not counted and :meth:`end_epoch` hands ``nonfinite=True`` to the pilot (which rolls back or
        stops the run). ``batch_size`` weights the epoch's mean training loss (default: equal weights).
        """
        if not self.began:
            raise RuntimeError("call begin() before the first step (attach does unless start=False)")
        if self._nonfinite:
            return
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if dist.any_true(not math.isfinite(value)):
            self._nonfinite = True
            return
        self.step_count += 1
        weight = 1 if batch_size is None else int(batch_size)
        self._loss_sum += value * weight
        self._n += weight
        if self.pilot is not None:
            self.pilot.on_step_end(StepSignals(epoch=self.epoch, step=self.step_count, loss=value))
        self._lr_in_force = self.parts.lrs()
        if self._lr_per_step:
            self.history.record_step_lr(self.step_count, self._lr_in_force)

    def end_epoch(
        self,
        val_metric: float | None = None,
        *,
        val_loss: float | None = None,
        train_loss: float | None = None,
        **extra: Any,
    ) -> Decision | None:
        """Hand the pilot the epoch's signals and carry out its decisions; returns the last one (or ``None``).

        Args:
            val_metric, val_loss: the validation metric and loss of the model as it is now (default:
                evaluated on ``val_loader`` when there is one, else ``nan``).
            train_loss: the epoch's mean training loss (default: the mean of the losses given to
                :meth:`step`).
            extra: signals the pilot asks for (``pilot.needs``) that you computed yourself, e.g.
                ``train_eval_loss=...``; the missing ones are computed from ``train_loader``.

        Every decision is in :attr:`history` (``history.decisions``). When the budget is spent or the
        pilot stops the run, :meth:`finish` runs (e.g. AALR restores its best checkpoint).
        """
        if not self.began:
            raise RuntimeError("call begin() before end_epoch() (attach does unless start=False)")
        if self.finished:
            raise RuntimeError(f"the run is over (epoch {self.epoch} of {self.epochs}, stopped={self.stopped})")
        self.epoch += 1
        nonfinite = self._nonfinite
        if train_loss is None:
            loss_sum, n = self._loss_sum, self._n
            if dist.is_distributed():
                loss_sum, n = dist.all_reduce_sum([loss_sum, n])
            train_loss = loss_sum / n if n and not nonfinite else math.nan
        elif dist.is_distributed():
            train_loss = _mean_over_ranks(train_loss)
        weights_finite = not dist.any_true(not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()))
        nonfinite = dist.any_true(nonfinite or not weights_finite or not math.isfinite(train_loss))
        if nonfinite:
            val_loss, val_metric, train_loss = math.nan, math.nan, math.nan
        else:
            val_loss, val_metric = self._val_signals(val_loss, val_metric)
        decisions: list[Decision] = []
        extras: dict[str, Any] = {}
        if self.pilot is not None:
            extras = self._extra_signals(extra) if not nonfinite else {name: math.nan for name in self.pilot.needs}
            signals = EpochSignals(
                epoch=self.epoch, step=self.step_count, lr=self._lr_in_force, train_loss=train_loss,
                val_loss=val_loss, val_metric=val_metric, nonfinite=nonfinite, extra=extras,
            )  # fmt: skip
            decisions = as_decisions(self.pilot.on_epoch_end(signals))
        if nonfinite and not any(d.restore is not None for d in decisions):
            handled = self.pilot is not None and self.pilot.handles_nonfinite
            reason = "nonfinite-unhandled" if handled else "nonfinite-loss"
            decisions = [Decision(reason=reason, stop=True, info={"train_loss": train_loss})]
            self.history.status, self.history.status_reason = "diverged", "non-finite training loss"
        self.history.epochs.append(EpochRecord(
            epoch=self.epoch, step=self.step_count, train_loss=train_loss, val_loss=val_loss, val_metric=val_metric,
            lr=list(self._lr_in_force), wall_s=0.0, train_s=0.0,
            extra={k: v for k, v in extras.items() if isinstance(v, (int, float))},
        ))  # fmt: skip
        applied = self._apply_all(decisions)
        self._reset_epoch()
        if self.should_stop:
            applied += self.finish()
        else:
            self._train_mode()
        return applied[-1] if applied else None

    def finish(self) -> list[Decision]:
        """``pilot.on_train_end`` (once): e.g. AALR's restore of its best checkpoint. Returns its decisions."""
        if self.finished:
            return []
        self.finished = True
        if self.pilot is None:
            return []
        return self._apply_all(as_decisions(self.pilot.on_train_end()))

    def eval_context(self) -> contextlib.AbstractContextManager[Any]:
        """Enter it around your own evaluation: some methods evaluate other weights than they train
        (Schedule-Free's ``x``, DoG's average); a no-op for the others."""
        return self.parts.eval_context() if self.parts.eval_context is not None else contextlib.nullcontext()

    def step_kwargs(self) -> dict[str, Any]:
        """The keyword signals this method's ``optimizer.step`` needs (``hd-val``, ``rt-hpo``: a
        ``val_closure`` on the next mini-batch of ``val_loader``, cycled through); ``{}`` for the others."""
        kwargs: dict[str, Any] = {}
        for name in self.parts.step_kwargs:
            if name != "val_closure":
                raise ValueError(f"method {self.method_name!r} asks for step signal {name!r}, which attach cannot provide")
            if self.val_loader is None:
                raise ValueError(f"method {self.method_name!r} steps on validation mini-batches: pass val_loader= to {self.where}")
            kwargs[name] = self._val_closure()
        return kwargs

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The pilot's state, its checkpoints and counters (not the model or the optimizer: save those
        yourself, as you do without lrpilot)."""
        return copy.deepcopy({
            "format": STATE_FORMAT,
            "method": self.method_name,
            "pilot": self.pilot.state_dict() if self.pilot is not None else None,
            "extra_state": self.state.extra_state_dict(),
            "checkpoints": self.state.checkpoints,
            "initial_optimizer": self.state.initial_optimizer_state,
            "epoch": self.epoch, "step": self.step_count, "began": self.began, "stopped": self.stopped,
            "finished": self.finished, "history": self.history,
        })  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"attached-pilot state format {state.get('format')!r} is not {STATE_FORMAT}")
        if state["method"] != self.method_name:
            raise ValueError(f"state was saved by method {state['method']!r}, this pilot runs {self.method_name!r}")
        state = copy.deepcopy(dict(state))
        if self.pilot is not None:
            self.pilot.load_state_dict(state["pilot"])
        self.state.load_extra_state(state["extra_state"])
        self.state.checkpoints = state["checkpoints"]
        self.state.initial_optimizer_state = state["initial_optimizer"]
        self.epoch, self.step_count = state["epoch"], state["step"]
        self.began, self.stopped, self.finished = state["began"], state["stopped"], state["finished"]
        self.history = state["history"]
        self._reset_epoch()

    # ------------------------------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self._loss_sum, self._n, self._nonfinite = 0.0, 0, False
        self._lr_in_force = self.parts.lrs()

    def _train_mode(self) -> None:
        if self.parts.train_mode is not None:
            self.parts.train_mode()

    def _apply_all(self, decisions: list[Decision]) -> list[Decision]:
        for decision in decisions:
            self.state.apply(decision)
            if decision.stop:
                self.stopped = True
                if self.history.status == "completed":
                    self.history.status, self.history.status_reason = "stopped", decision.reason
            record = DecisionRecord(
                epoch=self.epoch, step=self.step_count, lr=list(self.parts.lrs()), action=decision.action,
                reason=decision.reason, info=dict(decision.info),
            )  # fmt: skip
            self.history.decisions.append(record)
            log.info("epoch %d step %d: %s (%s) lr=%s", record.epoch, record.step, record.action, record.reason, record.lr)
        return decisions

    def _val_signals(self, val_loss: float | None, val_metric: float | None) -> tuple[float, float]:
        if (val_loss is None or val_metric is None) and self.val_loader is not None:
            loss, metric = evaluate(
                self.model, self.val_loader, self.loss_fn, self.metric, device=self.device, eval_context=self.eval_context
            )
            val_loss = loss if val_loss is None else val_loss
            val_metric = metric if val_metric is None else val_metric
        val_loss = math.nan if val_loss is None else float(val_loss)
        val_metric = math.nan if val_metric is None else float(val_metric)
        if dist.is_distributed():  # every rank decides on the same numbers
            val_loss, val_metric = _mean_over_ranks(val_loss), _mean_over_ranks(val_metric)
        return val_loss, val_metric

    def _extra_signals(self, given: Mapping[str, Any]) -> dict[str, Any]:
        needs = self.pilot.needs if self.pilot is not None else frozenset()
        unknown = set(given) - set(needs) - {TRAIN_EVAL_LOSS}
        if unknown:
            raise ValueError(f"unknown signal(s) {sorted(unknown)}; this pilot needs {sorted(needs) or 'none'}")
        extra: dict[str, Any] = {}
        for name in needs:
            if name in given:
                extra[name] = float(given[name]) if name == TRAIN_EVAL_LOSS else given[name]
            elif name == TRAIN_EVAL_LOSS:
                if self.train_loader is None:
                    raise ValueError(missing_train_eval_loss(self.method_name, self.where))
                with rng_preserved(self.train_loader):  # the pass must not move the user's training order
                    extra[name] = evaluate(
                        self.model, self.train_loader, self.loss_fn, self.metric, device=self.device,
                        eval_context=self.eval_context,
                    )[0]  # fmt: skip
            elif name == TRAIN_PASS:
                if self.train_loader is None:
                    raise ValueError(f"method {self.method_name!r} reads the training data: pass train_loader= to {self.where}")
                extra[name] = functools.partial(train_pass, self.model, self.train_loader, device=self.device)
            elif name == PROBE:
                extra[name] = probe_signal(self.pilot, self.model, device=self.device, eval_context=self.eval_context)
            else:
                raise ValueError(f"pilot {type(self.pilot).__name__} needs signal {name!r}: pass it to end_epoch")
        if TRAIN_EVAL_LOSS in extra and dist.is_distributed() and TRAIN_EVAL_LOSS in given:
            extra[TRAIN_EVAL_LOSS] = _mean_over_ranks(extra[TRAIN_EVAL_LOSS])
        return extra

    def _val_closure(self) -> Callable[[], torch.Tensor]:
        if self._val_iter is None:
            self._val_iter = _cycle(self.val_loader)
        xv, yv = split_batch(next(self._val_iter), where="val_loader")
        if self.device is not None:
            xv, yv = xv.to(self.device), yv.to(self.device)

        def val_closure() -> torch.Tensor:
            return self.loss_fn(self.model(xv), yv)

        return val_closure


def missing_train_eval_loss(method: str, where: str) -> str:
    return (
        f"method {method!r} compares the loss over the training set ({TRAIN_EVAL_LOSS!r}): pass train_loader= "
        f"(and loss_fn=) to {where}, or hand it to end_epoch({TRAIN_EVAL_LOSS}=...); for AALR, "
        "objective='val' compares the validation loss instead"
    )


def attach(
    method: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    epochs: int,
    train_loader: Any = None,
    val_loader: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    metric: Metric | str | None = None,
    steps_per_epoch: int | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    task_kind: str | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    start: bool = True,
    **options: Any,
) -> AttachedPilot:
    """Run registry method ``method`` in your own training loop.

    Args:
        method: a registry name (``lrpilot list methods``).
        model: your network; decisions roll it back in place.
        optimizer: yours, for an epoch-level method (AALR, MI decay, Lipschitz, ...), which then sets its LR
            (the method's own optimizer options are ignored); ``None`` (default) builds the method's
            optimizer, returned as ``.optimizer``. Step-level methods are optimizers: pass none.
        epochs: your budget; the pilot plans with it, and :meth:`AttachedPilot.finish` runs after it.
        train_loader: your training batches ``(x, y)``: the number of steps per epoch, and the data for
            the signals some methods need (AALR's loss over the training set, MI decay's probe and range
            test, Lipschitz's first-epoch probe).
        val_loader: your validation batches: default validation signals, MI decay's range test,
            ``hd-val``/``rt-hpo``'s validation mini-batches.
        loss_fn: the training loss (default cross-entropy), for the signals computed here.
        metric: a :class:`~lrpilot.loop.metrics.Metric` or its name, for validation signals computed here
            (default: accuracy with the default loss, else the loss).
        steps_per_epoch: optimizer steps per epoch (default ``len(train_loader)``).
        seed: seeds Python, NumPy and torch before the method is built, as ``lrpilot.fit`` does
            (default: leave the RNG alone; the method's own seeds are then 0).
        device: where signals are computed (default: the model's device).
        task_kind: ``classification``/``binary``/``regression`` (default: from ``loss_fn``).
        param_groups: explicit param groups for the method's optimizer.
        start: hand the pilot the untrained model's signals now (``on_train_begin``); ``False`` to call
            :meth:`AttachedPilot.begin` yourself (e.g. with your own validation numbers).
        options: the method's options (``lrpilot list methods``, ``docs/methods/``).

    Raises:
        ValueError: when the method needs a signal or data not given, saying which argument to pass.
    """
    if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0):
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(method, str):
        raise TypeError(f"attach takes a registry method name, got {type(method).__name__}")
    if seed is not None:
        seed_everything(seed)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    device = torch.device(device)
    loss = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    resolved_metric = resolve_metric(metric, loss_fn, loss)
    if steps_per_epoch is None:
        if train_loader is None:
            raise ValueError("attach needs the number of optimizer steps per epoch: pass train_loader= or steps_per_epoch=")
        steps_per_epoch = len(train_loader)
    parts = build_parts(
        method, model, optimizer=optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch, loss_fn=loss,
        metric=resolved_metric, task_kind=task_kind or infer_task_kind(loss), train_loader=train_loader,
        val_loader=val_loader, seed=seed or 0, device=device, param_groups=param_groups, options=options,
    )  # fmt: skip
    attached = AttachedPilot(
        parts, model, method_name=method, epochs=epochs, loss_fn=loss, metric=resolved_metric,
        train_loader=train_loader, val_loader=val_loader, device=device,
    )  # fmt: skip
    check_signals(attached, "attach")
    if start:
        attached.begin()
    return attached


def check_signals(attached: AttachedPilot, where: str) -> None:
    """Fail before training when the method needs something this loop cannot give it."""
    pilot = attached.pilot
    needs = pilot.needs if pilot is not None else frozenset()
    if TRAIN_EVAL_LOSS in needs and attached.train_loader is None:
        raise ValueError(missing_train_eval_loss(attached.method_name, where))
    if TRAIN_PASS in needs and attached.train_loader is None:
        raise ValueError(
            f"method {attached.method_name!r} reads the training data before it sets its first LR: pass "
            f"train_loader= to {where}"
        )
    if "val_closure" in attached.parts.step_kwargs and attached.val_loader is None:
        raise ValueError(
            f"method {attached.method_name!r} steps on validation mini-batches: pass val_loader= to {where} "
            "and call optimizer.step(**pilot.step_kwargs())"
        )


def _mean_over_ranks(value: float) -> float:
    total, n = dist.all_reduce_sum([float(value), 1.0])
    return total / n


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("val_loader yielded no batches")


def _is_sharded(loader: Any) -> bool:
    if getattr(loader, "world_size", 1) > 1:
        return True
    sampler = getattr(loader, "sampler", None)
    return isinstance(sampler, torch.utils.data.distributed.DistributedSampler)
