r"""LipschitzLR (Yedida & Saha): the learning rate as the inverse of a closed-form Lipschitz constant.

Four methods from ``shared/papers/003_8119a118a538bf06.txt`` (the math is in
:mod:`lrpilot.estimators.lipschitz`, the choices and measurements in ``docs/methods/lipschitz.md``):

* ``lipschitz`` (:class:`LipschitzPilot`, epoch level): SGD with :math:`\alpha = 1/L`. A model without a
  hidden layer is a classical model (linear, logistic, softmax regression): its LR is computed once,
  from the data, before training (the paper's section 7.1). A network's LR is recomputed after every
  epoch from that epoch's :math:`K_z` (collected by a forward hook, no extra pass) and
  :math:`\max\lVert w\rVert` (section 7.4); the first epoch's LR comes from a forward pass over the
  training data at initialisation, as the authors' code did, or is the paper's fixed value
  (``initial_lr``).
* ``adamo`` (:class:`AdaMo`, Algorithm 1), ``lipschitz-rmsprop`` (:class:`LipschitzRMSprop`, section 6.2)
  and ``auto-adam`` (:class:`AutoAdam`, Algorithm 3): torch optimizers whose step size is built from
  exponentially weighted averages of the Lipschitz constant of every mini-batch.

Divergence, which the paper warns about for the first epoch (section 8), is handled by rolling back:
every method checkpoints after each finite epoch; an epoch with a non-finite loss is undone and retried
with its LR times ``backoff`` (see :class:`LipschitzPilot` and :class:`LipschitzGuard`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrpilot.core import distributed as dist
from lrpilot.core.checks import is_number, require_in
from lrpilot.core.contract import TRAIN_EVAL_LOSS, TRAIN_PASS, Decision, EpochSignals, Pilot, TrainPass
from lrpilot.core.rollback import Rollback, check_backoff, exploded
from lrpilot.estimators.lipschitz import (
    BatchStats,
    LossSpec,
    PenultimateMonitor,
    find_head,
    has_hidden_layer,
    max_weight_norm,
)

__all__ = ["LastLayerLipschitz", "LipschitzPilot", "initial_loss"]

CHECKPOINT_TAG = "lipschitz-last-good"  # the checkpoint tag rollbacks return to (the guard's too)


# ====================================================================================================
# Where the per-batch constant comes from
# ====================================================================================================
@dataclass
class LastLayerLipschitz:
    """The loss's Lipschitz constant for the batch just forwarded, read from a :class:`PenultimateMonitor`.

    The step-level optimizers call it after the forward pass of every step. It gives the loss part only;
    the optimizers add the L2 term of their own ``weight_decay``.

    Args:
        monitor: the hook on the last layer.
        loss: the loss's closed form (:meth:`LossSpec.from_loss`).
        y_norm: for least squares, a bound on the targets' norm over a batch.
        form: least squares' sign, ``"paper"`` or ``"bound"``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> source = LastLayerLipschitz.for_model(net, torch.nn.CrossEntropyLoss())
        >>> _ = net(torch.ones(2, 4))
        >>> lipschitz, stats = source()
        >>> lipschitz == 2 * stats.k_z / (3 * 2)
        True
    """

    monitor: PenultimateMonitor
    loss: LossSpec
    y_norm: float = 0.0
    form: str = "paper"

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        loss_fn: Any,
        *,
        y_norm: float = 0.0,
        form: str = "paper",
        include_bias: bool = False,
        elementwise: bool = True,
    ) -> LastLayerLipschitz:
        """Hook ``model``'s last layer; ``elementwise=False`` skips what only Auto-Adam and RMSprop use."""
        head = find_head(model)
        spec = LossSpec.from_loss(loss_fn, head.out_features)
        monitor = PenultimateMonitor(
            model,
            head,
            include_bias=include_bias,
            elementwise=elementwise,
            outputs=spec.kind == "least_squares",
        )
        return cls(monitor, spec, y_norm, form)

    def __call__(self) -> tuple[float, BatchStats]:
        stats = self.monitor.last()
        return abs(
            self.loss.lipschitz(stats.k_z, stats.rows, k_a=stats.k_a, y_norm=self.y_norm, form=self.form)
        ), stats


