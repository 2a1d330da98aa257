"""The training loop: :class:`Trainer` and its one-call form :func:`fit`.

The loop is deliberately thin. It owns what every method shares: seeding, data checks, the
forward/backward/step, evaluation, timing, telemetry, checkpoints and rollbacks, non-finite losses.
Everything that decides an LR lives in the method's optimizer (step-level pilots) or in its
:class:`~lrpilot.core.contract.Pilot` (epoch-level pilots), which talks to the loop only through
signals and :class:`~lrpilot.core.contract.Decision` objects.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lrpilot.core import distributed as dist
from lrpilot.core.contract import (
    PROBE,
    TRAIN_EVAL_LOSS,
    Decision,
    EpochSignals,
    MethodParts,
    Pilot,
    StepSignals,
    set_lrs,
)
from lrpilot.core.data import TensorLoader, check_batch, split_batch
from lrpilot.core.registry import BuildContext, build_method, get_method
from lrpilot.core.seeding import capture_rng, restore_rng, seed_everything
from lrpilot.loop.history import DecisionRecord, EpochRecord, History
from lrpilot.loop.metrics import Metric, get_metric, loss_metric
from lrpilot.loop.probe import run_probe

__all__ = ["Trainer", "fit", "infer_task_kind"]

log = logging.getLogger("lrpilot")

# Losses whose inputs must have exactly the targets' shape: they broadcast silently otherwise.
_SAME_SHAPE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCEWithLogitsLoss, nn.BCELoss)

#: ``train_transform(model, x, y) -> (x, y)``: changes a training batch (e.g. into FGSM examples).
BatchTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: ``extra_eval(model, val_loader) -> {name: value}``: more validation scores (e.g. under attack).
ExtraEval = Callable[[nn.Module, Any], Mapping[str, float]]

#: Version of :meth:`Trainer.state_dict`.
TRAINER_STATE_FORMAT = 1


def infer_task_kind(loss_fn: Any) -> str:
    """``classification``, ``binary`` or ``regression`` from the loss module's type (else ``unknown``)."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "classification"
    if isinstance(loss_fn, (nn.BCEWithLogitsLoss, nn.BCELoss)):
        return "binary"
    if isinstance(loss_fn, (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)):
        return "regression"
    return "unknown"


