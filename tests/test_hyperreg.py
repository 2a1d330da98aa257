"""Hyper-regularization: Lambert W, the beta rules of every divergence, the optimizer, its special cases.

The rules are checked against the equations they solve (float64, relative residual <= 1e-10, over
a = g^2/beta^2 from 1e-300 to 1e300), against a slow bracketing root finder, and against the max-min
problem they come from; the optimizer against a per-coordinate transcription of the report's code, and
its special cases against torch's Adagrad and a direct WNGrad.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lrpilot
from lrpilot.core.registry import get_method
from lrpilot.estimators.lambert import lambertw, lambertw_nonneg, lambertw_reference
from lrpilot.estimators.phi_divergence import (
    DIVERGENCES,
    growth,
    growth_reference,
    growth_threshold,
    stationarity_residual,
)
from lrpilot.pilots.hyperreg import HyperRegularization
from tests.conftest import TinyTask, needs_fmnist

F64 = torch.float64
PAPER_DIVERGENCES = ("kl", "rkl", "hellinger", "chi2")
ALL_DIVERGENCES = tuple(DIVERGENCES)
# The small-gradient coefficient k in beta_{t+1} ~ beta_t + k g^2 / beta_t (shared/research/hyperreg.md, §2).
WNGRAD_COEFFICIENT = {"kl": 1.0, "rkl": 1.0, "hellinger": 2.0, "chi2": 0.5, "half-chi2": 1.0, "neyman-chi2": 0.5}


def random_a(n: int = 400, seed: int = 0) -> torch.Tensor:
    """a = g^2 / beta^2 over 600 decades, plus the edge values."""
    gen = torch.Generator().manual_seed(seed)
    edges = torch.tensor([0.0, 1e-300, 1e-20, 1e-8, 1e-3, 0.5, 0.999, 1.0, 2.0, 1e8, 1e100, 1e300], dtype=F64)
    return torch.cat([edges, 10 ** (torch.rand(n, generator=gen, dtype=F64) * 600 - 300)])


def solvable(a: torch.Tensor, divergence: str, algorithm: int) -> torch.Tensor:
    """The a where the rule has a finite root (below Algorithm 2's pole; exp(a) representable)."""
    keep = torch.ones_like(a, dtype=torch.bool)
    if algorithm != 1:
        keep &= a < DIVERGENCES[divergence].pole
        if divergence == "kl":
            keep &= a < 700
    return a[keep]


# ----------------------------------------------------------------------------------------------------
# Lambert W
# ----------------------------------------------------------------------------------------------------
def test_lambertw_matches_scipy_over_the_whole_principal_branch():
    e = math.e
    x = torch.cat([
        -1 / e + torch.logspace(-8, math.log10(1 / e), 2000, dtype=F64),  # towards the branch point
        torch.linspace(-0.36, 0.0, 1001, dtype=F64),
        torch.logspace(-300, 300, 2001, dtype=F64),
    ])  # fmt: skip
    w, ref = lambertw(x), lambertw_reference(x)
    # Near -1/e, W is ill-conditioned (dW/dx ~ 1/sqrt(x + 1/e)): allow the rounding of x propagated.
    tol = 4e-16 * ref.abs() + 3e-16 / torch.sqrt(x + 1 / e)
    assert torch.all((w - ref).abs() <= tol + 1e-300)
    assert torch.allclose(w * torch.exp(w), x, rtol=1e-13, atol=1e-300)


def test_lambertw_special_values():
    x = torch.tensor([0.0, 5e-324, -1 / math.e, math.inf, -0.5, -1.0, math.e], dtype=F64)
    w = lambertw(x)
    assert w[0] == 0 and w[1] == 5e-324 and w[2] == -1 and w[3] == math.inf
    assert torch.isnan(w[4]) and torch.isnan(w[5])  # below -1/e: no real W
    assert w[6] == pytest.approx(1.0, rel=1e-15)
    with pytest.raises(TypeError, match="floating-point"):
        lambertw(torch.tensor([1, 2]))


def test_lambertw_nonneg_matches_the_general_one_in_float64_and_float32():
    x = torch.cat([torch.tensor([0.0, 5e-324], dtype=F64), torch.logspace(-300, 300, 3001, dtype=F64)])
    assert torch.allclose(lambertw_nonneg(x), lambertw_reference(x), rtol=4e-16, atol=0)
    x32 = torch.linspace(0, 6, 20001)
    w32 = lambertw_nonneg(x32)
    assert w32.dtype == torch.float32
    assert torch.allclose(w32.double(), lambertw_reference(x32.double()), rtol=3e-7, atol=0)


# ----------------------------------------------------------------------------------------------------
# the rules
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", [1, 2])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_each_rule_solves_its_stationarity_condition_to_1e_10(divergence, algorithm):
    a = solvable(random_a(), divergence, algorithm)
    delta = growth(a, divergence, algorithm)
    assert delta.dtype == F64 and torch.all(torch.isfinite(delta)) and torch.all(delta >= 0)
    residual = stationarity_residual(delta, a, divergence, algorithm)
    assert residual.abs().max() <= 1e-10, a[residual.abs().argmax()]
    assert torch.all(delta[a == 0] == 0)


@pytest.mark.parametrize("algorithm", [1, 2])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_each_rule_matches_the_slow_bracketing_reference(divergence, algorithm):
    a = solvable(random_a(30, seed=1), divergence, algorithm)
    fast = growth(a, divergence, algorithm)
    slow = torch.tensor([growth_reference(float(v), divergence, algorithm) for v in a], dtype=F64)
    assert torch.allclose(fast, slow, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("algorithm", [1, 2])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_in_place_ratio_forms_give_one_plus_the_growth_to_a_few_ulps(divergence, algorithm, dtype):
    """The optimizer's hot path computes u = 1 + delta in place; it must agree with the accurate rules."""
    div = DIVERGENCES[divergence]
    a = solvable(random_a(), divergence, algorithm)
    if dtype == torch.float32:
        a = a[a < 1e30]
    if algorithm != 1:
        a = a[a < min(div.pole, 80.0) * (1 - 1e-6)]  # exp(a) within float32, the pole kept at a distance
    expected = 1 + growth(a, divergence, algorithm)
    work = a.to(dtype)
    ratio = (div.exact_ratio_ if algorithm == 1 else div.approx_ratio_)(work.clone())
    assert ratio.dtype == dtype
    ulps = 16 if algorithm == 1 else 4  # Algorithm 2 near its pole: 1/(1 - a) amplifies a's rounding
    eps = torch.finfo(dtype).eps
    # rounding amplified by the problem itself: exp(w) turns w's rounding into ln(u) ulps of u, and
    # Algorithm 2 near its pole 1/(1 - a) turns a's rounding into a/(1 - a) ulps
    cond = torch.log(expected).clamp(min=1.0)
    if algorithm != 1 and div.pole < math.inf:
        cond = cond * (a / (1 - a)).clamp(min=1.0)
    assert torch.all((ratio.double() - expected).abs() <= ulps * eps * expected * cond), divergence


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_exact_rule_maximises_the_max_min_objective(divergence):
    """beta_{t+1} maximises J(beta) = -g^2/(2 beta) - eta phi(beta/eta)/2 with eta = beta_t (the derivation)."""
    from scipy.optimize import minimize_scalar

    div = DIVERGENCES[divergence]
    for g, beta_t in [(0.3, 1.0), (2.0, 1.5), (10.0, 0.5), (1e-3, 2.0)]:

        def neg_j(beta: float) -> float:
            phi = float(div.phi(torch.tensor(beta / beta_t, dtype=F64)))
            return g * g / (2 * beta) + beta_t * phi / 2

        best = minimize_scalar(neg_j, bounds=(beta_t, 100 * beta_t), method="bounded", options={"xatol": 1e-12})
        delta = growth(torch.tensor([g * g / beta_t**2], dtype=F64), divergence, 1)
        assert beta_t * (1 + float(delta)) == pytest.approx(best.x, rel=1e-7)


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_phi_prime_is_the_derivative_of_phi(divergence):
    div = DIVERGENCES[divergence]
    u = torch.tensor([0.5, 1.0, 1.3, 2.0, 7.0], dtype=F64)
    h = 1e-6
    numeric = (div.phi(u + h) - div.phi(u - h)) / (2 * h)
    assert torch.allclose(div.phi_prime(u - 1), numeric, rtol=1e-8, atol=1e-9)
    assert float(div.phi(torch.tensor(1.0, dtype=F64))) == 0.0  # phi(1) = phi'(1) = 0
    curvature = float((div.phi_prime(torch.tensor(h, dtype=F64)) - div.phi_prime(torch.tensor(-h, dtype=F64))) / (2 * h))
    assert curvature == pytest.approx(div.curvature, rel=1e-8)


@pytest.mark.parametrize("algorithm", [1, 2])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_small_gradient_limit_is_wngrad_with_the_research_note_coefficient(divergence, algorithm):
    """beta_{t+1} = beta_t + k g^2 / beta_t + O(g^4): k = 1 (KL, RKL), 2 (Hellinger), 1/2 (chi-square)."""
    beta_t = 3.0
    g = torch.tensor([1e-6, 1e-5, 1e-4], dtype=F64)
    delta = growth(g**2 / beta_t**2, divergence, algorithm)
    k = WNGRAD_COEFFICIENT[divergence]
    increment = beta_t * delta
    assert torch.allclose(increment, k * g**2 / beta_t, rtol=1e-7, atol=0)
    # and the next term is O(a)
    a = g**2 / beta_t**2
    assert torch.all((increment / (k * g**2 / beta_t) - 1).abs() <= 4 * a + 1e-15)


@pytest.mark.parametrize("divergence", ["rkl", "hellinger", "neyman-chi2"])
def test_algorithm_2_pole_is_infinite_growth_and_raw_form_goes_negative(divergence):
    a = torch.tensor([0.99, 1.0, 1.5, 3.0, 1e6], dtype=F64)
    delta = growth(a, divergence, 2)
    assert math.isfinite(delta[0]) and torch.all(torch.isinf(delta[1:]))
    raw = DIVERGENCES[divergence].approx_raw(a)
    if divergence == "rkl":  # beta_t^3 / (beta_t^2 - g^2): +inf at the pole, then negative
        assert raw[1] == math.inf and torch.all(1 + raw[2:] < 0)
    if divergence == "hellinger":  # beta_t^5 / (beta_t^2 - g^2)^2 > 0, below beta_t once g^2 > 2 beta_t^2
        assert raw[1] == math.inf and raw[2] > 0 and torch.all(raw[3:] < 0) and torch.all(1 + raw > 0)


def test_growth_threshold_is_where_the_rule_reaches_the_clip():
    for name in ALL_DIVERGENCES:
        for algorithm in (1, 2):
            for c in (1.5, 2.0, 10.0):
                threshold = growth_threshold(name, algorithm, c)
                delta = growth(torch.tensor([threshold], dtype=F64), name, algorithm)
                assert float(delta) == pytest.approx(c - 1, rel=1e-12)
    assert growth_threshold("kl", 2, 2.0) == pytest.approx(math.log(2))  # exp(a) = 2
    assert growth_threshold("rkl", 1, math.inf) == math.inf
    with pytest.raises(ValueError, match="max_growth"):
        growth_threshold("kl", 1, 1.0)
    with pytest.raises(ValueError, match="unknown divergence 'js'"):
        growth(torch.ones(1), "js", 1)
    with pytest.raises(ValueError, match="algorithm must be 1, 2 or 3"):
        growth(torch.ones(1), "kl", 4)


# ----------------------------------------------------------------------------------------------------
# the optimizer against a per-coordinate transcription of the report's code
# ----------------------------------------------------------------------------------------------------
def reference_step(x, g, beta, *, divergence, algorithm, clip, pole):
    """One step on plain Python floats, coordinate by coordinate, as the report's code does it:
    beta_new from the rule (Brent's method for Algorithm 1, the report's closed forms for 2 and 3),
    ``min(max(beta_new, beta), clip * beta)``, then ``x -= g / beta`` (new beta; old for Algorithm 3)."""
    xs, bs = [], []
    for xi, gi, bi in zip(x, g, beta):
        if algorithm != 1 and pole == "report" and divergence == "rkl":
            new = bi**3 / (bi * bi - gi * gi) if bi * bi != gi * gi else math.inf
        elif algorithm != 1 and pole == "report" and divergence == "hellinger":
            new = bi**5 / (bi * bi - gi * gi) ** 2 if bi * bi != gi * gi else math.inf
        else:
            new = bi * (1 + growth_reference(gi * gi / (bi * bi), divergence, algorithm))
        if clip is not None:
            new = min(max(new, bi), clip * bi)
        xs.append(xi - gi / (bi if algorithm == 3 else new))
        bs.append(new)
    return xs, bs


CASES = [(d, a, "infinite") for d in ALL_DIVERGENCES for a in (1, 2, 3)] + [
    (d, a, "report") for d in ("rkl", "hellinger") for a in (2, 3)
]


@pytest.mark.parametrize(("divergence", "algorithm", "pole"), CASES)
def test_optimizer_matches_the_per_coordinate_reference_step_by_step(divergence, algorithm, pole):
    gen = torch.Generator().manual_seed(3)
    x = torch.nn.Parameter(torch.randn(12, generator=gen, dtype=F64))
    opt = HyperRegularization([x], lr=0.5, divergence=divergence, algorithm=algorithm, pole=pole)
    xr, br = x.detach().tolist(), [2.0] * 12
    for _ in range(6):
        # gradients on every scale, past the poles too: a = g^2/beta^2 from ~1e-8 to ~100
        g = torch.randn(12, generator=gen, dtype=F64) * 10 ** torch.randint(-4, 2, (12,), generator=gen)
        x.grad = g.clone()
        opt.step()
        xr, br = reference_step(xr, g.tolist(), br, divergence=divergence, algorithm=algorithm, clip=2.0, pole=pole)
        assert torch.allclose(opt.state[x]["beta"], torch.tensor(br, dtype=F64), rtol=1e-12, atol=0)
        assert torch.allclose(x.detach(), torch.tensor(xr, dtype=F64), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", [info.name for info in lrpilot.list_methods("hyperreg-*")] + ["adagrad-diag", "wngrad"])
def test_growth_clipping_bounds_hold_for_every_registered_variant(name):
    """beta_t <= beta_{t+1} <= c beta_t on float32 gradients from 1e-30 to 1e30 (no overflow, no nan)."""
    model = torch.nn.Linear(50, 20)
    info = get_method(name)
    clip = 2.0
    parts = info.build(_ctx(model), **{**info.defaults, "growth_clip": clip})
    opt = parts.optimizer
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(-30, 31, p.shape, generator=gen)
        before = [b.clone() for b in _betas(opt)]
        opt.step()
        for b0, b1 in zip(before, _betas(opt)):
            assert torch.all(torch.isfinite(b1)), name
            assert torch.all(b1 >= b0) and torch.all(b1 <= clip * b0), name
        assert all(torch.all(torch.isfinite(p)) for p in model.parameters())
    # huge gradients everywhere hit the upper bound exactly
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30)
    before = [b.clone() for b in _betas(opt)]
    opt.step()
    assert all(torch.allclose(b1, clip * b0, rtol=2e-7, atol=0) for b0, b1 in zip(before, _betas(opt)))


def _ctx(model):
    from lrpilot.core.registry import BuildContext

    return BuildContext(model=model, epochs=1, steps_per_epoch=1)


def _betas(opt):
    seen, out = set(), []
    for state in opt.state.values():
        if id(state["beta"]) not in seen:
            seen.add(id(state["beta"]))
            out.append(state["beta"])
    return out


@pytest.mark.parametrize("divergence", ["rkl", "hellinger"])
@pytest.mark.parametrize("algorithm", [2, 3])
def test_pole_fix_doubles_beta_where_the_report_froze_it(divergence, algorithm):
    """g^2 >= beta_t^2: ours grows beta by the clip (2x); the report's formula gives beta_t (no growth)."""
    g = torch.tensor([1.0, 1.2, 3.0, 100.0], dtype=F64)  # beta_0 = 1: a = 1, 1.44, 9, 1e4
    betas = {}
    for pole in ("infinite", "report"):
        x = torch.nn.Parameter(torch.zeros(4, dtype=F64))
        opt = HyperRegularization([x], lr=1.0, divergence=divergence, algorithm=algorithm, pole=pole)
        x.grad = g.clone()
        opt.step()
        betas[pole] = opt.state[x]["beta"]
    assert torch.equal(betas["infinite"], torch.full((4,), 2.0, dtype=F64))
    report = betas["report"]
    assert report[0] == 2.0  # exactly at the pole: +inf, clipped
    if divergence == "rkl":
        assert torch.equal(report[1:], torch.ones(3, dtype=F64))  # negative, clipped up to beta_t
    else:
        assert 1.0 < report[1] <= 2.0 and torch.equal(report[2:], torch.ones(2, dtype=F64))


def test_report_pole_past_the_pole_per_divergence():
    """The report's raw Algorithm 2 past the pole, unclipped: reverse KL beta < 0, Hellinger
    beta = beta_t^5/(beta_t^2 - g^2)^2 > 0 but below beta_t once g^2 > 2 beta_t^2 (a longer step),
    Neyman nan."""
    expected = {"rkl": 1 / (1 - 10.0), "hellinger": 1 / (1 - 10.0) ** 2, "neyman-chi2": math.nan}
    for divergence, beta in expected.items():
        x = torch.nn.Parameter(torch.zeros(1, dtype=F64))
        opt = HyperRegularization([x], lr=1.0, divergence=divergence, algorithm=2, growth_clip=None, pole="report")
        x.grad = torch.tensor([math.sqrt(10.0)], dtype=F64)  # beta_0 = 1: a = g^2 / beta_t^2 = 10
        opt.step()
        got = float(opt.state[x]["beta"][0])
        if math.isnan(beta):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(beta, rel=1e-12)
            assert float(x.detach()[0]) == pytest.approx(-math.sqrt(10.0) / beta, rel=1e-12)
    # Hellinger: beta = 1/81 > 0, so the step is 81 times the one at beta_t, down the gradient.


def test_without_clipping_the_report_pole_ascends_and_ours_freezes_the_coordinate():
    x = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = HyperRegularization([x], lr=1.0, divergence="rkl", algorithm=2, growth_clip=None, pole="report")
    x.grad = torch.tensor([2.0, 0.5], dtype=F64)  # a = 4: beta = 1/(1 - 4) = -1/3 < 0
    opt.step()
    assert opt.state[x]["beta"][0] == pytest.approx(-1 / 3) and x[0] > 0  # gradient *ascent*
    y = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    ours = HyperRegularization([y], lr=1.0, divergence="rkl", algorithm=2, growth_clip=None)
    y.grad = torch.tensor([2.0, 0.5], dtype=F64)
    ours.step()
    assert ours.state[y]["beta"][0] == math.inf and y[0] == 0  # LR 0: the coordinate stops
    assert ours.state[y]["beta"][1] == pytest.approx(1 / (1 - 0.25))
    for g in (0.0, 0.3):  # and stays stopped, without inf * 0 = nan, whatever the next gradient
        y.grad = torch.tensor([g, 0.1], dtype=F64)
        ours.step()
        assert ours.state[y]["beta"][0] == math.inf and y[0] == 0 and torch.all(torch.isfinite(y))


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_kl2_and_friends_do_not_overflow_in_float32(divergence):
    x = torch.nn.Parameter(torch.zeros(3))
    opt = HyperRegularization([x], lr=10.0, divergence=divergence, algorithm=2)
    x.grad = torch.tensor([1e3, 1e20, 1e30])  # a = (g beta)^2 up to inf in float32
    opt.step()
    assert torch.equal(opt.state[x]["beta"], torch.full((3,), 0.2))
    assert torch.all(torch.isfinite(x))


def test_algorithms_step_with_the_new_or_the_old_beta():
    g = torch.tensor([0.3, -2.0], dtype=F64)
    for algorithm in (1, 2, 3):
        x = torch.nn.Parameter(torch.zeros(2, dtype=F64))
        opt = HyperRegularization([x], lr=0.5, divergence="chi2", algorithm=algorithm)
        x.grad = g.clone()
        opt.step()
        beta = opt.state[x]["beta"]
        a = g**2 / 4.0
        expected = 2.0 * (1 + (growth(a, "chi2", algorithm))).clamp(max=2.0)
        assert torch.allclose(beta, expected, rtol=1e-15)
        used = torch.full((2,), 2.0, dtype=F64) if algorithm == 3 else beta
        assert torch.allclose(x.detach(), -g / used, rtol=1e-15)


# ----------------------------------------------------------------------------------------------------
# special cases
# ----------------------------------------------------------------------------------------------------
def test_adagrad_diag_is_torch_adagrad_with_unit_lr_and_accumulator_one_over_lr_squared():
    """Neyman chi-square, exact: beta^2 += g^2, i.e. x -= g / sqrt(1/lr^2 + sum g^2)."""
    task = TinyTask()
    torch.manual_seed(0)
    model_a = task.model().double()
    model_b = copy.deepcopy(model_a)
    lr, wd = 0.05, 1e-3
    ours = get_method("adagrad-diag").build(_ctx(model_a), **{**get_method("adagrad-diag").defaults, "lr": lr,
                                                            "weight_decay": wd}).optimizer  # fmt: skip
    theirs = torch.optim.Adagrad(model_b.parameters(), lr=1.0, initial_accumulator_value=1 / lr**2, eps=0.0,
                                 weight_decay=wd)  # fmt: skip
    for step, (x, y) in enumerate(list(task.train) * 3):
        for model, opt in ((model_a, ours), (model_b, theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.double()), y).backward()
            opt.step()
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), step


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_wngrad_matches_a_direct_implementation(scope):
    """Wu, Ward & Bottou: b <- b + ||g||^2 / b, then x <- x - g / b (one b per group, or per tensor)."""
    task = TinyTask()
    model_a = task.model().double()
    model_b = copy.deepcopy(model_a)
    lr = 0.5
    ours = get_method("wngrad").build(_ctx(model_a), **{**get_method("wngrad").defaults, "lr": lr,
                                                      "scope": scope}).optimizer  # fmt: skip
    params_b = list(model_b.parameters())
    b = [1 / lr] * (1 if scope == "global" else len(params_b))
    for step, (x, y) in enumerate(list(task.train) * 3):
        ours.zero_grad()
        torch.nn.functional.cross_entropy(model_a(x.double()), y).backward()
        ours.step()
        model_b.zero_grad()
        torch.nn.functional.cross_entropy(model_b(x.double()), y).backward()
        with torch.no_grad():
            if scope == "global":
                b[0] += sum(float(p.grad.pow(2).sum()) for p in params_b) / b[0]
                for p in params_b:
                    p -= p.grad / b[0]
            else:
                for i, p in enumerate(params_b):
                    b[i] += float(p.grad.pow(2).sum()) / b[i]
                    p -= p.grad / b[i]
        for p, q in zip(model_a.parameters(), params_b):
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), step
    assert ours.mean_lr()[0] == pytest.approx(1 / b[0] if scope == "global" else
                                              sum(p.numel() / bi for p, bi in zip(params_b, b)) /
                                              sum(p.numel() for p in params_b))  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# state, warm-up, weight decay, telemetry, errors
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"divergence": "kl", "algorithm": 1},
    {"divergence": "hellinger", "algorithm": 3, "warmup_steps": 3, "warmup_lr": 0.01, "weight_decay": 1e-3},
    {"divergence": "half-chi2", "algorithm": 2, "scope": "global"},
    {"divergence": "rkl", "algorithm": 2, "scope": "tensor", "pole": "report"},
])  # fmt: skip
def test_state_dict_round_trip_continues_identically(options):
    def run(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randn(8, 4, generator=gen)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    torch.manual_seed(0)
    straight = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    first = copy.deepcopy(straight)
    opt_s = HyperRegularization(straight.parameters(), lr=0.3, **options)
    run(straight, opt_s, 5, seed=1)
    run(straight, opt_s, 5, seed=2)

    opt_f = HyperRegularization(first.parameters(), lr=0.3, **options)
    run(first, opt_f, 5, seed=1)
    saved = copy.deepcopy((first.state_dict(), opt_f.state_dict()))
    resumed = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt_r = HyperRegularization(resumed.parameters(), lr=0.3, **options)
    resumed.load_state_dict(saved[0])
    opt_r.load_state_dict(saved[1])
    assert opt_r.mean_lr() == opt_f.mean_lr()
    run(resumed, opt_r, 5, seed=2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt_r.mean_lr() == opt_s.mean_lr()


def test_warmup_is_plain_sgd_with_beta_frozen_then_the_rule_starts_from_beta_0():
    x = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = HyperRegularization([x], lr=0.5, divergence="rkl", algorithm=1, warmup_steps=2, warmup_lr=0.01)
    g = torch.tensor([1.0, -3.0], dtype=F64)
    assert opt.mean_lr() == [0.01]
    for k in range(2):
        x.grad = g.clone()
        opt.step()
        assert torch.allclose(x.detach(), -(k + 1) * 0.01 * g)
        assert torch.equal(opt.state[x]["beta"], torch.full((2,), 2.0, dtype=F64))
    assert opt.mean_lr() == [0.5]  # the next step uses beta_0 = 1/lr
    x.grad = g.clone()
    opt.step()
    beta = 2.0 * (1 + growth(g**2 / 4.0, "rkl", 1))
    assert torch.allclose(opt.state[x]["beta"], beta.clamp(max=4.0))
    assert opt.mean_lr()[0] == pytest.approx(float((1 / opt.state[x]["beta"]).mean()))


@pytest.mark.parametrize("wd_in_beta", [True, False])
def test_weight_decay_enters_the_step_and_optionally_the_rule(wd_in_beta):
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    wd = 0.1
    opt = HyperRegularization([x], lr=1.0, divergence="chi2", algorithm=2, weight_decay=wd, wd_in_beta=wd_in_beta)
    g = torch.tensor([0.2, 0.4], dtype=F64)
    x0 = x.detach().clone()
    x.grad = g.clone()
    opt.step()
    seen = g + wd * x0 if wd_in_beta else g
    beta = 1 + seen**2 / 2
    assert torch.allclose(opt.state[x]["beta"], beta)
    assert torch.allclose(x.detach(), x0 - (g + wd * x0) / beta)


def test_mean_lr_is_the_mean_inverse_beta_per_group_and_starts_at_lr():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = HyperRegularization([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1, divergence="chi2", algorithm=2)
    assert opt.mean_lr() == [0.1, 0.01]
    a.grad = torch.tensor([0.0, 0.1, 1.0])  # b has no gradient: its group keeps beta_0
    opt.step()
    expected = float((1 / opt.state[a]["beta"].double()).mean())
    assert opt.mean_lr() == pytest.approx([expected, 0.01])
    assert expected < 0.1


def test_mixed_dtypes_in_one_group_are_updated_alike():
    p32 = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
    p64 = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=F64))
    opt = HyperRegularization([p32, p64], lr=0.5, divergence="kl", algorithm=1)
    for _ in range(3):
        p32.grad = torch.tensor([0.7, 3.0])
        p64.grad = torch.tensor([0.7, 3.0], dtype=F64)
        opt.step()
    assert opt.state[p32]["beta"].dtype == torch.float32
    assert torch.allclose(p32.double(), p64, rtol=1e-6)
    with pytest.raises(RuntimeError, match="scope='global' needs every parameter"):
        HyperRegularization([p32, p64], lr=0.5, scope="global").step()


def test_closure_is_called_and_its_loss_returned():
    x = torch.nn.Parameter(torch.tensor([1.0]))
    opt = HyperRegularization([x], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 1.0 and float(x.detach()) < 1.0


@pytest.mark.parametrize(("options", "pattern"), [
    ({"lr": 0.0}, r"lr must be a positive finite number"),
    ({"divergence": "js"}, r"divergence must be one of .*'kl'"),
    ({"algorithm": 4}, r"algorithm must be 1, 2 or 3"),
    ({"growth_clip": 1.0}, r"growth_clip must be a number > 1 \(or None"),
    ({"warmup_steps": 2.5}, r"warmup_steps must be an integer >= 0"),
    ({"warmup_lr": -1.0}, r"warmup_lr must be a positive finite number or None"),
    ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0"),
    ({"pole": "clip"}, r"pole must be one of \['infinite', 'report'\]"),
    ({"scope": "layer"}, r"scope must be one of \['coordinate', 'tensor', 'global'\]"),
])  # fmt: skip
def test_bad_options_raise_errors_naming_them(options, pattern):
    x = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=pattern):
        HyperRegularization([x], **{"lr": 0.1, **options})
    opt = HyperRegularization([x], lr=0.1)
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], **options})
    assert len(opt.param_groups) == 1  # the bad group was not added


