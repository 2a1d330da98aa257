"""The step-level LipschitzLR methods: AdaMo (Algorithm 1), Lipschitz RMSprop (section 6.2), Auto-Adam (Algorithm 3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from lrpilot.core.checks import is_number
from lrpilot.core.foreach import ScalarOperands
from lrpilot.estimators.lipschitz import (
    GRAD_SQ_ESTIMATES,
    BatchStats,
    grad_sq_estimate,
    max_weight_norm,
)

__all__ = ["BIAS_CORRECTIONS", "AdaMo", "AutoAdam", "LipschitzRMSprop"]

BIAS_CORRECTIONS = ("none", "moments", "all")

_scalar = ScalarOperands()  # exact 0-d operands for the multi-tensor kernels


class LipschitzOptimizer(torch.optim.Optimizer):
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
        defaults.setdefault("foreach", None)
        defaults.setdefault("fused", False)
        super().__init__(params, defaults)
        self.source = source
        self._step_w_max: float | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before the options existed
            group.setdefault("foreach", None)
            group.setdefault("fused", False)

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
        weight_term = wd * self._max_weight_norm() if wd > 0 else 0.0
        m_t = (
            grad_sq_estimate(loss_part, stats.k_z, stats.elementwise, weight_term, group["grad_sq_estimate"])
            if self._uses_k2
            else 0.0
        )
        return (stats.k_z if group["k1_signal"] == "kz" else loss_part + weight_term), m_t

    def _max_weight_norm(self) -> float:
        r"""The paper's :math:`\max\lVert w\rVert` over every parameter this optimizer trains (all groups:
        the definition :class:`LipschitzPilot` uses too), computed once per step."""
        if self._step_w_max is None:
            self._step_w_max = max_weight_norm(p for g in self.param_groups for p in g["params"])
        return self._step_w_max

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
        self._step_w_max = None  # the weights as they are before this step's update
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
    if not (is_number(d["lr"]) and d["lr"] > 0):
        raise ValueError(f"Invalid lr multiplier: {d['lr']!r} (must be > 0)")
    if not (is_number(d["weight_decay"]) and d["weight_decay"] >= 0):
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
    if d["initial_lr"] is not None and not (is_number(d["initial_lr"]) and d["initial_lr"] > 0):
        raise ValueError(f"Invalid initial_lr: {d['initial_lr']!r} (must be None or > 0)")
    if (d["update"] == "epoch" or d["initial_lr"] is not None) and spe is None:
        raise ValueError(
            "update='epoch' and initial_lr need steps_per_epoch (the length of an epoch in steps)"
        )
    for name in ("k1_init", "k2_init"):
        if not (is_number(d[name]) and d[name] >= 0):
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
    ok = is_number(value) and (0.0 <= value < 1.0 if allow_zero else 0.0 < value < 1.0)
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (must be in {'[0, 1)' if allow_zero else '(0, 1)'})")
    return float(value)


def _state_tensors(state: Any, params: list[torch.Tensor], keys: tuple[str, ...]) -> list[list[torch.Tensor]]:
    """Per key, the state tensor of every parameter (zeros at first use)."""
    out: list[list[torch.Tensor]] = [[] for _ in keys]
    for p in params:
        st = state[p]
        if keys[0] not in st:
            for key in keys:
                st[key] = torch.zeros_like(p)
        for lst, key in zip(out, keys):
            lst.append(st[key])
    return out


def _moment_corrections(group: dict[str, Any]) -> tuple[float, float]:
    """Adam's 1 - beta^t for the first and second moments, when bias correction is on."""
    if group["bias_correction"] == "none":
        return 1.0, 1.0
    t = group["step"]
    return 1 - group["_b1"] ** t, 1 - group["_b2"] ** t


