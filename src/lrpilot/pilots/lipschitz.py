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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrpilot.estimators.lipschitz import (
    GRAD_SQ_ESTIMATES,
    BatchStats,
    LossSpec,
    PenultimateMonitor,
    find_head,
    grad_sq_estimate,
    has_hidden_layer,
    max_weight_norm,
)
from lrpilot import distributed as dist
from lrpilot.loop.data import split_batch
from lrpilot.loop.seeding import capture_rng, restore_rng
from lrpilot.pilots.base import Decision, EpochSignals, MethodParts, Pilot
from lrpilot.registry import BuildContext, MethodInfo, register, require_in, require_positive

__all__ = [
    "BIAS_CORRECTIONS",
    "AdaMo",
    "AutoAdam",
    "LastLayerLipschitz",
    "LipschitzGuard",
    "LipschitzPilot",
    "LipschitzRMSprop",
]

_GOOD = "lipschitz-last-good"  # the checkpoint tag rollbacks return to


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


def _targets_norm(loader: Any) -> float:
    """The largest Frobenius norm of a batch of targets (least squares' ``||y||``); reads targets only.

    Under torch.distributed a rank's batches are shards of the global ones: their squared norms are
    summed over ranks first.
    """
    squares = [float(split_batch(batch, where="train_loader")[1].detach().double().square().sum()) for batch in loader]
    if dist.is_distributed():
        squares = dist.all_reduce_sum(squares)
    return math.sqrt(max(squares, default=0.0))


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
    non-finite loss, an exploded one (mean training or validation loss above ``explode_factor`` times
    the validation loss at initialisation), a collapsed one (every penultimate activation zero, so
    :math:`L = 0`) or one whose :math:`L` overflowed is rolled back and retried with its LR times
    ``backoff``; a divergence after the first epoch also multiplies every later :math:`1/L` by
    ``backoff`` (it persists). After ``max_rollbacks`` rollbacks the run stops. This is our handling of
    the paper's section 8 warning, which only says to watch for large values.

    Args:
        optimizer: an SGD optimizer over the model's parameters; its groups' ``weight_decay`` is the
            :math:`\lambda` of the L2 term.
        loss: the loss's closed form.
        train_loader: the training data, for the first-epoch probe, the classical mode and least
            squares' :math:`\lVert y\rVert`.
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
        explode_factor: an epoch whose mean training loss or validation loss exceeds this multiple of
            the validation loss at initialisation also counts as diverged (a finite loss can still ruin
            the weights: at initialisation a classifier's loss is about ln k, the loss of a uniform
            guess); ``None`` only counts non-finite losses.

    Example:
        >>> import lrpilot
        >>> from lrpilot.loop.data import TensorLoader
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
        train_loader: Any = None,
        mode: str = "auto",
        initial_lr: float | None = None,
        constant: str = "paper",
        ls_form: str = "paper",
        weight_bound: str = "all",
        backoff: float = 0.1,
        max_rollbacks: int = 3,
        explode_factor: float | None = 10.0,
    ) -> None:
        super().__init__(optimizer)
        _check_choice("mode", mode, ("auto", "network", "classical"))
        _check_choice("constant", constant, ("paper", "smoothness"))
        _check_choice("ls_form", ls_form, ("paper", "bound"))
        _check_choice("weight_bound", weight_bound, ("all", "head"))
        if initial_lr is not None and not (_is_number(initial_lr) and initial_lr > 0):
            raise ValueError(
                f"initial_lr must be None (probe the data) or a positive number, got {initial_lr!r}"
            )
        _check_backoff(backoff, max_rollbacks, explode_factor)
        self.loss = loss
        self.train_loader = train_loader
        self.mode = mode
        self.initial_lr = None if initial_lr is None else float(initial_lr)
        self.constant = constant
        self.ls_form = ls_form
        self.weight_bound = weight_bound
        self.backoff = float(backoff)
        self.max_rollbacks = int(max_rollbacks)
        self.explode_factor = explode_factor
        # run state (saved by state_dict)
        self.initial_loss = math.nan  # the validation loss before training, the yardstick of an explosion
        self.scale = 1.0  # persistent LR factor after divergences
        self.rollbacks = 0
        self.epochs_done = 0  # finite epochs
        self.y_norm = 0.0
        self.last: dict[str, float] = {}
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
        if self.mode == "classical" and self.train_loader is None:
            raise ValueError("the classical mode computes 1/L from the training data: pass train_loader")

    def on_train_begin(self, signals: EpochSignals) -> Decision:
        if self.monitor is None:
            raise RuntimeError("LipschitzPilot.attach(model) must run before training (the loop does it)")
        self.initial_loss = float(signals.val_loss)
        if self.loss.kind == "least_squares" and self.mode == "network":
            self.y_norm = _targets_norm(self.train_loader) if self.train_loader is not None else 0.0
        if self.mode == "classical":
            lipschitz, info = self._classical_constant()
            lr = _safe_inverse(lipschitz)
            if lr is None:
                raise ValueError(
                    f"the classical Lipschitz constant is {lipschitz!r}: cannot take 1/L ({info})"
                )
            self.last = {**info, "lipschitz": lipschitz}
            return Decision("lipschitz-classical", lr=self._per_group(lr), save=self._save, info=self.last)
        if self.initial_lr is not None:
            return Decision("lipschitz-initial-fixed", lr=self._per_group(self.initial_lr), save=self._save)
        if self.train_loader is None:
            raise ValueError(
                "the first epoch's LR needs a probe of the training data: pass train_loader or initial_lr"
            )
        stats = self._probe()
        lrs, info = self._network_lrs(stats)
        self.monitor.reset()
        if lrs is None:
            raise ValueError(
                f"the Lipschitz constant at initialisation is not positive ({info}): set initial_lr"
            )
        self.last = info
        return Decision("lipschitz-probe", lr=lrs, save=self._save, info=info)

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        assert self.monitor is not None
        if signals.nonfinite:
            return self._diverged(signals)
        if _exploded(signals, self.initial_loss, self.explode_factor):
            return self._diverged(
                signals, reason="lipschitz-exploded-rollback", info={"train_loss": signals.train_loss}
            )
        if self.mode == "classical":
            self.monitor.reset()
            self.epochs_done += 1
            return self._checkpoint()
        stats = self.monitor.epoch()
        self.monitor.reset()
        if stats is None:  # the loop trained no batch (cannot happen with a non-empty loader)
            return self._checkpoint()
        if stats.k_z == 0:
            # Every penultimate activation of the epoch was zero (dead ReLUs): L = 0, 1/L is undefined and
            # the network cannot recover. A divergence in all but name.
            return self._diverged(signals, reason="lipschitz-collapsed-rollback")
        lrs, info = self._network_lrs(stats)
        if lrs is None:
            # L overflowed (weights or activations beyond float range) though the loss did not: the same.
            return self._diverged(signals, reason="lipschitz-undefined-rollback", info=info)
        self.epochs_done += 1
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
        params = self.monitor.layer.parameters() if self.weight_bound == "head" else self.model.parameters()
        w_max = max_weight_norm(params)
        if self.constant == "paper":
            loss_part = abs(
                self.loss.lipschitz(
                    stats.k_z, stats.rows, k_a=stats.k_a, y_norm=self.y_norm, form=self.ls_form
                )
            )
        else:
            loss_part = self.loss.smoothness(stats.k_z, stats.rows)
        lrs = []
        for group in self.optimizer.param_groups:
            wd = float(group.get("weight_decay", 0.0))
            # The L2 term: lambda*K (paper) or lambda (its Hessian, for the smoothness constant).
            total = loss_part + (wd * w_max if self.constant == "paper" else wd)
            lr = _safe_inverse(total)
            if lr is None:
                return None, {"k_z": stats.k_z, "m": stats.rows, "max_w": w_max, "lipschitz": total}
            lrs.append(self.scale * lr)
        info = {
            "k_z": stats.k_z,
            "m": stats.rows,
            "max_w": w_max,
            "lipschitz": loss_part,
            "scale": self.scale,
        }
        if self.loss.kind == "least_squares":
            info.update(k_a=stats.k_a, y_norm=self.y_norm)
        return tuple(lrs), info

    def _probe(self) -> BatchStats:
        """K_z of the initial model over the training data, in evaluation mode (the authors' epoch-start pass)."""
        assert self.model is not None and self.monitor is not None
        device = next(self.model.parameters()).device
        rng = capture_rng()  # a shuffling DataLoader draws from the global RNG: leave it as it was
        was_training = self.model.training
        self.monitor.reset()
        try:
            self.model.eval()
            with torch.no_grad(), self.monitor.recording():
                for batch in self.train_loader:
                    x, _ = split_batch(batch, where="train_loader")
                    self.model(x.to(device))
        finally:
            self.model.train(was_training)
            restore_rng(rng)
        stats = self.monitor.epoch()
        if stats is None:
            raise ValueError("train_loader yielded no batches")
        return stats

    def _classical_constant(self) -> tuple[float, dict[str, Any]]:
        """The paper's classical-model constant from the data, streamed batch by batch.

        Each norm is the largest over the loader's batches and ``m`` the largest batch: with one full
        batch this is exactly the paper's full-batch formula.
        """
        assert self.model is not None and self.monitor is not None
        if self.loss.kind != "least_squares":
            stats = self._probe()
            self.monitor.reset()
            if self.constant == "smoothness":
                value = self.loss.smoothness(stats.k_z, stats.rows) + self._max_weight_decay()
            else:
                value = self.loss.lipschitz(stats.k_z, stats.rows)
            return value, {"k_z": stats.k_z, "m": stats.rows}
        head = self.monitor.layer
        rows = 0
        total_rows = 0
        col_sum = col_max = None
        gram = cross = k_z = 0.0
        device = next(self.model.parameters()).device
        for batch in self.train_loader:
            x, y = split_batch(batch, where="train_loader")
            a = _head_input(self.model, head, x.to(device)).double()
            if head.bias is not None:
                a = torch.cat([torch.ones(len(a), 1, dtype=a.dtype, device=a.device), a], dim=1)
            y = y.to(device).double().reshape(len(a), -1)
            rows, total_rows = max(rows, len(a)), total_rows + len(a)
            col_sum = a.sum(0) if col_sum is None else col_sum + a.sum(0)
            col_max = a.max(0).values if col_max is None else torch.maximum(col_max, a.max(0).values)
            gram = max(gram, float(torch.linalg.matrix_norm(a.T @ a)))
            cross = max(cross, float(torch.linalg.matrix_norm(y.T @ a)))
            k_z = max(k_z, float(a.norm()))
        assert col_sum is not None and col_max is not None
        # The paper's K = (a + b)/2 over the whole training set (section 7.1).
        k = (float(col_sum.sum()) / total_rows + float(col_max.mean())) / 2
        if self.constant == "smoothness":
            value = self.loss.smoothness(k_z, rows) + self._max_weight_decay()
        else:
            sign = -1.0 if self.ls_form == "paper" else 1.0
            value = self.loss.scale * abs(k * gram + sign * cross) / rows
        return value, {"k_z": k_z, "m": rows, "weight_bound": k, "gram": gram, "cross": cross}

    @property
    def _save(self) -> str | None:
        """The checkpoint tag to save after a good epoch; none when rollbacks are off (``max_rollbacks=0``)."""
        return _GOOD if self.max_rollbacks > 0 else None

    def _checkpoint(self) -> Decision | None:
        return Decision("lipschitz-checkpoint", save=_GOOD) if self.max_rollbacks > 0 else None

    def _max_weight_decay(self) -> float:
        return max(float(g.get("weight_decay", 0.0)) for g in self.optimizer.param_groups)

    def _per_group(self, lr: float) -> tuple[float, ...]:
        return (float(lr),) * len(self.optimizer.param_groups)

    # -- divergence -----------------------------------------------------------------------------------
    def _diverged(
        self,
        signals: EpochSignals,
        reason: str = "lipschitz-diverged-rollback",
        info: Mapping[str, Any] | None = None,
    ) -> Decision | None:
        """Roll back to the last good epoch with the LR times ``backoff``; give up after ``max_rollbacks``."""
        assert self.monitor is not None
        self.monitor.reset()
        if self.rollbacks >= self.max_rollbacks:
            if signals.nonfinite:
                return None  # the loop stops the run as diverged
            return Decision(reason.replace("-rollback", ""), stop=True, info={"rollbacks": self.rollbacks})
        self.rollbacks += 1
        first = self.epochs_done == 0
        if not first and self.mode == "network":
            # A network that diverges after the first epoch: its 1/L is too large from now on.
            self.scale *= self.backoff
        lrs = tuple(lr * self.backoff for lr in signals.lr)
        details = {"rollbacks": self.rollbacks, "first_epoch": first, "scale": self.scale, **(info or {})}
        return Decision(reason, restore=_GOOD, lr=lrs, info=details)

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "initial_loss": self.initial_loss,
            "scale": self.scale,
            "rollbacks": self.rollbacks,
            "epochs_done": self.epochs_done,
            "y_norm": self.y_norm,
            "last": dict(self.last),
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mode = state.get("mode", self.mode)
        self.initial_loss = state.get("initial_loss", math.nan)
        self.scale = state.get("scale", 1.0)
        self.rollbacks = state.get("rollbacks", 0)
        self.epochs_done = state.get("epochs_done", 0)
        self.y_norm = state.get("y_norm", 0.0)
        self.last = dict(state.get("last", {}))
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
BIAS_CORRECTIONS = ("none", "moments", "all")


