r"""Hypergradient LR pilots: SGD that learns its own LR by gradient descent, every step.

Majumder, Donini & Chaudhari, *Learning the Learning Rate for Gradient Descent by Gradient Descent*
(RT-HPO, ``shared/papers/002_d28fdd73ca38742b.txt``, section 3) update the LR of SGD with a
hyper-learning rate :math:`\beta` (their eq. 2):

.. math::
    \eta_{t+1} = \eta_t + \beta\, \Delta\eta_t, \qquad -\Delta\eta_t = \frac{dE(w)}{d\eta}
    \text{ (the hypergradient)},

where :math:`E` is a performance metric: the validation loss, or the training loss itself. The three
methods of the paper's Table 1 differ in how they estimate :math:`\Delta\eta_t`:

* :class:`SGDHD`, **First-order (Train)** (Baydin et al. 2018, the paper's eq. 6):
  :math:`\Delta\eta_t = \langle \nabla\ell(w_{t-1}; b_{t-1}), \nabla\ell(w_t; b_t)\rangle`; the LR grows
  while consecutive gradients agree.
* :class:`SGDHDVal`, **First-order (Val)**: the current training gradient replaced by the gradient of
  the validation loss on a validation mini-batch, :math:`\nabla E(w_t; v_t)`.
* :class:`RTHPO`: eq. 5. The tangent :math:`z_t = dw_t/d\eta` is carried forward through the SGD map
  :math:`\Phi(w, \eta) = w - \eta\nabla\ell(w)` as :math:`z_{t+1} = A_t z_t + B_t` with
  :math:`A_t z = z - \eta_t \nabla^2\ell(w_t; b_t)\, z` (one Hessian-vector product per step) and
  :math:`B_t = -\nabla\ell(w_t; b_t)`; then :math:`\Delta\eta_t = -\langle\nabla E(w_t; v_t), z_t\rangle`.

All three are one class, :class:`HypergradientSGD`, differing in two settings: the ``objective`` whose
gradient is contracted (training mini-batch or validation mini-batch) and the ``horizon`` of the tangent
(``"one-step"``: :math:`z_t = -d_{t-1}`, the last update direction, i.e. eq. 5 truncated to its last
term with :math:`A = I`; ``"full"``: the whole recursion). The first-order rules are exactly the
one-step truncation of RT-HPO, as the paper notes below eq. 6.

The module registers ``hd-train``, ``hd-val`` and ``rt-hpo`` at the bottom.
"""

from __future__ import annotations

import functools
import inspect
import math
import struct
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lrpilot.core import distributed as dist
from lrpilot.core.checks import is_number, require_bool, require_in, require_positive, require_range
from lrpilot.estimators.curvature import gradient_with_graph, hvp
from lrpilot.pilots.hypergradient.flat import ACC, GRAD, FlatState, eligible_dtype

__all__ = ["RTHPO", "SGDHD", "HypergradientSGD", "SGDHDVal"]

