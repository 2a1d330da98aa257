"""Hessian-vector products: the fast double-backward path against torch's hvp and an explicit Hessian."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from lrpilot.estimators.curvature import gradient_with_graph, hessian_reference, hvp, hvp_reference


def _tiny_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    return model, x, y


def _loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]

    def fn(*params: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)

    return fn


def test_hvp_matches_torch_functional_hvp_and_the_explicit_hessian() -> None:
    model, x, y = _tiny_model()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    vectors = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    fast = hvp(gradient_with_graph(torch.nn.functional.cross_entropy(model(x), y), params), params, vectors)
    fn = _loss_of(model, x, y)
    _, torch_hvp = torch.autograd.functional.hvp(fn, tuple(p.detach() for p in params), tuple(vectors))
    explicit = hvp_reference(fn, params, vectors)

    for a, b, c in zip(fast, torch_hvp, explicit):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert max(float(a.abs().max()) for a in fast) > 1e-3  # not a vacuous comparison of zeros


def test_explicit_hessian_is_symmetric_and_matches_a_closed_form() -> None:
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    w = torch.tensor([0.5, -1.0], dtype=torch.float64)
    hess = hessian_reference(lambda v: 0.5 * v @ a @ v + v.pow(4).sum(), [w])
    torch.testing.assert_close(hess, a + torch.diag(12 * w**2))


def test_parameters_the_loss_ignores_or_enters_linearly_get_zero_products() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor(0.5, requires_grad=True)  # enters linearly: its gradient has no graph
    unused = torch.ones(3, requires_grad=True)
    loss = (w**2).sum() + 3 * b
    params = [w, b, unused]
    out = hvp(gradient_with_graph(loss, params), params, [torch.ones(2), torch.tensor(1.0), torch.ones(3)])
    torch.testing.assert_close(out[0], torch.tensor([2.0, 2.0]))
    assert float(out[1]) == 0.0 and torch.equal(out[2], torch.zeros(3))


def test_a_linear_loss_has_a_zero_hessian() -> None:
    w = torch.ones(3, requires_grad=True)
    out = hvp(gradient_with_graph((2 * w).sum(), [w]), [w], [torch.ones(3)])
    assert torch.equal(out[0], torch.zeros(3))


def test_mismatched_lists_raise() -> None:
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="2 vectors"):
        hvp(gradient_with_graph((w**2).sum(), [w]), [w], [torch.ones(2), torch.ones(2)])