class _LipschitzOptimizer(torch.optim.Optimizer):
    """Shared bookkeeping of AdaMo, Lipschitz-RMSprop and Auto-Adam.

    Per group (in ``param_groups``, so the stock ``state_dict`` saves it): ``step``; the exponentially
    weighted averages ``k1`` (of the Lipschitz constant) and ``k2`` (of the estimate of
    ``max ||(grad)^2||``); ``ema_updates`` (how many times they were updated, for bias correction);
    the current epoch's maxima for ``update="epoch"``; and ``lipschitz_lr``, the LR applied at the last
    step (what telemetry records). ``lr`` is a multiplier of the computed step size (1 = the paper).
    """

    _uses_k2 = True

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        source: Callable[[], tuple[float, BatchStats]] | None,
    ) -> None:
        _check_common(defaults)
        initial = defaults["initial_lr"]
        # Run state lives in every group (defaults fill groups added later too).
        defaults.update(
            step=0,
            k1=float(defaults["k1_init"]),
            k2=float(defaults["k2_init"]),
            ema_updates=0,
            epoch_max_k1=0.0,
            epoch_max_k2=0.0,
            lipschitz_lr=float(defaults["lr"] * initial) if initial is not None else 0.0,
        )
        defaults.setdefault("k1_signal", "lipschitz")
        super().__init__(params, defaults)
        self.source = source

    def effective_lrs(self) -> list[float]:
        """The LR applied at the last step, per group (0 before the first step unless ``initial_lr``)."""
        return [float(g["lipschitz_lr"]) for g in self.param_groups]

    # -- the Lipschitz signal ------------------------------------------------------------------------------
    def _signal(
        self, group: dict[str, Any], lipschitz: float | None, grad_sq: float | None, k_z: float | None
    ) -> tuple[float, float]:
        """What this step feeds the two averages: (L_t or K_z, M_t) for one group."""
        if lipschitz is not None:
            l_t = float(lipschitz)
            m_t = float(grad_sq) if grad_sq is not None else l_t * l_t
            if group["k1_signal"] == "kz":
                if k_z is None:
                    raise ValueError(
                        f"{type(self).__name__} divides by K_z: pass step(k_z=...) with lipschitz=..."
                    )
                return float(k_z), m_t
            return l_t, m_t
        if self.source is None:
            raise ValueError(
                f"{type(self).__name__}.step needs this step's Lipschitz constant: build the optimizer with "
                "source=LastLayerLipschitz.for_model(model, loss_fn), or pass step(lipschitz=...)"
            )
        loss_part, stats = self.source()
        wd = group["weight_decay"]
        weight_term = wd * max_weight_norm(group["params"]) if wd > 0 else 0.0
        m_t = (
            grad_sq_estimate(loss_part, stats.k_z, stats.elementwise, weight_term, group["grad_sq_estimate"])
            if self._uses_k2
            else 0.0
        )
        return (stats.k_z if group["k1_signal"] == "kz" else loss_part + weight_term), m_t

    def _advance(self, group: dict[str, Any], s1: float, s2: float) -> tuple[float, float, bool]:
        """Update the averages with this step's signals; return (K1, K2) to use and whether the
        first-epoch fixed LR is in force."""
        b1, b2 = group["_b1"], group["_b2"]
        t = group["step"]  # steps before this one
        spe = group["steps_per_epoch"]
        fixed = group["initial_lr"] is not None and t < spe
        if group["update"] == "step":
            if not fixed:
                group["k1"] = b1 * group["k1"] + (1 - b1) * s1
                group["k2"] = b2 * group["k2"] + (1 - b2) * s2
                group["ema_updates"] += 1
        else:  # "epoch": one update per epoch, from the previous epoch's largest values (the authors' code)
            if t > 0 and t % spe == 0:
                group["k1"] = b1 * group["k1"] + (1 - b1) * group["epoch_max_k1"]
                group["k2"] = b2 * group["k2"] + (1 - b2) * group["epoch_max_k2"]
                group["ema_updates"] += 1
                group["epoch_max_k1"] = group["epoch_max_k2"] = 0.0
            group["epoch_max_k1"] = max(group["epoch_max_k1"], s1)
            group["epoch_max_k2"] = max(group["epoch_max_k2"], s2)
        group["step"] = t + 1
        k1, k2 = group["k1"], group["k2"]
        n = group["ema_updates"]
        if group["bias_correction"] == "all" and n > 0:
            k1 = k1 / (1 - b1**n)
            k2 = k2 / (1 - b2**n)
        return k1, k2, fixed

    def _step_size(self, group: dict[str, Any], k1: float, k2: float) -> float:
        raise NotImplementedError

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], alpha: float) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        lipschitz: float | None = None,
        grad_sq: float | None = None,
        k_z: float | None = None,
    ) -> Any:
        """One update.

        Args:
            closure: re-evaluates the loss (optional).
            lipschitz: this step's Lipschitz constant :math:`L_t` (the algorithms' "max ||grad||"),
                overriding the source; used as given (no L2 term added).
            grad_sq: this step's estimate of :math:`\\max\\lVert(\\nabla L)^2\\rVert` (default
                :math:`L_t^2` when ``lipschitz`` is given).
            k_z: this step's :math:`K_z`, for :class:`LipschitzRMSprop` with ``denominator="kz"``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            s1, s2 = self._signal(group, lipschitz, grad_sq, k_z)
            if not (math.isfinite(s1) and math.isfinite(s2)):
                raise ValueError(f"{type(self).__name__}: non-finite Lipschitz signal ({s1}, {s2})")
            k1, k2, fixed = self._advance(group, s1, s2)
            alpha = group["lr"] * group["initial_lr"] if fixed else self._step_size(group, k1, k2)
            group["lipschitz_lr"] = alpha
            self._update(group, params, alpha)
        return loss


def _check_common(d: Mapping[str, Any]) -> None:
    if not (_is_number(d["lr"]) and d["lr"] > 0):
        raise ValueError(f"Invalid lr multiplier: {d['lr']!r} (must be > 0)")
    if not (_is_number(d["weight_decay"]) and d["weight_decay"] >= 0):
        raise ValueError(f"Invalid weight_decay: {d['weight_decay']!r} (must be >= 0)")
    if d["update"] not in ("step", "epoch"):
        raise ValueError(f"Invalid update: {d['update']!r} (must be 'step' or 'epoch')")
    if d["bias_correction"] not in BIAS_CORRECTIONS:
        raise ValueError(
            f"Invalid bias_correction: {d['bias_correction']!r} (must be one of {list(BIAS_CORRECTIONS)})"
        )
    spe = d["steps_per_epoch"]
    if spe is not None and not (isinstance(spe, int) and not isinstance(spe, bool) and spe > 0):
        raise ValueError(f"Invalid steps_per_epoch: {spe!r} (must be a positive integer)")
    if d["initial_lr"] is not None and not (_is_number(d["initial_lr"]) and d["initial_lr"] > 0):
        raise ValueError(f"Invalid initial_lr: {d['initial_lr']!r} (must be None or > 0)")
    if (d["update"] == "epoch" or d["initial_lr"] is not None) and spe is None:
        raise ValueError(
            "update='epoch' and initial_lr need steps_per_epoch (the length of an epoch in steps)"
        )
    for name in ("k1_init", "k2_init"):
        if not (_is_number(d[name]) and d[name] >= 0):
            raise ValueError(f"Invalid {name}: {d[name]!r} (must be >= 0)")
    if d["update"] == "epoch" and d["initial_lr"] is None and d["k1_init"] == 0:
        raise ValueError(
            "update='epoch' has no constant during the first epoch: set initial_lr (the paper's fixed first-epoch LR)"
        )
    if d["grad_sq_estimate"] not in GRAD_SQ_ESTIMATES:
        raise ValueError(
            f"Invalid grad_sq_estimate: {d['grad_sq_estimate']!r} (must be one of {list(GRAD_SQ_ESTIMATES)})"
        )


def _beta(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = _is_number(value) and (0.0 <= value < 1.0 if allow_zero else 0.0 < value < 1.0)
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (must be in {'[0, 1)' if allow_zero else '(0, 1)'})")
    return float(value)


def _moment_corrections(group: dict[str, Any]) -> tuple[float, float]:
    """Adam's 1 - beta^t for the first and second moments, when bias correction is on."""
    if group["bias_correction"] == "none":
        return 1.0, 1.0
    t = group["step"]
    return 1 - group["_b1"] ** t, 1 - group["_b2"] ** t