class Trainer:
    """Trains ``model`` with one method for a budget of epochs, evaluating after every epoch.

    Use :func:`fit` for the one-call form. A ``Trainer`` adds resumption: :meth:`run` can stop early
    (``until_epoch``), :meth:`state_dict` snapshots everything (model, optimizer, pilot, RNG, tagged
    checkpoints, telemetry) and :meth:`load_state_dict` on a fresh ``Trainer`` built with the same
    arguments continues exactly as the uninterrupted run would have.

    Args:
        model: the network (moved to ``device``).
        train_loader, val_loader: iterables of ``(inputs, targets)`` batches with a ``len``.
        method: a registry name (``lrpilot list methods``), a :class:`Pilot` wrapping an optimizer, a
            ``torch.optim.Optimizer`` over ``model``'s parameters, or :class:`MethodParts`.
        epochs: the budget. Epochs that a pilot rolls back still count.
        loss_fn: training loss ``loss_fn(outputs, targets)``; default cross-entropy.
        metric: a :class:`Metric` or a name (``"accuracy"``, ``"binary-accuracy"``, ``"mae"``,
            ``"mse"``); default accuracy with the default loss, else the validation loss.
        seed: seeds Python, NumPy and torch before the method is built.
        device: ``"cpu"``, ``"cuda"``, ... (default: where the model's parameters are).
        param_groups: explicit param groups for registry methods (default: all parameters).
        progress: show a progress bar; default when stderr is a terminal.
        task_kind: ``classification``/``binary``/``regression``; default inferred from ``loss_fn``.
        method_options: options of a registry method (see ``lrpilot list methods``).
        safety_net: wrap the method's pilot in a :class:`~lrpilot.pilots.safety_net.SafetyNet`, which
            checkpoints the best epoch and, on a non-finite or exploding training loss, rolls back and
            halves the LR: ``True`` for its defaults, or a dict of its options. Default off.
        train_transform: ``train_transform(model, x, y) -> (x, y)`` applied to every training batch
            before the step, and to the training-set pass of ``train_eval_loss`` (the objective being
            trained), e.g. :class:`~lrpilot.loop.adversarial.FGSMTransform`. It may take gradients
            with respect to the inputs; it must not touch the parameters' gradients.
        extra_eval: ``extra_eval(model, val_loader) -> {name: float}``, called in evaluation mode
            after every validation evaluation (before training, every epoch, after a final restore);
            the values are recorded in each epoch's ``extra``, e.g.
            :class:`~lrpilot.loop.adversarial.AdversarialEval`.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Any,
        val_loader: Any,
        *,
        method: str | Pilot | torch.optim.Optimizer | MethodParts = "sgd",
        epochs: int = 10,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric: Metric | str | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        progress: bool | None = None,
        task_kind: str | None = None,
        method_options: Mapping[str, Any] | None = None,
        safety_net: bool | Mapping[str, Any] | None = None,
        train_transform: BatchTransform | None = None,
        extra_eval: ExtraEval | None = None,
    ) -> None:
        if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0):
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        seed_everything(seed)
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device)
        # Under torch.distributed every rank starts from rank 0's weights and, from then on, sees the
        # same averaged gradients and the same reduced signals, so every pilot decides the same thing.
        self._distributed = dist.is_distributed()
        self._grads_synced_by_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        dist.broadcast_tensors_([t.detach() for t in (*self.model.parameters(), *self.model.buffers())])
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.metric = _resolve_metric(metric, loss_fn, self.loss_fn)
        self.task_kind = task_kind or infer_task_kind(self.loss_fn)
        self.train_loader = _on_device(train_loader, self.device)
        self.val_loader = _on_device(val_loader, self.device)
        self.epochs = epochs
        self.seed = seed
        self.progress = (sys.stderr.isatty() if progress is None else progress) and dist.is_main_process()
        self.train_transform = train_transform
        self.extra_eval = extra_eval

        steps_per_epoch = _length(self.train_loader, "train_loader")
        if steps_per_epoch == 0:
            raise ValueError("train_loader yields no batches: the training set is empty")
        if _length(self.val_loader, "val_loader") == 0:
            raise ValueError("val_loader yields no batches: the validation set is empty")
        self._precheck()

        ctx = BuildContext(
            model=self.model,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            task_kind=self.task_kind,
            loss_fn=self.loss_fn,
            train_loader=self.train_loader,
            val_loader=self.val_loader,
            seed=seed,
            device=self.device,
            param_groups=param_groups,
            metric=self.metric,
            trial_runner=self._trial,
        )
        self.method_name, self.parts = _build_parts(method, ctx, dict(method_options or {}), self.model)
        if safety_net:
            from lrpilot.pilots.safety_net import with_safety_net

            self.parts = with_safety_net(self.parts, **({} if safety_net is True else dict(safety_net)))
        self.optimizer = self.parts.optimizer
        self.pilot = self.parts.pilot
        self._lr_per_step = _lr_moves_per_step(self.method_name, self.parts)
        if self.pilot is not None:
            self.pilot.attach(self.model)

        self._initial_optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self._checkpoints: dict[str, dict[str, Any]] = {}
        self.history = History(metric_name=self.metric.name, higher_is_better=self.metric.higher_is_better)
        self.epoch = 0  # epochs trained (the budget counter)
        self.step = 0  # optimizer steps taken
        self._wall_s = 0.0
        self._train_s = 0.0
        self._began = False
        self._stopped = False
        self._val_cursor = 0  # validation batches handed to step-level pilots so far
        self._val_iter: Iterator[Any] | None = None
        self._data_checked = False
        self._extra_eval_names: tuple[str, ...] = ()  # recorded as nan when the weights are not finite

    # ------------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------------
    def run(self, until_epoch: int | None = None) -> History:
        """Train until the budget is spent, a pilot stops the run, or ``until_epoch`` epochs are done."""
        stop_at = self.epochs if until_epoch is None else min(until_epoch, self.epochs)
        bar = _progress_bar(self.progress, self.epochs, self.epoch, self.method_name)
        try:
            if not self._began:
                self._begin()
            while self.epoch < stop_at and not self._stopped:
                record = self._run_epoch()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record.train_loss:.4g}", val=f"{record.val_metric:.4g}", lr=f"{record.lr[0]:.3g}")
            if (self.epoch >= self.epochs or self._stopped) and not self.history.final and self.pilot is not None:
                self._end()
        finally:
            if bar is not None:
                bar.close()
        if self.parts.info:  # what the method reports about itself (a range test's bounds and trials)
            self.history.info["method"] = self.parts.info
        return self.history

    def evaluate(self, loader: Any | None = None, *, transform: bool = False) -> tuple[float, float]:
        """Mean loss and metric over ``loader`` (default: the validation loader) in evaluation mode;
        with ``transform``, on the batches as :attr:`train_transform` changes them."""
        loader = self.val_loader if loader is None else loader
        batch_transform = self.train_transform if transform else None
        was_training = self.model.training
        self.model.eval()
        loss_sum, metric_sum, n = 0.0, 0.0, 0
        # Distributed: each rank evaluates every world_size-th batch of a loader that is not sharded
        # already, and the sums are reduced, so every rank gets the metric of the whole split.
        share = dist.world_size() if self._distributed and not _is_sharded(loader) else 1
        try:
            with torch.no_grad(), self._eval_context():
                for i, batch in enumerate(loader):
                    if i % share != (dist.rank() if share > 1 else 0):
                        continue
                    x, y = split_batch(batch, where="the evaluation loader")
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    if batch_transform is not None:
                        with torch.enable_grad():  # an attack needs gradients with respect to the inputs
                            x, y = batch_transform(self.model, x, y)
                    out = self.model(x)
                    loss_sum += float(self.loss_fn(out, y)) * len(y)
                    metric_sum += self.metric.batch_sum(out, y)
                    n += len(y)
        finally:
            self.model.train(was_training)
        loss_sum, metric_sum, n = dist.all_reduce_sum([loss_sum, metric_sum, n])
        if n == 0:
            raise ValueError("the evaluation loader yielded no batches")
        return loss_sum / n, metric_sum / n * self.metric.scale

    def _trial(self, method: Any, *, epochs: int, seed: int | None = None, **options: Any) -> Trainer:
        """Train a deep copy of the model as it is now (before training: its initial weights).

        Runs on this trainer's data, loss and metric; the global RNG is restored afterwards so the
        main run does not depend on how many trials ran before it.
        """
        rng = capture_rng()
        try:
            trainer = Trainer(
                copy.deepcopy(self.model),
                self.train_loader,
                self.val_loader,
                method=method,
                epochs=epochs,
                loss_fn=self.loss_fn,
                metric=self.metric,
                seed=self.seed if seed is None else seed,
                device=self.device,
                progress=False,
                task_kind=self.task_kind,
                method_options=options,
                train_transform=self.train_transform,
                extra_eval=self.extra_eval,
            )
            trainer.run()
        finally:
            restore_rng(rng)
        return trainer

    def state_dict(self) -> dict[str, Any]:
        """A deep snapshot of everything needed to continue this run identically."""
        return copy.deepcopy(
            {
                "format": TRAINER_STATE_FORMAT,
                "method": self.method_name,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "pilot": self.pilot.state_dict() if self.pilot is not None else None,
                "pilot_type": type(self.pilot).__name__ if self.pilot is not None else None,
                "extra_state": self._extra_state(),
                "rng": capture_rng(),
                "epoch": self.epoch,
                "step": self.step,
                "wall_s": self._wall_s,
                "train_s": self._train_s,
                "began": self._began,
                "stopped": self._stopped,
                "val_cursor": self._val_cursor,
                "extra_eval_names": self._extra_eval_names,
                "checkpoints": self._checkpoints,
                "initial_optimizer": self._initial_optimizer_state,
                "history": self.history,
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (on a Trainer built with the same arguments)."""
        if state.get("format") != TRAINER_STATE_FORMAT:
            raise ValueError(f"trainer state format {state.get('format')!r} is not {TRAINER_STATE_FORMAT}")
        if state["method"] != self.method_name:
            raise ValueError(f"state was saved by method {state['method']!r}, this trainer runs {self.method_name!r}")
        pilot_type = type(self.pilot).__name__ if self.pilot is not None else None
        if state.get("pilot_type", pilot_type) != pilot_type:
            raise ValueError(
                f"state was saved with pilot {state['pilot_type']}, this trainer has {pilot_type}: build it with the "
                "same method and the same safety_net"
            )
        state = copy.deepcopy(dict(state))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.pilot is not None:
            self.pilot.load_state_dict(state["pilot"])
        self._load_extra_state(state.get("extra_state", {}))
        self.epoch, self.step = state["epoch"], state["step"]
        self._wall_s, self._train_s = state["wall_s"], state["train_s"]
        self._began, self._stopped = state["began"], state["stopped"]
        self._val_cursor = state["val_cursor"]
        self._val_iter = None
        self._extra_eval_names = tuple(state.get("extra_eval_names", ()))
        self._checkpoints = state["checkpoints"]
        self._initial_optimizer_state = state["initial_optimizer"]
        self.history = state["history"]
        restore_rng(state["rng"])

    # ------------------------------------------------------------------------------------------------
    # one epoch
    # ------------------------------------------------------------------------------------------------
    def _begin(self) -> None:
        self._began = True
        t0 = time.perf_counter()
        val_loss, val_metric = self.evaluate()
        evals = self._run_extra_eval()
        eval_s = time.perf_counter() - t0
        self.history.info["initial"] = {"val_loss": val_loss, "val_metric": val_metric, **evals}
        if self.pilot is not None:
            extra = self._extra_signals()
            signals = EpochSignals(
                epoch=0, step=0, lr=self.parts.lrs(), train_loss=math.nan,
                val_loss=val_loss, val_metric=val_metric, extra=extra,
            )
            for decision in _decisions(self.pilot.on_train_begin(signals)):
                self._apply(decision)
        spent = time.perf_counter() - t0
        self._wall_s += spent
        self._train_s += spent - eval_s
        if self._lr_per_step:
            self.history.record_step_lr(0, self.parts.lrs())

    def _end(self) -> None:
        decisions = _decisions(self.pilot.on_train_end()) if self.pilot is not None else []
        for decision in decisions:
            self._apply(decision)
        restored = [d for d in decisions if d.restore is not None]
        if restored:
            val_loss, val_metric = self.evaluate()
            evals = self._run_extra_eval()
            self.history.final = {"val_loss": val_loss, "val_metric": val_metric, **evals, "reason": restored[-1].reason}

    def _run_epoch(self) -> EpochRecord:
        t0 = time.perf_counter()
        train_loss, nonfinite, lr_in_force = self._train_one_epoch()
        self.epoch += 1
        t_train = time.perf_counter()

        weights_finite = not dist.any_true(not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()))
        if weights_finite and not nonfinite:
            val_loss, val_metric = self.evaluate()
            evals = self._run_extra_eval()
        else:
            nonfinite = True
            val_loss, val_metric = math.nan, math.nan
            evals = {name: math.nan for name in self._extra_eval_names}
        t_eval = time.perf_counter()

        decisions: list[Decision] = []
        extra: dict[str, Any] = {}
        if self.pilot is not None:
            extra = self._extra_signals() if not nonfinite else {name: math.nan for name in self.pilot.needs}
            signals = EpochSignals(
                epoch=self.epoch, step=self.step, lr=lr_in_force, train_loss=train_loss,
                val_loss=val_loss, val_metric=val_metric, nonfinite=nonfinite, extra=extra,
            )
            decisions = _decisions(self.pilot.on_epoch_end(signals))
        if nonfinite and not any(d.restore is not None for d in decisions):
            handled = self.pilot is not None and self.pilot.handles_nonfinite
            reason = "nonfinite-unhandled" if handled else "nonfinite-loss"
            decisions = [Decision(reason=reason, stop=True, info={"train_loss": train_loss})]
            self.history.status, self.history.status_reason = "diverged", "non-finite training loss"

        record = EpochRecord(
            epoch=self.epoch,
            step=self.step,
            train_loss=train_loss,
            val_loss=val_loss,
            val_metric=val_metric,
            lr=list(lr_in_force),
            wall_s=0.0,
            train_s=0.0,
            extra={**{k: v for k, v in extra.items() if isinstance(v, (int, float))}, **evals},  # scalars
        )
        for decision in decisions:
            self._apply(decision)
        t_end = time.perf_counter()
        self._wall_s += t_end - t0
        self._train_s += (t_train - t0) + (t_end - t_eval)
        record.wall_s, record.train_s = self._wall_s, self._train_s
        self.history.epochs.append(record)
        return record

    def _train_one_epoch(self) -> tuple[float, bool, tuple[float, ...]]:
        self.model.train()
        if self.parts.train_mode is not None:
            self.parts.train_mode()  # back from the evaluation mode eval_context may have left it in
        _set_epoch(self.train_loader, self.epoch)
        check = not self._data_checked
        loss_sum, n, nonfinite = 0.0, 0, False
        lr_in_force = self.parts.lrs()
        for i, batch in enumerate(self.train_loader):
            x, y = split_batch(batch, where="train_loader")
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if check:
                check_batch(x, y, where=f"train_loader (batch {i})")
            if self.train_transform is not None:
                x, y = self.train_transform(self.model, x, y)
            loss, stepped = self._train_step(x, y)
            if stepped:
                self.step += 1
            if not math.isfinite(loss):
                nonfinite = True
                break
            loss_sum += loss * len(y)
            n += len(y)
            if self.pilot is not None:
                self.pilot.on_step_end(StepSignals(epoch=self.epoch, step=self.step, loss=loss))
            lr_in_force = self.parts.lrs()
            if self._lr_per_step:
                self.history.record_step_lr(self.step, lr_in_force)
        if n == 0 and not nonfinite:
            raise ValueError("train_loader yielded no batches this epoch: the training set is empty")
        self._data_checked = True
        if self._distributed:
            loss_sum, n = dist.all_reduce_sum([loss_sum, n])
            # Buffers (BatchNorm statistics) saw only this rank's shard: take rank 0's, as DDP does.
            dist.broadcast_tensors_(list(self.model.buffers()))
        return (math.nan if nonfinite else loss_sum / n), nonfinite, lr_in_force

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, bool]:
        """One optimizer step; returns the mini-batch loss and whether a step was taken."""
        kwargs = self._step_kwargs()
        if self.parts.needs_closure:

            def closure(*, backward: bool = True) -> torch.Tensor:
                """The mini-batch loss; with ``backward=False`` the graph is returned un-differentiated
                (for optimizers that need second derivatives, e.g. Hessian-vector products)."""
                if not backward:
                    return self.loss_fn(self.model(x), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
                self._sync_gradients()
                return loss

            loss = self.optimizer.step(closure, **kwargs)
            value = float(loss.detach())
            return (math.nan if dist.any_true(not math.isfinite(value)) else value), True
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        value = float(loss.detach())  # a CPU-GPU sync point, needed to catch a non-finite loss at once
        if dist.any_true(not math.isfinite(value)):
            return math.nan, False  # never apply a non-finite gradient (on any rank)
        loss.backward()
        self._sync_gradients()
        self.optimizer.step(**kwargs)
        return value, True

    def _sync_gradients(self) -> None:
        """Average the gradients over ranks (unless a DistributedDataParallel model already does)."""
        if self._distributed and not self._grads_synced_by_ddp:
            dist.all_reduce_mean_([p.grad for p in self.model.parameters() if p.grad is not None])

    # ------------------------------------------------------------------------------------------------
    # signals
    # ------------------------------------------------------------------------------------------------
    def _step_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for name in self.parts.step_kwargs:
            if name == "val_closure":
                kwargs[name] = self._val_closure()
            else:
                raise ValueError(f"method {self.method_name!r} asks for step signal {name!r}, which the loop does not provide")
        return kwargs

    def _val_closure(self) -> Callable[[], torch.Tensor]:
        """A closure returning the loss on the next validation mini-batch (graph attached, no backward).

        For an in-memory validation set the mini-batches have the training batch size and are drawn
        without replacement from a fresh permutation on every pass (seeded by the run's seed and the
        pass number); a user's loader is cycled through as it is. The cursor is part of the trainer's
        state, so a resumed run hands out the same batches.
        """
        if self._val_iter is None:
            self._val_iter = self._val_batches(self._val_cursor)
        xv, yv = split_batch(next(self._val_iter), where="val_loader")
        self._val_cursor += 1
        xv, yv = xv.to(self.device, non_blocking=True), yv.to(self.device, non_blocking=True)

        def val_closure() -> torch.Tensor:
            return self.loss_fn(self.model(xv), yv)

        return val_closure

    def _val_batches(self, start: int) -> Iterator[Any]:
        """Validation mini-batches for step signals, from the ``start``-th one on."""
        loader = self.val_loader
        if isinstance(loader, TensorLoader):
            # The global training batch size (every rank takes the same validation batch: the validation
            # gradient a step-level pilot contracts is then the same on every rank).
            size = _batch_size(self.train_loader, default=loader.batch_size)
            if self._distributed and _is_sharded(self.train_loader):
                size *= dist.world_size()
            loader = TensorLoader(
                loader.inputs, loader.targets, size, shuffle=True, seed=self.seed + 7919,  # its own stream
            )
        n_batches = len(loader)
        epoch, skip = divmod(start, n_batches)
        while True:
            _set_epoch(loader, epoch)
            for i, batch in enumerate(loader):
                if i >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0

    def _extra_signals(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        needs = self.pilot.needs if self.pilot is not None else frozenset()
        for name in needs:
            if name == TRAIN_EVAL_LOSS:
                extra[name] = self.evaluate(self.train_loader, transform=True)[0]
            elif name == PROBE:
                probe = self.pilot.probe
                if probe is None:
                    raise ValueError(f"pilot {type(self.pilot).__name__} needs signal 'probe' but sets no `probe`")
                extra[name] = run_probe(self.model, probe, device=self.device, eval_context=self._eval_context)
            else:
                raise ValueError(f"pilot {type(self.pilot).__name__} needs signal {name!r}, which the loop does not provide")
        return extra

    # ------------------------------------------------------------------------------------------------
    # decisions, checkpoints
    # ------------------------------------------------------------------------------------------------
    def _apply(self, decision: Decision) -> None:
        if decision.restore is not None:
            if decision.restore not in self._checkpoints:
                raise KeyError(
                    f"decision {decision.reason!r} restores checkpoint {decision.restore!r}, which was never saved "
                    f"(saved: {sorted(self._checkpoints)})"
                )
            self._restore(self._checkpoints[decision.restore])
        if decision.reset_optimizer:
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer_state))
            set_lrs(self.optimizer, lrs)  # a reset clears the optimizer's state, not the LR
        if decision.save is not None:
            self._checkpoints[decision.save] = self._snapshot()
        if decision.lr is not None:
            set_lrs(self.optimizer, decision.lr)
        if decision.stop:
            self._stopped = True
            if self.history.status == "completed":
                self.history.status, self.history.status_reason = "stopped", decision.reason
        record = DecisionRecord(
            epoch=self.epoch,
            step=self.step,
            lr=list(self.parts.lrs()),
            action=decision.action,
            reason=decision.reason,
            info=dict(decision.info),
        )
        self.history.decisions.append(record)
        log.info("epoch %d step %d: %s (%s) lr=%s", record.epoch, record.step, record.action, record.reason, record.lr)

    def _snapshot(self) -> dict[str, Any]:
        """The training state a rollback restores: model, optimizer, the method's extra state and RNG (not
        the pilot)."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "extra_state": self._extra_state(),
                "rng": capture_rng(),
            }
        )

    def _restore(self, snapshot: Mapping[str, Any]) -> None:
        # Deep-copy again: load_state_dict keeps references to the tensors it is given, and the
        # checkpoint must survive the training that follows.
        snapshot = copy.deepcopy(snapshot)
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self._load_extra_state(snapshot.get("extra_state", {}))
        restore_rng(snapshot["rng"])

    def _extra_state(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.parts.extra_state.items()}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.parts.extra_state):
            raise ValueError(
                f"saved extra state {sorted(state)} does not match this method's {sorted(self.parts.extra_state)}"
            )
        for name, obj in self.parts.extra_state.items():
            obj.load_state_dict(state[name])

    def _run_extra_eval(self) -> dict[str, float]:
        """The :attr:`extra_eval` values of the current model, in evaluation mode."""
        if self.extra_eval is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._eval_context(), torch.enable_grad():  # attacks need input gradients
                values = self.extra_eval(self.model, self.val_loader)
        finally:
            self.model.train(was_training)
        values = {str(k): float(v) for k, v in values.items()}
        self._extra_eval_names = tuple(values)
        return values

    def _eval_context(self) -> contextlib.AbstractContextManager[Any]:
        return self.parts.eval_context() if self.parts.eval_context is not None else contextlib.nullcontext()

    def _precheck(self) -> None:
        """Run the model on the first training batch so bad data or shapes fail with a clear message."""
        with torch.no_grad():
            for where, loader in (("train_loader", self.train_loader), ("val_loader", self.val_loader)):
                batch = next(iter(loader), None)
                if batch is None:
                    raise ValueError(f"{where} yields no batches: the dataset is empty")
                x, y = split_batch(batch, where=where)
                x, y = x.to(self.device), y.to(self.device)
                check_batch(x, y, where=f"{where} (first batch)")
                was_training = self.model.training
                self.model.eval()
                try:
                    out = self.model(x)
                except Exception as err:  # noqa: BLE001 - re-raised with context
                    raise ValueError(
                        f"the model failed on the first batch of {where} (inputs of shape {tuple(x.shape)}): {err}"
                    ) from err
                finally:
                    self.model.train(was_training)
                if isinstance(self.loss_fn, _SAME_SHAPE_LOSSES) and out.shape != y.shape:
                    raise ValueError(
                        f"model outputs have shape {tuple(out.shape)} but targets from {where} have shape "
                        f"{tuple(y.shape)}; {type(self.loss_fn).__name__} needs them equal (reshape the targets "
                        f"or the model's output)"
                    )
                try:
                    value = self.loss_fn(out, y)
                except Exception as err:  # noqa: BLE001 - re-raised with context
                    raise ValueError(
                        f"loss_fn failed on model outputs of shape {tuple(out.shape)} and targets of shape "
                        f"{tuple(y.shape)} (dtype {y.dtype}) from {where}: {err}"
                    ) from err
                if value.ndim != 0:
                    raise ValueError(f"loss_fn must return a scalar (mean over the batch), got shape {tuple(value.shape)}")


def fit(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any,
    *,
    method: str | Pilot | torch.optim.Optimizer | MethodParts = "sgd",
    epochs: int = 10,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    metric: Metric | str | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    progress: bool | None = None,
    task_kind: str | None = None,
    safety_net: bool | Mapping[str, Any] | None = None,
    train_transform: BatchTransform | None = None,
    extra_eval: ExtraEval | None = None,
    **method_options: Any,
) -> History:
    """Train ``model`` with ``method`` for ``epochs`` and return its :class:`History`.

    Example:
        >>> import torch, lrpilot
        >>> from lrpilot.core.data import TensorLoader
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> model = torch.nn.Linear(4, 3)
        >>> hist = lrpilot.fit(model, TensorLoader(x, y, 16), TensorLoader(x, y, 64, shuffle=False),
        ...                    method="sgd-cosine", epochs=3, lr=0.05, progress=False)
        >>> len(hist.epochs)
        3

    See :class:`Trainer` for every argument; ``method_options`` are the registry method's options.
    """
    trainer = Trainer(
        model,
        train_loader,
        val_loader,
        method=method,
        epochs=epochs,
        loss_fn=loss_fn,
        metric=metric,
        seed=seed,
        device=device,
        param_groups=param_groups,
        progress=progress,
        task_kind=task_kind,
        method_options=method_options,
        safety_net=safety_net,
        train_transform=train_transform,
        extra_eval=extra_eval,
    )
    return trainer.run()


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _decisions(result: Decision | Sequence[Decision] | None) -> list[Decision]:
    """A hook's answer as a list: ``None``, one decision, or a sequence of them (applied in order)."""
    if result is None:
        return []
    if isinstance(result, Decision):
        return [result]
    decisions = list(result)
    for d in decisions:
        if not isinstance(d, Decision):
            raise TypeError(f"a pilot hook returned {type(d).__name__}; expected Decision, a sequence of them, or None")
    return decisions


