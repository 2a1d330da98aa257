"""The Lipschitz constants of Yedida & Saha: closed-form values, what they bound, and the hook that feeds them.

The paper's constant is :math:`L \\ge \\max_{ij}|\\partial E/\\partial w_{ij}|` (its eq. 6), i.e. a Lipschitz
constant of the *loss* (section 3.1), not of its gradient. The property tests below check, on random small
networks and batches, exactly which of these statements hold:

* least squares (bound form): every last-layer gradient entry, always;
* (binary) cross-entropy, the paper's constant: one example's term at uniform predictions (its limiting
  case), tight there, and *not* the batch gradient in general (a counterexample);
* the rigorous bounds on the gradient and the smoothness constant (a Lipschitz constant of the gradient:
  ``||grad(W1) - grad(W2)|| <= beta ||W1 - W2||`` on random pairs), which the paper's constant is not;
* the section 4.3 equivalence of the classical and network formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from lrpilot.bench.tasks.models import MLP, LinearModel
from lrpilot.estimators.lipschitz import (
    LossSpec,
    PenultimateMonitor,
    binary_cross_entropy_lipschitz,
    classical_lipschitz,
    classification_gradient_bound,
    cross_entropy_lipschitz,
    estimate_weight_bound,
    find_head,
    grad_sq_estimate,
    has_hidden_layer,
    l2_lipschitz,
    least_squares_lipschitz,
    linear_regression_lipschitz,
    logistic_regression_lipschitz,
    max_weight_norm,
    softmax_regression_lipschitz,
    tikhonov_lipschitz,
)

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("cross_entropy", "binary_cross_entropy", "least_squares")
TOL = 1e-6  # float64 slack


# ----------------------------------------------------------------------------------------------------
# helpers: a random small network, its penultimate activations through the hook, exact gradients
# ----------------------------------------------------------------------------------------------------
def _network(seed: int, n_in: int, hidden: int, outputs: int, depth: int) -> nn.Module:
    torch.manual_seed(seed)
    sizes = (n_in,) + (hidden,) * depth + (outputs,)
    return MLP(sizes).double()


def _targets(kind: str, m: int, outputs: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "cross_entropy":
        return torch.randint(0, outputs, (m,), generator=gen)
    if kind == "binary_cross_entropy":
        return torch.randint(0, 2, (m, outputs), generator=gen).double()
    return torch.randn(m, outputs, generator=gen, dtype=torch.float64) * 3


def _torch_loss(kind: str) -> nn.Module:
    return {
        "cross_entropy": nn.CrossEntropyLoss(),
        "binary_cross_entropy": nn.BCEWithLogitsLoss(),
        "least_squares": nn.MSELoss(),
    }[kind]


def _activations(seed: int, m: int, n_in: int, hidden: int, outputs: int, depth: int, x_scale: float):
    """A random network, a batch, the head's input A captured by the monitor (one forward pass)."""
    net = _network(seed, n_in, hidden, outputs, depth)
    monitor = PenultimateMonitor(net)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, n_in, generator=gen, dtype=torch.float64) * x_scale
    captured = []
    handle = net.head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    net(x)
    handle.remove()
    return net, monitor, x, captured[0], gen


def _head_loss(
    kind: str, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, wd: float
) -> torch.Tensor:
    """The loss as a function of the last layer: torch's mean loss plus (wd/2)||W||^2 (torch's weight decay)."""
    out = a @ w.T + b
    return _torch_loss(kind)(out, y) + 0.5 * wd * w.square().sum()


def _grad(kind: str, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, wd: float = 0.0):
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    loss = _head_loss(kind, a, w, b, y, wd)
    gw, gb = torch.autograd.grad(loss, (w, b))
    return float(loss.detach()), gw, gb


def _random_weights(
    shape: tuple[int, int], scale: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    b = torch.randn(shape[0], generator=gen, dtype=torch.float64) * scale
    return w, b


sizes = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "m": st.integers(1, 12),
        "n_in": st.integers(1, 6),
        "hidden": st.integers(1, 10),
        "outputs": st.integers(2, 5),
        "depth": st.integers(1, 2),
        "x_scale": st.sampled_from([0.1, 1.0, 10.0]),
    }
)


