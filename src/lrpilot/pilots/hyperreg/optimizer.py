r"""Hyper-regularization: per-coordinate learning rates from a divergence-regularized max-min problem.

Xie, Jin, Lin & Zhang, "Hyper-Regularization: An Adaptive Choice for the Learning Rate in Gradient
Descent" (ICLR 2019 submission, https://openreview.net/forum?id=S1e_ssC5F7; later arXiv:2104.05447).
The paper's text was not available; the rules are the ones its reproducibility report's code implements
(``shared/papers/004_103abf1d96e1d0d8.txt``), re-derived in ``shared/research/hyperreg.md`` and in
:mod:`lrpilot.estimators.phi_divergence`. ``docs/methods/hyperreg.md`` lists every choice we made.

Registers ``hyperreg-<divergence>-<algorithm>`` for kl, rkl, hellinger, chi2 and algorithms 1-3, and the
two special cases the paper re-derives: ``adagrad-diag`` and ``wngrad``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lrpilot.estimators import scratch
from lrpilot.estimators.phi_divergence import DIVERGENCES, get_divergence, growth, growth_threshold

__all__ = ["HyperRegularization"]

POLES = ("infinite", "report")
SCOPES = ("coordinate", "tensor", "global")


class HyperRegularization(torch.optim.Optimizer):
    r"""Gradient descent whose inverse learning rate :math:`\beta` solves a max-min problem every step.

    Per coordinate (or per block of coordinates sharing one :math:`\beta`, see ``scope``), with
    :math:`g_t` the gradient (``weight_decay`` included), :math:`a = g_t^2/\beta_t^2` and the growth
    :math:`\delta(a)` of the chosen divergence :math:`\phi` (:mod:`lrpilot.estimators.phi_divergence`):

    .. math::
        \beta_0 = 1/\mathrm{lr}, \qquad
        \tilde\beta = \beta_t\,(1 + \delta(a)), \qquad
        \beta_{t+1} = \min(\max(\tilde\beta, \beta_t), c\,\beta_t), \\
        x_{t+1} = x_t - g_t/\beta_{t+1} \;\text{(Algorithms 1, 2)}, \qquad
        x_{t+1} = x_t - g_t/\beta_t \;\text{(Algorithm 3)}.

    * Algorithm 1 solves the stationarity condition :math:`\phi'(u) = a/u^2`, :math:`u = \beta_{t+1}/\beta_t`,
      exactly (Lambert W for KL, explicit root for reverse KL, Halley on the quartic for Hellinger,
      Cardano for chi-square), vectorised over every coordinate.
    * Algorithm 2 solves the approximate condition :math:`\phi'(u) = a` (closed forms).
    * Algorithm 3 (*inferred*, the report only says "one step behind"): the min step first with
      :math:`\beta_t`, then Algorithm 2's :math:`\beta` update.

    The learning rate :math:`1/\beta` never increases: ``lr`` is its upper bound for the whole run.

    Args:
        params: parameters or param groups.
        lr: initial learning rate; :math:`\beta_0 = 1/\mathrm{lr}` when a parameter's state is created
            (default 0.1). Changing ``group["lr"]`` afterwards has no effect on :math:`\beta`.
        divergence: ``"kl"``, ``"rkl"``, ``"hellinger"``, ``"chi2"`` (the paper's four), or
            ``"half-chi2"``, ``"neyman-chi2"`` (the special cases WNGrad and AdaGrad).
        algorithm: 1 (exact), 2 (approximate), 3 (approximate, lagged step). Default 1.
        growth_clip: :math:`c`, the largest growth ratio :math:`\beta_{t+1}/\beta_t` per step
            (default 2.0, the report's "growth clipping"); ``None`` disables clipping (both bounds).
        warmup_steps: steps of plain SGD at ``warmup_lr`` before the rules start, :math:`\beta`
            frozen at :math:`\beta_0` meanwhile (the report's "starting point" fix; default 0).
        weight_decay: L2 coefficient added to the gradient (default 0).
        warmup_lr: the LR of the warm-up steps (default ``None``: ``lr``).
        wd_in_beta: the :math:`\beta` rule sees the L2 term too, i.e. the gradient of the regularised
            objective (default ``True``, the report's MNIST code); ``False`` feeds it the raw gradient
            (the report's CIFAR code).
        pole: what Algorithms 2 and 3 do where :math:`\phi'(u) = a` has no solution (reverse KL,
            Hellinger, Neyman: :math:`a \ge 1`). ``"infinite"`` (default): the maximiser is
            :math:`+\infty`, which the clip turns into :math:`c\,\beta_t`. ``"report"``: evaluate the closed
            form past the pole as the report's code did: :math:`\beta_t^3/(\beta_t^2 - g^2) < 0` for
            reverse KL, :math:`\beta_t^5/(\beta_t^2 - g^2)^2 > 0` for Hellinger (below :math:`\beta_t`
            once :math:`g^2 > 2\beta_t^2`), ``nan`` for Neyman; the clip's lower bound turns each into *no*
            growth; without clipping, reverse KL ascends the gradient and Hellinger lengthens the step.
        scope: who shares one :math:`\beta`: ``"coordinate"`` (default, the paper), ``"tensor"``
            (one per parameter tensor) or ``"global"`` (one per param group), with
            :math:`a = \lVert g\rVert^2/\beta_t^2` over the block.
        foreach: ``True`` or ``None`` (default): the per-tensor operations (weight decay, the growths'
            inputs, :math:`\beta` updates, the descent) are multi-tensor kernels (``torch._foreach_*``);
            ``False``: the reference loop, one tensor at a time. Same weights and LRs, bit for bit on
            CPU (``tests/test_foreach.py``). The rule itself is a few whole-tensor passes over one flat
            buffer either way, and nothing is read back to the host.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = HyperRegularization(model.parameters(), lr=0.1, divergence="rkl", algorithm=2)
        >>> model(torch.ones(3, 4)).pow(2).sum().backward()
        >>> opt.step()
        >>> 0 < opt.mean_lr()[0] <= 0.1
        True

    .. note::
        Deviations from the reproducibility report's code: the pole is ``"infinite"`` by default
        (``pole="report"`` restores theirs); Algorithm 1 uses closed forms and a fixed number of
        Newton/Halley steps instead of ``scipy.optimize.fsolve``; Algorithm 3 steps with :math:`\beta_t`
        (their RKL3 stepped with :math:`\beta_{t+1}`, i.e. was RKL2); the gradient is whatever the loss
        gives (the report's MNIST code summed the batch; a sum is a mean with ``lr`` times the batch
        size).

    References:
        Xie, Jin, Lin, Zhang (2019), ICLR submission S1e_ssC5F7; arXiv:2104.05447 (2021).
        Saadatnejad, Bahari, Belhadj (2019), ICLR reproducibility challenge report.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        divergence: str = "kl",
        algorithm: int = 1,
        growth_clip: float | None = 2.0,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        *,
        warmup_lr: float | None = None,
        wd_in_beta: bool = True,
        pole: str = "infinite",
        scope: str = "coordinate",
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, divergence=divergence, algorithm=algorithm, growth_clip=growth_clip,
            warmup_steps=warmup_steps, warmup_lr=warmup_lr, weight_decay=weight_decay,
            wd_in_beta=wd_in_beta, pole=pole, scope=scope, step=0, foreach=foreach,
        )  # fmt: skip
        _check_options(defaults)
        super().__init__(params, defaults)
        self._mean_lr_cache: tuple[tuple[int, ...], list[float]] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before the option existed
            group.setdefault("foreach", None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # checked before torch appends the group, so a bad one leaves the optimizer as it was
        _check_options({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("HyperRegularization does not support sparse gradients")
            buckets = _buckets(params)
            if group["scope"] == "global" and len(buckets) > 1:
                raise RuntimeError("HyperRegularization: scope='global' needs every parameter of a group on one device "
                                   "and dtype; put the others in their own param group")
            grads = [p.grad for p in params]
            fe = group["foreach"]
            if group["weight_decay"] != 0:
                decayed = _add(grads, params, alpha=group["weight_decay"], foreach=fe)
            else:
                decayed = grads
            t = group["step"]
            group["step"] = t + 1
            if t < group["warmup_steps"]:
                self._betas(group, params)  # beta_0 exists from the first step (state_dict, telemetry)
                warmup_lr = group["lr"] if group["warmup_lr"] is None else group["warmup_lr"]
                _add_(params, decayed, alpha=-warmup_lr, foreach=fe)
                continue
            for idx in buckets:
                ps = [params[i] for i in idx]
                # CPU temporaries come from a pool kept across steps (see lrpilot.estimators.scratch)
                pool = self._scratch_pool() if ps[0].device.type == "cpu" else None
                with scratch.reuse(pool) if pool is not None else contextlib.nullcontext():
                    _hyperreg_update(
                        ps,
                        [decayed[i] for i in idx],
                        [decayed[i] for i in idx] if group["wd_in_beta"] else [grads[i] for i in idx],
                        self._betas(group, ps),
                        group,
                    )
        self._mean_lr_cache = None
        return loss

    def _scratch_pool(self) -> scratch.Pool:
        """Work buffers of the rules, kept between steps; not state (``copy``/``pickle`` drop it)."""
        pool = self.__dict__.get("_scratch")
        if pool is None:
            pool = self.__dict__["_scratch"] = scratch.Pool()
        return pool

    def _betas(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The beta of each parameter (created at 1/lr on first use), one entry per parameter."""
        beta0 = 1.0 / group["lr"]
        if group["scope"] == "global":
            # One scalar per group, kept in the state of its first parameter (as torch's LBFGS does).
            state = self.state[group["params"][0]]
            if "beta" not in state:
                first = group["params"][0]
                state["beta"] = torch.full((), beta0, dtype=first.dtype, device=first.device)
            return [state["beta"]] * len(params)
        betas = []
        for p in params:
            state = self.state[p]
            if "beta" not in state:
                if group["scope"] == "tensor":
                    state["beta"] = torch.full((), beta0, dtype=p.dtype, device=p.device)
                else:
                    state["beta"] = torch.full_like(p, beta0, memory_format=torch.preserve_format)
            betas.append(state["beta"])
        return betas

    # ------------------------------------------------------------------------------------------------
    def mean_lr(self) -> list[float]:
        r"""The LR per group, for telemetry: the mean over the group's coordinates of :math:`1/\beta`
        after the last step (the warm-up LR while the next step is a warm-up step).

        The mean of the per-coordinate LRs is the average step size a coordinate gets per unit of
        gradient; it equals ``lr`` until the first update and is bounded by it afterwards. Costs a pass
        over :math:`\beta`, cached until the next step.
        """
        key = tuple(g["step"] for g in self.param_groups)
        cached = self.__dict__.get("_mean_lr_cache")  # absent after copy.deepcopy / unpickling
        if cached is not None and cached[0] == key:
            return list(cached[1])
        values = []
        for group in self.param_groups:
            if group["step"] < group["warmup_steps"]:  # the next step is a warm-up step
                values.append(float(group["lr"] if group["warmup_lr"] is None else group["warmup_lr"]))
            else:
                values.append(self._group_mean_lr(group))
        self._mean_lr_cache = (key, values)
        return list(values)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._mean_lr_cache = None

    def _group_mean_lr(self, group: dict[str, Any]) -> float:
        if group["scope"] == "global":
            beta = self.state[group["params"][0]].get("beta")
            return float(group["lr"]) if beta is None else float(1.0 / beta)
        fresh, count, sums = 0, 0, []
        for p in group["params"]:
            beta = self.state[p].get("beta")
            count += p.numel()
            if beta is None:
                fresh += p.numel()  # no gradient yet: still at beta_0 = 1/lr
            elif group["scope"] == "tensor":
                sums.append(p.numel() / beta.double())
            else:
                sums.append(torch.reciprocal(beta).sum(dtype=torch.float64))
        if not sums:
            return float(group["lr"])
        total = float(torch.stack([s.cpu() for s in sums]).sum())
        return (total + fresh * group["lr"]) / count


def _check_options(group: dict[str, Any]) -> None:
    """Every option of a group, with errors that name the option and its valid values."""
    lr = group["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"HyperRegularization: lr must be a positive finite number, got {lr!r}")
    if group["divergence"] not in DIVERGENCES:
        raise ValueError(f"HyperRegularization: divergence must be one of {list(DIVERGENCES)}, got {group['divergence']!r}")
    if group["algorithm"] not in (1, 2, 3) or isinstance(group["algorithm"], bool):
        raise ValueError(f"HyperRegularization: algorithm must be 1, 2 or 3, got {group['algorithm']!r}")
    clip = group["growth_clip"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 1):
        raise ValueError(f"HyperRegularization: growth_clip must be a number > 1 (or None: no clipping), got {clip!r}")
    steps = group["warmup_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"HyperRegularization: warmup_steps must be an integer >= 0, got {steps!r}")
    wlr = group["warmup_lr"]
    if wlr is not None and (isinstance(wlr, bool) or not isinstance(wlr, (int, float)) or not (math.isfinite(wlr) and wlr > 0)):
        raise ValueError(f"HyperRegularization: warmup_lr must be a positive finite number or None (lr), got {wlr!r}")
    wd = group["weight_decay"]
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"HyperRegularization: weight_decay must be a finite number >= 0, got {wd!r}")
    if group["pole"] not in POLES:
        raise ValueError(f"HyperRegularization: pole must be one of {list(POLES)}, got {group['pole']!r}")
    if group["scope"] not in SCOPES:
        raise ValueError(f"HyperRegularization: scope must be one of {list(SCOPES)}, got {group['scope']!r}")


def _buckets(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype): each bucket's growths are computed in one go."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return list(buckets.values())


def growth_ratio_(a: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    r"""The clipped growth ratio :math:`u = \beta_{t+1}/\beta_t \in [1, c]` for a flat tensor ``a``
    (which it may overwrite).

    With clipping, ``a`` is first clipped at the threshold where the rule reaches :math:`c`
    (:func:`~lrpilot.estimators.phi_divergence.growth_threshold`): the rules increase with ``a``, so this
    is the same clip, and it keeps every rule on a bounded range: KL's ``exp`` cannot overflow and
    Algorithm 2 never reaches its pole, whose :math:`+\infty` becomes :math:`c` exactly as the
    ``"infinite"`` reading says. On that range the in-place ratio forms apply. ``pole="report"``
    evaluates the raw closed form instead (past the pole: negative for reverse KL, positive but below 1
    for Hellinger once :math:`a > 2`, ``nan`` for Neyman), then clips; without clipping the pole gives
    :math:`u = +\infty`.
    """
    algorithm, clip = group["algorithm"], group["growth_clip"]
    div = get_divergence(group["divergence"])
    if algorithm != 1 and group["pole"] == "report":
        u = div.approx_raw(a).add_(1.0)
    elif clip is not None:
        a = a.clamp_(max=_threshold(div.name, algorithm, float(clip)))
        u = div.exact_ratio_(a) if algorithm == 1 else div.approx_ratio_(a)
    elif algorithm == 1:
        u = div.exact_ratio_(a)  # no pole
    else:
        u = growth(a, div, algorithm).add_(1.0)  # +inf past the pole
    if clip is not None:
        # Also absorbs the last-bit rounding of the rule at the threshold: beta_{t+1} <= c beta_t exactly.
        u = u.clamp_(min=1.0, max=float(clip))
    return u


@functools.lru_cache(maxsize=64)
def _threshold(divergence: str, algorithm: int, clip: float) -> float:
    return growth_threshold(divergence, algorithm, clip)


def _hyperreg_update(
    params: list[torch.Tensor],
    step_grads: list[torch.Tensor],
    beta_grads: list[torch.Tensor],
    betas: list[torch.Tensor],
    group: dict[str, Any],
) -> None:
    """One step for parameters of one device and dtype (``betas`` from :meth:`HyperRegularization._betas`)."""
    scope, foreach = group["scope"], group.get("foreach")
    if scope == "coordinate":
        # a = (g / beta)^2 of every coordinate in one flat tensor, so that the rule is a few whole-tensor
        # passes whatever the number of parameters, and in place: no per-tensor temporaries.
        a = scratch.empty((sum(b.numel() for b in betas),), dtype=betas[0].dtype, device=betas[0].device)
        views = [v.view_as(b) for v, b in zip(a.split([b.numel() for b in betas]), betas)]
        if foreach is False:
            for v, g, b in zip(views, beta_grads, betas):
                v.copy_(g).div_(b)
        else:
            torch._foreach_copy_(views, beta_grads)
            torch._foreach_div_(views, betas)
        a.square_()
    else:
        norms = torch.stack([torch.linalg.vector_norm(g) for g in beta_grads] if foreach is False
                            else torch._foreach_norm(beta_grads))
        if scope == "tensor":
            a = (norms / torch.stack(betas)).square_()
        else:
            a = (norms.square().sum() / betas[0].square()).reshape(1)
    # beta <- beta * u: the product form keeps beta = +inf (the unclipped pole) at +inf where
    # beta + beta * delta would give inf * 0 = nan once delta is 0.
    ratio = growth_ratio_(a, group)
    if scope == "coordinate":
        ratios = [r.view_as(b) for r, b in zip(ratio.split([b.numel() for b in betas]), betas)]
        unique_betas = betas
    elif scope == "tensor":
        ratios, unique_betas = list(ratio.unbind()), betas
    else:
        ratios, unique_betas = [ratio[0]], betas[:1]

    lagged = group["algorithm"] == 3
    if lagged:
        _descend(params, step_grads, betas, scope, foreach)
    if foreach is False:
        for b, r in zip(unique_betas, ratios):
            b.mul_(r)
    else:
        torch._foreach_mul_(unique_betas, ratios)  # beta <- beta u
    if not lagged:
        _descend(params, step_grads, betas, scope, foreach)


def _descend(params: list[torch.Tensor], grads: list[torch.Tensor], betas: list[torch.Tensor], scope: str,
             foreach: bool | None) -> None:
    """``x <- x - g / beta``."""
    if scope == "coordinate" and foreach is not False:
        torch._foreach_addcdiv_(params, grads, betas, value=-1.0)
    else:
        for p, g, b in zip(params, grads, betas):
            p.addcdiv_(g, b, value=-1.0)  # a 0-d beta broadcasts


def _add(xs: list[torch.Tensor], ys: list[torch.Tensor], *, alpha: float, foreach: bool | None) -> list[torch.Tensor]:
    if foreach is False:
        return [x.add(y, alpha=alpha) for x, y in zip(xs, ys)]
    return list(torch._foreach_add(xs, ys, alpha=alpha))


def _add_(xs: list[torch.Tensor], ys: list[torch.Tensor], *, alpha: float, foreach: bool | None) -> None:
    if foreach is False:
        for x, y in zip(xs, ys):
            x.add_(y, alpha=alpha)
    else:
        torch._foreach_add_(xs, ys, alpha=alpha)