class AdaMo(_LipschitzOptimizer):
    r"""AdaMo: SGD with momentum whose LR is the inverse of an average Lipschitz constant (Algorithm 1).

    For every step :math:`t`, with :math:`L_t` the closed-form Lipschitz constant of the mini-batch
    (the paper's :math:`\max\lVert\nabla_W L\rVert`: :class:`LastLayerLipschitz` plus
    :math:`\lambda\max\lVert w\rVert`):

    .. math::
        V \leftarrow \beta V + (1-\beta)\,g_t, \qquad
        K \leftarrow \beta K + (1-\beta)\,L_t, \qquad
        W \leftarrow W - \frac{1}{K} V

    starting from :math:`K = 0, V = 0`. The recorded LR is :math:`1/K`. ``weight_decay`` adds
    :math:`\lambda W` to :math:`g_t` (L2 in the loss, as in the paper's Keras models).

    Args:
        params: parameters or param groups.
        source: gives each step's loss constant (:class:`LastLayerLipschitz`); or pass
            ``step(lipschitz=...)``.
        lr: multiplier of the step size (1.0 = the paper; a rollback lowers it).
        beta: :math:`\beta` (0.9).
        weight_decay: :math:`\lambda`.
        update: ``"step"`` (Algorithm 1: :math:`K` updated every iteration) or ``"epoch"`` (the authors'
            code: :math:`K` updated once per epoch from the previous epoch's largest :math:`L_t`).
        initial_lr: the paper's first-epoch remedy (section 7.3.1): during the first epoch
            :math:`K = x` and the LR is :math:`x`; the average then starts from :math:`x`. ``None``:
            Algorithm 1 as printed.
        steps_per_epoch: needed by ``update="epoch"`` and ``initial_lr``.
        bias_correction: ``"none"``, ``"moments"`` (divide :math:`V` by :math:`1-\beta^t`) or ``"all"``
            (section 6.4: :math:`K` too). Both averages carry the same bias, so with ``update="step"``
            ``"all"`` changes nothing.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = AdaMo([w], beta=0.9)
        >>> w.grad = torch.tensor([1.0, -2.0])
        >>> opt.step(lipschitz=4.0)  # K = 0.4, V = 0.1*g: W -= V/K = g/4
        >>> w.data
        tensor([0.7500, 1.5000])

    References:
        Yedida & Saha, *LipschitzLR*, Algorithm 1 and section 7.3.1.
    """

    _uses_k2 = False

    def __init__(
        self,
        params: Iterable[Any],
        source: Callable[[], tuple[float, BatchStats]] | None = None,
        *,
        lr: float = 1.0,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        update: str = "step",
        initial_lr: float | None = None,
        steps_per_epoch: int | None = None,
        bias_correction: str = "none",
    ) -> None:
        b = _beta("beta", beta)
        defaults = {
            "lr": lr,
            "beta": b,
            "weight_decay": weight_decay,
            "update": update,
            "initial_lr": initial_lr,
            "steps_per_epoch": steps_per_epoch,
            "bias_correction": bias_correction,
            # "the algorithm sets K to x" for the first epoch (section 7.3.1)
            "k1_init": 0.0 if initial_lr is None else initial_lr,
            "k2_init": 0.0,
            "grad_sq_estimate": "first",
            "_b1": b,
            "_b2": b,
        }
        super().__init__(params, defaults, source)

    def _step_size(self, group: dict[str, Any], k1: float, k2: float) -> float:
        return group["lr"] / k1 if k1 > 0 else 0.0

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], alpha: float) -> None:
        beta, wd = group["beta"], group["weight_decay"]
        bc1, _ = _moment_corrections(group)
        for p in params:
            g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            state = self.state[p]
            if "v" not in state:
                state["v"] = torch.zeros_like(p)
            v = state["v"]
            v.mul_(beta).add_(g, alpha=1 - beta)
            if alpha != 0.0:
                p.add_(v, alpha=-alpha / bc1)