def test_registry_names_and_lr_telemetry_through_the_loop():
    names = {info.name for info in lrpilot.list_methods(tags=()) if info.family == "hyperreg"}
    expected = {f"hyperreg-{d}-{a}" for d in PAPER_DIVERGENCES for a in (1, 2, 3)} | {"adagrad-diag", "wngrad"}
    assert names == expected
    task = TinyTask()
    hist = lrpilot.fit(task.model(), task.train, task.val, method="hyperreg-rkl-1", epochs=3, lr=0.5, progress=False)
    lrs = [lr[0] for _, lr in hist.step_lr]
    assert lrs[0] == 0.5 and all(b <= a for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.5  # never increases
    assert [e.lr[0] for e in hist.epochs][-1] == pytest.approx(lrs[-1])


def test_the_report_task_is_registered_with_its_network():
    from lrpilot.bench.tasks import get_task

    task = get_task("fmnist-mlp500-sigmoid")
    model = task.model()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 500), (500, 10)]
    assert any(isinstance(m, torch.nn.Sigmoid) for m in model.modules())
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
@needs_fmnist
def test_report_network_pole_fix_removes_the_divergence_the_report_saw():
    """On the report's network at LR 10 (the report's summed-gradient LR 0.08, where its RKL2/RKL3 gave
    NaN): the report's unclipped raw pole diverges in the first epoch; ours trains."""
    from lrpilot.bench.tasks import run_task

    def final(**options):
        record = run_task("fmnist-mlp500-sigmoid", "hyperreg-rkl-2", epochs=1, train_subset=2000, progress=False,
                          method_options={"lr": 10.0, "weight_decay": 1e-4, **options})
        return record["summary"]["status"], record["epochs"][-1]["train_loss"]

    assert final(pole="report", growth_clip=None)[0] == "diverged"
    status, loss = final()
    assert status == "completed" and math.isfinite(loss)


