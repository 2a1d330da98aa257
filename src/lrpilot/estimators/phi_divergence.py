r"""Phi-divergences and the inverse-learning-rate updates they imply (hyper-regularization).

Hyper-regularization (Xie, Jin, Lin & Zhang, ICLR 2019 submission; see ``docs/methods/hyperreg.md``)
chooses the inverse learning rate :math:`\beta` of gradient descent by a max-min problem per step,

.. math::
    \max_\beta \min_x \; \langle g_t, x - x_t\rangle + \tfrac12 \lVert x - x_t\rVert_\beta^2
    - \tfrac12 D(\beta, \beta_t), \qquad D(\beta, \eta) = \textstyle\sum_i \eta_i\,\phi(\beta_i/\eta_i),

with :math:`\phi` convex, :math:`\phi(1) = \phi'(1) = 0`. The inner minimum is :math:`x = x_t - g/\beta`;
the outer problem is concave and separable, and per coordinate its maximiser solves the
**stationarity condition** :math:`\phi'(u) = a/u^2` in the growth ratio :math:`u = \beta_{t+1}/\beta_t`,
with :math:`a = g_t^2/\beta_t^2` (for a block of coordinates sharing one :math:`\beta`,
:math:`a = \lVert g\rVert^2/\beta_t^2`). Algorithm 1 solves it exactly; Algorithm 2 replaces
:math:`\beta_{t+1}` by :math:`\beta_t` on the right, :math:`\phi'(u) = a`.

The rules are written in the *growth* :math:`\delta = u - 1 \ge 0`, because :math:`\delta` is tiny for
small gradients (:math:`\delta \approx a/\phi''(1)`) and would be lost to rounding in :math:`u`; each
also has an in-place form for :math:`u` itself (``exact_ratio_``, ``approx_ratio_``), accurate to a few
ulps of :math:`u`, which is all :math:`\beta_{t+1} = \beta_t u` can use: the optimizer's hot path.

=============  ===========================  ==============================  ==========  ===========
name           :math:`\phi(u)`              Algorithm 1 (exact) solves      Algorithm 2 :math:`\phi''(1)`
=============  ===========================  ==============================  ==========  ===========
kl             u ln u - u + 1               u^2 ln u = a (Lambert W)        e^a         1
rkl            u - 1 - ln u                 u^2 - u = a (explicit root)     1/(1-a)     1
hellinger      (sqrt(u) - 1)^2              u^2 (1 - u^-1/2) = a (quartic)  1/(1-a)^2   1/2
chi2           (u - 1)^2 (Pearson)          2 u^2 (u - 1) = a (cubic)       1 + a/2     2
half-chi2      (u - 1)^2 / 2                u^2 (u - 1) = a (cubic)         1 + a       1
neyman-chi2    (u - 1)^2 / u                u^2 - 1 = a (AdaGrad)           (1-a)^-1/2  2
=============  ===========================  ==============================  ==========  ===========

(the Algorithm 2 column gives :math:`u`). Reverse KL, Hellinger and Neyman have :math:`\sup\phi' = 1`:
Algorithm 2 has no solution for :math:`a \ge 1` (the *pole*), where the concave objective increases
without bound in :math:`\beta`, so the maximiser is :math:`+\infty` (:func:`growth` returns ``inf``);
``approx_raw`` evaluates the closed form past the pole as the reproducibility report's code did.

Every fast rule has a slow reference beside it (:func:`growth_reference`: a bracketing root finder on the
stationarity condition, one coordinate at a time, in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lrpilot.estimators import scratch
from lrpilot.estimators.lambert import lambertw_nonneg, lambertw_nonneg_

__all__ = [
    "DIVERGENCES",
    "PhiDivergence",
    "get_divergence",
    "growth",
    "growth_reference",
    "growth_threshold",
    "stationarity_residual",
]

Rule = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PhiDivergence:
    """A separable phi-divergence and the beta-growth rules it implies.

    Args:
        name: registry-style name (``"kl"``, ``"rkl"``, ...).
        formula: :math:`\\phi(u)` in words, for documentation and error messages.
        phi: :math:`\\phi(u)`, elementwise.
        phi_prime: :math:`\\phi'(1 + \\delta)` as a function of :math:`\\delta`, written to stay accurate
            for tiny :math:`\\delta`.
        curvature: :math:`\\phi''(1)`; for small gradients both algorithms give
            :math:`\\delta \\approx a / \\phi''(1)` (per-coordinate WNGrad with that coefficient).
        exact: Algorithm 1, :math:`\\delta(a)` solving :math:`(1+\\delta)^2\\phi'(1+\\delta) = a`.
        approx: Algorithm 2, :math:`\\delta(a)` solving :math:`\\phi'(1+\\delta) = a`; ``inf`` where
            :math:`a \\ge` ``pole``.
        approx_raw: Algorithm 2's closed form evaluated everywhere, past the pole included (there:
            :math:`u < 0` for reverse KL, :math:`0 < u` for Hellinger, below 1 once :math:`a > 2`, ``nan``
            for Neyman): what the reproducibility report's code computed.
        exact_ratio_: Algorithm 1 as the growth *ratio* :math:`u = 1 + \\delta`, computed in place: it
            may overwrite its argument, and returns it or another tensor (the optimizer's hot path).
        approx_ratio_: Algorithm 2's ratio in place, for :math:`a` below the pole only.
        pole: :math:`\\sup_u \\phi'(u)` (``inf`` when :math:`\\phi'` is unbounded).

    The ratio forms give :math:`u` to a few units in the last place, which is all
    :math:`\\beta_{t+1} = \\beta_t u` can use, with few passes and no temporaries where the formula allows
    (on a CPU a fresh temporary costs as much as the arithmetic); the :math:`\\delta` forms keep
    :math:`\\delta`'s own relative accuracy for tiny :math:`a`, which the tests check against the equations.
    """

    name: str
    formula: str
    phi: Rule
    phi_prime: Rule
    curvature: float
    exact: Rule
    approx: Rule
    approx_raw: Rule
    exact_ratio_: Rule
    approx_ratio_: Rule
    pole: float = math.inf


# ----------------------------------------------------------------------------------------------------
# closed forms and iterations
# ----------------------------------------------------------------------------------------------------
def _cubic_growth(b: torch.Tensor) -> torch.Tensor:
    r"""The root :math:`e \ge 0` of :math:`e (1 + e)^2 = b`, i.e. :math:`u^3 - u^2 = b` with :math:`u = 1 + e`.

    Cardano in hyperbolic form, rewritten so that no step cancels: with :math:`z = 27b/2`,
    :math:`u = \tfrac13 + \tfrac23\cosh(\tfrac13\operatorname{arcosh}(1 + z))`, hence
    :math:`e = \tfrac43\sinh^2(\tfrac16\operatorname{arcosh}(1 + z))` and
    :math:`\operatorname{arcosh}(1 + z) = \operatorname{log1p}(z + \sqrt{z}\sqrt{2 + z})`
    (two square roots so that :math:`z(2 + z)` cannot overflow).
    """
    z = 13.5 * b
    x = torch.sqrt(z).mul_(torch.sqrt(z + 2)).add_(z).log1p_().mul_(1.0 / 6)
    return x.sinh_().square_().mul_(4.0 / 3)


def _quartic_root(a: torch.Tensor) -> torch.Tensor:
    r"""The root :math:`e \ge 0` of :math:`e (1 + e)^3 = a` (Hellinger, :math:`s = \sqrt{u} = 1 + e`).

    Ferrari's closed form cancels catastrophically at both ends (small and large :math:`a`), so this is
    Halley's method on :math:`h(e) = e - a/(1 + e)^3` (increasing, concave) from
    :math:`\max(a/(1 + 3a), a^{1/4} - 1)`, which has the right first terms at both ends. Three steps
    reach the float64 rounding error for every :math:`a` in :math:`[0, 10^{300}]`; two leave < 2e-7,
    below float32 rounding, so lower precisions take two. ``a`` is only read; the five work buffers
    come from :func:`lrpilot.estimators.scratch.empty_like` and the passes are in place, because the
    rule runs on every coordinate at every optimizer step.
    """
    steps = 3 if a.dtype == torch.float64 else 2
    e = torch.mul(a, 3.0, out=scratch.empty_like(a)).add_(1.0).reciprocal_().mul_(a)
    p = torch.sqrt(a, out=scratch.empty_like(a)).sqrt_().sub_(1.0)
    torch.maximum(e, p, out=e)
    r, h, h1 = (scratch.empty_like(a) for _ in range(3))
    for _ in range(steps):
        torch.add(e, 1.0, out=p)
        torch.mul(p, p, out=r).square_()
        torch.div(a, r, out=r)  # r = a / p^4
        torch.addcmul(e, r, p, value=-1.0, out=h)  # h(e) = e - a/p^3
        torch.mul(r, 3.0, out=h1).add_(1.0)  # h'(e) = 1 + 3a/p^4
        # Halley: e - h h' / (h'^2 - h h''/2), with h'' = -12 r / p; the denominator goes in r's buffer
        r.mul_(h).div_(p).mul_(6.0).addcmul_(h1, h1)
        e.sub_(h.mul_(h1).div_(r))
    return e


def _cubic_ratio_(b: torch.Tensor) -> torch.Tensor:
    """In place: ``u = 1/3 + (2/3) cosh(arcosh(1 + z) / 3)``, ``z = 27 b / 2``, the root > 1 of
    ``u^3 - u^2 = b``, with ``arcosh(1 + z) = log1p(z + sqrt(z) sqrt(2 + z))`` (torch's ``acosh`` is
    ten times slower than ``log1p`` on CPUs)."""
    z = b.mul_(13.5)
    t = torch.add(z, 2.0, out=scratch.empty_like(z)).sqrt_().mul_(torch.sqrt(z, out=scratch.empty_like(z)))
    return t.add_(z).log1p_().mul_(1.0 / 3).cosh_().mul_(2.0 / 3).add_(1.0 / 3)


def _kl_ratio_(a: torch.Tensor) -> torch.Tensor:
    """In place: ``u = exp(W(2a) / 2) = sqrt(2a / W(2a))`` (``W e^W = x``; a square root is cheaper)."""
    x = a.mul_(2.0)
    w = lambertw_nonneg_(x)  # clamps x at the smallest normal number: x / w = 1 there
    return torch.div(x, w, out=w).sqrt_()


def _beyond(pole: float, a: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``a < pole``, ``+inf`` elsewhere (the maximiser past Algorithm 2's pole)."""
    return torch.where(a < pole, value, torch.full_like(value, math.inf))


def _rkl_approx_raw(a: torch.Tensor) -> torch.Tensor:
    return a / (1 - a)  # u = 1/(1 - a)


def _hellinger_approx_raw(a: torch.Tensor) -> torch.Tensor:
    return a * (2 - a) / ((1 - a) * (1 - a))  # u = 1/(1 - a)^2


def _neyman_approx_raw(a: torch.Tensor) -> torch.Tensor:
    s = torch.sqrt(1 - a)  # u = 1/sqrt(1 - a); 1/s - 1 = a / (s (1 + s))
    return a / (s * (1 + s))


def _hellinger_phi_prime(d: torch.Tensor) -> torch.Tensor:
    s = torch.sqrt(1 + d)  # 1 - 1/s = d / (s (1 + s))
    return d / (s * (1 + s))


DIVERGENCES: dict[str, PhiDivergence] = {
    d.name: d
    for d in (
        PhiDivergence(
            "kl", "u ln u - u + 1 (Kullback-Leibler)",
            phi=lambda u: torch.xlogy(u, u) - u + 1,
            phi_prime=torch.log1p,
            curvature=1.0,
            # u^2 ln u = a  <=>  (2 ln u) e^(2 ln u) = 2a  <=>  ln u = W(2a) / 2
            exact=lambda a: torch.expm1(lambertw_nonneg(2 * a).mul_(0.5)),
            approx=torch.expm1,
            approx_raw=torch.expm1,
            exact_ratio_=_kl_ratio_,
            approx_ratio_=torch.exp_,
        ),
        PhiDivergence(
            "rkl", "u - 1 - ln u (reverse Kullback-Leibler)",
            phi=lambda u: u - 1 - torch.log(u),
            phi_prime=lambda d: d / (1 + d),
            curvature=1.0,
            # u^2 - u = a: u = (1 + sqrt(1 + 4a)) / 2, and u - 1 without cancellation
            exact=lambda a: 2 * a / (1 + torch.sqrt(1 + 4 * a)),
            approx=lambda a: _beyond(1.0, a, _rkl_approx_raw(a)),
            approx_raw=_rkl_approx_raw,
            exact_ratio_=lambda a: a.mul_(4.0).add_(1.0).sqrt_().add_(1.0).mul_(0.5),
            approx_ratio_=lambda a: a.neg_().add_(1.0).reciprocal_(),
            pole=1.0,
        ),
        PhiDivergence(
            "hellinger", "(sqrt(u) - 1)^2 (squared Hellinger)",
            phi=lambda u: (torch.sqrt(u) - 1) ** 2,
            phi_prime=_hellinger_phi_prime,
            curvature=0.5,
            exact=lambda a: (lambda e: e * (2 + e))(_quartic_root(a)),  # u = (1 + e)^2
            approx=lambda a: _beyond(1.0, a, _hellinger_approx_raw(a)),
            approx_raw=_hellinger_approx_raw,
            exact_ratio_=lambda a: _quartic_root(a).add_(1.0).square_(),
            approx_ratio_=lambda a: a.neg_().add_(1.0).square_().reciprocal_(),
            pole=1.0,
        ),
        PhiDivergence(
            "chi2", "(u - 1)^2 (Pearson chi-square)",
            phi=lambda u: (u - 1) ** 2,
            phi_prime=lambda d: 2 * d,
            curvature=2.0,
            exact=lambda a: _cubic_growth(a / 2),
            approx=lambda a: a / 2,
            approx_raw=lambda a: a / 2,
            exact_ratio_=lambda a: _cubic_ratio_(a.mul_(0.5)),
            approx_ratio_=lambda a: a.mul_(0.5).add_(1.0),
        ),
        PhiDivergence(
            "half-chi2", "(u - 1)^2 / 2 (half Pearson chi-square; WNGrad)",
            phi=lambda u: (u - 1) ** 2 / 2,
            phi_prime=lambda d: d,
            curvature=1.0,
            exact=_cubic_growth,
            approx=lambda a: a,
            approx_raw=lambda a: a,
            exact_ratio_=_cubic_ratio_,
            approx_ratio_=lambda a: a.add_(1.0),
        ),
        PhiDivergence(
            "neyman-chi2", "(u - 1)^2 / u (Neyman chi-square; AdaGrad)",
            phi=lambda u: (u - 1) ** 2 / u,
            phi_prime=lambda d: d * (2 + d) / ((1 + d) * (1 + d)),
            curvature=2.0,
            # u^2 - 1 = a: u = sqrt(1 + a), u - 1 = a / (1 + sqrt(1 + a))
            exact=lambda a: a / (1 + torch.sqrt(1 + a)),
            approx=lambda a: _beyond(1.0, a, _neyman_approx_raw(a)),
            approx_raw=_neyman_approx_raw,
            exact_ratio_=lambda a: a.add_(1.0).sqrt_(),
            approx_ratio_=lambda a: a.neg_().add_(1.0).rsqrt_(),
            pole=1.0,
        ),
    )
}  # fmt: skip


def get_divergence(name: str) -> PhiDivergence:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}") from None