class AutoAdam(_LipschitzOptimizer):
    r"""Auto-Adam: Adam whose step size is a ratio of Lipschitz-constant averages (Algorithm 3).

    For every step, with :math:`L_t` the mini-batch's Lipschitz constant and :math:`M_t` an estimate of
    :math:`\max\lVert(\nabla_W L)^2\rVert` (``grad_sq_estimate``, section 6.3):

    .. math::
        V &\leftarrow \beta_1 V + (1-\beta_1) g, \qquad S \leftarrow \beta_2 S + (1-\beta_2) g^2 \\
        K_1 &\leftarrow \beta_1 K_1 + (1-\beta_1) L_t, \qquad K_2 \leftarrow \beta_2 K_2 + (1-\beta_2) M_t \\
        W &\leftarrow W - \frac{\sqrt{K_2}+\epsilon}{K_1}\cdot\frac{V}{\sqrt{S+\epsilon}}

    The recorded LR is :math:`(\sqrt{K_2}+\epsilon)/K_1`.

    Args:
        params, source, lr, weight_decay, update, initial_lr, steps_per_epoch: as in :class:`AdaMo`
            (``initial_lr`` here fixes the first epoch's LR without touching :math:`K_1, K_2`: the
            authors' code used 1e-3).
        beta1, beta2: (0.9, 0.999), the paper's values.
        eps: :math:`\epsilon`.
        eps_inside_sqrt: ``True`` (Algorithm 3: :math:`\sqrt{S+\epsilon}`) or ``False``
            (:math:`\sqrt S + \epsilon`, Adam's and Keras's placement).
        grad_sq_estimate: ``"remedy"`` (default: the estimate the paper settled on), ``"second"`` or
            ``"first"``; see :func:`~lrpilot.estimators.lipschitz.grad_sq_estimate`.
        k1_init, k2_init: initial :math:`K_1, K_2` (Algorithm 3: 0). Section 9's remedy is
            ``k1_init=1, k2_init=1e-6``, which makes the first LR about 1e-3, Adam's default.
        bias_correction: ``"none"`` (Algorithm 3), ``"moments"`` (Adam's: :math:`V, S` divided by
            :math:`1-\beta^t`; the authors' Keras runs had it) or ``"all"`` (section 6.4: :math:`K_1,
            K_2` too; with ``update="step"`` and zero initial values it only moves :math:`\epsilon`).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> opt = AutoAdam(net.parameters(), LastLayerLipschitz.for_model(net, torch.nn.CrossEntropyLoss()),
        ...                k1_init=1.0, k2_init=1e-6)
        >>> loss = torch.nn.functional.cross_entropy(net(torch.randn(16, 4)), torch.randint(0, 3, (16,)))
        >>> loss.backward()
        >>> opt.step()
        >>> opt.effective_lrs()[0] < 0.01  # section 9's initial values start near Adam's 1e-3
        True

    References:
        Yedida & Saha, *LipschitzLR*, Algorithm 3, sections 6.3-6.4 and 9.
    """

    def __init__(
        self,
        params: Iterable[Any],
        source: Callable[[], tuple[float, BatchStats]] | None = None,
        *,
        lr: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        eps_inside_sqrt: bool = True,
        weight_decay: float = 0.0,
        grad_sq_estimate: str = "remedy",
        k1_init: float = 0.0,
        k2_init: float = 0.0,
        update: str = "step",
        initial_lr: float | None = None,
        steps_per_epoch: int | None = None,
        bias_correction: str = "none",
        _k1_signal: str = "lipschitz",
    ) -> None:
        b1 = _beta("beta1", beta1, allow_zero=True)
        b2 = _beta("beta2", beta2)
        if not (_is_number(eps) and eps >= 0):
            raise ValueError(f"Invalid eps: {eps!r} (must be >= 0)")
        defaults = {
            "lr": lr,
            "beta1": b1,
            "beta2": b2,
            "eps": float(eps),
            "eps_inside_sqrt": bool(eps_inside_sqrt),
            "weight_decay": weight_decay,
            "grad_sq_estimate": grad_sq_estimate,
            "k1_init": k1_init,
            "k2_init": k2_init,
            "update": update,
            "initial_lr": initial_lr,
            "steps_per_epoch": steps_per_epoch,
            "bias_correction": bias_correction,
            "k1_signal": _k1_signal,
            "_b1": b1,
            "_b2": b2,
        }
        super().__init__(params, defaults, source)

    def _step_size(self, group: dict[str, Any], k1: float, k2: float) -> float:
        if k1 <= 0:
            return 0.0
        return group["lr"] * (math.sqrt(k2) + group["eps"]) / k1

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], alpha: float) -> None:
        b1, b2, eps, wd = group["_b1"], group["_b2"], group["eps"], group["weight_decay"]
        bc1, bc2 = _moment_corrections(group)
        for p in params:
            g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            state = self.state[p]
            if "v" not in state:
                state["v"] = torch.zeros_like(p)
                state["s"] = torch.zeros_like(p)
            v, s = state["v"], state["s"]
            v.mul_(b1).add_(g, alpha=1 - b1)
            s.mul_(b2).addcmul_(g, g, value=1 - b2)
            if alpha == 0.0:
                continue
            s_hat = s / bc2 if bc2 != 1.0 else s
            denom = (s_hat + eps).sqrt_() if group["eps_inside_sqrt"] else s_hat.sqrt().add_(eps)
            p.addcdiv_(v, denom, value=-alpha / bc1)