Closure = Callable[..., torch.Tensor]
ValClosure = Callable[[], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

OBJECTIVES = ("train", "val")
_HORIZONS = ("one-step", "full")
_LR_UPDATES = ("before-step", "after-step")
LR_RULES = ("multiplicative", "additive")
_GLOBAL = "hypergradient"  # key of the optimizer-wide state in ``self.state`` (saved by state_dict)


class HypergradientSGD(torch.optim.Optimizer):
    r"""SGD (optionally with momentum) whose LR follows its hypergradient, every step.

    At step :math:`t`, with training gradient :math:`g_t = \nabla\ell(w_t; b_t) + \lambda w_t`, update
    direction :math:`d_t` (:math:`g_t` for plain SGD) and tangent :math:`z_t \approx dw_t/d\eta`:

    .. math::
        \Delta_t = -\langle G_t, z_t\rangle, \qquad
        \eta_t \leftarrow \operatorname{clip}_{[\eta_{\min}, \eta_{\max}]}(\eta_{t-1} + \beta\,\Delta_t),
        \qquad w_{t+1} = w_t - \eta_t d_t,

    with :math:`G_t = g_t` (``objective="train"``) or :math:`G_t = \nabla E(w_t; v_t)`, the gradient of
    the validation loss on a validation mini-batch (``objective="val"``), and

    * ``horizon="one-step"``: :math:`z_t = -d_{t-1}` (Baydin et al.'s hypergradient);
    * ``horizon="full"``: :math:`z_{t+1} = z_t - \eta_t (H_t + \lambda I) z_t - d_t`, :math:`z_0 = 0`
      (RT-HPO, eq. 5), with :math:`H_t z_t` a Hessian-vector product of the training mini-batch loss.

    With momentum :math:`\mu` (torch's convention, :math:`v_{t+1} = \mu v_t + g_t`, :math:`d_t = v_{t+1}`,
    or :math:`d_t = g_t + \mu v_{t+1}` with Nesterov) the tangent also carries the momentum state, as the
    paper suggests (section 3.1): :math:`y_{t+1} = \mu y_t + (H_t + \lambda I) z_t` and the tangent of
    :math:`d_t` (:math:`y_{t+1}`, or :math:`(H_t + \lambda I) z_t + \mu y_{t+1}`) replaces
    :math:`(H_t + \lambda I) z_t` above.

    **Param groups.** Every group has its own LR :math:`\eta^{(k)}` and its own hypergradient. For the
    one-step horizon, :math:`\Delta^{(k)}` contracts over the group's parameters. For the full horizon
    the tangent :math:`dw/d\eta^{(k)}` of *all* weights is carried for every group (exact forward mode:
    one Hessian-vector product per group and step, memory ``len(param_groups)`` times the weights).

    **Safeguard** (Baydin et al.'s reference implementation has none; with a large :math:`\beta` its LR
    goes negative, which is gradient *ascent*, or non-finite): the new LR is clipped to
    ``[min_lr, max_lr]`` (``group["lr_clamped"]`` counts how often), and a non-finite :math:`\Delta_t`
    leaves the LR unchanged (``group["lr_skipped"]``) and resets a non-finite tangent to zero. A step
    whose training loss or gradient is not finite changes nothing at all (weights, LR, tangent, momentum;
    :attr:`steps_skipped` counts them) and returns a ``nan`` loss, whatever the hypergradient: at step 0
    the hypergradient is 0 and finite, and a NaN gradient used to be applied. ``group["hypergrad"]`` holds
    the last hypergradient :math:`dE/d\eta = -\Delta_t` (``nan`` when skipped).

    **Default form** (issue 15, ``docs/robustness-study.md``): the update above is the paper's
    (``lr_rule="additive"``); by default the LR moves multiplicatively,
    :math:`\eta_t = \eta_{t-1} \exp(\beta \cos(G_t, -z_t))`, at most a factor :math:`e^{\pm\beta}` per
    step and never 0, and the tangent is decayed (``tangent_decay``) and, for the full horizon, clipped
    (``tangent_clip``). With the additive rule the step carries the scale of :math:`z`, which grows with
    the horizon and explodes once :math:`\eta\lambda_{\max} > 2`; on a conv net the LR overshot, was
    driven through 0 and stayed there (0 is absorbing: at :math:`\eta = 0` nothing contracts z).
    The paper's form: ``lr_rule="additive", lr=1e-3, beta=1e-3, momentum=0, tangent_decay=1,
    tangent_clip=False`` (Baydin et al. 2018's SGD-HD setting).

    Args:
        params: parameters or param groups.
        lr: initial LR :math:`\bar\eta` (default 0.1; > 0 under the multiplicative rule).
        beta: hyper-learning rate :math:`\beta` (default 0.02: unitless under the multiplicative rule;
            Baydin et al. 2018's SGD-HD setting for the additive rule is 1e-3).
        objective: ``"train"`` or ``"val"``: whose gradient :math:`G_t` is contracted with the tangent.
        horizon: ``"one-step"`` or ``"full"`` (see above).
        momentum: :math:`\mu` in [0, 1) (default 0.9; 0 is the paper's vanilla SGD).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 penalty :math:`\lambda`, part of the training objective (default 0).
        min_lr, max_lr: the LR is kept in ``[min_lr, max_lr]`` (default 0 and ``None``: no cap).
        lr_update: ``"before-step"`` (default, as Baydin et al.'s algorithm and code: the step from
            :math:`w_t` uses the LR just updated with :math:`\Delta_t`) or ``"after-step"`` (the literal
            indexing of the paper's eq. 2: the step uses :math:`\eta_{t-1}`, then the LR moves).
        lr_rule: ``"multiplicative"`` (default: ``lr * exp(beta * cos)``, the cosine of the contracted
            gradient and the tangent) or ``"additive"`` (the paper's ``lr + beta * Delta``).
        tangent_decay: gamma in (0, 1] (default 0.99, per param group). Full horizon:
            ``z_{t+1} = A_t (gamma z_t) + B_t`` (~1/(1 - gamma) steps of memory). One-step horizon: the
            contracted direction is the decayed sum ``a_t = gamma a_{t-1} + d_t`` instead of ``d_{t-1}``
            alone. 1: the paper's.
        tangent_clip: full horizon only (default True): after each step keep
            ``||z|| <= ||d_t|| / (1 - gamma)``; ``False`` (or gamma = 1): no clip, the paper's.
        val_loader, model, loss_fn: for ``objective="val"`` without a ``val_closure`` argument to
            :meth:`step`: validation batches ``(inputs, targets)`` are drawn from ``val_loader`` in turn
            (cycling) and the loss is ``loss_fn(model(inputs), targets)`` (default cross-entropy). The
            position in the loader is part of the state.
        foreach: ``True`` or ``None`` (default): every per-parameter operation of the update is one
            multi-tensor kernel (``torch._foreach_*``) over the group; ``False``: the reference loop,
            one tensor at a time. They give the same weights and LRs, bit for bit on CPU
            (``tests/test_foreach.py``; the multi-tensor path is the one ``flat=False`` takes).
        flat: ``None`` (default) or ``True``: the one-step horizon's default form (multiplicative rule,
            momentum, ``tangent_decay`` < 1) keeps its state on one flat buffer (``flat.py``): the step is
            a handful of kernels whatever the number of tensors (a whole training step of ``hd-train`` on
            ``mnist1d-mlp``: 1.36x -> 1.08x plain SGD, docs/performance.md). The cosine's sums are added in
            another order and two multiply-adds are fused, so the LRs agree with the per-tensor path to
            float rounding, not bit for bit (``tests/test_flat.py``). Frozen parameters (``requires_grad`` False,
            no gradient) are left out of it; a step it cannot take (a trainable parameter without a
            gradient, mixed dtypes or devices, half precision) runs the per-tensor path.
            ``False``: always the per-tensor path. ``True`` raises where the form is not the flat one.

    **Non-finite gradients.** When a training gradient holds a ``nan`` or ``inf`` the step is not
    taken: no weight, momentum buffer or tangent moves, every LR is kept (``group["lr_skipped"]``
    counts it) and the step is not counted. The check is made on the device (the sum of the tensors'
    norms; on the flat layout ``|g|^2``, from the Gram matrix) and read back together with the
    hypergradients, in the step's one device-to-host read.

    **Host reads.** The LR is a Python float in ``param_groups`` (what schedulers, telemetry and
    ``state_dict`` read), so each step reads its hypergradients back once: one synchronisation per
    step on a GPU, whatever the number of parameters or groups.

    References:
        Majumder, Donini & Chaudhari, *Learning the Learning Rate for Gradient Descent by Gradient
        Descent* (``shared/papers/002``), section 3. Baydin, Cornish, Martinez Rubio, Schmidt & Wood,
        *Online Learning Rate Adaptation with Hypergradient Descent*, ICLR 2018. Pearlmutter, *Fast Exact
        Multiplication by the Hessian*, Neural Computation 1994.
    """

    #: keyword signals :meth:`step` needs from a training loop (the registry passes this on)
    needs_val_closure: bool
    needs_closure: bool

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        beta: float = 0.02,
        *,
        objective: str = "train",
        horizon: str = "one-step",
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        min_lr: float = 0.0,
        max_lr: float | None = None,
        lr_update: str = "before-step",
        lr_rule: str = "multiplicative",
        tangent_decay: float = 0.99,
        tangent_clip: bool = True,
        val_loader: Iterable[Any] | None = None,
        model: nn.Module | None = None,
        loss_fn: LossFn | None = None,
        foreach: bool | None = None,
        flat: bool | None = None,
    ) -> None:
        cls = type(self).__name__
        for name, value in (("beta", beta), ("weight_decay", weight_decay), ("min_lr", min_lr)):
            require_positive(name, value, owner=cls, allow_zero=True)
        if max_lr is None:
            max_lr = math.inf
        if not (is_number(max_lr) or max_lr == math.inf) or max_lr < min_lr:
            raise ValueError(f"{cls}: max_lr must be a number >= min_lr ({min_lr}) or None, got {max_lr!r}")
        if not is_number(lr) or not min_lr <= lr <= max_lr:
            raise ValueError(f"{cls}: lr must be a finite number in [min_lr, max_lr] = [{min_lr}, {max_lr}], "
                             f"got {lr!r}")
        require_range("momentum", momentum, 0, 1, open_high=True, owner=cls)
        if nesterov and momentum <= 0:
            raise ValueError(f"{cls}: nesterov=True needs momentum > 0, got momentum={momentum!r}")
        for name, value, choices in (
            ("objective", objective, OBJECTIVES),
            ("horizon", horizon, _HORIZONS),
            ("lr_update", lr_update, _LR_UPDATES),
            ("lr_rule", lr_rule, LR_RULES),
        ):
            require_in(name, value, choices, owner=cls)
        require_range("tangent_decay", tangent_decay, 0, 1, open_low=True, owner=cls)  # 1: the paper's tangent
        require_bool("tangent_clip", tangent_clip, owner=cls)
        if flat is not None:
            require_bool("flat", flat, owner=cls)
        if flat and (horizon != "one-step" or lr_rule != "multiplicative" or momentum == 0 or tangent_decay == 1
                     or foreach is False):
            raise ValueError(f"{cls}: flat=True is the one-step horizon's default form only (horizon='one-step', "
                             f"lr_rule='multiplicative', momentum > 0, tangent_decay < 1, foreach not False); got "
                             f"horizon={horizon!r}, lr_rule={lr_rule!r}, momentum={momentum!r}, "
                             f"tangent_decay={tangent_decay!r}, foreach={foreach!r}")
        if lr_rule == "multiplicative" and lr <= 0:
            raise ValueError(f"{cls}: lr_rule='multiplicative' scales the LR, so lr must be > 0 (an LR of 0 "
                             f"would never move), got {lr!r}")
        self.objective, self.horizon, self.lr_update = objective, horizon, lr_update
        self.lr_rule, self.tangent_clip, self.flat = lr_rule, tangent_clip, flat
        self._flat: FlatState | None = None  # the layout (flat.py), built at the first flat step
        defaults = {
            "lr": float(lr),
            "beta": float(beta),
            "momentum": float(momentum),
            "nesterov": bool(nesterov),
            "weight_decay": float(weight_decay),
            "min_lr": float(min_lr),
            "max_lr": float(max_lr),
            "tangent_decay": float(tangent_decay),
            "foreach": foreach,
        }
        super().__init__(params, defaults)
        self._add_counters()
        # Only the full horizon needs the loop's closure (its HVPs need the loss's graph). The one-step
        # forms step on .grad as any torch optimizer does, so they run in any loop (Lightning's automatic
        # optimization included); a step they skip on a non-finite gradient changes nothing and is counted
        # (steps_skipped); given a closure, they return nan for it, which the loop then sees.
        self.needs_closure = horizon == "full"
        self.needs_val_closure = objective == "val"
        self._val_stream: _ValidationStream | None = None
        # Not state: which .grad tensors the one-step horizon keeps by reference (see _keep_directions).
        # Keyed by id(param) (a parameter lives as long as its optimizer): hashing a tensor key costs a
        # Python call, and these are looked up for every tensor in every step.
        self._last_grad: dict[int, weakref.ref[torch.Tensor]] = {}
        self._lent: dict[int, int | None] = {}
        if val_loader is not None:
            if objective != "val":
                raise ValueError(f"{cls}: val_loader is only used with objective='val'")
            if model is None:
                raise ValueError(f"{cls}: val_loader needs model= (the network to evaluate on it)")
            self._val_stream = _ValidationStream(val_loader, model, loss_fn or nn.functional.cross_entropy)
        elif model is not None or loss_fn is not None:
            raise ValueError(f"{cls}: model= and loss_fn= are only used together with val_loader=")

    # ------------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------------
    @property
    def _global(self) -> dict[str, Any]:
        """Optimizer-wide counters: a non-parameter key of ``self.state``, which torch saves as is."""
        state = self.state[_GLOBAL]  # type: ignore[index]
        if not state:
            state.update(step=0, val_cursor=0, tangent_groups=len(self.param_groups))
        return state

    def _add_counters(self) -> None:
        for group in self.param_groups:  # checkpoints from before a counter existed still load
            group.setdefault("foreach", None)
            group.setdefault("tangent_decay", 1.0)  # checkpoints from before the option: the paper's tangent
            group.setdefault("hypergrad", 0.0)
            group.setdefault("lr_clamped", 0)
            group.setdefault("lr_skipped", 0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if _GLOBAL in state["state"]:  # a copy: the live counters must not change a saved checkpoint
            state["state"][_GLOBAL] = dict(state["state"][_GLOBAL])
        if self._flat is not None:  # views into the flat buffer: saved alone they would drag the whole
            flat = self._flat        # buffer (scratch rows too) into every checkpoint, so copies
            for index, entry in state["state"].items():
                if index != _GLOBAL and any(isinstance(v, torch.Tensor) and flat.owns(v) for v in entry.values()):
                    state["state"][index] = {k: v.clone() if isinstance(v, torch.Tensor) and flat.owns(v) else v
                                             for k, v in entry.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._flat = None  # the next flat step lays the loaded state out afresh
        self._last_grad, self._lent = {}, {}
        if _GLOBAL in self.state:
            self.state[_GLOBAL] = dict(self.state[_GLOBAL])  # type: ignore[index]
        self._add_counters()

    # ------------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------------
    def step(  # type: ignore[override]
        self, closure: Closure | None = None, *, val_closure: ValClosure | None = None, **_: Any
    ) -> Any:
        """One SGD step after one hypergradient update of every group's LR.

        Args:
            closure: for ``horizon="one-step"``, the usual optional closure (zero_grad, backward,
                return the loss). For ``horizon="full"`` (RT-HPO) it is required and must return the
                training mini-batch loss *with its graph* (no ``backward``): a closure with a
                ``backward`` keyword (the lrpilot loop's) is called with ``backward=False``.
            val_closure: for ``objective="val"``: returns the loss on the next validation mini-batch
                with its graph attached (no ``backward``). Not needed when the optimizer was built with
                ``val_loader``. Other keyword signals are ignored.

        Returns:
            The training loss returned by the closure, or ``None``.
        """
        if self.objective == "val" and val_closure is None and self._val_stream is None:
            raise ValueError(self._missing_val_message())
        if self.horizon == "full":
            return self._step_full(closure, val_closure)
        return self._step_one_step(closure, val_closure)

    # -- first-order (one-step tangent): SGD-HD and First-order (Val) ----------------------------------
    def _step_one_step(self, closure: Closure | None, val_closure: ValClosure | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = self._flat_layout()
        if flat is not None:
            return self._step_flat(flat, loss, val_closure)
        glob = self._global
        groups = []  # (group, params with a gradient, their gradients incl. weight decay)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if group["weight_decay"] and params:
                grads = _add(grads, params, alpha=group["weight_decay"], foreach=group["foreach"])
            groups.append((group, params, grads))

        ref = self.param_groups[0]["params"][0]
        # Whether each group's training gradient is finite. When the hypergradient contracts that very
        # gradient with a previous direction of every tensor, a non-finite entry makes it non-finite, so
        # the check costs nothing unless it is: then (rarely) one more read. Otherwise (the first step,
        # a tensor with no previous direction, the validation objective) a flag computed on the device
        # is read back with the hypergradients.
        flags: list[torch.Tensor | None] = [None] * len(groups)
        # What each group reads back: its 0-d hypergradient (form None) or, on the multi-tensor path
        # with the multiplicative rule, the sums <a, b>, |a|^2, |b|^2 ("cos"), with the finiteness flag
        # as a fourth entry where it fits ("cos+flag"); their cosine is finished on the host
        # (_host_cosine: the same float32 operations, ~8 fewer dispatches per group).
        forms: list[str | None] = [None] * len(groups)
        if glob["step"] == 0:  # z_0 = 0: the hypergradient is 0, skip the validation pass
            dots = [torch.zeros((), dtype=ref.dtype, device=ref.device) for _ in groups]
            covered = [False] * len(groups)
        else:
            contracted = [grads for *_, grads in groups]
            if self.objective == "val":
                all_params = [p for _, ps, _ in groups for p in ps]
                val_grads = iter(self._validation_gradient(val_closure, all_params))
                contracted = [[next(val_grads) for _ in ps] for _, ps, _ in groups]
            dots, covered = [], []
            multiplicative = self.lr_rule == "multiplicative"
            for k, ((group, params, grads), gs) in enumerate(zip(groups, contracted)):
                prev = [self._previous_direction(p) for p in params]
                pairs = [(g, d) for g, d in zip(gs, prev) if d is not None]
                a, b = [g for g, _ in pairs], [d for _, d in pairs]
                cov = self.objective == "train" and len(pairs) == len(params)
                if group["foreach"] is False:  # the reference: one dot at a time
                    dot = _dot(a, b, ref=ref)
                    dots.append(_cosine(dot, a, b, ref=ref) if multiplicative else dot)
                elif multiplicative and a and _host_cosine_dtype(a[0].dtype):
                    dots.append(_cosine_sums(_flats(a), _flats(b), None if cov else grads))
                    forms[k] = "cos" if dots[-1].numel() == 6 else "cos+flag"
                    cov = cov or forms[k] == "cos+flag"  # its flag comes with the sums
                else:
                    dots.append(_hypergrad_fast(a, b, multiplicative=multiplicative, ref=ref))
                covered.append(cov)
        for k, ((group, _, grads), cov) in enumerate(zip(groups, covered)):
            if not cov:
                flags[k] = _finite_flag(grads)
        # the one device-to-host read of the step: the hypergradients and the flags that are needed
        values = iter(_read_parts([*dots, *(f for f in flags if f is not None)]))
        deltas, finite = [], [True] * len(groups)
        for k, form in enumerate(forms):
            if form is None:
                deltas.append(next(values))
            else:  # [dot, |a|^2, |b|^2, (flag), and their square roots]
                got = [next(values) for _ in range(dots[k].numel())]
                deltas.append(_host_cosine(got[0], got[len(got) // 2 + 1], got[len(got) // 2 + 2], dots[k].dtype))
                if form == "cos+flag":
                    finite[k] = math.isfinite(got[3])
        for k, f in enumerate(flags):
            if f is not None:
                finite[k] = math.isfinite(next(values))

        for k, ((_, _, grads), delta) in enumerate(zip(groups, deltas)):
            if flags[k] is None and forms[k] != "cos+flag" and not math.isfinite(delta):
                finite[k] = _all_finite(grads)  # a non-finite hypergradient: was it this gradient?
        if not all(finite):  # never apply a non-finite gradient: nothing moves, every LR is kept
            for group, _, _ in groups:
                self._skip_lr(group)
            return self._skip_nonfinite(loss)

        with torch.no_grad():
            for (group, params, grads), delta in zip(groups, deltas):
                lr_step = self._update_lr(group, delta)
                if not params:
                    continue
                fused = self._momentum_and_accumulate(group, params, grads)
                if fused is not None:
                    _add_(params, fused, alpha=-lr_step, foreach=group["foreach"])
                    continue
                directions = self._directions(group, params, grads)
                owned = directions is not grads or bool(group["weight_decay"])  # not the raw .grad tensors
                if group["tangent_decay"] == 1.0:
                    self._keep_directions(params, directions, owned=owned)
                else:
                    self._accumulate_directions(group, params, directions)
                _add_(params, directions, alpha=-lr_step, foreach=group["foreach"])
        glob["step"] += 1
        return loss

    def _flat_layout(self) -> FlatState | None:
        """The flat layout for this step, or ``None`` where the per-tensor path must take it (see ``flat``)."""
        if self.flat is False or self.lr_rule != "multiplicative":
            return None
        groups = self.param_groups
        # A frozen parameter (requires_grad False, no gradient) is left out of the layout, as the per-tensor
        # path leaves it alone; a trainable one without a gradient this step sends the step there.
        laid_out = []
        for group in groups:
            if group["foreach"] is False or group["momentum"] == 0 or group["tangent_decay"] == 1.0:
                return None
            params = [p for p in group["params"] if p.requires_grad or p.grad is not None]
            if not params:
                return None
            for p in params:
                if p.grad is None or p.grad.is_sparse:
                    return None
            laid_out.append(params)
        layout = self._flat
        if layout is None or not layout.current(laid_out, self.state):
            first = laid_out[0][0]
            if not eligible_dtype(first.dtype) or any(
                p.dtype != first.dtype or p.device != first.device for ps in laid_out for p in ps
            ):
                return None
            layout = self._flat = FlatState(laid_out, self.state, self._lent, validation=self.objective == "val")
        return layout

    def _step_flat(self, flat: FlatState, loss: Any, val_closure: ValClosure | None) -> Any:
        """The default one-step update on the flat buffer: the same rule as the per-tensor path.

        ``g <- grad + wd w`` (one copy and one add into the GRAD row), the Gram matrix of the group's rows
        ``[g, a(, v)]`` (one kernel; on large tensors ``<v, a>`` and ``|v|^2`` per tensor instead), one host
        read of every group's entries (the cosine on the host, the finiteness of ``g`` from ``|g|^2``), then per group ``m <- g + mu m``, ``d = m`` (or ``g + mu m``),
        ``a <- d + gamma a``, ``w <- w - lr d`` (two row passes and one multi-tensor add).
        """
        glob = self._global
        groups = self.param_groups
        with torch.no_grad():
            torch._foreach_copy_(flat.grad_views, [p.grad for p in flat.all_params])
            for k, group in enumerate(groups):
                if group["weight_decay"]:
                    torch._foreach_add_(flat.views[GRAD][k], flat.params[k], alpha=group["weight_decay"])
        rows, val_grads = 2, None  # rows of the Gram matrix: [g, a], or [g, a, v] with the validation row
        if self.objective == "val" and glob["step"] > 0:  # at step 0 a = 0: the cosine is 0, no validation pass
            val_grads = self._validation_gradient(val_closure, flat.all_params)
            if flat.val_row is not None:
                rows = 3
                with torch.no_grad():
                    torch._foreach_copy_(flat.val_views, val_grads)
        with torch.no_grad():
            parts = [flat.gram(k, rows).reshape(-1) for k in range(len(groups))]
            if val_grads is not None and rows == 2:  # large tensors: <v, a> and |v|^2 where v lies (flat.py)
                start = 0
                for accs in flat.views[ACC]:
                    vs = _flats(val_grads[start:start + len(accs)])
                    start += len(accs)
                    parts.append(_dot_rows([(vs, _flats(accs)), (vs, vs)]))
            # the one device-to-host read of the step
            values = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
        n_groups, size = len(groups), rows * rows
        cosines, finite = [], True
        for k in range(n_groups):
            gram = values[k * size:(k + 1) * size]
            gg, aa = gram[0], gram[rows + 1]  # <g, g>, <a, a>
            finite = finite and math.isfinite(gg)  # a nan or inf in g shows in |g|^2 (overflow aside, as _finite_flag)
            if val_grads is None:
                dot, norm2 = gram[1], gg  # <g, a>, |g|^2
            elif rows == 3:
                dot, norm2 = gram[2 * rows + 1], gram[2 * rows + 2]  # <v, a>, |v|^2
            else:
                dot, norm2 = values[n_groups * size + 2 * k:n_groups * size + 2 * k + 2]
            den = math.sqrt(norm2) * math.sqrt(aa) if norm2 >= 0 and aa >= 0 else math.nan
            cosines.append(0.0 if den == 0 else dot / den)
        if not finite:  # never apply a non-finite gradient: nothing moves, every LR is kept
            for group in groups:
                self._skip_lr(group)
            return self._skip_nonfinite(loss)
        with torch.no_grad():
            for k, (group, cosine) in enumerate(zip(groups, cosines)):
                lr_step = self._update_lr(group, cosine)
                rows = flat.rows_of[k]
                g, a, m = rows[GRAD], rows[ACC], rows[flat.mom_row]
                mu = group["momentum"]
                # m <- g + mu m and a <- d + gamma a, each one pass (torch's add computes x + alpha y as one
                # fused multiply-add on CPU): the step is memory bound on a large network, and the per-tensor
                # path's mul_ then add_ is two (the last bit differs; the flat path is held to a tolerance)
                torch.add(g, m, alpha=mu, out=m)
                d, views = m, flat.views[flat.mom_row][k]
                if group["nesterov"]:  # d = g + mu m, in the GRAD row (g is not needed again)
                    g.add_(m, alpha=mu)
                    d, views = g, flat.views[GRAD][k]
                torch.add(d, a, alpha=group["tangent_decay"], out=a)
                torch._foreach_add_(flat.params[k], views, alpha=-lr_step)
        glob["step"] += 1
        return loss

    def _keep_directions(
        self, params: list[torch.Tensor], directions: list[torch.Tensor], *, owned: bool
    ) -> None:
        """Keep d_t for the next step's hypergradient, without copying it when that is safe.

        ``owned`` directions (momentum buffers, fresh tensors) are ours and kept by reference. The raw
        ``.grad`` tensors of plain SGD are kept by reference too when the training loop hands out new
        gradient tensors every step (``zero_grad(set_to_none=True)``, torch's default): then nothing
        writes into last step's tensor. A loop that zeroes gradients in place reuses the tensor; that
        shows as the same tensor two steps running, and we copy into a buffer of our own instead.
        """
        last_grad, lent, states = self._last_grad, self._lent, self.state
        fresh = True
        for p in params:
            ref = last_grad.get(id(p))
            if ref is None or ref() is p.grad:
                fresh = False
                break
        for p, d in zip(params, directions):
            key, grad = id(p), p.grad
            state = states[p]
            last_grad[key] = weakref.ref(grad)
            if owned or fresh:
                state["direction"] = d
                lent[key] = d._version if d is grad else None
            else:
                if "direction" not in state or lent.get(key) is not None or state["direction"] is d:
                    state["direction"] = torch.empty_like(d)
                state["direction"].copy_(d)
                lent[key] = None

    def _accumulate_directions(
        self, group: dict[str, Any], params: list[torch.Tensor], directions: list[torch.Tensor]
    ) -> None:
        """``tangent_decay`` gamma < 1: keep ``a_t = gamma a_{t-1} + d_t`` in an owned buffer.

        This is RT-HPO's tangent with the curvature term left out (A = I), over a horizon of about
        1 / (1 - gamma) steps: the study (``docs/robustness-study.md``, hd-train) found the one-step
        hypergradient ``<g_{t-1}, g_t>`` biased low (consecutive mini-batch gradients anti-correlate
        through the curvature), so even a scale-free rule drifts the LR down; over ~100 steps the
        agreement adds up linearly and the noise as its square root. Never a borrowed ``.grad``.
        """
        states, lent, fe = self.state, self._lent, group["foreach"]
        accs = []
        for p, d in zip(params, directions):
            state = states[p]
            acc = state.get("direction")
            if acc is None or lent.get(id(p)) is not None or acc is d:
                state["direction"] = torch.zeros_like(d)
            else:
                accs.append(acc)
            lent[id(p)] = None
        _mul_(accs, group["tangent_decay"], foreach=fe)
        _add_([states[p]["direction"] for p in params], directions, alpha=1, foreach=fe)

    def _momentum_and_accumulate(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """The default one-step update (multi-tensor, momentum, ``tangent_decay`` < 1) in four kernels.

        The same operations as :meth:`_directions` then :meth:`_accumulate_directions`, on the same
        tensors with the same scalars, so the same bits; only the momentum buffers' and the
        accumulators' decays are one ``_foreach_mul_`` (distinct tensors: the order does not matter)
        and one pass over the state finds both. Returns the directions to apply; declines (``None``:
        the general path runs) unless every tensor already has its own momentum buffer and
        accumulator (not the first step, no borrowed ``.grad``).
        """
        mu, gamma = group["momentum"], group["tangent_decay"]
        if group["foreach"] is False or mu == 0 or gamma == 1.0:
            return None
        states, lent = self.state, self._lent
        bufs, accs = [], []
        for p in params:
            state = states[p]
            buf, acc = state.get("momentum_buffer"), state.get("direction")
            if buf is None or acc is None or acc is buf or lent.get(id(p)) is not None:
                return None
            bufs.append(buf)
            accs.append(acc)
        n = len(bufs)
        torch._foreach_mul_(bufs + accs, [mu] * n + [gamma] * n)
        torch._foreach_add_(bufs, grads, alpha=1)
        directions = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        torch._foreach_add_(accs, directions, alpha=1)
        return directions

    def _previous_direction(self, p: torch.Tensor) -> torch.Tensor | None:
        """d_{t-1} of ``p``; ``nan`` if a borrowed ``.grad`` was written into since (never silently wrong)."""
        d = self.state[p].get("direction")
        version = self._lent.get(id(p))
        if d is not None and version is not None and d._version != version:
            return torch.full_like(d, math.nan)  # the hypergradient is skipped, the LR kept
        return d

    # -- RT-HPO (full tangent) -----------------------------------------------------------------------
    def _step_full(self, closure: Closure | None, val_closure: ValClosure | None) -> Any:
        cls = type(self).__name__
        if closure is None:
            raise ValueError(
                f"{cls}.step needs the training loss with its graph for the Hessian-vector product: pass a "
                f"closure that returns it without calling backward, e.g. "
                f"opt.step(lambda: loss_fn(model(x), y)); lrpilot's training loop does this itself"
            )
        loss = _loss_with_graph(closure, cls)
        glob = self._global
        n_groups = len(self.param_groups)
        if glob["tangent_groups"] != n_groups:
            raise RuntimeError(f"{cls}: param groups were added after the first step; build a new optimizer")
        segments, params = [], []  # segments[k] = (group k, the slice of `params` it owns)
        for group in self.param_groups:
            start = len(params)
            params += [p for p in group["params"] if p.requires_grad]
            segments.append((group, slice(start, len(params))))
        first = glob["step"] == 0  # z_0 = 0: no Hessian-vector product, no validation pass
        # tangents[k][i] = d w_i / d eta_k, for every weight i and every group's LR k
        tangents = [[self._state_tensor(p, "tangent")[k] for p in params] for k in range(n_groups)]
        grads, hz = self._gradient_and_hvps(loss, params, tangents, first, cls)
        # Under torch.distributed each rank differentiated its own shard of the batch: average the
        # gradient and the Hessian-vector products so every rank holds those of the global batch.
        dist.all_reduce_mean_([*grads, *(t for hz_k in hz for t in hz_k)])

        if first:
            deltas = torch.zeros(n_groups, dtype=loss.dtype, device=loss.device)
        else:
            contracted = self._validation_gradient(val_closure, params) if self.objective == "val" else None
            with torch.no_grad():
                for group, sl in segments:
                    if group["weight_decay"]:  # the regularised objective's Hessian: H + lambda I
                        for k in range(n_groups):
                            _add_(hz[k][sl], tangents[k][sl], alpha=group["weight_decay"], foreach=group["foreach"])
                if contracted is None:  # objective "train": the gradient the step follows (with weight decay)
                    contracted = [
                        g.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else g
                        for group, sl in segments
                        for g, p in zip(grads[sl], params[sl])
                    ]
                ref = self.param_groups[0]["params"][0]
                if not params or any(group["foreach"] is False for group in self.param_groups):
                    dots = [_dot(contracted, tangents[k], ref=ref) for k in range(n_groups)]
                    if self.lr_rule == "multiplicative":
                        dots = [_cosine(dot, contracted, tangents[k], ref=ref) for k, dot in enumerate(dots)]
                    deltas = -torch.stack(dots)
                else:
                    cs, flat_tangents = _flats(contracted), [_flats(zs) for zs in tangents]
                    if self.lr_rule == "multiplicative":  # every <c, z_k>, <c, c> and <z_k, z_k> in one stack
                        sums = _dot_rows([(cs, zs) for zs in flat_tangents] + [(cs, cs)]
                                         + [(zs, zs) for zs in flat_tangents])
                        deltas = -_cosines(sums[:n_groups], sums[n_groups], sums[n_groups + 1 :])
                    else:
                        deltas = -_dot_rows([(cs, zs) for zs in flat_tangents])
        # the one device-to-host read of the step: the loss, every group's hypergradient and gradient check
        flags = [_finite_flag(grads[sl]) for group, sl in segments]
        values = _read([loss.detach(), *deltas.unbind(0), *flags])
        if dist.any_true(not math.isfinite(values[0])):
            return loss  # a non-finite training loss: change nothing (the loop ends the epoch)
        finite = [math.isfinite(v) for v in values[1 + n_groups :]]
        if not all(finite):  # never apply a non-finite gradient: nothing moves, every LR is kept
            for group, _ in segments:
                self._skip_lr(group)
            return self._skip_nonfinite(loss)
        values = values[: 1 + n_groups]

        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g  # the training gradient, for anyone who inspects .grad after the step
            lrs, all_directions = [], []
            for k, ((group, _), delta) in enumerate(zip(segments, values[1:])):
                lrs.append(self._update_lr(group, delta))
                if not math.isfinite(delta) and not first and self._reset_tangent_if_nonfinite(params, k):
                    hz[k] = [torch.zeros_like(p) for p in params]
            for own, ((group, sl), lr_step) in enumerate(zip(segments, lrs)):
                ps, gs = params[sl], grads[sl]
                if not ps:
                    continue
                fe = group["foreach"]
                if group["weight_decay"]:
                    gs = _add(gs, ps, alpha=group["weight_decay"], foreach=fe)
                directions = self._directions(group, ps, gs)
                all_directions += directions
                # z_k <- z_k - eta (d d_t / d eta_k) - [k == own group] d_t, all at w_t
                for k in range(n_groups):
                    zs = tangents[k][sl]
                    if not first:
                        dz = self._tangent_directions(group, ps, hz[k][sl], k)
                        _add_(zs, dz, alpha=-lr_step, foreach=fe)
                    if k == own:
                        _add_(zs, directions, alpha=-1, foreach=fe, subtract=True)
                _add_(ps, directions, alpha=-lr_step, foreach=fe)
            self._shrink_tangents(params, tangents, all_directions)
        glob["step"] += 1
        return loss

    def _shrink_tangents(
        self, params: list[torch.Tensor], tangents: list[list[torch.Tensor]], directions: list[torch.Tensor]
    ) -> None:
        """After a step: clip z_k (``tangent_clip``) and decay it by group k's ``tangent_decay`` gamma.

        **Decay.** The stored tangent is ``gamma z_{t+1}``, so the next step's contraction and its
        Hessian-vector product see ``z_{t+1} = A_t (gamma z_t) + B_t``. Why: with gamma = 1 (the paper)
        z sums every past update direction and its norm grows with the run (linearly on a plateau,
        geometrically once ``lr * lambda_max > 2``); ``docs/robustness-study.md`` traced rt-hpo's
        divergence and its LR stuck at 0 to this. gamma = 0.99 keeps a horizon of ~100 steps. Done at
        the end of a step taken (not at the start of the next) so that a skipped step changes nothing.

        **Clip** (before the decay): ``||z_k|| <= ||d_t|| / (1 - gamma)`` (norms over all weights,
        ``d_t`` this step's update directions), the most a decayed sum of update directions reaches
        without curvature amplifying it. Why: along negative-curvature directions of the mini-batch
        Hessian (or past the stability edge) ``A_t`` expands z faster than the decay shrinks it; in
        the study z reached 1e18 and then non-finite while training itself was stable, freezing the LR.
        The multiplicative rule uses only z's direction, so rescaling z loses nothing it needs. The
        scale ``min(1, bound / ||z_k||)`` stays on the device (no host read); a non-finite norm leaves
        z to the non-finite reset of the next step. With gamma = 1 the bound is infinite: no clip.
        """
        ref = self.param_groups[0]["params"][0]
        fast = all(group["foreach"] is not False for group in self.param_groups)
        d_norm: torch.Tensor | None = None
        for k, group in enumerate(self.param_groups):
            gamma = group["tangent_decay"]
            if gamma == 1.0:
                continue
            zs = tangents[k]
            ys = [self.state[p]["tangent_momentum"][k] for p in params if "tangent_momentum" in self.state[p]]
            factor: float | torch.Tensor = gamma
            if self.tangent_clip:
                if fast and len(directions) == len(zs) > 0:  # ||d|| (once) and ||z_k||: one stack
                    fz = _flats(zs)
                    if d_norm is None:
                        fd = _flats(directions)
                        d_norm, z_norm = _dot_rows([(fd, fd), (fz, fz)]).sqrt().unbind(0)
                    else:
                        z_norm = _dot_rows([(fz, fz)]).sqrt()[0]
                else:
                    if d_norm is None:
                        d_norm = _dot(directions, directions, ref=ref).sqrt()
                    z_norm = _dot(zs, zs, ref=ref).sqrt()
                bound = d_norm / (1.0 - gamma)
                factor = torch.where(z_norm > bound, bound / z_norm, torch.ones_like(z_norm)) * gamma
            _mul_([*zs, *ys], factor, foreach=group["foreach"])

    def _gradient_and_hvps(
        self,
        loss: torch.Tensor,
        params: list[torch.Tensor],
        tangents: list[list[torch.Tensor]],
        first: bool,
        cls: str,
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """The training gradient (detached) and H z_k for every tangent (none on the first step)."""
        try:
            with torch.enable_grad():
                if first:
                    raw = list(torch.autograd.grad(loss, params, allow_unused=True))
                    hz: list[list[torch.Tensor]] = []
                else:
                    raw = gradient_with_graph(loss, params)
                    last = len(tangents) - 1
                    hz = [hvp(raw, params, zs, retain_graph=k < last) for k, zs in enumerate(tangents)]
        except RuntimeError as err:
            if "backward through the graph a second time" in str(err):
                raise RuntimeError(
                    f"{cls}.step: the closure called backward(), which frees the graph the Hessian-vector "
                    f"product needs; return the loss without calling backward"
                ) from err
            raise
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, raw)], hz

    # ------------------------------------------------------------------------------------------------
    # pieces
    # ------------------------------------------------------------------------------------------------
    @property
    def steps_skipped(self) -> int:
        """Steps skipped because the training gradient was not finite (nothing changed in them)."""
        return int(self._global.get("steps_skipped", 0))

    def _skip_nonfinite(self, loss: Any) -> torch.Tensor:
        """Count a step skipped for a non-finite gradient; its result: ``nan`` as the loss.

        The loop's closure path (``needs_closure``, set for every horizon) reads the returned loss, so the
        skipped step reaches its non-finite handling (the epoch ends, the pilot or safety net decides).
        """
        glob = self._global
        glob["steps_skipped"] = glob.get("steps_skipped", 0) + 1
        ref = loss.detach() if isinstance(loss, torch.Tensor) else self.param_groups[0]["params"][0].detach()
        return torch.full((), math.nan, dtype=ref.dtype, device=ref.device)

    def _skip_lr(self, group: dict[str, Any]) -> None:
        """A step not taken (non-finite gradient): the LR is kept and the skip counted."""
        group["hypergrad"] = math.nan
        group["lr_skipped"] += 1

    def _update_lr(self, group: dict[str, Any], delta: float) -> float:
        """Move the group's LR (safeguarded); return the LR this step applies.

        ``lr_rule="additive"``: ``lr + beta * delta`` (the paper's eq. 2, Baydin et al.'s SGD-HD).
        ``"multiplicative"``: ``delta`` is a cosine in [-1, 1] and the LR becomes
        ``lr * exp(beta * delta)``: a change of at most ``exp(+-beta)`` per step whatever the gradients'
        scale, and an LR > 0 never reaches 0 (0 was absorbing for the additive rule, see the study).
        """
        old = group["lr"]
        if not math.isfinite(delta):
            group["hypergrad"] = math.nan
            group["lr_skipped"] += 1
            return old
        group["hypergrad"] = -delta
        if self.lr_rule == "multiplicative":
            new = old * math.exp(group["beta"] * delta)
        else:
            new = old + group["beta"] * delta
        if not math.isfinite(new):
            group["lr_skipped"] += 1
            new = old
        elif not group["min_lr"] <= new <= group["max_lr"]:
            group["lr_clamped"] += 1
            new = min(max(new, group["min_lr"]), group["max_lr"])
        group["lr"] = new
        return new if self.lr_update == "before-step" else old

    def _directions(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The update direction d_t (the momentum buffers advance here)."""
        mu = group["momentum"]
        if mu == 0:
            return grads
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        fe = group["foreach"]
        _mul_(bufs, mu, foreach=fe)
        _add_(bufs, grads, alpha=1, foreach=fe)
        if group["nesterov"]:
            return _add(grads, bufs, alpha=mu, foreach=fe)
        return bufs

    def _tangent_directions(
        self, group: dict[str, Any], params: list[torch.Tensor], hz: list[torch.Tensor], k: int
    ) -> list[torch.Tensor]:
        """d(d_t)/d eta_k from (H + lambda I) z_k: the momentum tangents y_k advance here."""
        mu = group["momentum"]
        if mu == 0:
            return hz
        ys = [self._state_tensor(p, "tangent_momentum")[k] for p in params]
        fe = group["foreach"]
        _mul_(ys, mu, foreach=fe)
        _add_(ys, hz, alpha=1, foreach=fe)
        if group["nesterov"]:
            return _add(hz, ys, alpha=mu, foreach=fe)
        return ys

    def _state_tensor(self, p: torch.Tensor, key: str) -> torch.Tensor:
        """One tangent of ``p`` per group's LR (shape ``(len(param_groups), *p.shape)``), zeros at first."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros((len(self.param_groups), *p.shape), dtype=p.dtype, device=p.device)
        return state[key]

    def _reset_tangent_if_nonfinite(self, params: list[torch.Tensor], k: int) -> bool:
        """Zero the tangent of group k's LR if it has diverged (then the safeguard starts it afresh)."""
        keys = ("tangent", "tangent_momentum")
        stacks = [self.state[p][key] for p in params for key in keys if key in self.state[p]]
        if _all_finite([t[k] for t in stacks]):
            return False
        for t in stacks:
            t[k].zero_()
        return True

    def _validation_gradient(
        self, val_closure: ValClosure | None, params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """:math:`\\nabla E(w_t; v_t)` on the next validation mini-batch (``.grad`` is left alone)."""
        cls = type(self).__name__
        if val_closure is None:
            if self._val_stream is None:
                raise ValueError(self._missing_val_message())
            glob = self._global
            val_closure = self._val_stream.closure(glob["val_cursor"])
            glob["val_cursor"] += 1
        with torch.enable_grad():
            value = val_closure()
        if not isinstance(value, torch.Tensor) or value.ndim != 0 or not value.requires_grad:
            raise ValueError(
                f"{cls}: val_closure must return the scalar validation loss with its graph attached (not "
                f"detached, not computed under torch.no_grad()), got {type(value).__name__}"
                + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")
            )
        grads = torch.autograd.grad(value, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def _missing_val_message(self) -> str:
        cls = type(self).__name__
        return (
            f"{cls}.step needs the validation loss: pass step(..., val_closure=...) where val_closure() "
            f"returns loss_fn(model(x_val), y_val) on the next validation mini-batch (graph attached, no "
            f"backward), or build {cls}(..., val_loader=..., model=..., loss_fn=...); lrpilot's training "
            f"loop passes it itself"
        )



class SGDHD(HypergradientSGD):
    r"""First-order (Train): SGD with hypergradient descent on its LR (Baydin et al. 2018, SGD-HD).

    .. math::
        \eta_t = \eta_{t-1} + \beta \langle g_{t-1}, g_t\rangle, \qquad w_{t+1} = w_t - \eta_t g_t

    (:math:`g_{t-1}` is the previous update direction with momentum). The LR grows while consecutive
    gradients agree and shrinks when they oppose. Costs one dot product and one copy of the gradient
    per step.

    Args:
        params, lr, beta, momentum, nesterov, weight_decay, min_lr, max_lr, lr_update, lr_rule,
        tangent_decay: see :class:`HypergradientSGD` (the formula above is the paper's
        ``lr_rule="additive"`` with ``tangent_decay=1``; Baydin et al. 2018's setting is ``lr=1e-3``,
        ``beta=1e-3``, momentum 0).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGDHD(model.parameters(), lr=0.01, beta=1e-3)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.ones(8, 4)).pow(2).mean().backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"] > 0.01  # the gradients agreed: the LR grew
        True

    Note:
        Deviation from the reference implementation: it supports one param group and lets the LR go
        negative or non-finite; here every group has its own LR and the safeguard of
        :class:`HypergradientSGD` keeps it in ``[min_lr, max_lr]``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, beta: float = 0.02, **options: Any) -> None:
        _reject(type(self).__name__, options, ("objective", "horizon", "val_loader", "model", "loss_fn"))
        super().__init__(params, lr, beta, objective="train", horizon="one-step", **options)


class SGDHDVal(HypergradientSGD):
    r"""First-order (Val): SGD-HD with the current training gradient replaced by a validation gradient.

    .. math::
        \eta_t = \eta_{t-1} + \beta \langle g_{t-1}, \nabla E(w_t; v_t)\rangle, \qquad
        w_{t+1} = w_t - \eta_t g_t

    The LR grows while the last step also lowered the validation loss. Costs one forward and backward
    pass on a validation mini-batch per step (the paper's Table 1: 2.3x First-order (Train)).

    Args:
        params, lr, beta, momentum, nesterov, weight_decay, min_lr, max_lr, lr_update, val_loader,
        model, loss_fn: see :class:`HypergradientSGD`.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> xv, yv = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> loss_fn = torch.nn.functional.cross_entropy
        >>> opt = SGDHDVal(model.parameters(), lr=0.01)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss_fn(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
        ...     opt.step(val_closure=lambda: loss_fn(model(xv), yv))
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, beta: float = 0.02, **options: Any) -> None:
        _reject(type(self).__name__, options, ("objective", "horizon"))
        super().__init__(params, lr, beta, objective="val", horizon="one-step", **options)


class RTHPO(HypergradientSGD):
    r"""RT-HPO: SGD whose LR follows the approximate hypergradient of eq. 5 (forward-mode tangent).

    .. math::
        \Delta_t = -\langle \nabla E(w_t; v_t), z_t\rangle, \quad \eta_t = \eta_{t-1} + \beta\Delta_t, \quad
        z_{t+1} = z_t - \eta_t \nabla^2\ell(w_t; b_t) z_t - \nabla\ell(w_t; b_t), \quad
        w_{t+1} = w_t - \eta_t \nabla\ell(w_t; b_t)

    with :math:`z_0 = 0`. The tangent :math:`z_t` is :math:`dw_t/d\eta` along the trajectory (each step's
    Jacobian :math:`A_t` evaluated at the LR that step used); contracting it with the validation gradient
    at the *current* weights is the paper's Approximation 2. Per step: the training loss graph, a
    gradient with ``create_graph=True``, one Hessian-vector product (double backward), and a forward and
    backward pass on a validation mini-batch.

    Args:
        params, lr, beta, momentum, nesterov, weight_decay, min_lr, max_lr, lr_update, val_loader,
        model, loss_fn: see :class:`HypergradientSGD`.
        objective: ``"val"`` (default, the paper's :math:`E`) or ``"train"`` (the paper's alternative
            :math:`E = \ell(w; X_\text{train})`, estimated on the training mini-batch: no validation pass).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> loss_fn = torch.nn.functional.cross_entropy
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> xv, yv = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> opt = RTHPO(model.parameters(), lr=0.05, beta=1e-3)
        >>> for _ in range(3):
        ...     loss = opt.step(lambda: loss_fn(model(x), y), val_closure=lambda: loss_fn(model(xv), yv))

    Note:
        The paper's inner optimizer is vanilla SGD (the default). With ``momentum > 0`` the momentum
        state is carried in the tangent (the extension the paper names in section 3.1).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        beta: float = 0.02,
        *,
        objective: str = "val",
        **options: Any,
    ) -> None:
        _reject(type(self).__name__, options, ("horizon",))
        super().__init__(params, lr, beta, objective=objective, horizon="full", **options)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
class _ValidationStream:
    """Validation mini-batches from a loader in its order, cycling; ``cursor`` counts the batches drawn."""

    def __init__(self, loader: Iterable[Any], model: nn.Module, loss_fn: LossFn) -> None:
        try:
            n = len(loader)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("val_loader must have a length (batches per pass), e.g. a DataLoader") from None
        if n == 0:
            raise ValueError("val_loader yields no batches: the validation set is empty")
        self.loader, self.model, self.loss_fn, self.n = loader, model, loss_fn, n
        self._iter: Iterator[Any] | None = None
        self._next = -1  # the cursor the live iterator would serve next

    def closure(self, cursor: int) -> Callable[[], torch.Tensor]:
        if self._iter is None or self._next != cursor:  # fresh, or resumed from a state_dict
            self._iter = self._cycle()
            for _ in range(cursor % self.n):
                next(self._iter)
        batch = next(self._iter)
        self._next = cursor + 1
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"val_loader must yield (inputs, targets) pairs, got {type(batch).__name__}")
        device = next(self.model.parameters()).device
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return lambda: self.loss_fn(self.model(x), y)

    def _cycle(self) -> Iterator[Any]:
        while True:
            yield from self.loader


@functools.lru_cache(maxsize=64)
def _code_takes_backward(code: types.CodeType) -> bool:
    return "backward" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def _takes_backward(closure: Closure) -> bool:
    """Whether the closure accepts ``backward=`` (a new closure every step: cached by its code object)."""
    code = getattr(closure, "__code__", None)
    if code is not None:
        return _code_takes_backward(code)
    try:
        return "backward" in inspect.signature(closure).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def _loss_with_graph(closure: Closure, cls: str) -> torch.Tensor:
    takes_backward = _takes_backward(closure)
    with torch.enable_grad():
        loss = closure(backward=False) if takes_backward else closure()
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
        raise ValueError(
            f"{cls}: the closure must return the scalar training loss with its graph attached (no backward, "
            f"not under torch.no_grad()), got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    return loss


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, ref: torch.Tensor) -> torch.Tensor:
    """sum_i <a_i, b_i> as a 0-d tensor (a Python loop over tensors, never over elements)."""
    if not a:
        return torch.zeros((), dtype=ref.dtype, device=ref.device)
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()


def _cosine(
    dot: torch.Tensor, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, ref: torch.Tensor
) -> torch.Tensor:
    """``dot / (|a| |b|)`` (``dot = <a, b>``) as a 0-d tensor; 0 when either norm is 0.

    A non-finite entry stays non-finite (``nan == 0`` is false), so the non-finite checks that read the
    hypergradient still see it.
    """
    den = _dot(a, a, ref=ref).sqrt() * _dot(b, b, ref=ref).sqrt()
    return torch.where(den == 0, torch.zeros_like(dot), dot / den)


def _dot_rows(rows: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]) -> torch.Tensor:
    """``[_dot(a, b) for a, b in rows]`` as one tensor of shape ``(len(rows),)``, bit for bit.

    The multi-tensor path's form of :func:`_dot`: the same per-tensor dot kernel (``torch.dot`` is what
    ``torch.vdot`` runs for real dtypes), but the partial dots of every row go into one ``stack`` and are
    summed row by row over an ``(m, n)`` view, which on CPU reduces each row exactly as the 1-D sum of
    one ``_dot`` (``tests/test_foreach.py`` holds it to ``torch.equal``). On an mnist1d-mlp-sized MLP (6
    tensors) the three ``_dot`` of a cosine and its 0-d arithmetic were ~100 us of hd-train's ~300 us
    ``step`` (two ``reshape`` per pair, a ``stack`` of ``unsqueeze`` and a ``sum`` per dot, then
    seven 0-d ops); one stack of them ~40 us. Every row must hold the same number of
    pairs (``n > 0``), already flattened (:func:`_flats`: a list used in several rows is flattened once).
    """
    m, n = len(rows), len(rows[0][0])
    parts = [torch.dot(x, y) for a, b in rows for x, y in zip(a, b)]
    return torch.stack(parts).view(m, n).sum(1)


def _flats(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as 1-D views (1-D tensors, e.g. biases, as they are: no dispatch)."""
    return [x if x.dim() == 1 else x.reshape(-1) for x in xs]


def _cosines(dots: torch.Tensor, aa: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    """:func:`_cosine` elementwise: ``dots / (sqrt(aa) sqrt(bb))``, 0 where a norm is 0 (same operations)."""
    den = aa.sqrt() * bb.sqrt()
    return torch.where(den == 0, torch.zeros_like(dots), dots / den)


def _hypergrad_fast(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, multiplicative: bool,
                    ref: torch.Tensor) -> torch.Tensor:
    """``_cosine(_dot(a, b), a, b)`` (or ``_dot(a, b)``) as a 0-d tensor, bit for bit, in one stack."""
    if not a:
        return torch.zeros((), dtype=ref.dtype, device=ref.device)
    a, b = _flats(a), _flats(b)
    if not multiplicative:
        return _dot_rows([(a, b)])[0]
    dots, aa, bb = _dot_rows([(a, b), (a, a), (b, b)]).unbind(0)
    return _cosines(dots, aa, bb)


def _cosine_sums(a: list[torch.Tensor], b: list[torch.Tensor], check: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """``[<a, b>, |a|^2, |b|^2]`` (flattened ``a``, ``b``; each sum bit for bit :func:`_dot`'s) and, when
    ``check`` is given and has one tensor per pair in ``a``'s dtype (>= 4 bytes), :func:`_finite_flag`'s
    sum of norms as a fourth entry (same norms, same row sum): one stack and one sum for all of them;
    then the square roots of the same entries (length 6 or 8)."""
    n = len(a)
    # tensor by tensor (its three dots while it is in cache: ~10 % faster on fmnist-mlp), stacked by row
    parts: list[Any] = [None] * (3 * n)
    for i, (x, y) in enumerate(zip(a, b)):
        parts[i], parts[n + i], parts[2 * n + i] = torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)
    rows = 3
    if (check is not None and len(check) == n and all(t.dtype == a[0].dtype for t in check)
            and a[0].element_size() >= 4):
        parts += torch._foreach_norm(list(check))
        rows = 4
    sums = torch.stack(parts).view(rows, n).sum(1)
    # the square roots on the device: torch's float32 sqrt is not always the correctly rounded one
    # (~0.6 % of values differ in the last bit), so the host could not reproduce it
    return torch.cat([sums, sums.sqrt()])


_F32 = struct.Struct("f")


def _host_cosine_dtype(dtype: torch.dtype) -> bool:
    """Whether :func:`_host_cosine` reproduces the device's arithmetic for this dtype exactly."""
    return dtype in (torch.float32, torch.float64)


def _host_cosine(dot: float, root_aa: float, root_bb: float, dtype: torch.dtype) -> float:
    """:func:`_cosines` of one group on the host from the device's square roots, bit for bit for float32
    and float64 values.

    The product and the quotient are done in double and rounded to float32: double has more than
    2 * 24 + 2 bits, so the double rounding is innocuous and the result is the correctly rounded float32
    one, which is what the device's IEEE multiply and divide return. Inf and nan propagate as on the
    device (``where(den == 0, 0, dot / den)``).
    """
    r = _round_f32 if dtype == torch.float32 else float
    den = r(root_aa * root_bb)
    if den == 0:
        return 0.0
    return r(dot / den)


def _round_f32(x: float) -> float:
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # rounds past float32's largest value: inf, as on the device
        return math.copysign(math.inf, x)


def _read_parts(parts: Sequence[torch.Tensor]) -> list[float]:
    """Tensors of any shape (on any devices) as one list of Python floats, in one transfer per device."""
    if not parts:
        return []
    if len(parts) == 1:
        return parts[0].reshape(-1).tolist()
    first = parts[0]
    if all(v.device == first.device for v in parts):
        if all(v.dtype == first.dtype for v in parts):
            return torch.cat([v.reshape(-1) for v in parts]).tolist()
        return torch.cat([v.reshape(-1).to(torch.float64) for v in parts]).tolist()
    return [x for v in parts for x in v.reshape(-1).tolist()]


def _finite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-d tensor on the device that is finite exactly when every entry of ``tensors`` is (barring
    overflow: finite entries make it ``inf`` only past the dtype's largest value, a gradient no step
    should apply either): the sum of the tensors' L2 norms, one multi-tensor kernel and a sum.

    ``nan`` propagates through both reductions and ``inf`` stays ``inf``. A max-abs norm would be exact,
    but torch's CPU kernel for it is ~25x slower than the L2 norm (0.4x an SGD step on fmnist-mlp). Half
    precision is reduced in float32 so that its small range gives no false alarm.
    """
    if not tensors:
        return torch.zeros(())
    if all(t.element_size() >= 4 for t in tensors):
        return torch.stack(torch._foreach_norm(list(tensors))).sum()
    return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]).sum()


def _read(values: Sequence[torch.Tensor]) -> list[float]:
    """0-d tensors (on any devices) as Python floats, in one device-to-host transfer per device."""
    if not values:
        return []
    first = values[0]
    if all(v.device == first.device for v in values):
        if all(v.dtype == first.dtype for v in values):
            return torch.stack(list(values)).tolist()
        return torch.stack([v.to(torch.float64) for v in values]).tolist()
    return [float(v) for v in values]


def _add(xs: list[torch.Tensor], ys: list[torch.Tensor], *, alpha: float, foreach: bool | None) -> list[torch.Tensor]:
    """``x + alpha * y`` for every pair: one multi-tensor kernel, or the reference loop (``foreach=False``)."""
    if foreach is False:
        return [x.add(y, alpha=alpha) for x, y in zip(xs, ys)]
    return list(torch._foreach_add(xs, ys, alpha=alpha))


def _add_(xs: list[torch.Tensor], ys: list[torch.Tensor], *, alpha: float, foreach: bool | None,
          subtract: bool = False) -> None:
    """``x += alpha * y`` in place (``x -= y`` with ``subtract``)."""
    if foreach is False:
        for x, y in zip(xs, ys):
            x.sub_(y) if subtract else x.add_(y, alpha=alpha)
    elif subtract:
        torch._foreach_sub_(xs, ys)
    else:
        torch._foreach_add_(xs, ys, alpha=alpha)


def _mul_(xs: list[torch.Tensor], factor: float | torch.Tensor, *, foreach: bool | None) -> None:
    if not xs:
        return
    if foreach is False:
        for x in xs:
            x.mul_(factor)
    else:
        torch._foreach_mul_(xs, factor)


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _reject(cls: str, options: dict[str, Any], fixed: Sequence[str]) -> None:
    for name in fixed:
        if name in options:
            raise TypeError(f"{cls} fixes {name}; use HypergradientSGD to choose it")