class AdaMo(LipschitzOptimizer):
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
        k1_start: where :math:`K` starts when ``initial_lr = x`` is set: ``"paper"`` (:math:`K = x`,
            section 7.3.1 read literally, so the LR jumps from :math:`x` to about :math:`1/x`, x94
            measured for ``x = 0.1``, when the first epoch ends) or ``"continuous"`` (:math:`K = 1/x`: the
            LR is continuous at the switch). The trade-off is measured in ``docs/methods/lipschitz.md``.

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
        k1_start: str = "paper",
        foreach: bool | None = None,
    ) -> None:
        b = _beta("beta", beta)
        if k1_start not in ("paper", "continuous"):
            raise ValueError(f"Invalid k1_start: {k1_start!r} (must be 'paper' or 'continuous')")
        if initial_lr is None:
            k1_init = 0.0
        elif k1_start == "paper" or not is_number(initial_lr) or initial_lr <= 0:
            k1_init = initial_lr  # "the algorithm sets K to x" (section 7.3.1); a bad x is refused below
        else:
            k1_init = 1.0 / initial_lr
        defaults = {
            "lr": lr,
            "beta": b,
            "weight_decay": weight_decay,
            "update": update,
            "initial_lr": initial_lr,
            "steps_per_epoch": steps_per_epoch,
            "bias_correction": bias_correction,
            "k1_init": k1_init,
            "k1_start": k1_start,
            "k2_init": 0.0,
            "grad_sq_estimate": "first",
            "_b1": b,
            "_b2": b,
            "foreach": foreach,
        }
        super().__init__(params, defaults, source)

    def _step_size(self, group: dict[str, Any], k1: float, k2: float) -> float:
        return group["lr"] / k1 if k1 > 0 else 0.0

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], alpha: float) -> None:
        vs = _state_tensors(self.state, params, ("v",))[0]
        func = _single_tensor_adamo if group["foreach"] is False else _multi_tensor_adamo
        func(params, vs, beta=group["beta"], weight_decay=group["weight_decay"], alpha=alpha,
             bc1=_moment_corrections(group)[0])


def _single_tensor_adamo(params: list[torch.Tensor], vs: list[torch.Tensor], *, beta: float, weight_decay: float,
                         alpha: float, bc1: float) -> None:
    """AdaMo's update, one tensor at a time (the reference)."""
    for p, v in zip(params, vs):
        g = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
        v.mul_(beta).add_(g, alpha=1 - beta)
        if alpha != 0.0:
            p.add_(v, alpha=-alpha / bc1)


def _multi_tensor_adamo(params: list[torch.Tensor], vs: list[torch.Tensor], *, beta: float, weight_decay: float,
                        alpha: float, bc1: float) -> None:
    """The same update, one multi-tensor kernel per operation."""
    grads = [p.grad for p in params]
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(vs, _scalar(beta, vs))
    torch._foreach_add_(vs, grads, alpha=1 - beta)
    if alpha != 0.0:
        torch._foreach_add_(params, vs, alpha=-alpha / bc1)