def growth(a: torch.Tensor, divergence: str | PhiDivergence, algorithm: int) -> torch.Tensor:
    r"""The unclipped growth :math:`\delta = \beta_{t+1}/\beta_t - 1` for :math:`a = g^2/\beta_t^2`.

    Args:
        a: non-negative tensor (any shape).
        divergence: a name of :data:`DIVERGENCES` or the record.
        algorithm: 1 (exact stationarity) or 2 (approximate; also Algorithm 3's rule).

    Example:
        >>> a = torch.tensor([0.0, 0.5, 4.0], dtype=torch.float64)
        >>> growth(a, "rkl", 2).tolist()  # 1/(1 - a) - 1, and +inf past the pole a >= 1
        [0.0, 1.0, inf]
    """
    div = divergence if isinstance(divergence, PhiDivergence) else get_divergence(divergence)
    if algorithm == 1:
        return div.exact(a)
    if algorithm in (2, 3):
        return div.approx(a)
    raise ValueError(f"algorithm must be 1, 2 or 3, got {algorithm!r}")


def growth_threshold(divergence: str | PhiDivergence, algorithm: int, max_growth: float) -> float:
    r"""The :math:`a` at which the rule's growth ratio reaches ``max_growth`` (:math:`u = c`).

    The rules are increasing in :math:`a`, so clipping :math:`u` to :math:`c` is clipping :math:`a` to
    this threshold first: :math:`c^2\phi'(c)` for Algorithm 1, :math:`\phi'(c)` for Algorithm 2. Doing
    so keeps every rule on a bounded range (no overflow in ``exp``, never at Algorithm 2's pole).
    """
    div = divergence if isinstance(divergence, PhiDivergence) else get_divergence(divergence)
    if not max_growth > 1:
        raise ValueError(f"max_growth must be > 1, got {max_growth!r}")
    if math.isinf(max_growth):
        return math.inf
    slope = float(div.phi_prime(torch.tensor(max_growth - 1.0, dtype=torch.float64)))
    return max_growth**2 * slope if algorithm == 1 else slope