def test_scratch_pool_recycles_the_same_buffers_and_changes_no_result():
    from lrpilot.estimators import scratch

    a = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1.1
    fresh = DIVERGENCES["hellinger"].exact_ratio_(a.clone())
    pool = scratch.Pool()
    for _ in range(3):
        with scratch.reuse(pool):
            pooled = DIVERGENCES["hellinger"].exact_ratio_(a.clone())
            assert torch.equal(pooled, fresh)
        assert [len(v) for v in pool.values()] == [5]  # five work buffers, allocated once
    assert scratch.empty_like(a) is not pool[((1000,), torch.float32, torch.device("cpu"))][0]  # no pool outside


@pytest.mark.parametrize("name", ["hyperreg-kl-1", "hyperreg-hellinger-1", "hyperreg-chi2-1", "hyperreg-rkl-2"])
def test_optimizer_steps_allocate_no_new_work_buffers_once_warm(name):
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 3))
    opt = get_method(name).build(_ctx(model), **get_method(name).defaults).optimizer
    sizes = []
    for step in range(4):
        opt.zero_grad()
        model(torch.randn(8, 20, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        opt.step()
        sizes.append({k: len(v) for k, v in opt._scratch_pool().items()})
    assert sizes[0] == sizes[1] == sizes[3] and sum(sizes[0].values()) >= 1
    twin = copy.deepcopy(opt)  # the pool and the telemetry cache are not state: a copy works without them
    assert twin.mean_lr() == opt.mean_lr()