def targets_norm(train_pass: TrainPass) -> float:
    """The largest Frobenius norm of a batch of targets (least squares' ``||y||``), from the loop's pass over
    the training data; reads targets only.

    Under torch.distributed a rank's batches are shards of the global ones: their squared norms are
    summed over ranks first.
    """
    squares: list[float] = []
    train_pass(lambda x, y: squares.append(float(y.detach().double().square().sum())))
    if dist.is_distributed():
        squares = dist.all_reduce_sum(squares)
    return math.sqrt(max(squares, default=0.0))


def initial_loss(signals: EpochSignals) -> float:
    """The yardstick of an explosion: the loss of the untrained model over the training set (the loop's
    ``train_eval_loss`` pass), so that the divergence test reads no validation data; a driver that does
    not provide it falls back to the validation loss it hands over."""
    return float(signals.extra.get(TRAIN_EVAL_LOSS, signals.val_loss))


def _safe_inverse(value: float) -> float | None:
    return 1.0 / value if math.isfinite(value) and value > 0 else None


# ====================================================================================================
# lipschitz: SGD with LR = 1/L (epoch-level pilot)
# ====================================================================================================
class LipschitzPilot(Pilot):
    r"""SGD with the LR set to :math:`1/L`, the closed-form Lipschitz constant of the loss (paper sections 4-7).

    .. math::
        \alpha_e = \frac{1}{L_e}, \qquad
        L_e = \underbrace{c_{\text{loss}}(K_z, m)}_{\text{e.g. } \frac{k-1}{km}K_z}
              + \lambda \max\lVert w\rVert

    **Networks** (``mode="network"``): :math:`K_z` is the largest Frobenius norm of a mini-batch's
    penultimate activations during epoch :math:`e-1` (a forward hook, no extra pass), ``m`` the batch
    size and :math:`\max\lVert w\rVert` the largest parameter-tensor norm at the end of epoch
    :math:`e-1`. The first epoch has no previous epoch: by default (``initial_lr=None``) its LR comes
    from a forward pass over the training data at initialisation in evaluation mode, which is what the
    authors' Keras code computed every epoch; ``initial_lr=x`` uses a fixed value instead (the paper's
    remedy for AdaMo and RMSprop, sections 7.3-8).

    **Classical models** (``mode="classical"``, a model with no hidden layer): the LR is computed once,
    before training, from the data (the model's input is its penultimate activation), counting the bias
    as a column of ones as the paper does; it never changes. Least squares uses the paper's estimate of
    the weight bound :math:`K` from the data (:func:`~lrpilot.estimators.lipschitz.estimate_weight_bound`).
    Feed full batches to reproduce the paper's full-batch gradient descent; the paper also scales each
    feature to sum to 1 first, which is data preparation (``lrpilot reproduce lipschitz`` does it).

    **Divergence.** After each good epoch the pilot asks the loop to checkpoint. An epoch with a
    non-finite loss, an exploded one (mean training loss above ``explode_factor`` times the untrained
    model's loss over the training set: no validation data is read), a collapsed one (every penultimate activation zero, so
    :math:`L = 0`) or one whose :math:`L` overflowed is rolled back and retried with the LR of the last
    good epoch times ``backoff`` (never the failed epoch's LR: after a collapse that is the huge
    :math:`1/L` of a dead network); a divergence after the first epoch also multiplies every later
    :math:`1/L` by ``backoff`` (it persists). After ``max_rollbacks`` rollbacks the run stops. This is
    our handling of the paper's section 8 warning, which only says to watch for large values.

    **The guard on conv nets** (network mode; ``docs/robustness-study.md``). :math:`1/L` bounds the
    gradient with respect to the head's weights, not the network's curvature, and it is proportional to
    :math:`m/K_z`: an LR that kills ReLUs lowers :math:`K_z` and raises the next LR, a positive feedback
    loop (``mnist1d-cnn``: :math:`1/L` from 1.9 to 11,325 after one dead epoch). Three options cut it,
    each ``None`` for the paper's form: ``stall_factor`` (an epoch whose mean training loss is above this
    multiple of the untrained model's, a classifier stuck at :math:`\ln k`, is rolled back),
    ``shrink_factor`` (an epoch whose :math:`K_z` fell below this multiple of the last good epoch's is
    rolled back as collapsed; :math:`K_z = 0` always is) and ``max_growth`` (the next LR is at most this
    multiple of the last good epoch's).

    Args:
        optimizer: an SGD optimizer over the model's parameters; its groups' ``weight_decay`` is the
            :math:`\lambda` of the L2 term.
        loss: the loss's closed form.
        mode: ``"network"``, ``"classical"`` or ``"auto"`` (classical when the model has no hidden layer).
        initial_lr: the first epoch's LR in network mode; ``None`` probes the data.
        constant: ``"paper"`` (:math:`1/L`) or ``"smoothness"`` (:math:`1/\beta`, the last layer's
            gradient-Lipschitz constant, the descent lemma's step; not in the paper).
        ls_form: least squares' sign: ``"paper"`` (``K_a - ||y||``, absolute value taken as in the
            authors' code) or ``"bound"`` (``+``).
        weight_bound: :math:`\max\lVert w\rVert` over ``"all"`` parameter tensors (the authors' code) or
            the ``"head"`` only (the layer the derivation is about).
        backoff: LR factor after a divergence, in (0, 1).
        max_rollbacks: rollbacks allowed before giving up; 0 turns the divergence handling off and with
            it the per-epoch checkpoint (a deep copy of the model and optimizer).
        explode_factor: an epoch whose mean training loss exceeds this multiple of the untrained model's
            loss over the training set also counts as diverged (a finite loss can still ruin
            the weights: at initialisation a classifier's loss is about ln k, the loss of a uniform
            guess); ``None`` only counts non-finite losses.
        stall_factor: network mode: an epoch whose mean training loss is above this multiple of the
            untrained model's counts as collapsed (``None``: off, the paper).
        shrink_factor: network mode: an epoch whose :math:`K_z` is below this multiple of the last good
            epoch's counts as collapsed (``None``: only :math:`K_z = 0`, the paper).
        max_growth: network mode: the LR of the next epoch is at most this multiple of the LR of the
            epoch that just succeeded (``None``: uncapped, the paper).

    Example:
        >>> import lrpilot
        >>> from lrpilot.core.data import TensorLoader
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> hist = lrpilot.fit(net, TensorLoader(x, y, 16), TensorLoader(x, y, 64, shuffle=False),
        ...                    method="lipschitz", epochs=2, progress=False)
        >>> [d.reason for d in hist.decisions]
        ['lipschitz-probe', 'lipschitz-epoch', 'lipschitz-epoch']

    References:
        Yedida & Saha, *LipschitzLR*, sections 4-5 (constants), 7.1-7.4 (protocols), 8 (warnings).
    """

    handles_nonfinite = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        loss: LossSpec,
        mode: str = "auto",
        initial_lr: float | None = None,
        constant: str = "paper",
        ls_form: str = "paper",
        weight_bound: str = "all",
        backoff: float = 0.1,
        max_rollbacks: int = 3,
        explode_factor: float | None = 10.0,
        stall_factor: float | None = None,
        shrink_factor: float | None = None,
        max_growth: float | None = None,
    ) -> None:
        super().__init__(optimizer)
        require_in("mode", mode, ("auto", "network", "classical"))
        require_in("constant", constant, ("paper", "smoothness"))
        require_in("ls_form", ls_form, ("paper", "bound"))
        require_in("weight_bound", weight_bound, ("all", "head"))
        if initial_lr is not None and not (is_number(initial_lr) and initial_lr > 0):
            raise ValueError(
                f"initial_lr must be None (probe the data) or a positive number, got {initial_lr!r}"
            )
        check_backoff(backoff, max_rollbacks, explode_factor)
        if stall_factor is not None and not (is_number(stall_factor) and stall_factor > 0):
            raise ValueError(f"stall_factor must be None (the paper) or a number > 0, got {stall_factor!r}")
        if shrink_factor is not None and not (is_number(shrink_factor) and 0 < shrink_factor < 1):
            raise ValueError(f"shrink_factor must be None (the paper) or in (0, 1), got {shrink_factor!r}")
        if max_growth is not None and not (is_number(max_growth) and max_growth >= 1):
            raise ValueError(f"max_growth must be None (the paper) or a number >= 1, got {max_growth!r}")
        self.stall_factor = None if stall_factor is None else float(stall_factor)
        self.shrink_factor = None if shrink_factor is None else float(shrink_factor)
        self.max_growth = None if max_growth is None else float(max_growth)
        self.loss = loss
        self.mode = mode
        self.initial_lr = None if initial_lr is None else float(initial_lr)
        self.constant = constant
        self.ls_form = ls_form
        self.weight_bound = weight_bound
        # Checkpoint after each good epoch; on divergence restore it with the LR times backoff.
        self.rollback = Rollback(CHECKPOINT_TAG, factor=backoff, max_rollbacks=max_rollbacks)
        self.explode_factor = explode_factor
        # run state (saved by state_dict)
        self.begun = False
        self.initial_loss = math.nan  # the training-set loss before training, the yardstick of an explosion
        self.epochs_done = 0  # finite epochs
        self.y_norm = 0.0
        self.last: dict[str, float] = {}
        self.good_lr: tuple[float, ...] | None = None  # the LR of the last good epoch (or the first decision's)
        self.good_k_z = math.nan  # K_z of the last good epoch (shrink_factor's yardstick)
        self.model: nn.Module | None = None
        self.monitor: PenultimateMonitor | None = None

    # -- hooks ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        head = find_head(model)
        if self.mode == "auto":
            self.mode = "network" if has_hidden_layer(model, head) else "classical"
        # The paper counts a classical model's bias as a weight on a column of ones; the network
        # constants read the penultimate layer's output only. beta is a bound only with the bias in.
        include_bias = self.mode == "classical" or self.constant == "smoothness"
        self.model = model
        self.monitor = PenultimateMonitor(
            model,
            head,
            include_bias=include_bias,
            elementwise=False,
            outputs=self.loss.kind == "least_squares",
        )

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """The loop's pass over the training data, until training begins (see :meth:`on_train_begin`)."""
        return frozenset() if self.begun else frozenset({TRAIN_PASS, TRAIN_EVAL_LOSS})

    def on_train_begin(self, signals: EpochSignals) -> Decision:
        if self.monitor is None:
            raise RuntimeError("LipschitzPilot.attach(model) must run before training (the loop does it)")
        self.begun = True
        self.initial_loss = initial_loss(signals)
        if self.loss.kind == "least_squares" and self.mode == "network":
            self.y_norm = targets_norm(signals[TRAIN_PASS])
        if self.mode == "classical":
            loss_part, info = self._classical_constant(signals[TRAIN_PASS])
            # The L2 term of section 5.3, per group: lambda*K (paper) or lambda (smoothness), with K the
            # paper's estimate of the weight bound from the data.
            totals = [loss_part + self._l2_term(wd, info["weight_bound"]) for wd in self._weight_decays()]
            lrs = [_safe_inverse(total) for total in totals]
            if any(lr is None for lr in lrs):
                raise ValueError(
                    f"the classical Lipschitz constant is {max(totals)!r}: cannot take 1/L ({info})"
                )
            self.last = {**info, **self._telemetry(loss_part, info["weight_bound"])}
            self.good_lr = tuple(lrs)
            return Decision("lipschitz-classical", lr=self.good_lr, save=self._save, info=self.last)
        if self.initial_lr is not None:
            self.good_lr = self._per_group(self.initial_lr)
            return Decision("lipschitz-initial-fixed", lr=self.good_lr, save=self._save)
        stats = self._probe(signals[TRAIN_PASS])
        lrs, info = self._network_lrs(stats)
        self.monitor.reset()
        if lrs is None:
            raise ValueError(
                f"the Lipschitz constant at initialisation is not positive ({info}): set initial_lr"
            )
        self.last = info
        self.good_lr = lrs
        return Decision("lipschitz-probe", lr=lrs, save=self._save, info=info)

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        assert self.monitor is not None
        if signals.nonfinite:
            return self._diverged(signals)
        if exploded((signals.train_loss, signals.val_loss), self.initial_loss, self.explode_factor):
            return self._diverged(
                signals, reason="lipschitz-exploded-rollback", info={"train_loss": signals.train_loss}
            )
        if self.mode == "classical":
            self.monitor.reset()
            self.epochs_done += 1
            self.good_lr = tuple(signals.lr)
            return self._checkpoint()
        if (
            self.stall_factor is not None
            and math.isfinite(self.initial_loss)
            and signals.train_loss > self.stall_factor * self.initial_loss
        ):
            # A whole epoch no better than the untrained model (a classifier stuck at ln k): the LR
            # killed the network; its K_z, and so the next 1/L, would reward that.
            return self._diverged(
                signals, reason="lipschitz-stalled-rollback",
                info={"train_loss": signals.train_loss, "initial_loss": self.initial_loss},
            )  # fmt: skip
        stats = self.monitor.epoch()
        self.monitor.reset()
        if stats is None:  # the loop trained no batch (cannot happen with a non-empty loader)
            return self._checkpoint()
        if stats.k_z == 0 or (
            self.shrink_factor is not None
            and math.isfinite(self.good_k_z)
            and stats.k_z < self.shrink_factor * self.good_k_z
        ):
            # Every penultimate activation of the epoch was zero (dead ReLUs): L = 0, 1/L is undefined and
            # the network cannot recover. A divergence in all but name; so is most of them dying
            # (K_z fell by more than shrink_factor), whose 1/L would be huge.
            return self._diverged(
                signals, reason="lipschitz-collapsed-rollback", info={"k_z": stats.k_z, "good_k_z": self.good_k_z}
            )
        lrs, info = self._network_lrs(stats)
        if lrs is None:
            # L overflowed (weights or activations beyond float range) though the loss did not: the same.
            return self._diverged(signals, reason="lipschitz-undefined-rollback", info=info)
        self.epochs_done += 1
        self.good_lr = tuple(signals.lr)  # the epoch just ended was good: its LR is the reference
        self.good_k_z = stats.k_z
        if self.max_growth is not None:
            capped = tuple(min(lr, self.max_growth * good) for lr, good in zip(lrs, self.good_lr))
            if capped != lrs:
                info = {**info, "uncapped_lr": lrs[0]}
            lrs = capped
        self.last = info
        return Decision("lipschitz-epoch", lr=lrs, save=self._save, info=info)

    def on_train_end(self) -> Decision | None:
        if self.monitor is not None:
            self.monitor.remove()
        return None

    # -- the constant ---------------------------------------------------------------------------------
    def _network_lrs(self, stats: BatchStats) -> tuple[tuple[float, ...] | None, dict[str, Any]]:
        """1/L per param group (groups differ by their weight decay) from one epoch's statistics."""
        assert self.model is not None and self.monitor is not None
        w_max = max_weight_norm(self._bound_params())
        if self.constant == "paper":
            loss_part = abs(
                self.loss.lipschitz(
                    stats.k_z, stats.rows, k_a=stats.k_a, y_norm=self.y_norm, form=self.ls_form
                )
            )
        else:
            loss_part = self.loss.smoothness(stats.k_z, stats.rows)
        lrs = []
        for wd in self._weight_decays():
            total = loss_part + self._l2_term(wd, w_max)
            lr = _safe_inverse(total)
            if lr is None:
                return None, {"k_z": stats.k_z, "m": stats.rows, "max_w": w_max, "lipschitz": total}
            lrs.append(self.rollback.scale * lr)  # the persistent factor of past divergences
        info = {
            "k_z": stats.k_z,
            "m": stats.rows,
            "max_w": w_max,
            **self._telemetry(loss_part, w_max),
            "scale": self.rollback.scale,
        }
        if self.loss.kind == "least_squares":
            info.update(k_a=stats.k_a, y_norm=self.y_norm)
        return tuple(lrs), info

    def _bound_params(self) -> list[torch.Tensor]:
        r"""The tensors :math:`\max\lVert w\rVert` runs over: every parameter the optimizer trains (all its
        groups, as the step-level optimizers take it), or the last layer's (``weight_bound="head"``)."""
        assert self.monitor is not None
        if self.weight_bound == "head":
            return list(self.monitor.layer.parameters())
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _probe(self, train_pass: TrainPass) -> BatchStats:
        """K_z of the initial model over the training data, in evaluation mode (the authors' epoch-start pass)."""
        assert self.model is not None and self.monitor is not None
        model = self.model
        self.monitor.reset()
        with self.monitor.recording():
            train_pass(lambda x, y: model(x))
        stats = self.monitor.epoch()
        if stats is None:
            raise ValueError("train_loader yielded no batches")
        return stats

    def _classical_constant(self, train_pass: TrainPass) -> tuple[float, dict[str, Any]]:
        r"""The loss part of the paper's classical-model constant from the data, streamed batch by batch.

        Each norm is the largest over the loader's batches and ``m`` the largest batch: with one full
        batch this is exactly the paper's full-batch formula. ``info["weight_bound"]`` is the paper's
        estimate :math:`K = (a+b)/2` of :math:`\lVert w\rVert` from the data (section 7.1): least squares'
        formula needs it, and so does the L2 term :math:`\lambda K` of section 5.3 for every loss (the LR
        is fixed before training, so no weight of the trained model can stand in for the bound). The pass
        leaves the RNG as it found it (a shuffling DataLoader draws from it).
        """
        assert self.model is not None and self.monitor is not None
        head = self.monitor.layer
        model = self.model
        least_squares = self.loss.kind == "least_squares"
        acc: dict[str, Any] = {"rows": 0, "total_rows": 0, "col_sum": None, "col_max": None,
                               "gram": 0.0, "cross": 0.0, "k_z": 0.0}  # fmt: skip

        def add(x: torch.Tensor, y: torch.Tensor) -> None:
            a = _head_input(model, head, x).double()
            if head.bias is not None:
                a = torch.cat([torch.ones(len(a), 1, dtype=a.dtype, device=a.device), a], dim=1)
            acc["rows"], acc["total_rows"] = max(acc["rows"], len(a)), acc["total_rows"] + len(a)
            s, m = a.sum(0), a.max(0).values
            acc["col_sum"] = s if acc["col_sum"] is None else acc["col_sum"] + s
            acc["col_max"] = m if acc["col_max"] is None else torch.maximum(acc["col_max"], m)
            acc["k_z"] = max(acc["k_z"], float(a.norm()))
            if least_squares:
                y = y.double().reshape(len(a), -1)
                acc["gram"] = max(acc["gram"], float(torch.linalg.matrix_norm(a.T @ a)))
                acc["cross"] = max(acc["cross"], float(torch.linalg.matrix_norm(y.T @ a)))

        train_pass(add)  # the loop's pass: evaluation mode, no gradients, the RNG left as it was
        rows, total_rows, col_sum, col_max = acc["rows"], acc["total_rows"], acc["col_sum"], acc["col_max"]
        gram, cross, k_z = acc["gram"], acc["cross"], acc["k_z"]
        if col_sum is None or col_max is None:
            raise ValueError("train_loader yielded no batches")
        # The paper's K = (a + b)/2 over the whole training set (section 7.1).
        k = (float(col_sum.sum()) / total_rows + float(col_max.mean())) / 2
        info: dict[str, Any] = {"k_z": k_z, "m": rows, "weight_bound": k}
        if self.constant == "smoothness":
            return self.loss.smoothness(k_z, rows), info
        if not least_squares:
            return abs(self.loss.lipschitz(k_z, rows)), info
        sign = -1.0 if self.ls_form == "paper" else 1.0
        value = self.loss.scale * abs(k * gram + sign * cross) / rows
        return value, {**info, "gram": gram, "cross": cross}

    def _weight_decays(self) -> list[float]:
        r"""Each parameter group's :math:`\lambda` (its ``weight_decay``), in group order."""
        return [float(g.get("weight_decay", 0.0)) for g in self.optimizer.param_groups]

    def _l2_term(self, wd: float, bound: float) -> float:
        r"""What an L2 term adds to the constant: :math:`\lambda K` (paper, section 5.3) or :math:`\lambda`
        (its Hessian, for the smoothness constant)."""
        return wd * bound if self.constant == "paper" else wd

    def _telemetry(self, loss_part: float, bound: float) -> dict[str, float]:
        """The constant as the run record reports it (one definition, ``docs/methods/lipschitz.md``).

        ``lipschitz`` is the whole constant of the most regularised group, loss part plus L2 term, so
        ``1/lipschitz`` is the LR before any rollback factor when every group shares its weight decay;
        ``loss_lipschitz`` is the loss part alone.
        """
        wd = max(self._weight_decays())
        return {"lipschitz": loss_part + self._l2_term(wd, bound), "loss_lipschitz": loss_part, "weight_decay": wd}

    @property
    def _save(self) -> str | None:
        """The checkpoint tag to save after a good epoch; none when rollbacks are off (``max_rollbacks=0``)."""
        return self.rollback.tag if self.rollback.enabled else None

    def _checkpoint(self) -> Decision | None:
        return self.rollback.checkpoint("lipschitz-checkpoint")

    def _per_group(self, lr: float) -> tuple[float, ...]:
        return (float(lr),) * len(self.optimizer.param_groups)

    # -- divergence -----------------------------------------------------------------------------------
    def _diverged(
        self,
        signals: EpochSignals,
        reason: str = "lipschitz-diverged-rollback",
        info: Mapping[str, Any] | None = None,
    ) -> Decision | None:
        """Roll back to the last good epoch with the LR times ``backoff``; give up after ``max_rollbacks``.

        The LR backed off from is the smaller of the failed epoch's and the last good epoch's: after a
        collapse the failed epoch ran at the 1/L of a dead network (11,325 on ``mnist1d-cnn``), and a
        tenth of that still diverges."""
        assert self.monitor is not None
        self.monitor.reset()
        rb = self.rollback
        if rb.exhausted:
            if signals.nonfinite:
                return None  # the loop stops the run as diverged
            return Decision(reason.replace("-rollback", ""), stop=True, info={"rollbacks": rb.rollbacks})
        first = self.epochs_done == 0
        return rb.roll_back(
            reason,
            lr=tuple(min(lr, good) * rb.factor for lr, good in zip(signals.lr, self.good_lr or signals.lr)),
            # A network that diverges after the first epoch: its 1/L is too large from now on.
            persist=not first and self.mode == "network",
            info=lambda rb: {"rollbacks": rb.rollbacks, "first_epoch": first, "scale": rb.scale, **(info or {})},
        )

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "begun": self.begun,
            "initial_loss": self.initial_loss,
            "scale": self.rollback.scale,
            "rollbacks": self.rollback.rollbacks,
            "epochs_done": self.epochs_done,
            "y_norm": self.y_norm,
            "last": dict(self.last),
            "good_lr": None if self.good_lr is None else list(self.good_lr),
            "good_k_z": self.good_k_z,
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mode = state.get("mode", self.mode)
        self.begun = state.get("begun", True)
        self.initial_loss = state.get("initial_loss", math.nan)
        self.rollback.load_state_dict(state)
        self.epochs_done = state.get("epochs_done", 0)
        self.y_norm = state.get("y_norm", 0.0)
        self.last = dict(state.get("last", {}))
        good_lr = state.get("good_lr")
        self.good_lr = None if good_lr is None else tuple(float(v) for v in good_lr)
        self.good_k_z = float(state.get("good_k_z", math.nan))
        if self.monitor is not None and state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])


def _head_input(model: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input the last layer receives for ``x`` (for a classical model, the flattened data)."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    a = captured[-1]
    return a.reshape(-1, a.shape[-1])


# ====================================================================================================
# The step-level optimizers (section 6)
# ====================================================================================================