def stationarity_residual(delta: torch.Tensor, a: torch.Tensor, divergence: str | PhiDivergence, algorithm: int) -> torch.Tensor:
    r"""Relative residual of the condition the rule solves: :math:`(1+\delta)^2\phi'(1+\delta)/a - 1`
    (Algorithm 1) or :math:`\phi'(1+\delta)/a - 1` (Algorithm 2); 0 where :math:`a = 0 = \delta`."""
    div = divergence if isinstance(divergence, PhiDivergence) else get_divergence(divergence)
    lhs = div.phi_prime(delta)
    if algorithm == 1:
        lhs = lhs * (1 + delta) ** 2
    return torch.where(a > 0, lhs / a - 1, lhs)


def growth_reference(a: float, divergence: str | PhiDivergence, algorithm: int) -> float:
    """The slow reference of :func:`growth` for one coordinate: Brent's method on the stationarity
    condition in float64 (no closed form, no special function), ``inf`` past Algorithm 2's pole."""
    from scipy.optimize import brentq

    div = divergence if isinstance(divergence, PhiDivergence) else get_divergence(divergence)
    if a == 0:
        return 0.0
    if algorithm != 1 and a >= div.pole:
        return math.inf

    def condition(d: float) -> float:
        dt = torch.tensor(d, dtype=torch.float64)
        lhs = float(div.phi_prime(dt)) * ((1 + d) ** 2 if algorithm == 1 else 1.0)
        return math.log(lhs) - math.log(a) if lhs > 0 else -math.inf  # log: well scaled for any a

    hi = 1.0
    while condition(hi) < 0:
        hi *= 2
    lo = hi
    while condition(lo) >= 0:  # the condition tends to -inf as delta -> 0
        lo /= 2
    return brentq(condition, lo, 2 * lo, xtol=max(lo * 1e-17, 1e-320), rtol=8.9e-16, maxiter=500)
