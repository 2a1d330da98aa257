"""Any registry method in a ``lightning.Trainer``: the :class:`LRPilot` callback.

::

    from lrpilot.integrations.lightning import LRPilot

    trainer = lightning.Trainer(max_epochs=30, callbacks=[LRPilot("aalr")])
    trainer.fit(module, train_loader, val_loader)

The callback drives an :class:`~lrpilot.integrations.own_loop.AttachedPilot` (the same code
``lrpilot.attach`` gives a hand-written loop, which carries out decisions with the loop's
:class:`~lrpilot.loop.decisions.TrainingState`):

* **optimizer**: at ``on_fit_start`` it builds the method's optimizer through the registry and puts it
  in the Trainer's place of the one ``configure_optimizers`` returned (the module may return none);
  with ``use_module_optimizer=True`` an epoch-level method (AALR, MI decay, Lipschitz) drives the LR of
  the module's own optimizer instead. The Trainer then saves and restores that optimizer in its
  checkpoints as usual.
* **signals**: every training step's loss (``on_train_batch_end``); at each training epoch's end the
  validation loss and metric (evaluated with ``loss_fn``/``metric`` on the validation dataloader, as
  ``lrpilot.fit`` does, or read from what the module logged with ``val_loss_key``/``val_metric_key``),
  and the extra signals the pilot asks for (the loss over the training dataloader, MI decay's probe).
  Validation runs inside the method's ``eval_context``.
* **decisions**: LR changes, checkpoints and rollbacks of the LightningModule's weights, the optimizer,
  the method's extra state and the RNG (in memory), and stop (``trainer.should_stop``). Every LR (per
  step) and every decision with its reason are logged through the Trainer's loggers (metric names
  ``lrpilot/lr``, ``lrpilot/decision/<action>/<reason>`` with the LR after it as the value), and kept in
  :attr:`LRPilot.history`.
* **state**: ``state_dict``/``load_state_dict`` carry the pilot's state, its checkpoints and telemetry
  in Lightning checkpoints, so ``trainer.fit(..., ckpt_path=..., weights_only=False)`` continues
  identically (the state holds NumPy RNG states and plain Python objects, which torch's
  ``weights_only`` loading refuses; load only checkpoints you trust, as with any pickle). Save
  checkpoints at the end of training epochs (``ModelCheckpoint(save_on_train_epoch_end=True)``): a
  checkpoint taken after validation but before the epoch's end misses that epoch's decision.
* **non-finite losses**: a step whose gradients are not finite is not applied (its gradients are
  dropped) and, as in the loop, the rest of the epoch's steps neither; the pilot sees ``nonfinite``
  and rolls back or the run stops.
* **DDP**: losses and validation numbers are reduced over ranks before the pilot sees them, and the
  gradients are DDP's average, so every rank takes the same decisions.

Methods whose optimizer needs a closure with the loss's graph (``rt-hpo``) or validation mini-batches
at every step (``hd-val``) cannot run under Lightning's automatic optimization: the callback says so at
``on_fit_start`` and points to ``lrpilot.attach``, which gives them both in a loop of your own.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lrpilot.core import distributed as dist
from lrpilot.core.contract import MethodParts
from lrpilot.core.registry import get_method
from lrpilot.core.seeding import seed_everything
from lrpilot.integrations.own_loop import AttachedPilot, build_parts, check_signals
from lrpilot.loop.fit import infer_task_kind, resolve_metric
from lrpilot.loop.history import History
from lrpilot.loop.metrics import Metric

__all__ = ["LRPilot"]

log = logging.getLogger("lrpilot")

try:  # Lightning is an optional extra: pip install 'lrpilot[lightning]'
    import lightning as _lightning
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    _lightning = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None


def _require_lightning() -> Any:
    if _lightning is None:
        raise ImportError(
            "lrpilot.integrations.lightning needs the package 'lightning', which is not installed: "
            "pip install 'lrpilot[lightning]'"
        ) from _IMPORT_ERROR
    return _lightning


_Callback: type = _lightning.pytorch.Callback if _lightning is not None else object


class LRPilot(_Callback):  # type: ignore[misc, valid-type]
    """A ``lightning.Callback`` that runs registry method ``method`` (``lrpilot list methods``).

    Args:
        method: the registry name.
        loss_fn: the training loss, for the signals the callback computes itself (the loss over the
            training set for AALR, the validation loss); default cross-entropy.
        metric: a :class:`~lrpilot.loop.metrics.Metric` or its name for the validation metric (default:
            accuracy with the default loss, else the loss).
        val_loss_key, val_metric_key: read the validation loss/metric from what the module logged
            (``trainer.callback_metrics``) instead of evaluating the validation dataloader again.
        seed: seed Python, NumPy and torch before the method is built, as ``lrpilot.fit`` does
            (default: leave them alone; the method's own seeds are then 0).
        use_module_optimizer: let an epoch-level method drive the optimizer ``configure_optimizers``
            returns instead of building its own (the method's optimizer options are then ignored).
        param_groups: explicit param groups for the method's optimizer.
        task_kind: ``classification``/``binary``/``regression`` (default: from ``loss_fn``).
        log_lr: log the LR of every param group after every step (``lrpilot/lr``, ``lrpilot/lr/<i>``).
        options: the method's options.

    Attributes:
        pilot: the :class:`~lrpilot.integrations.own_loop.AttachedPilot` once training starts.
        history: its telemetry (per-epoch LRs, every decision with its reason).
    """

    def __init__(
        self,
        method: str = "aalr",
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric: Metric | str | None = None,
        val_loss_key: str | None = None,
        val_metric_key: str | None = None,
        seed: int | None = None,
        use_module_optimizer: bool = False,
        param_groups: list[dict[str, Any]] | None = None,
        task_kind: str | None = None,
        log_lr: bool = True,
        **options: Any,
    ) -> None:
        _require_lightning()
        super().__init__()
        info = get_method(method)  # an unknown name fails here, with the valid ones
        unknown = sorted(set(options) - set(info.defaults))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
                f"valid options: {', '.join(info.defaults) or '(none)'}"
            )
        self.method = method
        self.options = dict(options)
        self.loss_fn = loss_fn if loss_fn is not None else torch.nn.CrossEntropyLoss()
        self.metric = resolve_metric(metric, loss_fn, self.loss_fn)
        self.task_kind = task_kind or infer_task_kind(self.loss_fn)
        self.val_loss_key = val_loss_key
        self.val_metric_key = val_metric_key
        self.seed = seed
        self.use_module_optimizer = use_module_optimizer
        self.param_groups = param_groups
        self.log_lr = log_lr
        self.pilot: AttachedPilot | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._eval_stack: contextlib.ExitStack | None = None
        self._logged_decisions = 0

    @property
    def state_key(self) -> str:
        return f"LRPilot[{self.method}]"

    @property
    def history(self) -> History:
        if self.pilot is None:
            raise RuntimeError("LRPilot has no history before training starts")
        return self.pilot.history

    # ------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        epochs = trainer.max_epochs
        if not (isinstance(epochs, int) and epochs > 0):
            raise ValueError(
                f"LRPilot plans with the budget in epochs: set lightning.Trainer(max_epochs=...) (got {epochs!r})"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "LRPilot counts one optimizer step per training batch: use accumulate_grad_batches=1 (a larger "
                "batch size does the same)"
            )
        if self.seed is not None:
            seed_everything(self.seed)
        trainer.fit_loop.setup_data()  # the training dataloader, before Lightning would load it
        steps = trainer.num_training_batches
        if not (isinstance(steps, int) and steps > 0):
            raise ValueError(f"LRPilot needs a finite number of training batches per epoch, got {steps!r}")
        own = None
        if self.use_module_optimizer:
            if len(trainer.optimizers) != 1 or trainer.lr_scheduler_configs:
                raise ValueError(
                    "LRPilot(use_module_optimizer=True) drives one optimizer and no LR scheduler: return exactly "
                    "one optimizer from configure_optimizers"
                )
            own = trainer.optimizers[0]
        parts = build_parts(
            self.method, pl_module, optimizer=own, epochs=epochs, steps_per_epoch=steps, loss_fn=self.loss_fn,
            metric=self.metric, task_kind=self.task_kind, train_loader=trainer.train_dataloader, val_loader=None,
            seed=self.seed or 0, device=pl_module.device, param_groups=self.param_groups, options=self.options,
            where="LRPilot",
        )  # fmt: skip
        _check_automatic_optimization(self.method, parts, pl_module)
        self.pilot = AttachedPilot(
            parts, pl_module, method_name=self.method, epochs=epochs, loss_fn=self.loss_fn, metric=self.metric,
            train_loader=trainer.train_dataloader, device=pl_module.device, where="LRPilot",
        )  # fmt: skip
        check_signals(self.pilot, "LRPilot")
        # The Trainer steps, saves and restores this optimizer from now on (Lightning restores optimizer
        # states after on_fit_start, so a resumed run gets it back).
        trainer.strategy.optimizers = [parts.optimizer]
        trainer.strategy.lr_scheduler_configs = []
        if self._pending_state is not None:
            self.pilot.load_state_dict(self._pending_state)
            self._pending_state = None
            self._logged_decisions = len(self.pilot.history.decisions)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        pilot = self._pilot()
        pilot.val_loader = _single(trainer.val_dataloaders)
        if not pilot.began:
            pilot.begin()
            self._log_decisions(trainer)

    # ------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.pilot is not None and self.pilot.parts.train_mode is not None:
            self.pilot.parts.train_mode()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Drop a non-finite gradient (and every later one of the epoch, as the loop ends the epoch)."""
        pilot = self._pilot()
        grads = [p.grad for g in pilot.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if pilot.epoch_nonfinite or dist.any_true(not finite):
            for group in pilot.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None:
            return  # the module skipped the step
        pilot = self._pilot()
        pilot.step(loss, batch_size=_batch_size(batch))
        if self.log_lr:
            lrs = pilot.parts.lrs()
            values = {"lrpilot/lr": lrs[0]}
            if len(lrs) > 1:
                values.update({f"lrpilot/lr/{i}": v for i, v in enumerate(lrs)})
            for name, value in values.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False)

    # ------------------------------------------------------------------------------------------------
    # evaluation, epoch ends
    # ------------------------------------------------------------------------------------------------
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.pilot is not None and self.pilot.parts.eval_context is not None:
            self._eval_stack = contextlib.ExitStack()
            self._eval_stack.enter_context(self.pilot.eval_context())

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._eval_stack is not None:
            self._eval_stack.close()
            self._eval_stack = None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        pilot = self._pilot()
        if pilot.finished:
            return
        pilot.val_loader = _single(trainer.val_dataloaders)
        val_loss = _logged(trainer, self.val_loss_key)
        val_metric = _logged(trainer, self.val_metric_key)
        pilot.end_epoch(val_metric, val_loss=val_loss)
        self._log_decisions(trainer)
        if pilot.stopped:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.pilot is not None and not self.pilot.finished and self.pilot.began:
            self.pilot.finish()  # the run ended before the budget (another callback, max_steps)
            self._log_decisions(trainer)

    # ------------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.pilot is None:
            return dict(self._pending_state or {})
        return self.pilot.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning loads callback states before on_fit_start builds the method: keep it until then.
        self._pending_state = dict(state_dict)
        if self.pilot is not None:
            self.pilot.load_state_dict(self._pending_state)
            self._pending_state = None

    # ------------------------------------------------------------------------------------------------
    def _pilot(self) -> AttachedPilot:
        if self.pilot is None:
            raise RuntimeError("LRPilot was not set up: it builds the method in on_fit_start (trainer.fit)")
        return self.pilot

    def _log_decisions(self, trainer: Any) -> None:
        decisions = self._pilot().history.decisions
        new, self._logged_decisions = decisions[self._logged_decisions:], len(decisions)
        for record in new:
            metrics = {f"lrpilot/decision/{record.action}/{record.reason}": float(record.lr[0]) if record.lr else math.nan}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def _check_automatic_optimization(method: str, parts: MethodParts, pl_module: Any) -> None:
    if parts.needs_closure or parts.step_kwargs:
        what = "a closure with the loss's graph (for Hessian-vector products)" if parts.needs_closure else (
            f"step signals {sorted(parts.step_kwargs)} (validation mini-batches)")
        raise ValueError(
            f"method {method!r} needs {what} at every optimizer step, which Lightning's optimizer step does not "
            f"pass. Train it with lrpilot.fit, or with lrpilot.attach in a loop of your own "
            f"(optimizer.step(closure, **pilot.step_kwargs())); under Lightning, pick a method without them "
            f"(e.g. hd-train)."
        )
    if not getattr(pl_module, "automatic_optimization", True):
        raise ValueError(
            "LRPilot feeds the pilot from Lightning's automatic optimization; with manual optimization use "
            "lrpilot.attach inside training_step instead"
        )


def _single(loaders: Any) -> Any:
    """The one validation dataloader (Lightning gives a list when there are several: the first)."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _logged(trainer: Any, key: str | None) -> float | None:
    if key is None:
        return None
    value = trainer.callback_metrics.get(key)
    if value is None:
        raise KeyError(
            f"LRPilot reads {key!r} from the module's logged metrics, which has none (logged: "
            f"{sorted(trainer.callback_metrics)}); log it in validation_step or drop the key"
        )
    return float(value)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return len(batch[1])
    return None