class AutoAdam(LipschitzOptimizer):
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
        max_lr: an absolute cap on the step size, as a multiple of ``lr`` (``None``: none, Algorithm 3).
            :math:`\sqrt{K_2}/K_1` is a dimensionless number up to about 1 (``docs/robustness-study.md``),
            while Adam's update ``V/sqrt(S)`` has unit size per coordinate: any step size above ~0.01 is
            destructive. The ``auto-adam`` method's default is 0.01 (10x Adam's default LR).
        max_lr_growth: the step size may grow by at most a factor ``1 + max_lr_growth`` per step
            (``None``: unbounded, Algorithm 3); falls are not limited. It cuts the feedback loop that
            dying activations start (``K_1``, :math:`\beta_1 = 0.9`, follows a falling :math:`K_z` in ~10
            steps while ``K_2``, :math:`\beta_2 = 0.999`, remembers the old one for ~1000: the step size
            runs away as :math:`1/K_z`). The ``auto-adam`` method's default is 0.01.
        bias_correction: ``"none"`` (Algorithm 3), ``"moments"`` (Adam's: :math:`V, S` divided by
            :math:`1-\beta^t`; the authors' Keras runs had it) or ``"all"`` (section 6.4: :math:`K_1,
            K_2` too; with ``update="step"`` and zero initial values it only moves :math:`\epsilon`).
        foreach: ``None`` (default) or ``True``: one multi-tensor kernel per operation; ``False``: the
            reference loop over tensors. Equal bit for bit on CPU (``tests/test_foreach.py``).
        fused: ``True`` runs the update through torch's fused Adam kernel (``torch._fused_adam_``): one
            pass over each tensor instead of seven. Opt-in because it is *not* bit-identical: the kernel
            updates :math:`V` as a lerp and rounds in another order (weights of order 0.1-1 within 1e-6
            of the reference after 6 steps, ``tests/test_foreach.py``). ``eps_inside_sqrt=True`` is
            carried by offsetting :math:`S` by :math:`\epsilon` around the kernel (two more in-place
            passes). Every tensor of a group must be a floating tensor of one dtype on one device.

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
        max_lr: float | None = None,
        max_lr_growth: float | None = None,
        update: str = "step",
        initial_lr: float | None = None,
        steps_per_epoch: int | None = None,
        bias_correction: str = "none",
        _k1_signal: str = "lipschitz",
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        b1 = _beta("beta1", beta1, allow_zero=True)
        b2 = _beta("beta2", beta2)
        if not (is_number(eps) and eps >= 0):
            raise ValueError(f"Invalid eps: {eps!r} (must be >= 0)")
        if max_lr is not None and not (is_number(max_lr) and max_lr > 0):
            raise ValueError(f"Invalid max_lr: {max_lr!r} (must be None or > 0)")
        if max_lr_growth is not None and not (is_number(max_lr_growth) and max_lr_growth >= 0):
            raise ValueError(f"Invalid max_lr_growth: {max_lr_growth!r} (must be None or >= 0)")
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
            "max_lr": None if max_lr is None else float(max_lr),
            "max_lr_growth": None if max_lr_growth is None else float(max_lr_growth),
            "update": update,
            "initial_lr": initial_lr,
            "steps_per_epoch": steps_per_epoch,
            "bias_correction": bias_correction,
            "k1_signal": _k1_signal,
            "_b1": b1,
            "_b2": b2,
            "foreach": foreach,
            "fused": _fused_option(fused, foreach),
        }
        super().__init__(params, defaults, source)

    def _step_size(self, group: dict[str, Any], k1: float, k2: float) -> float:
        if k1 <= 0:
            return 0.0
        alpha = group["lr"] * (math.sqrt(k2) + group["eps"]) / k1
        growth, prev = group.get("max_lr_growth"), group["lipschitz_lr"]
        if growth is not None and prev > 0:  # at most (1 + growth) x the previous step's size
            alpha = min(alpha, prev * (1.0 + growth))
        if group.get("max_lr") is not None:  # the multiplier scales the cap, so a guard's back-off still bites
            alpha = min(alpha, group["lr"] * group["max_lr"])
        return alpha

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], alpha: float) -> None:
        vs, ss = _state_tensors(self.state, params, ("v", "s"))
        bc1, bc2 = _moment_corrections(group)
        if group.get("fused") and alpha != 0.0:  # alpha 0: moments only; the kernel would divide 0 by 0 at eps 0
            _fused_auto_adam(params, vs, ss, b1=group["_b1"], b2=group["_b2"], eps=group["eps"],
                             weight_decay=group["weight_decay"], eps_inside_sqrt=group["eps_inside_sqrt"],
                             alpha=alpha, step=group["step"] if group["bias_correction"] != "none" else None)
            return
        kw = {"b1": group["_b1"], "b2": group["_b2"], "eps": group["eps"], "weight_decay": group["weight_decay"],
              "eps_inside_sqrt": group["eps_inside_sqrt"], "alpha": alpha, "bc1": bc1, "bc2": bc2}
        if group["foreach"] is False:
            _single_tensor_auto_adam(params, vs, ss, **kw)
        else:
            _multi_tensor_auto_adam(params, vs, ss, **kw, scratch=self._scratch_like(ss))

    def _scratch_like(self, ss: list[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor like each of ``ss``, kept between steps for the denominator (not in the state: no
        checkpoint carries it). Keyed by the identity of the state tensors, which a state load replaces."""
        cache: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = self.__dict__.setdefault("_scratch", {})
        hit = cache.get(id(ss[0]))
        if hit is not None and len(hit[0]) == len(ss) and all(a is b for a, b in zip(hit[0], ss)):
            return hit[1]
        if len(cache) >= len(self.param_groups):  # a stale entry (a state load replaced the tensors)
            cache.clear()
        scratch = [torch.empty_like(s) for s in ss]
        cache[id(ss[0])] = (list(ss), scratch)
        return scratch


def _single_tensor_auto_adam(params: list[torch.Tensor], vs: list[torch.Tensor], ss: list[torch.Tensor], *,
                             b1: float, b2: float, eps: float, weight_decay: float, eps_inside_sqrt: bool,
                             alpha: float, bc1: float, bc2: float) -> None:
    """Auto-Adam's (and Lipschitz RMSprop's) update, one tensor at a time (the reference)."""
    for p, v, s in zip(params, vs, ss):
        g = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
        v.mul_(b1).add_(g, alpha=1 - b1)
        s.mul_(b2).addcmul_(g, g, value=1 - b2)
        if alpha == 0.0:
            continue
        s_hat = s / bc2 if bc2 != 1.0 else s
        denom = (s_hat + eps).sqrt_() if eps_inside_sqrt else s_hat.sqrt().add_(eps)
        p.addcdiv_(v, denom, value=-alpha / bc1)


def _multi_tensor_auto_adam(params: list[torch.Tensor], vs: list[torch.Tensor], ss: list[torch.Tensor], *,
                            b1: float, b2: float, eps: float, weight_decay: float, eps_inside_sqrt: bool,
                            alpha: float, bc1: float, bc2: float, scratch: list[torch.Tensor] | None = None) -> None:
    """The same update, one multi-tensor kernel per operation (the denominator into ``scratch`` if given)."""
    grads = [p.grad for p in params]
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(vs, _scalar(b1, vs))
    torch._foreach_add_(vs, grads, alpha=1 - b1)
    torch._foreach_mul_(ss, _scalar(b2, ss))
    torch._foreach_addcmul_(ss, grads, grads, value=1 - b2)
    if alpha == 0.0:
        return
    if scratch is None:
        s_hat = torch._foreach_div(ss, bc2) if bc2 != 1.0 else ss
        if eps_inside_sqrt:
            denom = torch._foreach_add(s_hat, eps)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(s_hat)
            torch._foreach_add_(denom, eps)
    else:
        # The same operations into tensors kept between steps, one tensor at a time: no allocation, and
        # with 0-d operands a single-tensor op is cheaper than the multi-tensor one that wraps a Python
        # number per tensor (mnist1d-mlp: 22 -> 16 us; fmnist-mlp: 320 -> 270 us, no fresh pages).
        denom = scratch
        e, c = _scalar(eps, ss), (_scalar(bc2, ss) if bc2 != 1.0 else None)
        for s, d in zip(ss, denom):
            src = s if c is None else torch.div(s, c, out=d)
            if eps_inside_sqrt:
                torch.add(src, e, out=d).sqrt_()
            else:
                torch.sqrt(src, out=d).add_(e)
    torch._foreach_addcdiv_(params, vs, denom, value=-alpha / bc1)


def _fused_option(fused: Any, foreach: Any) -> bool:
    if not isinstance(fused, bool):
        raise ValueError(f"Invalid fused: {fused!r} (must be True or False)")  # noqa: TRY004 - as every option error
    if fused and foreach is False:
        raise ValueError("fused=True and foreach=False are two different kernels: choose one")
    return fused


def _fused_auto_adam(params: list[torch.Tensor], vs: list[torch.Tensor], ss: list[torch.Tensor], *, b1: float,
                     b2: float, eps: float, weight_decay: float, eps_inside_sqrt: bool, alpha: float,
                     step: int | None) -> None:
    """Auto-Adam's update through torch's fused Adam kernel (opt-in: close to the reference, not equal).

    The kernel computes, per element and in one pass: ``g += wd * p``; ``V = lerp(V, g, 1 - b1)``;
    ``S = b2 S + (1 - b2) g^2``; ``p -= lr / c1 * V / (sqrt(S) / sqrt(c2) + eps)`` with ``c = 1 - b^t``
    from ``state_steps``. ``step=None`` (no bias correction) passes ``t = inf``, so ``c1 = c2 = 1``.
    Algorithm 3's ``sqrt(S / c2 + eps)`` is the kernel's formula with ``eps = 0`` applied to
    ``S + eps c2``: adding ``eps c2 / b2`` to ``S`` before the kernel makes it compute exactly that
    (``b2 (S + eps c2 / b2) + (1 - b2) g^2 = S_new + eps c2``), and subtracting ``eps c2`` after it
    gives back ``S_new`` up to one rounding.
    """
    kinds = {(p.device, p.dtype) for p in params}
    if len(kinds) > 1:  # the kernel takes one device and one dtype per call
        for kind in kinds:
            idx = [i for i, p in enumerate(params) if (p.device, p.dtype) == kind]
            _fused_auto_adam([params[i] for i in idx], [vs[i] for i in idx], [ss[i] for i in idx], b1=b1, b2=b2,
                             eps=eps, weight_decay=weight_decay, eps_inside_sqrt=eps_inside_sqrt, alpha=alpha,
                             step=step)
        return
    device = params[0].device
    if step is None:
        steps = _INF_STEPS.get(device)
        if steps is None:  # read only by the kernel: one per device for good
            steps = _INF_STEPS[device] = torch.full((), math.inf, dtype=torch.float32, device=device)
    else:
        steps = torch.full((), float(step), dtype=torch.float32, device=device)
    c2 = 1.0 if step is None else 1 - b2**step
    shift = eps * c2 if eps_inside_sqrt and eps > 0 else 0.0
    if shift:
        # a per-tensor add_ of a 0-d tensor: 6.5 us on mnist1d-mlp's 6 tensors, _foreach_add_ 10 us
        up, down = _scalar(shift / b2, ss), _scalar(-shift, ss)
        for s in ss:
            s.add_(up)
    torch._fused_adam_(params, [p.grad for p in params], vs, ss, [], [steps] * len(params), lr=alpha, beta1=b1,
                       beta2=b2, weight_decay=weight_decay, eps=0.0 if eps_inside_sqrt else eps, amsgrad=False,
                       maximize=False)
    if shift:
        for s in ss:
            s.add_(down)


_INF_STEPS: dict[torch.device, torch.Tensor] = {}


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

    Args: as :class:`AutoAdam` (``fused`` included: with :math:`\beta_1 = 0` the kernel's lerp gives
    :math:`V = g` exactly), with ``rho`` (0.9, the paper's RMSprop :math:`\beta`) in place of
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
        max_lr: float | None = None,
        max_lr_growth: float | None = None,
        denominator: str = "kz",
        update: str = "step",
        initial_lr: float | None = None,
        steps_per_epoch: int | None = None,
        bias_correction: str = "none",
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        rho = _beta("rho", rho)
        if denominator not in ("kz", "lipschitz"):
            raise ValueError(f"Invalid denominator: {denominator!r} (must be 'kz' or 'lipschitz')")
        super().__init__(
            params, source, lr=lr, beta1=0.0, beta2=rho, eps=eps, eps_inside_sqrt=eps_inside_sqrt,
            weight_decay=weight_decay, grad_sq_estimate=grad_sq_estimate, k1_init=0.0, k2_init=k2_init,
            max_lr=max_lr, max_lr_growth=max_lr_growth, update=update, initial_lr=initial_lr,
            steps_per_epoch=steps_per_epoch, bias_correction=bias_correction,
            _k1_signal=denominator, foreach=foreach, fused=fused,
        )  # fmt: skip
