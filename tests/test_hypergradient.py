"""Hypergradient pilots: SGD-HD against Baydin's update, RT-HPO against finite differences and eq. 5.

Everything runs in float64 on problems small enough for explicit Hessians, so the comparisons are tight.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lrpilot
from lrpilot.core.data import TensorLoader
from lrpilot.estimators.curvature import hessian_reference
from lrpilot.pilots.hypergradient import optimizers as hg

F = nn.functional

#: The paper-literal form (Baydin et al.'s SGD-HD setting, the paper's eq. 2 and 5): additive LR step,
#: vanilla SGD, undecayed and unclipped tangent. The classes' defaults are the robustness study's
#: multiplicative form (tests/test_hypergradient_robust.py); the tests in this file pin the paper's
#: update rules, so the classes they use default to the paper's options (any option passed wins).
PAPER = {"lr_rule": "additive", "momentum": 0.0, "tangent_decay": 1.0, "tangent_clip": False}


def _paper_literal(cls: type) -> type:
    class Paper(cls):  # type: ignore[misc, valid-type]
        def __init__(self, params, lr=1e-3, beta=1e-3, **options):  # type: ignore[no-untyped-def]
            super().__init__(params, lr, beta, **{**PAPER, **options})

    Paper.__name__ = Paper.__qualname__ = cls.__name__
    return Paper


SGDHD, SGDHDVal, RTHPO = _paper_literal(hg.SGDHD), _paper_literal(hg.SGDHDVal), _paper_literal(hg.RTHPO)
HypergradientSGD = _paper_literal(hg.HypergradientSGD)


# ------------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """f(w) = 1/2 w^T A w - b^T w, A symmetric positive definite (eigenvalues 0.2 .. 2)."""

    def __init__(self, dim: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.linspace(0.2, 2.0, dim, dtype=torch.float64)) @ q.T)
        self.register_buffer("b", torch.randn(dim, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def loss(self, batch: int = 0) -> torch.Tensor:  # deterministic: the batch index is ignored
        return 0.5 * self.w @ self.a @ self.w - self.b @ self.w


class LeastSquares:
    """y = X w* + noise, a linear model, fixed mini-batches of 8 drawn in a fixed order."""

    def __init__(self, n: int = 64, dim: int = 5, batch: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        w_true = torch.randn(dim, 1, generator=g, dtype=torch.float64)
        self.y = self.x @ w_true + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        self.xv = torch.randn(32, dim, generator=g, dtype=torch.float64)
        self.yv = self.xv @ w_true + 0.1 * torch.randn(32, 1, generator=g, dtype=torch.float64)
        self.batch, self.n = batch, n

    def model(self) -> nn.Module:
        torch.manual_seed(2)
        return nn.Linear(self.x.shape[1], 1).double()

    def batch_at(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (t * self.batch) % self.n
        return self.x[i : i + self.batch], self.y[i : i + self.batch]

    def val_at(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (t % 4) * 8
        return self.xv[i : i + 8], self.yv[i : i + 8]


def tiny_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def mlp_data(t: int, *, val: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed sequence of training (or validation) batches for the tiny MLP."""
    g = torch.Generator().manual_seed(1000 * val + t)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def functional(model: nn.Module):
    """(unflatten, loss_at): the model as a function of one flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def unflatten(w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.reshape(s) for n, c, s in zip(names, torch.split(w, sizes), shapes)}

    def loss_at(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, unflatten(w), (x,))
        return F.cross_entropy(out, y) if y.dtype == torch.int64 else F.mse_loss(out, y)

    return unflatten, loss_at


def grad_at(fn, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().requires_grad_(True)
    return torch.autograd.grad(fn(w), w)[0].detach()


# ------------------------------------------------------------------------------------------------------
# SGD-HD (hd-train) against Baydin et al.'s update, transcribed from their SGDHD.step on flat vectors
# ------------------------------------------------------------------------------------------------------
def baydin_sgd_hd(w0, grad_fn, lr, beta, steps, momentum=0.0, nesterov=False, lr_first=True):
    """Baydin et al. 2018's SGD-HD (their reference `SGDHD.step`, weight decay 0): LR and weights per step.

    ``lr_first=False`` steps with the LR from before the update (the paper's eq. 2 read literally).
    """
    w, grad_prev, buf = w0.clone(), torch.zeros_like(w0), None
    lrs, ws = [], []
    for t in range(steps):
        grad = grad_fn(w, t)
        h = torch.dot(grad, grad_prev)
        lr_before = lr
        lr = lr + beta * float(h)
        if momentum != 0:
            buf = grad.clone() if buf is None else momentum * buf + grad
            grad = grad + momentum * buf if nesterov else buf
        grad_prev = grad
        w = w - (lr if lr_first else lr_before) * grad
        lrs.append(lr)
        ws.append(w)
    return lrs, ws


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.5, False), (0.5, True)])
def test_hd_train_matches_baydin_on_a_quadratic(momentum: float, nesterov: bool) -> None:
    model = Quadratic()
    w0 = flat(model.parameters())
    expected_lrs, expected_ws = baydin_sgd_hd(
        w0, lambda w, t: model.a @ w - model.b, lr=0.05, beta=2e-3, steps=300, momentum=momentum, nesterov=nesterov
    )
    opt = SGDHD(model.parameters(), lr=0.05, beta=2e-3, momentum=momentum, nesterov=nesterov)
    for t in range(300):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lrs[t], rel=1e-10, abs=1e-14)
        torch.testing.assert_close(model.w.detach(), expected_ws[t], rtol=1e-10, atol=1e-12)
    assert opt.param_groups[0]["lr_clamped"] == 0  # the safeguard never acted: a pure comparison
    assert max(expected_lrs) > 0.06 or min(expected_lrs) < 0.04  # the LR really moved


@pytest.mark.parametrize("momentum,lr,beta", [(0.0, 0.01, 1e-3), (0.9, 0.005, 1e-4)])
def test_hd_train_matches_baydin_on_least_squares_minibatches(momentum: float, lr: float, beta: float) -> None:
    prob = LeastSquares()
    model = prob.model()
    _, loss_at = functional(model)

    def grad_fn(w, t):
        x, y = prob.batch_at(t)
        return grad_at(lambda v: loss_at(v, x, y), w)

    expected_lrs, expected_ws = baydin_sgd_hd(flat(model.parameters()), grad_fn, lr=lr, beta=beta, steps=200,
                                              momentum=momentum)
    opt = SGDHD(model.parameters(), lr=lr, beta=beta, momentum=momentum)
    for t in range(200):
        x, y = prob.batch_at(t)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lrs[t], rel=1e-9)
        torch.testing.assert_close(flat(model.parameters()), expected_ws[t], rtol=1e-9, atol=1e-12)
    assert min(expected_lrs) > 0 and abs(expected_lrs[-1] / lr - 1) > 1  # moved, safeguard idle


def test_lr_update_after_step_steps_with_the_previous_lr() -> None:
    model = Quadratic()
    expected_lrs, expected_ws = baydin_sgd_hd(flat(model.parameters()), lambda w, t: model.a @ w - model.b,
                                              lr=0.05, beta=2e-3, steps=50, lr_first=False)
    opt = SGDHD(model.parameters(), lr=0.05, beta=2e-3, lr_update="after-step")
    for t in range(50):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lrs[t], rel=1e-10)
        torch.testing.assert_close(model.w.detach(), expected_ws[t], rtol=1e-10, atol=1e-12)


def test_hd_val_matches_its_definition_on_least_squares() -> None:
    """eta_t = eta_{t-1} + beta <g_{t-1}, grad E(w_t; v_t)>, then w_{t+1} = w_t - eta_t g_t."""
    prob = LeastSquares()
    model = prob.model()
    _, loss_at = functional(model)
    w, lr, prev = flat(model.parameters()), 0.01, None
    opt = SGDHDVal(model.parameters(), lr=0.01, beta=2e-3)
    for t in range(100):
        x, y = prob.batch_at(t)
        xv, yv = prob.val_at(t)
        g = grad_at(lambda v: loss_at(v, x, y), w)
        if prev is not None:
            lr += 2e-3 * float(prev @ grad_at(lambda v: loss_at(v, xv, yv), w))
        w, prev = w - lr * g, g

        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step(val_closure=lambda: F.mse_loss(model(xv), yv))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-9)
        torch.testing.assert_close(flat(model.parameters()), w, rtol=1e-9, atol=1e-12)
    assert opt.param_groups[0]["lr_clamped"] == 0 and lr > 0.1  # moved, safeguard idle


def test_each_param_group_follows_its_own_hypergradient() -> None:
    prob = LeastSquares()
    model = prob.model()
    opt = SGDHD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.03, "beta": 3e-3}], lr=0.01, beta=1e-3)
    expected = [0.01, 0.03]
    prev = None
    for t in range(30):
        x, y = prob.batch_at(t)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        grads = [model.weight.grad.clone(), model.bias.grad.clone()]
        if prev is not None:
            expected = [expected[0] + 1e-3 * float((grads[0] * prev[0]).sum()),
                        expected[1] + 3e-3 * float((grads[1] * prev[1]).sum())]
        opt.step()
        prev = grads
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected, rel=1e-12)
    assert expected[0] != pytest.approx(0.01, rel=0.05) and expected[1] != pytest.approx(0.03, rel=0.05)


# ------------------------------------------------------------------------------------------------------
# RT-HPO: the exact hypergradient (eq. 4) against finite differences of the unrolled training
# ------------------------------------------------------------------------------------------------------
def _rthpo_hypergrads(model: nn.Module, groups, steps: int, objective: str = "val", **options) -> list[float]:
    """Run RT-HPO with beta = 0 for `steps` steps; return dE(w_T)/d eta_k for every group k."""
    opt = RTHPO(groups(model), beta=0.0, objective=objective, **options)
    for t in range(steps + 1):
        x, y = mlp_data(t)
        xv, yv = mlp_data(0, val=True)
        opt.step(lambda: F.cross_entropy(model(x), y), val_closure=lambda: F.cross_entropy(model(xv), yv))
    return [g["hypergrad"] for g in opt.param_groups]


def _unrolled_objective(lrs: list[float], groups, steps: int, objective: str = "val", **options) -> float:
    """E(w_T) after `steps` steps of torch.optim.SGD with these per-group LRs (same batches)."""
    model = tiny_mlp()
    opt = torch.optim.SGD(groups(model), lr=lrs[0], **options)
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    for t in range(steps):
        x, y = mlp_data(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    x, y = mlp_data(0, val=True) if objective == "val" else mlp_data(steps)
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _one_group(model):
    return model.parameters()


def _two_groups(model):
    return [{"params": model[0].parameters(), "lr": 0.3}, {"params": model[2].parameters(), "lr": 0.15}]


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": 0.8}, {"momentum": 0.8, "nesterov": True}, {"weight_decay": 0.05}],
    ids=["sgd", "momentum", "nesterov", "weight-decay"],
)
def test_rthpo_exact_hypergradient_matches_finite_differences(options) -> None:
    steps, lr, eps = 6, 0.3, 1e-6
    hypergrad = _rthpo_hypergrads(tiny_mlp(), _one_group, steps, lr=lr, **options)[0]
    fd = (_unrolled_objective([lr + eps], _one_group, steps, **options)
          - _unrolled_objective([lr - eps], _one_group, steps, **options)) / (2 * eps)
    assert abs(fd) > 1e-3  # a non-trivial derivative
    assert hypergrad == pytest.approx(fd, rel=1e-6)


def test_rthpo_per_group_hypergradients_match_finite_differences() -> None:
    steps, eps = 5, 1e-6
    hypergrads = _rthpo_hypergrads(tiny_mlp(), _two_groups, steps, lr=0.3)
    for k in range(2):
        up, down = [0.3, 0.15], [0.3, 0.15]  # the LRs of _two_groups
        up[k] += eps
        down[k] -= eps
        fd = (_unrolled_objective(up, _two_groups, steps) - _unrolled_objective(down, _two_groups, steps)) / (2 * eps)
        assert hypergrads[k] == pytest.approx(fd, rel=1e-6), f"group {k}"


def test_rthpo_on_the_training_objective_matches_finite_differences() -> None:
    steps, lr, eps = 6, 0.3, 1e-6
    hypergrad = _rthpo_hypergrads(tiny_mlp(), _one_group, steps, objective="train", lr=lr)[0]
    fd = (_unrolled_objective([lr + eps], _one_group, steps, "train")
          - _unrolled_objective([lr - eps], _one_group, steps, "train")) / (2 * eps)
    assert hypergrad == pytest.approx(fd, rel=1e-6)


# ------------------------------------------------------------------------------------------------------
# RT-HPO with a moving LR: eq. 5 written out with explicit Hessians and explicit products
# ------------------------------------------------------------------------------------------------------
def rthpo_eq5_reference(model: nn.Module, lr: float, beta: float, steps: int, lr_update: str = "before-step"):
    """Eq. 5 by its definition: dE/d eta at t = grad E(w_t) . sum_{s<t} (prod_{u=s+1}^{t-1} A_u) B_s.

    A_u = I - eta_u H_u with the explicit Hessian H_u and the LR eta_u step u applied, B_s = -grad l(w_s).
    The sum and products are computed as written (no recursion). Returns the LRs and weights per step.
    """
    _, loss_at = functional(model)
    w = flat(model.parameters())
    eye = torch.eye(len(w), dtype=w.dtype)
    a_mats, b_vecs, lrs, ws, hypergrads = [], [], [], [], []
    for t in range(steps):
        x, y = mlp_data(t)
        xv, yv = mlp_data(t % 3, val=True)
        g = grad_at(lambda v: loss_at(v, x, y), w)
        hess = hessian_reference(lambda v: loss_at(v, x, y), [w])
        total = torch.zeros_like(w)
        for s in range(t):
            v = b_vecs[s]
            for u in range(s + 1, t):
                v = a_mats[u] @ v
            total = total + v
        hypergrad = float(grad_at(lambda v: loss_at(v, xv, yv), w) @ total)
        new_lr = max(lr - beta * hypergrad, 0.0)
        applied = new_lr if lr_update == "before-step" else lr
        lr = new_lr
        a_mats.append(eye - applied * hess)
        b_vecs.append(-g)
        w = w - applied * g
        lrs.append(lr)
        ws.append(w)
        hypergrads.append(hypergrad)
    return lrs, ws, hypergrads


@pytest.mark.parametrize("lr_update", ["before-step", "after-step"])
def test_rthpo_approximate_hypergradient_matches_eq5(lr_update: str) -> None:
    steps, beta = 12, 0.2
    expected_lrs, expected_ws, expected_h = rthpo_eq5_reference(tiny_mlp(), 0.5, beta, steps, lr_update)
    model = tiny_mlp()
    opt = RTHPO(model.parameters(), lr=0.5, beta=beta, lr_update=lr_update)
    for t in range(steps):
        x, y = mlp_data(t)
        xv, yv = mlp_data(t % 3, val=True)
        opt.step(lambda: F.cross_entropy(model(x), y), val_closure=lambda: F.cross_entropy(model(xv), yv))
        group = opt.param_groups[0]
        assert group["hypergrad"] == pytest.approx(expected_h[t], rel=1e-8, abs=1e-14)
        assert group["lr"] == pytest.approx(expected_lrs[t], rel=1e-9)
        torch.testing.assert_close(flat(model.parameters()), expected_ws[t], rtol=1e-9, atol=1e-12)
    assert group["lr_clamped"] == 0
    assert max(abs(lr / 0.5 - 1) for lr in expected_lrs) > 0.05  # the LR moved, so A_u used varying LRs


# ------------------------------------------------------------------------------------------------------
# SGD-HD keeps last step's gradient by reference when the loop hands out fresh .grad tensors
# ------------------------------------------------------------------------------------------------------
def _run_sgd_hd(set_to_none_per_step: list[bool]) -> tuple[list[float], torch.Tensor, SGDHD]:
    prob = LeastSquares()
    model = prob.model()
    opt = SGDHD(model.parameters(), lr=0.01, beta=1e-3)
    lrs = []
    for t, set_to_none in enumerate(set_to_none_per_step):
        x, y = prob.batch_at(t)
        opt.zero_grad(set_to_none=set_to_none)
        F.mse_loss(model(x), y).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs, flat(model.parameters()), opt


def test_gradients_zeroed_in_place_give_the_same_trajectory() -> None:
    fresh_lrs, fresh_w, fresh = _run_sgd_hd([True] * 20)
    inplace_lrs, inplace_w, inplace = _run_sgd_hd([False] * 20)
    assert fresh_lrs == inplace_lrs and torch.equal(fresh_w, inplace_w)
    w = fresh.param_groups[0]["params"][0]
    assert fresh.state[w]["direction"] is w.grad  # kept by reference: no copy of the gradient
    w = inplace.param_groups[0]["params"][0]
    assert inplace.state[w]["direction"] is not w.grad  # the loop reuses .grad: a copy of our own


def test_a_loop_that_switches_to_in_place_zeroing_skips_one_hypergradient_never_a_wrong_one() -> None:
    pattern = [True] * 10 + [False] * 10
    lrs, _, opt = _run_sgd_hd(pattern)
    reference, _, _ = _run_sgd_hd([False] * 20)
    assert lrs[:10] == reference[:10]
    assert lrs[10] == lrs[9]  # last step's gradient was overwritten in place: no hypergradient this step
    assert opt.param_groups[0]["lr_skipped"] == 1 and lrs[11] != lrs[10]  # then copies, and moves again


# ------------------------------------------------------------------------------------------------------
# the safeguard
# ------------------------------------------------------------------------------------------------------
def test_overshooting_lr_is_clamped_at_min_lr_where_baydin_goes_negative() -> None:
    """1-D quadratic a w^2 / 2 with eta_0 = 1.5 / a: the first step overshoots, the gradients oppose."""
    a, w0, beta = 2.0, 1.0, 1.0
    lr0 = 1.5 / a
    ref_lrs, _ = baydin_sgd_hd(torch.tensor([w0], dtype=torch.float64), lambda w, t: a * w, lr0, beta, steps=3)
    assert ref_lrs[1] == pytest.approx(lr0 - beta * 0.5 * a**2 * w0**2) and ref_lrs[1] < 0  # gradient ascent

    w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    opt = SGDHD([w], lr=lr0, beta=beta)
    lrs, ws = [], []
    for _ in range(3):
        opt.zero_grad()
        (0.5 * a * w**2).sum().backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        ws.append(float(w.detach()))
    # step 1 clamps at 0 (w stays), step 2 sees the same gradient twice: eta = beta * (a w1)^2
    assert lrs == pytest.approx([lr0, 0.0, beta * (0.5 * a * w0) ** 2])
    assert ws[:2] == pytest.approx([-0.5 * w0, -0.5 * w0])
    assert opt.param_groups[0]["lr_clamped"] == 1


def test_min_lr_and_max_lr_bound_the_lr() -> None:
    model = Quadratic()
    opt = SGDHD(model.parameters(), lr=0.05, beta=1.0, min_lr=0.01, max_lr=0.2)
    seen = []
    for _ in range(50):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
        seen.append(opt.param_groups[0]["lr"])
    assert min(seen) >= 0.01 and max(seen) <= 0.2
    assert 0.2 in seen and opt.param_groups[0]["lr_clamped"] > 0


def test_rthpo_lr_never_goes_negative_or_nonfinite_with_a_huge_beta() -> None:
    prob = LeastSquares()
    model = prob.model()
    opt = RTHPO(model.parameters(), lr=0.9, beta=1e3)  # overshoots: the first hypergradient is large and > 0
    for t in range(60):
        x, y = prob.batch_at(t)
        xv, yv = prob.val_at(t)
        opt.step(lambda: F.mse_loss(model(x), y), val_closure=lambda: F.mse_loss(model(xv), yv))
        lr = opt.param_groups[0]["lr"]
        assert math.isfinite(lr) and lr >= 0
    assert opt.param_groups[0]["lr_clamped"] > 0


def test_a_nonfinite_validation_loss_leaves_the_lr_but_still_steps() -> None:
    prob = LeastSquares()
    model = prob.model()
    opt = SGDHDVal(model.parameters(), lr=0.01)
    x, y = prob.batch_at(0)
    for t in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        before = flat(model.parameters())
        opt.step(val_closure=lambda: model(x).sum() * math.inf)
        assert opt.param_groups[0]["lr"] == 0.01
        assert not torch.equal(flat(model.parameters()), before)
    group = opt.param_groups[0]
    assert group["lr_skipped"] == 2 and math.isnan(group["hypergrad"])  # the first step has no hypergradient


def test_rthpo_nonfinite_training_loss_changes_nothing() -> None:
    model = tiny_mlp()
    opt = RTHPO(model.parameters(), lr=0.2, beta=0.1)
    x, y = mlp_data(0)
    xv, yv = mlp_data(0, val=True)
    val = lambda: F.cross_entropy(model(xv), yv)
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x), y), val_closure=val)
    state = copy.deepcopy(opt.state_dict())
    weights = flat(model.parameters())
    loss = opt.step(lambda: F.cross_entropy(model(x), y) * math.nan, val_closure=val)
    assert math.isnan(float(loss.detach()))
    assert torch.equal(flat(model.parameters()), weights)
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, v in state["state"].items():
        if isinstance(v, dict) and "tangent" in v:
            assert torch.equal(after["state"][k]["tangent"], v["tangent"])


def test_a_diverged_tangent_is_reset_and_the_lr_kept() -> None:
    model = tiny_mlp()
    opt = RTHPO(model.parameters(), lr=0.2, beta=0.1)
    x, y = mlp_data(0)
    xv, yv = mlp_data(0, val=True)

    def step():
        opt.step(lambda: F.cross_entropy(model(x), y), val_closure=lambda: F.cross_entropy(model(xv), yv))

    step()
    step()
    opt.state[model[0].weight]["tangent"].fill_(math.inf)
    lr = opt.param_groups[0]["lr"]
    step()
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[0]["lr_skipped"] == 1
    # reset to zero, then z <- 0 - eta * H 0 - g: finite again, and the next hypergradient is finite
    assert all(bool(torch.isfinite(opt.state[p]["tangent"]).all()) for p in model.parameters())
    step()
    assert math.isfinite(opt.param_groups[0]["hypergrad"]) and opt.param_groups[0]["lr_skipped"] == 1


# ------------------------------------------------------------------------------------------------------
# signals: what is missing says what to pass
# ------------------------------------------------------------------------------------------------------
def test_missing_validation_signal_says_what_to_pass() -> None:
    model = tiny_mlp()
    x, y = mlp_data(0)
    opt = SGDHDVal(model.parameters())
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"val_closure=.*val_loader="):
        opt.step()
    with pytest.raises(ValueError, match=r"val_closure=.*val_loader="):
        RTHPO(model.parameters()).step(lambda: F.cross_entropy(model(x), y))


def test_rthpo_without_a_closure_says_what_to_pass() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"closure that returns it without calling backward"):
        RTHPO(model.parameters(), objective="train").step()


def test_rthpo_closure_that_calls_backward_is_explained() -> None:
    model = tiny_mlp()
    x, y = mlp_data(0)
    opt = RTHPO(model.parameters(), objective="train")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="called backward"):
        opt.step(closure)


def test_rthpo_rejects_param_groups_added_after_the_first_step() -> None:
    model = tiny_mlp()
    opt = RTHPO(model[0].parameters(), objective="train")
    x, y = mlp_data(0)
    opt.step(lambda: F.cross_entropy(model(x), y))
    opt.add_param_group({"params": model[2].parameters()})
    with pytest.raises(RuntimeError, match="param groups were added after the first step"):
        opt.step(lambda: F.cross_entropy(model(x), y))


def test_a_detached_validation_loss_is_rejected() -> None:
    model = tiny_mlp()
    x, y = mlp_data(0)
    opt = SGDHDVal(model.parameters())
    F.cross_entropy(model(x), y).backward()
    opt.step(val_closure=lambda: F.cross_entropy(model(x), y))  # the first step takes no validation gradient
    with pytest.raises(ValueError, match="graph attached"):
        opt.step(val_closure=lambda: F.cross_entropy(model(x), y).detach())


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda p: SGDHD(p, beta=-1.0), r"beta must be a finite number >= 0"),
        (lambda p: SGDHD(p, lr=1.0, max_lr=0.5), r"lr must be a finite number in \[min_lr, max_lr\]"),
        (lambda p: SGDHD(p, momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda p: SGDHD(p, nesterov=True), r"nesterov=True needs momentum > 0"),
        (lambda p: RTHPO(p, objective="test"), r"objective must be one of"),
        (lambda p: SGDHDVal(p, val_loader=[(torch.ones(1, 3), torch.zeros(1))]), r"val_loader needs model="),
        (lambda p: HypergradientSGD(p, val_loader=[(torch.ones(1, 3), torch.zeros(1))]), r"only used with objective='val'"),
    ],
)
def test_bad_options_raise_a_clear_error(make, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        make(tiny_mlp().parameters())


# ------------------------------------------------------------------------------------------------------
# a validation loader given at construction, and state_dict round trips
# ------------------------------------------------------------------------------------------------------
def test_a_validation_loader_equals_passing_the_same_batches() -> None:
    prob = LeastSquares()
    loader = TensorLoader(prob.xv, prob.yv, 8, shuffle=False)
    model_a, model_b = prob.model(), prob.model()
    opt_a = RTHPO(model_a.parameters(), lr=0.02, beta=0.1, val_loader=loader, model=model_a, loss_fn=F.mse_loss)
    opt_b = RTHPO(model_b.parameters(), lr=0.02, beta=0.1)
    for t in range(10):
        x, y = prob.batch_at(t)
        opt_a.step(lambda: F.mse_loss(model_a(x), y))
        xv, yv = prob.val_at(t - 1)  # the first step needs no validation batch: the loader starts at step 1
        opt_b.step(lambda: F.mse_loss(model_b(x), y), val_closure=lambda: F.mse_loss(model_b(xv), yv))
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] != 0.02
    assert torch.equal(flat(model_a.parameters()), flat(model_b.parameters()))


def _drive(opt, model, prob, steps, start=0):
    for t in range(start, start + steps):
        x, y = prob.batch_at(t)
        xv, yv = prob.val_at(t)
        if isinstance(opt, RTHPO):
            opt.step(lambda: F.mse_loss(model(x), y), val_closure=lambda: F.mse_loss(model(xv), yv))
        else:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step(val_closure=lambda: F.mse_loss(model(xv), yv))


@pytest.mark.parametrize("cls", [SGDHD, SGDHDVal, RTHPO])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_round_trip_continues_identically(cls, momentum) -> None:
    prob = LeastSquares()
    straight_model = prob.model()
    straight = cls(straight_model.parameters(), lr=0.02, beta=0.05, momentum=momentum)
    _drive(straight, straight_model, prob, 12)

    model = prob.model()
    opt = cls(model.parameters(), lr=0.02, beta=0.05, momentum=momentum)
    _drive(opt, model, prob, 6)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))

    resumed_model = nn.Linear(5, 1).double()
    resumed_model.load_state_dict(saved[0])
    resumed = cls(resumed_model.parameters(), lr=0.5, beta=0.05, momentum=momentum)
    resumed.load_state_dict(saved[1])
    _drive(resumed, resumed_model, prob, 6, start=6)

    assert resumed.param_groups[0]["lr"] == straight.param_groups[0]["lr"] != 0.02
    assert torch.equal(flat(resumed_model.parameters()), flat(straight_model.parameters()))


def test_state_dict_round_trip_keeps_the_validation_loader_position() -> None:
    prob = LeastSquares()
    loader = TensorLoader(prob.xv, prob.yv, 8, shuffle=False)

    def make(model):
        return SGDHDVal(model.parameters(), lr=0.02, beta=0.05, val_loader=loader, model=model, loss_fn=F.mse_loss)

    def run(opt, model, start, steps):
        for t in range(start, start + steps):
            x, y = prob.batch_at(t)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    straight_model = prob.model()
    straight = make(straight_model)
    run(straight, straight_model, 0, 7)
    model = prob.model()
    opt = make(model)
    run(opt, model, 0, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed_model = prob.model()
    resumed_model.load_state_dict(saved[0])
    resumed = make(resumed_model)
    resumed.load_state_dict(saved[1])
    run(resumed, resumed_model, 3, 4)
    assert resumed.state["hypergradient"]["val_cursor"] == 6
    assert resumed.param_groups[0]["lr"] == straight.param_groups[0]["lr"]
    assert torch.equal(flat(resumed_model.parameters()), flat(straight_model.parameters()))


# ------------------------------------------------------------------------------------------------------
# in the training loop
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hd-train", "hd-val", "rt-hpo"])
def test_beta_zero_is_plain_sgd_in_the_loop(tiny, name: str) -> None:
    # hyper_fraction=0: hd-val and rt-hpo keep all the training data, as plain SGD does.
    ours = lrpilot.Trainer(tiny.model(), tiny.train, tiny.val, method=name, epochs=2, progress=False,
                           method_options={"lr": 0.05, "beta": 0.0, "momentum": 0.0, "cooldown": 0.0}, hyper_fraction=0)
    ours.run()
    plain = lrpilot.Trainer(tiny.model(), tiny.train, tiny.val, method="sgd", epochs=2, progress=False,
                            method_options={"lr": 0.05, "momentum": 0.0})
    plain.run()
    for p, q in zip(ours.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["hd-train", "hd-val", "rt-hpo"])
def test_the_loop_records_a_per_step_lr_that_moves(tiny, name: str) -> None:
    history = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method=name, epochs=2, lr=0.05, beta=0.01, progress=False)
    assert history.status == "completed"
    # one entry per step whose LR changed: all but the first (which has no hypergradient yet)
    steps = [step for step, _ in history.step_lr]
    lrs = [lr[0] for _, lr in history.step_lr]
    assert steps == [0, *range(2, 1 + 2 * len(tiny.train))]
    assert lrs[0] == 0.05 and len(set(lrs)) == len(lrs)


# ----------------------------------------------------------------------------------------------------
# a non-finite gradient with a finite hypergradient is never applied (issue 16)
# ----------------------------------------------------------------------------------------------------
def _nan_gradient_loss(w: torch.Tensor) -> torch.Tensor:
    """A finite loss whose gradient's middle entry is nan: sqrt's derivative at 0 is inf, times 0."""
    return (w * w).sum() / 2 + (w[1] * 0.0).sqrt()


@pytest.mark.parametrize("make", [
    lambda ps: SGDHD(ps, lr=0.1, beta=0.01),
    lambda ps: SGDHDVal(ps, lr=0.1, beta=0.01),
    lambda ps: RTHPO(ps, lr=0.1, beta=0.01),
    lambda ps: RTHPO(ps, lr=0.1, beta=0.01, objective="train"),
])
def test_a_nan_gradient_at_step_zero_changes_nothing(make) -> None:
    w = nn.Parameter(torch.ones(3))
    opt = make([w])
    val = lambda: (w * w).sum()  # finite: the hypergradient is finite (0 at step 0)

    def closure(*, backward: bool = True) -> torch.Tensor:
        loss = _nan_gradient_loss(w)
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss

    loss = opt.step(closure, val_closure=val)
    assert torch.equal(w.detach(), torch.ones(3))  # before the fix: [0.9, nan, 0.9]
    assert opt.param_groups[0]["lr"] == 0.1
    assert math.isnan(float(loss))
    assert opt.steps_skipped == 1


def test_a_nan_gradient_after_good_steps_leaves_weights_lr_and_direction() -> None:
    """hd-val: the validation hypergradient is finite while the training gradient is nan."""
    w = nn.Parameter(torch.ones(3))
    opt = SGDHDVal([w], lr=0.1, beta=0.01)
    val = lambda: (w * w).sum()
    for _ in range(2):
        opt.zero_grad()
        ((w * w).sum() / 2).backward()
        opt.step(val_closure=val)
    # w = 0.9 after step 1; step 2: delta = <grad_val(w)=2w, d_prev=w0> = 2*0.9*3 = 5.4, lr = 0.1 + 0.054
    assert opt.param_groups[0]["lr"] == pytest.approx(0.154)
    assert w.detach() == pytest.approx(torch.full((3,), 0.9 * (1 - 0.154)))
    weights, lr = w.detach().clone(), opt.param_groups[0]["lr"]
    direction = opt.state[w]["direction"].clone()
    opt.zero_grad()
    _nan_gradient_loss(w).backward()
    opt.step(val_closure=val)
    assert torch.equal(w.detach(), weights)
    assert opt.param_groups[0]["lr"] == lr
    assert torch.equal(opt.state[w]["direction"], direction)
    assert opt.steps_skipped == 1


@pytest.mark.parametrize("method", ["hd-train", "hd-val", "rt-hpo"])
def test_a_step_skipped_on_a_nan_gradient_changes_no_weight_in_the_loop(method: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    model = nn.Linear(3, 1)
    start = [p.detach().clone() for p in model.parameters()]

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(out, target) + (out[0, 0] * 0.0).sqrt()

    loader = TensorLoader(x, y, 8, shuffle=False)
    # rollback=False: the optimizer's own skip, without the safety net (which rolls back a nan epoch instead)
    trainer = lrpilot.Trainer(model, loader, loader, method=method, epochs=2, loss_fn=loss_fn, progress=False,
                              method_options={"lr": 0.1, "rollback": False}, hyper_fraction=0)
    hist = trainer.run()
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start))  # nothing applied
    if method == "rt-hpo":  # the closure path: the loop reads the nan the skipped step returns
        assert hist.status == "diverged" and hist.decisions[-1].reason == "nonfinite-loss"
    else:  # the .grad path (any loop): every step skipped and counted, the LR kept
        assert trainer.optimizer.steps_skipped == 2 * len(loader)
        assert trainer.optimizer.param_groups[0]["lr"] == 0.1
