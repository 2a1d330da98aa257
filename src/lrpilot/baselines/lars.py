"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888).

Not in torch; written from the paper's Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lrpilot.core.foreach import ScalarOperands

__all__ = ["LARS", "lars"]

_scalar = ScalarOperands()  # exact 0-d operands for the multi-tensor kernels


class LARS(torch.optim.Optimizer):
    r"""SGD with momentum and a per-layer (per-tensor) trust ratio.

    For every parameter tensor :math:`w` with gradient :math:`g` (Algorithm 1 of the paper):

    .. math::
        \lambda = \eta \, \frac{\lVert w \rVert}{\lVert g \rVert + \beta \lVert w \rVert}, \qquad
        v \leftarrow m\, v + \gamma \, \lambda \, (g + \beta w), \qquad
        w \leftarrow w - v

    with global LR :math:`\gamma` (``lr``), trust coefficient :math:`\eta`, weight decay :math:`\beta`
    and momentum :math:`m`. When :math:`\lVert w \rVert` or :math:`\lVert g \rVert` is zero the trust
    ratio is 1 (plain SGD for that tensor), which the paper leaves undefined.

    Args:
        params: parameters or param groups.
        lr: global LR :math:`\gamma` (the paper decays it polynomially; the registry entry ``lars``
            does this with a per-step schedule).
        momentum: :math:`m`.
        weight_decay: :math:`\beta`.
        trust_coefficient: :math:`\eta` (0.001 in the paper).
        exclude_1d: skip the trust ratio and weight decay for 1-D tensors (biases, norm scales), a
            common practice after the paper; ``False`` (the paper) adapts every tensor.
        eps: added to the denominator.
        foreach: ``True`` or ``None`` (default): one multi-tensor (``torch._foreach_*``) kernel per
            operation over all tensors of a group; ``False``: the reference loop over tensors. Neither
            reads a value back to the host: the trust ratio's zero-norm case is a ``torch.where``.
        fold: on the multi-tensor path, ``True`` (default) folds the trust ratio and the LR into the
            momentum update, :math:`v \leftarrow m v + \gamma \lambda g (+ \gamma \lambda \beta w)`, one
            ``_foreach_addcmul_`` per term: four passes over the weights' size instead of seven
            (docs/performance.md), equal to the reference loop within a rounding per step, not bit for
            bit (``tests/test_foreach.py``). ``False``: the multi-tensor path that equals the reference loop
            bit for bit on CPU (``g + beta w``, times the ratio, then the momentum), and the runs stored
            before the option existed.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LARS(model.parameters(), lr=1.0)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        exclude_1d: bool = False,
        eps: float = 1e-12,
        *,
        foreach: bool | None = None,
        fold: bool = True,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if not trust_coefficient > 0:
            raise ValueError(f"Invalid trust_coefficient: {trust_coefficient} (must be > 0)")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            exclude_1d=exclude_1d,
            eps=eps,
            foreach=foreach,
            fold=fold,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before the option existed
            group.setdefault("foreach", None)
            group.setdefault("fold", False)  # the path they were trained on

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            lars(
                params,
                [p.grad for p in params],
                bufs,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                trust_coefficient=group["trust_coefficient"],
                exclude_1d=group["exclude_1d"],
                eps=group["eps"],
                foreach=group.get("foreach"),
                fold=group.get("fold", False),  # a checkpoint from before the option: its own path
            )
        return loss


def lars(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    exclude_1d: bool,
    eps: float,
    foreach: bool | None = None,
    fold: bool = False,
) -> None:
    """The LARS update of :class:`LARS` on lists of tensors (torch's functional form, ``torch.optim.sgd``)."""
    if foreach is False:
        func = _single_tensor_lars
    else:
        func = _folded_lars if fold else _multi_tensor_lars
    func(params, grads, momentum_buffers, lr=lr, momentum=momentum, weight_decay=weight_decay,
         trust_coefficient=trust_coefficient, exclude_1d=exclude_1d, eps=eps)


def _single_tensor_lars(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *, lr: float,
    momentum: float, weight_decay: float, trust_coefficient: float, exclude_1d: bool, eps: float,
) -> None:
    """The reference: one tensor at a time, as Algorithm 1 reads."""
    for p, g, buf in zip(params, grads, bufs):
        if not (exclude_1d and p.ndim <= 1):
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(g)
            denom = g_norm + weight_decay * w_norm + eps
            trust = torch.where(
                (w_norm > 0) & (g_norm > 0),
                trust_coefficient * w_norm / denom,
                torch.ones_like(w_norm),
            )
            update = g.add(p, alpha=weight_decay).mul_(trust)
        else:
            update = g.clone()
        buf.mul_(momentum).add_(update, alpha=lr)
        p.sub_(buf)


def _trust_ratios(
    params: list[torch.Tensor], grads: list[torch.Tensor], *, weight_decay: float, trust_coefficient: float,
    exclude_1d: bool, eps: float,
) -> tuple[list[int] | None, list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """``(adapted indices or None for all, adapted params, their grads, their trust ratios as one vector)``.

    On a small network the step is bound by dispatch, not arithmetic, so the trust ratios take as few
    small-tensor operations as exact equality with the reference allows: both norms in one ``_foreach_norm``
    and one ``stack``; ``minimum(w, g) > 0`` for ``(w > 0) & (g > 0)`` (norms are >= 0, and a NaN fails both);
    a Python ``1.0`` in ``torch.where`` instead of a tensor of ones (the same float32 1.0)."""
    if exclude_1d:
        adapt = [i for i, p in enumerate(params) if p.ndim > 1]
        ps, gs = [params[i] for i in adapt], [grads[i] for i in adapt]
    else:
        adapt, ps, gs = None, params, grads
    if not ps:
        return adapt, ps, gs, None
    w_norm, g_norm = torch.stack(torch._foreach_norm(ps + gs)).view(2, len(ps))
    denom = g_norm + weight_decay * w_norm + eps  # the reference's expression, operation for operation
    trust = torch.where(torch.minimum(w_norm, g_norm) > 0, trust_coefficient * w_norm / denom, 1.0)
    return adapt, ps, gs, trust


def _folded_lars(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *, lr: float,
    momentum: float, weight_decay: float, trust_coefficient: float, exclude_1d: bool, eps: float,
) -> None:
    """``fold=True``: the trust ratio and the LR folded into the momentum update, ``v <- m v + lr * lambda * g``
    (``+ lr * beta * lambda * w``), each term one ``_foreach_addcmul_`` with the ratios as 0-d tensors; the
    weight decay's term is skipped at ``beta = 0`` (the reference adds ``0 * w``, which only flips the sign
    of a zero or turns an infinite weight into NaN)."""
    adapt, ps, _, trust = _trust_ratios(params, grads, weight_decay=weight_decay,
                                        trust_coefficient=trust_coefficient, exclude_1d=exclude_1d, eps=eps)
    torch._foreach_mul_(bufs, _scalar(momentum, bufs))
    if trust is None:  # nothing adapted (every tensor 1-D, exclude_1d): momentum SGD
        torch._foreach_add_(bufs, grads, alpha=lr)
    else:
        if adapt is None:
            ratios, adapted_bufs = trust.unbind(0), bufs
        else:  # the tensors left out take the ratio 1 and no decay
            full = torch.ones(len(params), dtype=trust.dtype, device=trust.device)
            full[adapt] = trust
            ratios, adapted_bufs = full.unbind(0), [bufs[i] for i in adapt]
        torch._foreach_addcmul_(bufs, grads, ratios, value=lr)
        if weight_decay:
            torch._foreach_addcmul_(adapted_bufs, ps, trust.unbind(0), value=lr * weight_decay)
    torch._foreach_sub_(params, bufs)


def _multi_tensor_lars(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *, lr: float,
    momentum: float, weight_decay: float, trust_coefficient: float, exclude_1d: bool, eps: float,
) -> None:
    """``fold=False``: the same update, one multi-tensor kernel per operation; the trust ratios of all
    adapted tensors are computed as one vector (elementwise, so each equals the reference's bit for bit)."""
    adapt, ps, gs, trust = _trust_ratios(params, grads, weight_decay=weight_decay,
                                         trust_coefficient=trust_coefficient, exclude_1d=exclude_1d, eps=eps)
    updates = grads
    if trust is not None:
        scaled = torch._foreach_add(gs, ps, alpha=weight_decay)
        torch._foreach_mul_(scaled, trust.unbind(0))
        if adapt is None:
            updates = scaled
        else:
            updates = list(grads)
            for i, u in zip(adapt, scaled):
                updates[i] = u
    torch._foreach_mul_(bufs, _scalar(momentum, bufs))
    torch._foreach_add_(bufs, updates, alpha=lr)
    torch._foreach_sub_(params, bufs)