class LipschitzRMSprop(AutoAdam):
    r"""Adaptive RMSprop (section 6.2, whose Algorithm 2 has no body: derived from the text and the authors' code).

    The text: "we simply maintain an exponentially weighted average of the Lipschitz constant as before;
    the learning rate is also replaced by the inverse of the update term, with the exponentially
    weighted average of the square of the gradient replaced with our computed exponentially weighted
    average". RMSprop's update term is :math:`g/\sqrt{S+\epsilon}`; with :math:`S` replaced by the
    average :math:`K_2` of the estimate :math:`M_t` of the squared gradient and :math:`g` by a bound
    :math:`D_t`, its inverse is the LR:

    .. math::
        S \leftarrow \rho S + (1-\rho) g^2, \qquad K_2 \leftarrow \rho K_2 + (1-\rho) M_t, \qquad
        W \leftarrow W - \frac{\sqrt{K_2}+\epsilon}{D_t}\cdot\frac{g}{\sqrt{S+\epsilon}}

    ``denominator`` chooses :math:`D_t`:

    * ``"kz"`` (default): :math:`K_z`, what the authors' Keras code divides by (the only concrete
      version of section 6.2, and the one behind the paper's RMSprop results). Since
      :math:`L \approx K_z/m`, it gives LRs about ``m`` times smaller than ``"lipschitz"``, of the order of
      RMSprop's usual 1e-3.
    * ``"lipschitz"``: :math:`L_t`, the literal reading; it is exactly Auto-Adam (Algorithm 3) with
      :math:`\beta_1 = 0` (then :math:`V = g`, :math:`K_1 = L_t`), which the tests check. It makes
      :math:`\sqrt{K_2}/L_t` of order 1, an LR RMSprop does not survive.

    Args: as :class:`AutoAdam`, with ``rho`` (0.9, the paper's RMSprop :math:`\beta`) in place of
    ``beta2``, no ``beta1``, and ``denominator``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = LipschitzRMSprop([w], eps=0.0)
        >>> w.grad = torch.tensor([0.5, -0.5])
        >>> opt.step(lipschitz=1.0, grad_sq=0.25, k_z=10.0)  # LR = sqrt(0.1 * 0.25) / 10 = 0.0158
        >>> w.data  # each coordinate moves by LR * g / sqrt(0.1 g^2) = LR * sqrt(10)
        tensor([-0.0500,  0.0500])

    References:
        Yedida & Saha, *LipschitzLR*, section 6.2.
    """

    def __init__(
        self,
        params: Iterable[Any],
        source: Callable[[], tuple[float, BatchStats]] | None = None,
        *,
        lr: float = 1.0,
        rho: float = 0.9,
        eps: float = 1e-8,
        eps_inside_sqrt: bool = True,
        weight_decay: float = 0.0,
        grad_sq_estimate: str = "remedy",
        k2_init: float = 0.0,
        denominator: str = "kz",
        update: str = "step",
        initial_lr: float | None = None,
        steps_per_epoch: int | None = None,
        bias_correction: str = "none",
    ) -> None:
        rho = _beta("rho", rho)
        if denominator not in ("kz", "lipschitz"):
            raise ValueError(f"Invalid denominator: {denominator!r} (must be 'kz' or 'lipschitz')")
        super().__init__(
            params, source, lr=lr, beta1=0.0, beta2=rho, eps=eps, eps_inside_sqrt=eps_inside_sqrt,
            weight_decay=weight_decay, grad_sq_estimate=grad_sq_estimate, k1_init=0.0, k2_init=k2_init,
            update=update, initial_lr=initial_lr, steps_per_epoch=steps_per_epoch, bias_correction=bias_correction,
            _k1_signal=denominator,
        )  # fmt: skip


