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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lrpilot.core import distributed as dist
from lrpilot.core.checks import require_range
from lrpilot.core.contract import (
    PROBE,
    TRAIN_EVAL_LOSS,
    TRAIN_PASS,
    Decision,
    EpochSignals,
    MethodParts,
    Pilot,
    StepSignals,
)
from lrpilot.core.data import TensorLoader, carve, check_batch, num_samples, split_batch
from lrpilot.core.registry import BuildContext, build_method, get_method, needs_decision_split
from lrpilot.core.seeding import capture_rng, restore_rng, rng_preserved, seed_everything
from lrpilot.loop.decisions import TrainingState, as_decisions
from lrpilot.loop.history import DecisionRecord, EpochRecord, History
from lrpilot.loop.metrics import Metric, get_metric, loss_metric
from lrpilot.loop.probe import probe_signal

__all__ = ["DEFAULT_HYPER_FRACTION", "Trainer", "fit", "infer_task_kind", "resolve_metric", "train_pass"]

#: The fraction of the training data carved out as the decision split of a method that decides from
#: validation signals, when no ``hyper_loader`` is given (seeded by the run's seed).
DEFAULT_HYPER_FRACTION = 0.1

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
        hyper_loader: the decision split: data a method that decides from validation signals (hd-val's
            and rt-hpo's hypergradient batches, a validation loss it compares, the trials of a range test)
            reads instead of ``val_loader``, which is only ever scored. Default: ``hyper_fraction`` of the
            training data, carved out (seeded) for such methods only; the others train on all of it.
            The run record says which split the decisions used (``info.decision_split``).
        hyper_fraction: the fraction carved when no ``hyper_loader`` is given (default 0.1); ``0`` lets
            the method decide from ``val_loader`` (recorded as such: its results are then not held out).
            A pilot object you built yourself sees ``val_loader`` unless you give it ``hyper_loader``.
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
        hyper_loader: Any = None,
        hyper_fraction: float = DEFAULT_HYPER_FRACTION,
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
        self.metric = resolve_metric(metric, loss_fn, self.loss_fn)
        self.task_kind = task_kind or infer_task_kind(self.loss_fn)
        self.train_loader = _on_device(train_loader, self.device)
        self.val_loader = _on_device(val_loader, self.device)
        # Decisions never see the split the results are scored on (val_loader): a method that decides
        # from validation signals gets hyper_loader, or a seeded fraction carved out of the training data.
        self.train_loader, self.hyper_loader, self.decision_split = _decision_split(
            method, method_options, safety_net, self.train_loader, self.val_loader,
            None if hyper_loader is None else _on_device(hyper_loader, self.device), hyper_fraction, seed,
        )  # fmt: skip
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
            val_loader=self._decision_loader,
            seed=seed,
            device=self.device,
            param_groups=param_groups,
            metric=self.metric,
            trial_runner=self._trial,
            data_pass=self.train_pass,
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

        # Checkpoints, rollbacks and optimizer resets (shared with lrpilot.integrations).
        self._state = TrainingState(self.model, self.optimizer, self.parts.extra_state)
        self.history = History(metric_name=self.metric.name, higher_is_better=self.metric.higher_is_better)
        self.history.info["decision_split"] = dict(self.decision_split)
        self.epoch = 0  # epochs trained (the budget counter)
        self.step = 0  # optimizer steps taken
        self._wall_s = 0.0
        self._train_s = 0.0
        # CPU seconds of this thread over the same spans as _train_s: unlike wall seconds, other
        # processes sharing the machine do not inflate them (the bench's overhead column uses them).
        self._train_cpu_s = 0.0
        self._began = False
        self._stopped = False
        self._val_cursor = 0  # validation batches handed to step-level pilots so far
        self._val_iter: Iterator[Any] | None = None
        self._data_checked = False
        self._extra_eval_names: tuple[str, ...] = ()  # recorded as nan when the weights are not finite
        self._restored_by: str | None = None  # the reason of a restore in the last epoch trained, if any

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
        with rng_preserved(self.train_loader, self.val_loader):
            trainer = Trainer(
                copy.deepcopy(self.model),
                self.train_loader,
                self._decision_loader,  # a search selects on the decision split, never on the scored one
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
        return trainer

    def train_pass(self, fn: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Call ``fn(x, y)`` on every training batch, the model in evaluation mode, without gradients,
        leaving the training order and every random source as they were
        (:data:`~lrpilot.core.contract.TrainPass`; the :data:`~lrpilot.core.contract.TRAIN_PASS` signal)."""
        train_pass(self.model, self.train_loader, fn, device=self.device)

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
                "extra_state": self._state.extra_state_dict(),
                "rng": capture_rng(),
                "epoch": self.epoch,
                "step": self.step,
                "wall_s": self._wall_s,
                "train_s": self._train_s,
                "train_cpu_s": self._train_cpu_s,
                "began": self._began,
                "stopped": self._stopped,
                "restored_by": self._restored_by,
                "val_cursor": self._val_cursor,
                "extra_eval_names": self._extra_eval_names,
                "checkpoints": self._state.checkpoints,
                "initial_optimizer": self._state.initial_optimizer_state,
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
        self._state.load_extra_state(state.get("extra_state", {}))
        self.epoch, self.step = state["epoch"], state["step"]
        self._wall_s, self._train_s = state["wall_s"], state["train_s"]
        self._train_cpu_s = state.get("train_cpu_s", 0.0)
        self._began, self._stopped = state["began"], state["stopped"]
        self._restored_by = state.get("restored_by")
        self._val_cursor = state["val_cursor"]
        self._val_iter = None
        self._extra_eval_names = tuple(state.get("extra_eval_names", ()))
        self._state.checkpoints = state["checkpoints"]
        self._state.initial_optimizer_state = state["initial_optimizer"]
        self.history = state["history"]
        restore_rng(state["rng"])

    # ------------------------------------------------------------------------------------------------
    # one epoch
    # ------------------------------------------------------------------------------------------------
    def _begin(self) -> None:
        self._began = True
        t0, c0 = time.perf_counter(), time.thread_time()
        val_loss, val_metric = self.evaluate()
        evals = self._run_extra_eval()
        eval_s, eval_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        self.history.info["initial"] = {"val_loss": val_loss, "val_metric": val_metric, **evals}
        if self.pilot is not None:
            extra = self._extra_signals()
            decision_loss, decision_metric = self._decision_metrics(val_loss, val_metric)
            signals = EpochSignals(
                epoch=0, step=0, lr=self.parts.lrs(), train_loss=math.nan,
                val_loss=decision_loss, val_metric=decision_metric, extra=extra,
            )
            for decision in as_decisions(self.pilot.on_train_begin(signals)):
                self._apply(decision)
        spent = time.perf_counter() - t0
        self._wall_s += spent
        self._train_s += spent - eval_s
        self._train_cpu_s += time.thread_time() - c0 - eval_cpu_s
        if self._lr_per_step:
            self.history.record_step_lr(0, self.parts.lrs())

    def _end(self) -> None:
        decisions = as_decisions(self.pilot.on_train_end()) if self.pilot is not None else []
        for decision in decisions:
            self._apply(decision)
        restored = [d.reason for d in decisions if d.restore is not None]
        if not restored and self._restored_by is not None:
            restored = [self._restored_by]  # the last epoch was rolled back: its checkpoint is the result
        if restored:
            val_loss, val_metric = self.evaluate()
            evals = self._run_extra_eval()
            self.history.final = {"val_loss": val_loss, "val_metric": val_metric, **evals, "reason": restored[-1]}

    def _run_epoch(self) -> EpochRecord:
        t0, c0 = time.perf_counter(), time.thread_time()
        train_loss, nonfinite, lr_in_force = self._train_one_epoch()
        self.epoch += 1
        t_train, c_train = time.perf_counter(), time.thread_time()

        weights_finite = not dist.any_true(not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()))
        if weights_finite and not nonfinite:
            val_loss, val_metric = self.evaluate()
            evals = self._run_extra_eval()
        else:
            nonfinite = True
            val_loss, val_metric = math.nan, math.nan
            evals = {name: math.nan for name in self._extra_eval_names}
        t_eval, c_eval = time.perf_counter(), time.thread_time()

        decisions: list[Decision] = []
        extra: dict[str, Any] = {}
        if self.pilot is not None:
            extra = self._extra_signals() if not nonfinite else {name: math.nan for name in self.pilot.needs}
            decision_loss, decision_metric = self._decision_metrics(val_loss, val_metric, nonfinite=nonfinite)
            signals = EpochSignals(
                epoch=self.epoch, step=self.step, lr=lr_in_force, train_loss=train_loss,
                val_loss=decision_loss, val_metric=decision_metric, nonfinite=nonfinite, extra=extra,
            )
            decisions = as_decisions(self.pilot.on_epoch_end(signals))
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
        # A rollback in the budget's last epoch leaves the restored weights as the run's result: _end
        # evaluates them as the final state (else the record's final would be the bad epoch's nan).
        self._restored_by = next((d.reason for d in reversed(decisions) if d.restore is not None), None)
        t_end, c_end = time.perf_counter(), time.thread_time()
        self._wall_s += t_end - t0
        self._train_s += (t_train - t0) + (t_end - t_eval)
        self._train_cpu_s += (c_train - c0) + (c_end - c_eval)
        record.wall_s, record.train_s, record.train_cpu_s = self._wall_s, self._train_s, self._train_cpu_s
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
        """Mini-batches of the decision split for step signals, from the ``start``-th one on."""
        loader = self._decision_loader
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

    @property
    def _decision_loader(self) -> Any:
        """Where the method's validation signals come from: the decision split, else ``val_loader``."""
        return self.hyper_loader if self.hyper_loader is not None else self.val_loader

    def _decision_metrics(self, val_loss: float, val_metric: float, *, nonfinite: bool = False) -> tuple[float, float]:
        """The loss and metric a pilot's :class:`EpochSignals` carry as ``val_loss``/``val_metric``: on the
        decision split (timed as training: the method pays for it), ``nan`` for a registry method that
        declared it decides from no validation signal, or the scored ones for a user's own pilot."""
        source = self.decision_split["source"]
        if source == "val":
            return val_loss, val_metric
        if source == "none" or nonfinite:
            return math.nan, math.nan
        return self.evaluate(self.hyper_loader)

    def _extra_signals(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        needs = self.pilot.needs if self.pilot is not None else frozenset()
        for name in needs:
            if name == TRAIN_EVAL_LOSS:
                # A shuffling DataLoader would draw its order: leave the training order as it was.
                with rng_preserved(self.train_loader):
                    extra[name] = self.evaluate(self.train_loader, transform=True)[0]
            elif name == TRAIN_PASS:
                extra[name] = self.train_pass
            elif name == PROBE:
                extra[name] = probe_signal(self.pilot, self.model, device=self.device, eval_context=self._eval_context)
            else:
                raise ValueError(f"pilot {type(self.pilot).__name__} needs signal {name!r}, which the loop does not provide")
        return extra

    # ------------------------------------------------------------------------------------------------
    # decisions, checkpoints
    # ------------------------------------------------------------------------------------------------
    @property
    def _checkpoints(self) -> dict[str, dict[str, Any]]:
        return self._state.checkpoints

    def _apply(self, decision: Decision) -> None:
        self._state.apply(decision)
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
    method: str | Pilot | torch.optim.Optimizer | MethodParts = "auto",
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
    hyper_loader: Any = None,
    hyper_fraction: float = DEFAULT_HYPER_FRACTION,
    **method_options: Any,
) -> History:
    """Train ``model`` with ``method`` (default ``"auto"``, lrpilot's own autopilot) for ``epochs`` and
    return its :class:`History`.

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
        hyper_loader=hyper_loader,
        hyper_fraction=hyper_fraction,
    )
    return trainer.run()


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def resolve_metric(metric: Metric | str | None, user_loss: Any, loss_fn: Any) -> Metric:
    """The metric as given (a :class:`Metric` or a name), else accuracy with the default loss, else the loss itself."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return get_metric(metric)
    if metric is not None:
        raise TypeError(f"metric must be a Metric or a name, got {type(metric).__name__}")
    return get_metric("accuracy") if user_loss is None else loss_metric(loss_fn)


def train_pass(
    model: nn.Module, loader: Any, fn: Callable[[torch.Tensor, torch.Tensor], None], *, device: torch.device | None
) -> None:
    """The :data:`~lrpilot.core.contract.TrainPass` over ``loader``: ``fn(x, y)`` on every batch, ``model``
    in evaluation mode, no gradients, every random source (a DataLoader's own generator included) as it was."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), rng_preserved(loader):
            for batch in loader:
                x, y = split_batch(batch, where="train_loader")
                if device is not None:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                fn(x, y)
    finally:
        model.train(was_training)


def _decision_split(
    method: Any,
    options: Mapping[str, Any] | None,
    safety_net: Any,
    train_loader: Any,
    val_loader: Any,
    hyper_loader: Any,
    fraction: float,
    seed: int,
) -> tuple[Any, Any, dict[str, Any]]:
    """``(train_loader, decision loader or None, record)``: where the method's decisions read validation
    signals, and what the run record says about it (``info.decision_split``)."""
    require_range("hyper_fraction", fraction, 0.0, 1.0, open_high=True)
    if hyper_loader is not None:
        return train_loader, hyper_loader, {"source": "given"}
    if not isinstance(method, str) and not safety_net:
        # A pilot the user built sees the validation loader it was given; hyper_loader= holds data out.
        return train_loader, None, {"source": "val"}
    needs = bool(safety_net) or needs_decision_split(get_method(method), dict(options or {}))
    if not needs:
        return train_loader, None, {"source": "none"}
    if fraction == 0:
        return train_loader, None, {"source": "val"}
    try:
        rest, held = carve(train_loader, fraction, seed + 104_729)  # a stream of its own
    except TypeError as err:
        raise ValueError(
            f"this method decides from validation signals, and {err}: pass hyper_loader= (data no result is "
            f"scored on), or hyper_fraction=0 to let it decide from val_loader (its validation results are "
            f"then not held out)"
        ) from None
    return rest, held, {"source": "train", "fraction": fraction, "samples": num_samples(held)}


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