def _resolve_metric(metric: Metric | str | None, user_loss: Any, loss_fn: Any) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return get_metric(metric)
    if metric is not None:
        raise TypeError(f"metric must be a Metric or a name, got {type(metric).__name__}")
    return get_metric("accuracy") if user_loss is None else loss_metric(loss_fn)


def _build_parts(
    method: Any, ctx: BuildContext, options: dict[str, Any], model: nn.Module
) -> tuple[str, MethodParts]:
    if isinstance(method, str):
        return method, build_method(method, ctx, options)
    if options:
        raise TypeError(
            f"method options ({', '.join(options)}) only apply to registry method names; "
            f"configure the {type(method).__name__} object directly instead"
        )
    if isinstance(method, MethodParts):
        parts = method
    elif isinstance(method, Pilot):
        parts = MethodParts(method.optimizer, method)
    elif isinstance(method, torch.optim.Optimizer):
        parts = MethodParts(method)
    else:
        raise TypeError(
            "method must be a registry name, a Pilot, a torch.optim.Optimizer or MethodParts, "
            f"got {type(method).__name__}"
        )
    model_params = {id(p) for p in model.parameters()}
    for group in parts.optimizer.param_groups:
        if any(id(p) not in model_params for p in group["params"]):
            raise ValueError("the optimizer holds parameters that are not the model's: build it from model.parameters()")
    return type(parts.pilot or parts.optimizer).__name__, parts