# ====================================================================================================
# The divergence guard of the step-level methods
# ====================================================================================================
class LipschitzGuard(Pilot):
    """Rolls a step-level Lipschitz optimizer back when an epoch diverges (the paper's section 8 warning).

    After every good epoch it asks the loop to checkpoint. After a non-finite epoch, an exploded one (mean
    training or validation loss above ``explode_factor`` times the validation loss at initialisation) or a
    collapsed one (every
    penultimate activation zero: the constant, hence the LR, is undefined), it restores the last
    checkpoint (weights and the optimizer's averages) and multiplies the optimizer's ``lr`` (the step-size
    multiplier) by ``backoff``; the multiplier persists. After ``max_rollbacks`` it gives up and the run
    stops (as diverged for a non-finite loss). It removes the activation hook when training ends.
    """

    handles_nonfinite = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        backoff: float = 0.1,
        max_rollbacks: int = 3,
        explode_factor: float | None = 10.0,
        monitor: PenultimateMonitor | None = None,
    ) -> None:
        super().__init__(optimizer)
        _check_backoff(backoff, max_rollbacks, explode_factor)
        self.backoff = float(backoff)
        self.max_rollbacks = int(max_rollbacks)
        self.explode_factor = explode_factor
        self.rollbacks = 0
        self.initial_loss = math.nan
        self.monitor = monitor

    def on_train_begin(self, signals: EpochSignals) -> Decision | None:
        self.initial_loss = float(signals.val_loss)
        return self._checkpoint()

    def _checkpoint(self) -> Decision | None:
        # No checkpoints (and their cost) when rollbacks are off.
        return Decision("lipschitz-checkpoint", save=_GOOD) if self.max_rollbacks > 0 else None

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        stats = self.monitor.epoch() if self.monitor is not None else None
        if self.monitor is not None:
            self.monitor.reset()
        if signals.nonfinite:
            reason = "lipschitz-diverged-rollback"
        elif _exploded(signals, self.initial_loss, self.explode_factor):
            reason = "lipschitz-exploded-rollback"
        elif stats is not None and stats.k_z == 0:
            reason = "lipschitz-collapsed-rollback"
        else:
            return self._checkpoint()
        if self.rollbacks >= self.max_rollbacks:
            return None if signals.nonfinite else Decision(reason.replace("-rollback", ""), stop=True)
        self.rollbacks += 1
        # The restored optimizer state carries the old multipliers: set them after the restore.
        multipliers = tuple(float(g["lr"]) * self.backoff for g in self.optimizer.param_groups)
        return Decision(reason, restore=_GOOD, lr=multipliers, info={"rollbacks": self.rollbacks})

    def on_train_end(self) -> Decision | None:
        if self.monitor is not None:
            self.monitor.remove()
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "initial_loss": self.initial_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks = state.get("rollbacks", 0)
        self.initial_loss = state.get("initial_loss", math.nan)