# ----------------------------------------------------------------------------------------------------
# the monitor (forward hook)
# ----------------------------------------------------------------------------------------------------
def test_monitor_records_the_head_input_of_training_batches_only() -> None:
    net, monitor, x, a, _ = _activations(0, 7, 3, 5, 4, 1, 1.0)
    last = monitor.last()
    assert last.k_z == pytest.approx(float(a.norm()), rel=1e-6)
    assert last.elementwise == pytest.approx(float(a.square().norm()), rel=1e-6)
    assert last.k_a == pytest.approx(
        float(F.linear(a, net.head.weight, net.head.bias).detach().norm()), rel=1e-6
    )
    assert last.rows == 7
    net.eval()
    net(x * 100)  # a validation pass must not count
    assert monitor.epoch().batches == 1
    assert monitor.last().k_z == pytest.approx(float(a.norm()), rel=1e-6)
    with monitor.recording():
        net(x * 100)
    assert monitor.epoch().batches == 2
    assert monitor.last().k_z == pytest.approx(float(net.body(x * 100).detach().norm()), rel=1e-6)


def test_monitor_epoch_maxima_use_the_nominal_batch_size() -> None:
    net = _network(1, 3, 4, 2, 1)
    monitor = PenultimateMonitor(net)
    big, small = torch.randn(8, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64) * 50
    net(big)
    net(small)
    stats = monitor.epoch()
    assert stats.rows == 8 and stats.batches == 2
    norms = []
    for x in (big, small):
        norms.append(float(net.body(x).detach().norm()))
    assert stats.k_z == pytest.approx(max(norms), rel=1e-6)
    monitor.reset()
    assert monitor.epoch() is None
    for _ in range(5000):  # standalone use, never reset: the per-batch norms are folded, the max is kept
        net(big)
    assert monitor.epoch().batches == 5000 and len(monitor._epoch["k_z"]) < 5000
    assert monitor.epoch().k_z == pytest.approx(norms[0], rel=1e-6)
    monitor.reset()
    # state round trip keeps the epoch's maxima
    net(big)
    saved = monitor.state_dict()
    other = PenultimateMonitor(_network(1, 3, 4, 2, 1))
    other.load_state_dict(saved)
    assert other.epoch() == monitor.epoch()


def test_monitor_needs_no_second_forward_pass() -> None:
    net = _network(2, 3, 4, 2, 1)
    calls = []
    net.body.register_forward_hook(lambda *args: calls.append(1))
    PenultimateMonitor(net)
    net(torch.randn(5, 3, dtype=torch.float64))
    assert len(calls) == 1


def test_monitor_counts_the_bias_as_a_column_of_ones_when_asked() -> None:
    net = LinearModel(3, 2).double()
    monitor = PenultimateMonitor(net, include_bias=True)
    x = torch.randn(6, 3, dtype=torch.float64)
    net(x)
    x1 = torch.cat([torch.ones(6, 1, dtype=torch.float64), x], dim=1)
    assert monitor.last().k_z == pytest.approx(float(x1.norm()), rel=1e-9)
    assert monitor.last().elementwise == pytest.approx(float(x1.square().norm()), rel=1e-9)


def test_monitor_flattens_sequence_inputs_into_rows() -> None:
    head = nn.Linear(4, 3)
    model = nn.Sequential(nn.Identity(), head)
    monitor = PenultimateMonitor(model)
    a = torch.randn(2, 5, 4)
    model(a)
    assert monitor.last().rows == 10
    assert monitor.last().k_z == pytest.approx(float(a.norm()), rel=1e-6)


def test_find_head_prefers_head_then_the_last_linear_and_explains_a_missing_one() -> None:
    net = MLP((3, 4, 2))
    assert find_head(net) is net.head
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_head(seq) is seq[2]
    with pytest.raises(ValueError, match="last nn.Linear"):
        find_head(nn.Sequential(nn.Conv1d(1, 1, 1)))
    assert has_hidden_layer(net) and not has_hidden_layer(LinearModel(3, 2))
    frozen = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    frozen[0].requires_grad_(False)
    assert not has_hidden_layer(frozen)