def _lr_moves_per_step(method_name: str, parts: MethodParts) -> bool:
    try:
        return get_method(method_name).lr_granularity == "step"
    except ValueError:
        # A user object: per-step telemetry only if a pilot steps within epochs.
        return parts.pilot is not None and type(parts.pilot).on_step_end is not Pilot.on_step_end


def _length(loader: Any, name: str) -> int:
    try:
        return len(loader)
    except TypeError:
        raise TypeError(f"{name} must have a length (number of batches per epoch), e.g. a DataLoader") from None


def _on_device(loader: Any, device: torch.device) -> Any:
    """Move an in-memory loader's tensors to ``device`` once (other loaders are moved batch by batch)."""
    to = getattr(loader, "to", None)
    if callable(to) and hasattr(loader, "set_epoch") and hasattr(loader, "inputs"):
        return to(device)
    return loader


def _set_epoch(loader: Any, epoch: int) -> None:
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            return


def _is_sharded(loader: Any) -> bool:
    """The loader already gives each rank its own share (a sharded TensorLoader, a DistributedSampler)."""
    if getattr(loader, "world_size", 1) > 1:
        return True
    sampler = getattr(loader, "sampler", None)
    return isinstance(sampler, torch.utils.data.distributed.DistributedSampler)


def _batch_size(loader: Any, default: int) -> int:
    size = getattr(loader, "batch_size", None)
    return size if isinstance(size, int) and size > 0 else default


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)
