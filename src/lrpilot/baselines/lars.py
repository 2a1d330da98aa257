"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888).

Not in torch; written from the paper's Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["LARS"]


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
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                adapt = not (group["exclude_1d"] and p.ndim <= 1)
                if adapt:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    denom = g_norm + group["weight_decay"] * w_norm + group["eps"]
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / denom,
                        torch.ones_like(w_norm),
                    )
                    update = g.add(p, alpha=group["weight_decay"]).mul_(trust)
                else:
                    update = g.clone()
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                p.sub_(buf)
        return loss
