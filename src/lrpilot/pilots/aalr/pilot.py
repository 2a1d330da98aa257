"""AALR: automated adaptive LR tuning by optimistic binary exploration with checkpoint rollback.

The paper (``shared/papers/001_a4e9763b494f3f8e.txt``, "A simple dynamic learning rate tuning
algorithm for automated training of DNNs", Algorithm 1) sets the LR once per epoch from one number,
the training loss J(theta), compared with the best loss L* seen so far:

* **Phase 1, initial LR exploration.** Start at eta_0 (0.1) with patience 10. After every epoch, a
  loss worse than L* (or non-finite) halves the LR and restarts from the *initial* model with a fresh
  optimizer; a loss no worse than L* becomes L*. After 10 epochs in a row without a restart, save a
  checkpoint (theta, L*) and go to phase 2.
* **Phase 2, optimistic binary exploration.** Double the LR, patience p = 1. Train a trial of p
  epochs, then compare: non-finite -> reload the checkpoint, halve the LR, double p; better than L*
  -> new checkpoint, double the LR, p = 1; otherwise train a second trial of p epochs at the same LR,
  and if that one does not improve either, halve the LR and double p (no rollback).

:class:`AALR` is that state machine as an epoch-level :class:`~lrpilot.core.contract.Pilot`: it never
trains, it asks the loop to checkpoint, roll back, reset the optimizer and set the LR, always with a
reason (:data:`REASONS`). ``docs/methods/aalr.md`` explains every choice below and gives the figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lrpilot.core.checks import require_bool, require_in, require_int
from lrpilot.core.contract import TRAIN_EVAL_LOSS, Decision, EpochSignals, Pilot, current_lrs
from lrpilot.core.rollback import Rollback

__all__ = ["AALR", "BEST_TAG", "INITIAL_TAG", "REASONS"]

#: Checkpoint tags: the initial model (phase 1 restarts from it) and the algorithm's checkpoint
#: (theta and L* saved at the end of phase 1 and at every phase-2 improvement).
INITIAL_TAG = "aalr-initial"
BEST_TAG = "aalr-best"

#: Every reason an AALR decision can carry.
REASONS = (
    "aalr-start",  # before training: J(theta_0) measured, the initial model saved
    "phase1-improved",  # phase 1: L <= L*, L* <- L, keep going
    "phase1-worse",  # phase 1: L > L*: halve, restart from the initial model, fresh optimizer
    "phase1-nan",  # phase 1: non-finite loss: same as phase1-worse
    "phase1-done",  # phase 1: `patience` epochs in a row without a restart: checkpoint, double the LR
    "phase2-improved",  # phase 2: L < L*: checkpoint, double the LR, p <- 1
    "phase2-second-trial",  # phase 2: first trial did not improve: train another trial at this LR
    "phase2-halve",  # phase 2: second trial did not improve either: halve the LR, p <- 2p
    "nan-rollback",  # phase 2: non-finite loss: reload the checkpoint, halve the LR, p <- 2p
    "restore-best",  # end of the budget: the model in hand is replaced by the checkpoint
    "keep-last",  # end of the budget, mid-trial: the model in hand has a lower J than the checkpoint
)

OBJECTIVES = ("train-eval", "train-mean", "val")
TRIAL_LENGTHS = ("p", "p+1")
ROLLBACK_OPTIMIZER = ("reset", "checkpoint")

#: Version of :meth:`AALR.state_dict`.
STATE_FORMAT = 1


class AALR(Pilot):
    r"""AALR (Algorithm 1): optimistic LR doubling, patient halving, rollback on divergence.

    With :math:`J(\theta)` the loss compared (by default the training-set loss of the current model)
    and :math:`L^*` the best one kept, after each *trial* (phase 1: one epoch; phase 2: ``p`` epochs,
    or ``p + 1`` with ``trial_length="p+1"``):

    .. math::

        \text{phase 1: }
        \begin{cases}
          L > L^* \text{ or } L \notin \mathbb{R}: & \eta \leftarrow \eta/2,\ \theta \leftarrow \theta_0,
              \text{ fresh optimizer},\ i \leftarrow 0,\ L^* \leftarrow J(\theta_0) \\
          \text{otherwise}: & L^* \leftarrow L,\ i \leftarrow i + 1;\ i = p_1 \Rightarrow
              \text{checkpoint},\ \eta \leftarrow 2\eta,\ p \leftarrow 1
        \end{cases}

        \text{phase 2: }
        \begin{cases}
          L \notin \mathbb{R}: & \theta \leftarrow \text{checkpoint},\ \eta \leftarrow \eta/2,\ p \leftarrow 2p \\
          L < L^*: & L^* \leftarrow L,\ \text{checkpoint},\ \eta \leftarrow 2\eta,\ p \leftarrow 1 \\
          \text{first trial}: & \text{train a second trial at } \eta \\
          \text{second trial}: & \eta \leftarrow \eta/2,\ p \leftarrow 2p
        \end{cases}

    :math:`\eta` is every param group's LR (each group keeps its ratio to the others); :math:`\eta_0` is
    the LR the optimizer holds when training begins. A non-finite training loss in the middle of a trial
    ends the trial at once (the loop cannot train on non-finite weights) and counts as a non-finite J.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its LR when training starts is :math:`\eta_0`
            (the paper: SGD, momentum 0.9, :math:`\eta_0 = 0.1`).
        patience: phase 1's patience :math:`p_1`, in epochs (default 10, the paper's).
        trial_length: ``"p"`` (default: the pseudocode, "train for p epochs") or ``"p+1"`` (the prose
            and section 4's epoch counts).
        objective: what J is: ``"train-eval"`` (default here, the paper's: the loss over the training
            set of the current model, in evaluation mode, one extra forward pass over the training data per
            trial), ``"train-mean"`` (the running mean of the epoch's mini-batch losses; free, noisy and
            biased towards the start of the epoch, and as good over 3 seeds on MNIST-1D MLP and CNN: the
            registry method ``aalr`` uses it by default, ``docs/methods/aalr.md``) or ``"val"`` (the
            validation loss of the decision split the loop carves for it, never the scored one). :math:`J(\theta_0)` is a training-set pass
            before training for both ``train-*`` objectives.
        phase1_reset_best: on a phase-1 restart, reset :math:`L^*` to :math:`J(\theta_0)` (default
            ``True``). ``False`` is the pseudocode read literally, which keeps the best loss of the
            discarded run and, on our tasks, halves the LR every epoch until it is useless.
        rollback_optimizer: on a phase-2 rollback, ``"reset"`` (default: the pseudocode, "Reset
            optimizer with LR") clears the optimizer's state; ``"checkpoint"`` (the prose) restores the
            optimizer state saved with the checkpoint.
        restore_best: when the budget is spent, replace the model in hand with the checkpoint if it
            moved since, unless its own J is known and lower (default ``True``; the run record keeps the
            last epoch's metrics and the restored model's under ``final``). During phase 1 the
            checkpoint is then also updated to the lowest-J model seen, so that a budget ending in
            phase 1 returns it rather than a restarted model.
        epochs: the run's budget, if known (the registry passes it): J is then also measured after the
            last epoch, so that a budget ending mid-trial keeps a model better than the checkpoint.

    Example:
        >>> import torch, lrpilot
        >>> from lrpilot.core.data import TensorLoader
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> model = torch.nn.Linear(4, 3)
        >>> pilot = lrpilot.AALR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), patience=2)
        >>> hist = lrpilot.fit(model, TensorLoader(x, y, 16), TensorLoader(x, y, 64, shuffle=False),
        ...                    method=pilot, epochs=5, progress=False)
        >>> [d.reason for d in hist.decisions][:3]
        ['aalr-start', 'phase1-improved', 'phase1-done']

    References:
        Algorithm 1, sections 2 and 4 of ``shared/papers/001_a4e9763b494f3f8e.txt`` (ICLR 2020
        submission, anonymous).

    Note:
        Deviations from the pseudocode, each an option except the last: phase 1 resets :math:`L^*` on a
        restart (``phase1_reset_best``); the model in hand at the end is the checkpoint
        (``restore_best``; the paper reports peak accuracy and says nothing of the end); a non-finite
        loss ends a trial early instead of training on non-finite weights for the rest of it.
    """

    handles_nonfinite = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        patience: int = 10,
        trial_length: str = "p",
        objective: str = "train-eval",
        phase1_reset_best: bool = True,
        rollback_optimizer: str = "reset",
        restore_best: bool = True,
        epochs: int | None = None,
    ) -> None:
        super().__init__(optimizer)
        # Messages name the registry method: the registry builds this class with the user's options as they are.
        require_int("patience", patience, minimum=1, method="aalr")
        require_in("trial_length", trial_length, TRIAL_LENGTHS, method="aalr")
        require_in("objective", objective, OBJECTIVES, method="aalr")
        require_in("rollback_optimizer", rollback_optimizer, ROLLBACK_OPTIMIZER, method="aalr")
        if epochs is not None:
            require_int("epochs", epochs, minimum=1, method="aalr")
        require_bool("phase1_reset_best", phase1_reset_best, method="aalr")
        require_bool("restore_best", restore_best, method="aalr")
        # Configuration.
        self.patience1 = patience
        self.trial_length = trial_length
        self.objective = objective
        self.phase1_reset_best = phase1_reset_best
        self.rollback_optimizer = rollback_optimizer
        self.restore_best = restore_best
        self.epochs = epochs
        # Algorithm state (all plain Python values: the default state_dict round trip is exact).
        self.started = False
        self.phase = 1
        self.lr: tuple[float, ...] = current_lrs(optimizer)  # eta, per param group
        self.initial_loss = math.nan  # J(theta_0)
        self.best_loss = math.nan  # L*
        self.patience = patience  # p: phase 1's, then phase 2's
        self.counter = 0  # i: phase-1 epochs since the last restart
        self.trial = 1  # phase 2: first or second trial at the current LR
        self.trial_epochs = 0  # phase 2: epochs trained in the current trial
        self.has_checkpoint = False
        self.checkpoint_loss = math.nan  # J of the model under BEST_TAG (L* once phase 2 has begun)
        self.epochs_since_checkpoint = 0  # epochs the model has moved away from the checkpoint
        self.epoch = 0  # epochs seen (the loop's budget counter)
        self.loss_in_hand: float | None = None  # J of the model in hand, when known
        # Lines 19-23: a non-finite trial reloads the checkpoint and halves the LR, as often as it happens.
        self.rollback = Rollback(BEST_TAG, factor=0.5)

    # -- signals -----------------------------------------------------------------------------------
    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """Ask the loop for the training-set pass only when the coming epoch end compares J.

        The loop reads ``needs`` before every epoch end, so phase 2's mid-trial epochs cost nothing;
        the pass does not touch the weights or the RNG, so asking less often changes no decision.
        """
        if self.objective == "val":
            return frozenset()
        if not self.started:
            return frozenset({TRAIN_EVAL_LOSS})  # J(theta_0) for L*, for both training objectives
        if self.objective == "train-mean":
            return frozenset()
        if self.phase == 1 or self.trial_epochs + 1 >= self._trial_len():
            return frozenset({TRAIN_EVAL_LOSS})
        if self.epochs is not None and self.epoch + 1 >= self.epochs and self.restore_best:
            return frozenset({TRAIN_EVAL_LOSS})  # the last epoch: is the model in hand better than the checkpoint
        return frozenset()

    def _trial_len(self) -> int:
        return self.patience + (1 if self.trial_length == "p+1" else 0)

    def _loss(self, signals: EpochSignals) -> float | None:
        """J of the epoch's model; ``None`` when it was not measured (mid-trial, default objective)."""
        if signals.nonfinite:
            return math.nan
        if self.objective == "val":
            return float(signals.val_loss)
        if self.objective == "train-mean":
            return float(signals.train_loss)
        if TRAIN_EVAL_LOSS not in signals.extra:
            return None
        return float(signals[TRAIN_EVAL_LOSS])

    # -- hooks -------------------------------------------------------------------------------------
    def on_train_begin(self, signals: EpochSignals) -> Decision:  # type: ignore[override]
        """Line 1: L* <- J(theta_0); the initial model is saved for phase 1's restarts."""
        if self.objective == "val":
            initial = float(signals.val_loss)
        else:
            initial = float(signals[TRAIN_EVAL_LOSS])
        if not math.isfinite(initial):
            raise ValueError(
                f"AALR needs a finite loss of the initial model to compare against, got J(theta_0) = {initial} "
                f"(objective {self.objective!r}); check the model's initialisation and the data"
            )
        self.started = True
        self.lr = tuple(float(v) for v in signals.lr)
        self.initial_loss = self.best_loss = initial
        return Decision(reason="aalr-start", save=INITIAL_TAG, info=self._info(initial))

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        if not self.started:
            raise RuntimeError("AALR.on_epoch_end before on_train_begin: drive it with lrpilot.fit or Trainer")
        self.epoch = signals.epoch
        self.epochs_since_checkpoint += 1
        loss = self._loss(signals)
        self.loss_in_hand = loss
        if self.phase == 1:
            return self._phase1(self._required(loss))
        self.trial_epochs += 1
        if signals.nonfinite:
            return self._nan_rollback(math.nan)  # a trial cannot go on with non-finite weights
        if self.trial_epochs < self._trial_len():
            return None  # mid-trial: nothing is compared
        self.trial_epochs = 0
        return self._phase2(self._required(loss))

    def on_train_end(self) -> Decision | None:
        if not (self.restore_best and self.has_checkpoint and self.epochs_since_checkpoint > 0):
            return None
        info = {"loss": self.loss_in_hand, "best_loss": self.checkpoint_loss}
        if self.loss_in_hand is not None and self.loss_in_hand < self.checkpoint_loss:
            return Decision(reason="keep-last", info=info)  # the budget ended mid-trial on a better model
        self.epochs_since_checkpoint = 0
        self.loss_in_hand = self.checkpoint_loss
        return Decision(reason="restore-best", restore=BEST_TAG, info=info)

    def _required(self, loss: float | None) -> float:
        if loss is None:
            raise RuntimeError(
                f"AALR needs signal {TRAIN_EVAL_LOSS!r} at this epoch: drive it through lrpilot.fit or Trainer"
            )
        return loss

    # -- phase 1: lines 2-15 -----------------------------------------------------------------------
    def _phase1(self, loss: float) -> Decision:
        self.counter += 1
        if not math.isfinite(loss) or loss > self.best_loss:
            reason = "phase1-worse" if math.isfinite(loss) else "phase1-nan"
            self.lr = tuple(v / 2 for v in self.lr)
            self.counter = 0
            if self.phase1_reset_best:
                self.best_loss = self.initial_loss
            self.loss_in_hand = self.initial_loss
            info = self._info(loss)
            return Decision(reason=reason, restore=INITIAL_TAG, reset_optimizer=True, lr=self.lr, info=info)
        self.best_loss = loss
        if self.counter < self.patience:
            save = None
            if self.restore_best and not (self.has_checkpoint and loss >= self.checkpoint_loss):
                # Not in Algorithm 1: keep the lowest-J model of phase 1, in case the budget ends
                # before phase 1 does (a later restart would otherwise leave nothing but theta_0).
                save = BEST_TAG
                self._saved(loss)
            return Decision(reason="phase1-improved", save=save, info=self._info(loss))
        # Lines 13-15: checkpoint (theta, L*), phase 2 at twice the LR with patience 1.
        self.phase, self.patience, self.trial, self.trial_epochs = 2, 1, 1, 0
        self.lr = tuple(2 * v for v in self.lr)
        self._saved(loss)
        return Decision(reason="phase1-done", save=BEST_TAG, lr=self.lr, info=self._info(loss))

    # -- phase 2: lines 16-41 ----------------------------------------------------------------------
    def _phase2(self, loss: float) -> Decision:
        if not math.isfinite(loss):
            return self._nan_rollback(loss)  # lines 19-23 (and 36-38 for a second trial)
        if loss < self.best_loss:  # lines 24-26 and 30-32
            self.best_loss = loss
            self.lr = tuple(2 * v for v in self.lr)
            self.patience, self.trial = 1, 1
            self._saved(loss)
            return Decision(reason="phase2-improved", save=BEST_TAG, lr=self.lr, info=self._info(loss))
        if self.trial == 1:  # lines 27-29: optimistic, one more trial at this LR
            self.trial = 2
            return Decision(reason="phase2-second-trial", info=self._info(loss))
        # Lines 33-35: halve, double the patience, carry on from the current weights.
        self.lr = tuple(v / 2 for v in self.lr)
        self.patience, self.trial = 2 * self.patience, 1
        return Decision(reason="phase2-halve", lr=self.lr, info=self._info(loss))

    def _nan_rollback(self, loss: float) -> Decision:
        self.lr = tuple(v * self.rollback.factor for v in self.lr)
        self.patience, self.trial, self.trial_epochs = 2 * self.patience, 1, 0
        self.epochs_since_checkpoint = 0
        self.loss_in_hand = self.checkpoint_loss
        return self.rollback.roll_back(
            "nan-rollback",
            lr=self.lr,
            reset_optimizer=self.rollback_optimizer == "reset",
            info=self._info(loss),
        )

    def _saved(self, loss: float) -> None:
        self.has_checkpoint = True
        self.checkpoint_loss = loss
        self.epochs_since_checkpoint = 0

    def _info(self, loss: float) -> dict[str, Any]:
        """What a decision compared, and the state it leaves (patience: of the next trial)."""
        return {"loss": loss, "best_loss": self.best_loss, "phase": self.phase, "patience": self.patience}

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        plain = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "rollback")}
        return {"format": STATE_FORMAT, **plain, "rollback": self.rollback.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        fmt = state.pop("format", STATE_FORMAT)
        if fmt != STATE_FORMAT:
            raise ValueError(f"AALR state format {fmt!r} is not {STATE_FORMAT}")
        unknown = set(state) - set(self.__dict__)
        if unknown:
            raise ValueError(f"AALR state has unknown keys {sorted(unknown)}")
        self.rollback.load_state_dict(state.pop("rollback", {}))
        self.__dict__.update(state)
        self.lr = tuple(self.lr)