# ====================================================================================================
# Registry
# ====================================================================================================
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_backoff(backoff: Any, max_rollbacks: Any, explode_factor: Any = None) -> None:
    if not (_is_number(backoff) and 0 < backoff < 1):
        raise ValueError(f"backoff must be in (0, 1), got {backoff!r}")
    if not (isinstance(max_rollbacks, int) and not isinstance(max_rollbacks, bool) and max_rollbacks >= 0):
        raise ValueError(f"max_rollbacks must be an integer >= 0, got {max_rollbacks!r}")
    if explode_factor is not None and not (_is_number(explode_factor) and explode_factor > 1):
        raise ValueError(f"explode_factor must be None or a number > 1, got {explode_factor!r}")


def _exploded(signals: EpochSignals, initial_loss: float, factor: float | None) -> bool:
    """A finite epoch whose mean training loss or validation loss exceeds ``factor`` times the validation
    loss at initialisation: the weights are worse than random ones, though no loss was non-finite."""
    if factor is None or not (math.isfinite(initial_loss) and initial_loss > 0):
        return False
    limit = factor * initial_loss
    return any(math.isfinite(v) and v > limit for v in (signals.train_loss, signals.val_loss))


def _options_error(method: str, err: ValueError) -> ValueError:
    return ValueError(f"method {method!r}: {err}")


def _loss_spec(ctx: BuildContext, method: str) -> LossSpec:
    head = find_head(ctx.model)
    try:
        return LossSpec.from_loss(
            ctx.loss_fn if ctx.loss_fn is not None else nn.CrossEntropyLoss(), head.out_features
        )
    except ValueError as err:
        raise _options_error(method, err) from None


def build_lipschitz(
    ctx: BuildContext,
    initial_lr: float | None,
    momentum: float,
    weight_decay: float,
    mode: str,
    constant: str,
    ls_form: str,
    weight_bound: str,
    backoff: float,
    max_rollbacks: int,
    explode_factor: float | None,
) -> MethodParts:
    name = "lipschitz"
    require_positive("weight_decay", weight_decay, method=name, allow_zero=True)
    if not (_is_number(momentum) and 0 <= momentum < 1):
        raise ValueError(f"option momentum of method {name!r} must be in [0, 1), got {momentum!r}")
    if initial_lr is not None:
        require_positive("initial_lr", initial_lr, method=name)
    spec = _loss_spec(ctx, name)
    # The LR is set before the first step (probe or initial_lr); this placeholder is never applied.
    opt = torch.optim.SGD(ctx.params(), lr=initial_lr or 1e-3, momentum=momentum, weight_decay=weight_decay)
    try:
        pilot = LipschitzPilot(
            opt, loss=spec, train_loader=ctx.train_loader, mode=mode, initial_lr=initial_lr, constant=constant,
            ls_form=ls_form, weight_bound=weight_bound, backoff=backoff, max_rollbacks=max_rollbacks,
            explode_factor=explode_factor,
        )  # fmt: skip
    except ValueError as err:
        raise _options_error(name, err) from None
    return MethodParts(opt, pilot, info={"loss": spec.kind})


def _source(ctx: BuildContext, method: str, ls_form: str, elementwise: bool) -> LastLayerLipschitz:
    spec = _loss_spec(ctx, method)
    require_in("ls_form", ls_form, ("paper", "bound"), method=method)
    y_norm = (
        _targets_norm(ctx.train_loader)
        if spec.kind == "least_squares" and ctx.train_loader is not None
        else 0.0
    )
    monitor = PenultimateMonitor(ctx.model, elementwise=elementwise, outputs=spec.kind == "least_squares")
    return LastLayerLipschitz(monitor, spec, y_norm, ls_form)