# ----------------------------------------------------------------------------------------------------
# closed-form values
# ----------------------------------------------------------------------------------------------------
def test_the_papers_cifar10_resnet20_learning_rate() -> None:
    # Section 7.4: K_z = 206.695, max||w|| = 43.257, batch 128, weight decay 1e-3, 10 classes -> LR 0.668.
    lipschitz = cross_entropy_lipschitz(206.695, 128, 10) + l2_lipschitz(1e-3, 43.257)
    assert 1 / lipschitz == pytest.approx(0.668, abs=5e-4)


def test_closed_forms() -> None:
    assert binary_cross_entropy_lipschitz(8.0, 4) == 1.0
    assert cross_entropy_lipschitz(12.0, 3, 4) == 3.0
    assert least_squares_lipschitz(5.0, 2.0, 3.0, 3) == 3.0
    assert least_squares_lipschitz(5.0, 2.0, 3.0, 3, form="bound") == 7.0
    assert least_squares_lipschitz(1.0, 2.0, 3.0, 3) < 0  # the printed sign is not a bound
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert logistic_regression_lipschitz(x) == pytest.approx(math.sqrt(30) / 4)
    assert softmax_regression_lipschitz(x, 3) == pytest.approx(2 * math.sqrt(30) / 6)
    # K = (a + b)/2, a = sum of column means = 2 + 3, b = mean of column maxima = (3 + 4)/2
    assert estimate_weight_bound(x) == pytest.approx((5 + 3.5) / 2)
    y = torch.tensor([1.0, -1.0])
    gram, cross = float(torch.linalg.matrix_norm(x.T @ x)), float((y @ x).norm())
    assert linear_regression_lipschitz(x, y, 2.0) == pytest.approx((2 * gram - cross) / 2)
    assert classical_lipschitz(x, y, "least_squares", form="bound") == pytest.approx(
        (4.25 * gram + cross) / 2
    )
    with pytest.raises(ValueError, match="num_classes"):
        classical_lipschitz(x, None, "cross_entropy")
    with pytest.raises(ValueError, match="m must be a positive integer"):
        cross_entropy_lipschitz(1.0, 0, 3)
    with pytest.raises(ValueError, match="form"):
        least_squares_lipschitz(1.0, 1.0, 1.0, 1, form="plus")


def test_grad_sq_estimates() -> None:
    a, b, k_z = 0.5, 0.2, 4.0
    assert grad_sq_estimate(a, k_z, 99.0, b, "first") == pytest.approx((a + b) ** 2)
    # Read with Q = K_z^2 the second estimate is the first expanded: the paper's two would coincide.
    assert grad_sq_estimate(a, k_z, k_z**2, b, "second") == pytest.approx((a + b) ** 2)
    q = 3.0
    second = grad_sq_estimate(a, k_z, q, b, "second")
    assert second == pytest.approx((a / k_z) ** 2 * q + b * b + 2 * a * b)
    assert grad_sq_estimate(a, k_z, q, b, "remedy") == pytest.approx(second - b * b)
    with pytest.raises(ValueError, match="estimate"):
        grad_sq_estimate(a, k_z, q, b, "third")


def test_tikhonov_with_gamma_squared_lambda_half_is_the_l2_term() -> None:
    lam, k = 0.3, 2.5
    gamma = math.sqrt(lam / 2) * torch.eye(4)
    assert tikhonov_lipschitz(gamma, k) == pytest.approx(l2_lipschitz(lam, k))
    # The paper's literal Gamma = (lambda/2) I gives lambda^2 K / 2 instead.
    assert tikhonov_lipschitz(lam / 2 * torch.eye(4), k) == pytest.approx(lam**2 * k / 2)