def _step_parts(
    ctx: BuildContext,
    opt: _LipschitzOptimizer,
    source: LastLayerLipschitz,
    guard_options: dict[str, Any],
    method: str,
) -> MethodParts:
    try:
        guard = LipschitzGuard(opt, monitor=source.monitor, **guard_options)
    except ValueError as err:
        source.monitor.remove()
        raise _options_error(method, err) from None
    return MethodParts(opt, guard, effective_lr=opt.effective_lrs, info={"loss": source.loss.kind})


def _build_optimizer(
    method: str,
    make: Callable[[LastLayerLipschitz], _LipschitzOptimizer],
    ctx: BuildContext,
    ls_form: str,
    guard_options: dict[str, Any],
    elementwise: bool = True,
) -> MethodParts:
    source = _source(ctx, method, ls_form, elementwise)
    try:
        opt = make(source)
    except ValueError as err:
        source.monitor.remove()
        raise _options_error(method, err) from None
    return _step_parts(ctx, opt, source, guard_options, method)


def _adaptive_builder(method: str, cls: type[_LipschitzOptimizer]) -> Callable[..., MethodParts]:
    """The registry builder of a per-step Lipschitz optimizer: the guard's options go to the guard,
    ``ls_form`` to the constant's source, every other option (the registry has checked them against the
    method's defaults) to ``cls`` itself."""

    def build(ctx: BuildContext, ls_form: str, **options: Any) -> MethodParts:
        guard = {name: options.pop(name) for name in _GUARD}
        # AdaMo needs only the constant; the adaptive denominators need the element-wise norms too,
        # unless max ||grad^2|| is estimated from the first-order bound alone.
        elementwise = cls is not AdaMo and options.get("grad_sq_estimate") != "first"

        def make(source: LastLayerLipschitz) -> _LipschitzOptimizer:
            return cls(ctx.params(), source, steps_per_epoch=ctx.steps_per_epoch, **options)

        return _build_optimizer(method, make, ctx, ls_form, guard, elementwise=elementwise)

    build.__name__ = build.__qualname__ = f"build_{method.replace('-', '_')}"
    return build


_PAPER = "Yedida & Saha, LipschitzLR (shared/papers/003_8119a118a538bf06.txt)"
_GUARD = {"backoff": 0.1, "max_rollbacks": 3, "explode_factor": 10.0}
_ADAPTIVE = {
    "weight_decay": 0.0,
    "update": "step",
    "initial_lr": None,
    "bias_correction": "none",
    "ls_form": "paper",
    **_GUARD,
}


def _register_all() -> None:
    seed = frozenset({"seed-method"})
    entries = [
        MethodInfo(
            "lipschitz",
            "lipschitz",
            "SGD with LR = 1/L, the loss's closed-form Lipschitz constant (per epoch for networks, fixed for classical models)",
            build_lipschitz,
            {
                "initial_lr": None,
                "momentum": 0.0,
                "weight_decay": 0.0,
                "mode": "auto",
                "constant": "paper",
                "ls_form": "paper",
                "weight_bound": "all",
                **_GUARD,
            },
            lr_granularity="epoch",
            kind="epoch-pilot",
            tags=seed,
            paper=_PAPER,
            handles_nonfinite=True,
            invalid_options=(
                ({"mode": "deep"}, r"mode"),
                ({"initial_lr": -1.0}, r"initial_lr"),
                ({"backoff": 1.5}, r"backoff"),
                ({"momentum": 1.0}, r"momentum"),
            ),
        ),
        MethodInfo(
            "adamo",
            "lipschitz",
            "AdaMo: momentum SGD with LR = 1/EMA of per-batch Lipschitz constants (Algorithm 1)",
            _adaptive_builder("adamo", AdaMo),
            {"lr": 1.0, "beta": 0.9, **_ADAPTIVE, "initial_lr": 0.1},
            lr_granularity="step",
            kind="step-pilot",
            tags=seed,
            paper=_PAPER,
            handles_nonfinite=True,
            invalid_options=(
                ({"beta": 1.0}, r"beta"),
                ({"update": "batch"}, r"update"),
                ({"initial_lr": -0.1}, r"initial_lr"),
                ({"bias_correction": True}, r"bias_correction"),
                ({"update": "epoch", "initial_lr": None}, r"initial_lr"),
            ),
        ),
        MethodInfo(
            "lipschitz-rmsprop",
            "lipschitz",
            "Adaptive RMSprop: LR = (sqrt(K2)+eps)/L from Lipschitz averages (section 6.2)",
            _adaptive_builder("lipschitz-rmsprop", LipschitzRMSprop),
            {
                "lr": 1.0,
                "rho": 0.9,
                "eps": 1e-8,
                "eps_inside_sqrt": True,
                "grad_sq_estimate": "remedy",
                "k2_init": 0.0,
                "denominator": "kz",
                **_ADAPTIVE,
            },
            lr_granularity="step",
            kind="step-pilot",
            paper=_PAPER,
            handles_nonfinite=True,
            invalid_options=(
                ({"rho": 1.5}, r"rho"),
                ({"grad_sq_estimate": "third"}, r"grad_sq_estimate"),
                ({"denominator": "k1"}, r"denominator"),
            ),
        ),
        MethodInfo(
            "auto-adam",
            "lipschitz",
            "Auto-Adam: Adam with LR = (sqrt(K2)+eps)/K1 from Lipschitz averages (Algorithm 3)",
            _adaptive_builder("auto-adam", AutoAdam),
            {
                "lr": 1.0,
                "beta1": 0.9,
                "beta2": 0.999,
                "eps": 1e-8,
                "eps_inside_sqrt": True,
                "grad_sq_estimate": "remedy",
                "k1_init": 0.0,
                "k2_init": 0.0,
                **_ADAPTIVE,
            },
            lr_granularity="step",
            kind="step-pilot",
            tags=seed,
            paper=_PAPER,
            handles_nonfinite=True,
            invalid_options=(
                ({"beta2": 1.0}, r"beta2"),
                ({"k1_init": -1.0}, r"k1_init"),
                ({"eps": -1.0}, r"eps"),
            ),
        ),
    ]
    for info in entries:
        register(info)


_register_all()