@PROPERTY
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), k=st.floats(0.1, 10.0))
def test_tikhonov_term_bounds_the_regulariser_gradient_in_the_ball(seed: int, n: int, k: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.randn(n, n, generator=gen, dtype=torch.float64)
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    w = w / w.norm() * k * float(torch.rand(1, generator=gen))
    grad = 2 * gamma.T @ gamma @ w  # d/dw ||Gamma w||^2
    assert float(grad.norm()) <= tikhonov_lipschitz(gamma, k) * (1 + TOL) + TOL


@pytest.mark.parametrize(
    "kind,outputs", [("cross_entropy", 4), ("binary_cross_entropy", 3), ("least_squares", 3)]
)
def test_loss_spec_scale_is_the_ratio_to_the_papers_loss(kind: str, outputs: int) -> None:
    """Torch's mean losses against the paper's forms (CE eq. 19, BCE eq. 13 per output, LS 1/(2m))."""
    gen = torch.Generator().manual_seed(0)
    m = 5
    out = torch.randn(m, outputs, generator=gen, dtype=torch.float64, requires_grad=True)
    y = _targets(kind, m, outputs, gen)
    spec = LossSpec.from_loss(_torch_loss(kind), outputs)
    (g_torch,) = torch.autograd.grad(_torch_loss(kind)(out, y), out)
    if kind == "cross_entropy":
        paper = -F.log_softmax(out, 1).gather(1, y[:, None]).sum() / m
    elif kind == "binary_cross_entropy":  # the paper's loss per output node, summed over the nodes
        paper = F.binary_cross_entropy_with_logits(out, y, reduction="sum") / m
    else:
        paper = (out - y).square().sum() / (2 * m)
    (g_paper,) = torch.autograd.grad(paper, out)
    assert torch.allclose(g_torch, spec.scale * g_paper)


def test_loss_spec_rejects_what_it_cannot_bound() -> None:
    with pytest.raises(ValueError, match="no closed-form.*L1Loss"):
        LossSpec.from_loss(nn.L1Loss(), 1)
    with pytest.raises(ValueError, match="reduction='sum'"):
        LossSpec.from_loss(nn.CrossEntropyLoss(reduction="sum"), 3)
    with pytest.raises(ValueError, match="at least 2 outputs"):
        LossSpec.from_loss(nn.CrossEntropyLoss(), 1)


def test_max_weight_norm() -> None:
    net = MLP((3, 4, 2))
    expected = max(float(p.detach().norm()) for p in net.parameters())
    assert max_weight_norm(net.parameters()) == pytest.approx(expected)
    assert max_weight_norm([]) == 0.0


# ----------------------------------------------------------------------------------------------------
# what the paper's constants bound (and what they do not)
# ----------------------------------------------------------------------------------------------------
@PROPERTY
@given(
    cfg=sizes,
    kind=st.sampled_from(["cross_entropy", "binary_cross_entropy"]),
    wd=st.sampled_from([0.0, 0.05]),
)
def test_paper_classification_constant_bounds_each_example_at_uniform_predictions(
    cfg: dict, kind: str, wd: float
) -> None:
    """The paper's derivation (eqs. 15-23): at its limiting case (all logits equal: uniform softmax, sigmoid
    1/2), each example's term (1/m) dl_i/dW has every entry within L, plus lambda*K for L2."""
    outputs = cfg["outputs"] if kind == "cross_entropy" else 1
    _, monitor, _, a, gen = _activations(
        cfg["seed"], cfg["m"], cfg["n_in"], cfg["hidden"], outputs, cfg["depth"], cfg["x_scale"]
    )
    m = cfg["m"]
    y = _targets(kind, m, outputs, gen)
    spec = LossSpec.from_loss(_torch_loss(kind), outputs)
    # Equal rows give every class the same logit (uniform softmax); the sigmoid needs W = 0 for 1/2.
    fill = 0.3 if kind == "cross_entropy" else 0.0
    w = torch.full((outputs, a.shape[1]), fill, dtype=torch.float64)
    b = torch.zeros(outputs, dtype=torch.float64)
    bound = spec.lipschitz(monitor.last().k_z, m) + l2_lipschitz(wd, float(w.norm()))
    for i in range(m):
        _, g_i, _ = _grad(kind, a[i : i + 1], w, b, y[i : i + 1])
        term = g_i / m + wd * w  # example i's share of the mean loss, plus the regulariser's gradient
        assert float(term.abs().max()) <= bound * (1 + TOL) + TOL


def test_paper_constant_is_tight_at_its_limiting_case() -> None:
    """One example, uniform predictions, its activation on one unit: max entry == (k-1)/(km) K_z."""
    k, a = 4, torch.tensor([[0.0, 3.0, 0.0]], dtype=torch.float64)
    _, gw, _ = _grad(
        "cross_entropy",
        a,
        torch.zeros(k, 3, dtype=torch.float64),
        torch.zeros(k, dtype=torch.float64),
        torch.tensor([2]),
    )
    assert float(gw.abs().max()) == pytest.approx(cross_entropy_lipschitz(3.0, 1, k))
    _, gw, _ = _grad(
        "binary_cross_entropy",
        a,
        torch.zeros(1, 3, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
    )
    assert float(gw.abs().max()) == pytest.approx(binary_cross_entropy_lipschitz(3.0, 1))


def test_paper_classification_constant_is_not_a_batch_bound() -> None:
    """Counterexample: m identical examples, all confidently wrong. The residuals approach 1 and add up over
    the batch, so the max gradient entry approaches K_z/sqrt(m) = sqrt(m) k/(k-1) times the paper's L."""
    m, k = 16, 10
    a = torch.zeros(m, 3, dtype=torch.float64)
    a[:, 0] = 1.0
    y = torch.zeros(m, dtype=torch.long)
    w = torch.zeros(k, 3, dtype=torch.float64)
    w[1, 0] = 30.0  # every example predicts class 1 with probability ~1; the label is 0
    _, gw, _ = _grad("cross_entropy", a, w, torch.zeros(k, dtype=torch.float64), y)
    actual = float(gw.abs().max())
    k_z = float(a.norm())
    paper = cross_entropy_lipschitz(k_z, m, k)
    assert actual > 3 * paper
    assert actual == pytest.approx(
        classification_gradient_bound(k_z, m), rel=1e-6
    )  # and the rigorous bound is tight


@PROPERTY
@given(
    cfg=sizes,
    kind=st.sampled_from(["cross_entropy", "binary_cross_entropy"]),
    wd=st.sampled_from([0.0, 0.05]),
    w_scale=st.sampled_from([0.01, 1.0, 30.0]),
)
def test_rigorous_classification_bounds_hold_for_every_weight(
    cfg: dict, kind: str, wd: float, w_scale: float
) -> None:
    _, monitor, _, a, gen = _activations(
        cfg["seed"], cfg["m"], cfg["n_in"], cfg["hidden"], cfg["outputs"], cfg["depth"], cfg["x_scale"]
    )
    outputs = cfg["outputs"]
    y = _targets(kind, cfg["m"], outputs, gen)
    spec = LossSpec.from_loss(_torch_loss(kind), outputs)
    w, b = _random_weights((outputs, a.shape[1]), w_scale, gen)
    _, gw, _ = _grad(kind, a, w, b, y, wd)
    k_z, reg = monitor.last().k_z, l2_lipschitz(wd, float(w.norm()))
    assert float(gw.abs().max()) <= classification_gradient_bound(k_z, cfg["m"], spec=spec) + reg + TOL
    assert (
        float(gw.norm())
        <= classification_gradient_bound(k_z, cfg["m"], norm="frobenius", spec=spec) + reg + TOL
    )


@PROPERTY
@given(cfg=sizes, wd=st.sampled_from([0.0, 0.05]), w_scale=st.sampled_from([0.01, 1.0, 10.0]))
def test_least_squares_bound_form_bounds_every_gradient_entry(cfg: dict, wd: float, w_scale: float) -> None:
    """Eq. 8/9 with K_a = ||a^[L]|| of the batch and the + sign: a true bound, in the network itself."""
    outputs = cfg["outputs"]
    net, monitor, x, a, gen = _activations(
        cfg["seed"], cfg["m"], cfg["n_in"], cfg["hidden"], outputs, cfg["depth"], cfg["x_scale"]
    )
    y = _targets("least_squares", cfg["m"], outputs, gen)
    w, b = _random_weights((outputs, a.shape[1]), w_scale, gen)
    with torch.no_grad():
        net.head.weight.copy_(w)
        net.head.bias.copy_(b)
    net.zero_grad()
    loss = nn.MSELoss()(net(x), y) + 0.5 * wd * net.head.weight.square().sum()
    loss.backward()
    stats = monitor.last()
    spec = LossSpec.from_loss(nn.MSELoss(), outputs)
    bound = spec.lipschitz(stats.k_z, stats.rows, k_a=stats.k_a, y_norm=float(y.norm()), form="bound")
    bound += l2_lipschitz(wd, float(w.norm()))
    assert float(net.head.weight.grad.abs().max()) <= bound * (1 + TOL) + TOL


@PROPERTY
@given(seed=st.integers(0, 10_000), m=st.integers(1, 12), n=st.integers(1, 5), k_bound=st.floats(0.1, 5.0))
def test_linear_regression_bound_form_is_a_lipschitz_constant_of_the_loss_in_the_ball(
    seed: int, m: int, n: int, k_bound: float
) -> None:
    """|g(w) - g(v)| <= L ||w - v|| for ||w||, ||v|| <= K (section 4.1, with the + sign)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen, dtype=torch.float64)
    y = torch.randn(m, generator=gen, dtype=torch.float64) * 2
    lipschitz = linear_regression_lipschitz(x, y, k_bound, form="bound")

    def g(w: torch.Tensor) -> float:
        return float((x @ w - y).square().sum() / (2 * m))

    for _ in range(5):
        w, v = (torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(2))
        w = w / w.norm() * k_bound * float(torch.rand(1, generator=gen))
        v = v / v.norm() * k_bound * float(torch.rand(1, generator=gen))
        assert abs(g(w) - g(v)) <= lipschitz * float((w - v).norm()) * (1 + TOL) + TOL


@PROPERTY
@given(
    cfg=sizes,
    kind=st.sampled_from(KINDS),
    wd=st.sampled_from([0.0, 0.1]),
    w_scale=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_smoothness_is_a_lipschitz_constant_of_the_gradient(
    cfg: dict, kind: str, wd: float, w_scale: float
) -> None:
    """||grad E(W1) - grad E(W2)|| <= beta ||W1 - W2|| over the last layer (weight and bias) on random pairs,
    with beta from the K_z the hook reads when it counts the bias."""
    outputs = cfg["outputs"]
    net, _, x, a, gen = _activations(
        cfg["seed"], cfg["m"], cfg["n_in"], cfg["hidden"], outputs, cfg["depth"], cfg["x_scale"]
    )
    monitor = PenultimateMonitor(net, include_bias=True)
    net(x)
    y = _targets(kind, cfg["m"], outputs, gen)
    spec = LossSpec.from_loss(_torch_loss(kind), outputs)
    beta = spec.smoothness(monitor.last().k_z, monitor.last().rows) + wd
    for _ in range(3):
        w1, b1 = _random_weights((outputs, a.shape[1]), w_scale, gen)
        w2, b2 = _random_weights((outputs, a.shape[1]), w_scale, gen)
        _, gw1, gb1 = _grad(kind, a, w1, b1, y, wd)
        _, gw2, gb2 = _grad(kind, a, w2, b2, y, wd)
        diff_grad = math.sqrt(float((gw1 - gw2).square().sum() + (gb1 - gb2).square().sum()))
        diff_w = math.sqrt(float((w1 - w2).square().sum() + (b1 - b2).square().sum()))
        assert diff_grad <= beta * diff_w * (1 + TOL) + TOL


def test_paper_constant_is_not_a_lipschitz_constant_of_the_gradient() -> None:
    """Section 3.1 says so; with large activations the gradient moves far faster than L (K_z^2 vs K_z)."""
    m, k = 4, 3
    a = torch.full((m, 2), 20.0, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    spec = LossSpec.from_loss(nn.CrossEntropyLoss(), k)
    w1 = torch.zeros(k, 2, dtype=torch.float64)
    w2 = w1.clone()
    w2[0, 0] = 0.001
    b = torch.zeros(k, dtype=torch.float64)
    _, g1, _ = _grad("cross_entropy", a, w1, b, y)
    _, g2, _ = _grad("cross_entropy", a, w2, b, y)
    ratio = float((g1 - g2).norm() / (w1 - w2).norm())
    assert ratio > 10 * spec.lipschitz(float(a.norm()), m)
    assert ratio <= spec.smoothness(float(a.norm()), m)


# ----------------------------------------------------------------------------------------------------
# section 4.3: classical models are networks without a hidden layer
# ----------------------------------------------------------------------------------------------------
@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(1, 20),
    n=st.integers(1, 6),
    k=st.integers(2, 5),
    kind=st.sampled_from(["cross_entropy", "binary_cross_entropy"]),
)
def test_classical_constants_equal_the_network_formula_without_a_hidden_layer(
    seed: int, m: int, n: int, k: int, kind: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(m, n, generator=gen, dtype=torch.float64) * 3
    outputs = k if kind == "cross_entropy" else 1
    model = LinearModel(n, outputs).double()
    monitor = PenultimateMonitor(model, include_bias=True)  # the classical design matrix has a column of ones
    model(x)
    stats = monitor.last()
    network = LossSpec.from_loss(_torch_loss(kind), outputs).lipschitz(stats.k_z, stats.rows)
    design = torch.cat([torch.ones(m, 1, dtype=torch.float64), x], dim=1)
    classical = classical_lipschitz(design, None, kind, num_classes=k)
    assert network == pytest.approx(classical, rel=1e-9)


@PROPERTY
@given(seed=st.integers(0, 10_000), m=st.integers(1, 20), n=st.integers(1, 6), k_bound=st.floats(0.1, 5.0))
def test_least_squares_equivalence_is_an_inequality_with_equality_for_rank_one_data(
    seed: int, m: int, n: int, k_bound: float
) -> None:
    """Section 4.3 substitutes K_a = K||X|| into eq. 9 and writes ||X||^2 = ||X^T X||, ||y|| ||X|| = ||y^T X||:
    both are inequalities (the network form is the larger), equalities when X = u v^T and y is parallel to u."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen, dtype=torch.float64)
    y = torch.randn(m, generator=gen, dtype=torch.float64)
    x_norm, y_norm = float(x.norm()), float(y.norm())
    network = least_squares_lipschitz(k_bound * x_norm, y_norm, x_norm, m, form="bound")
    classical = linear_regression_lipschitz(x, y, k_bound, form="bound")
    assert classical <= network * (1 + TOL)
    u = torch.randn(m, 1, generator=gen, dtype=torch.float64)
    v = torch.randn(1, n, generator=gen, dtype=torch.float64)
    x1, y1 = u @ v, 2.5 * u[:, 0]
    x_norm, y_norm = float(x1.norm()), float(y1.norm())
    for form in ("paper", "bound"):
        network = least_squares_lipschitz(k_bound * x_norm, y_norm, x_norm, m, form=form)
        classical = linear_regression_lipschitz(x1, y1, k_bound, form=form)
        assert classical == pytest.approx(network, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("scale", [1.0, 1e12, 1e-20])
def test_the_elementwise_norm_neither_overflows_nor_underflows_in_float32(scale: float) -> None:
    """||A o A||_F = sqrt(sum a^4) of float32 activations: at 1e12 the fourth powers (1e48) are past float32's
    range and at 1e-20 (1e-80) below it; the statistic is still the float64 closed form, in float32."""
    net = LinearModel(4, 2)
    monitor = PenultimateMonitor(net, include_bias=False)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * scale
    net(x)
    exact = float(x.double().pow(4).sum().sqrt())
    value = monitor.last().elementwise
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(exact, rel=1e-6)
