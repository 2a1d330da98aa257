"""The principal branch of the Lambert W function, elementwise on torch tensors.

``W0(x)`` solves ``w * exp(w) = x`` for real ``x >= -1/e`` with ``w >= -1``. torch has no Lambert W,
and the hyper-regularization KL rule needs one for every coordinate of every parameter at every step, so
it must be vectorised, branch-free (no per-element Python, no data-dependent loop: GPU-friendly) and
cheap: an initial guess plus a fixed number of fourth-order corrections.

* Initial guess: Winitzki's approximation ``l * (1 - log(1 + l) / (2 + l))``, ``l = log(1 + x)``
  (within 2 % for ``x >= 0``) for ``x >= -0.2``, and nearer the branch point its series in
  ``p = sqrt(2 (e x + 1))``: ``-1 + p - p^2/3 + 11 p^3/72 - ...`` up to ``p^6`` (Corless et al. 1996).
* Correction: the Fritsch-Shafer-Crowley (1973) iteration, fourth order: from a 2 % guess one step
  leaves ~6e-7, two leave the float64 rounding error (measured against ``scipy.special.lambertw``
  over ``[-1/e, 1e300]`` in ``tests/test_hyperreg.py``).

``scipy.special.lambertw`` (``lambertw_reference``) is the slow reference beside it.

References:
    Corless, Gonnet, Hare, Jeffrey, Knuth (1996), "On the Lambert W function", Adv. Comput. Math. 5.
    Fritsch, Shafer, Crowley (1973), "Algorithm 443: solution of the transcendental equation
    w e^w = x", Commun. ACM 16(2).
    Winitzki (2003), "Uniform approximations for transcendental functions", ICCSA.
"""

from __future__ import annotations

import math

import torch

from lrpilot.estimators import scratch

__all__ = ["lambertw", "lambertw_nonneg", "lambertw_nonneg_", "lambertw_reference"]

_INV_E = math.exp(-1.0)
#: FSC corrections after the initial guess: two reach the float64 rounding error (x + 1/e > 1e-8).
ITERATIONS = 2


def lambertw(x: torch.Tensor, *, iterations: int = ITERATIONS) -> torch.Tensor:
    r"""Principal branch :math:`W_0(x)`, elementwise: the :math:`w \ge -1` with :math:`w e^w = x`.

    Branch-free (``torch.where``, no host synchronisation), so it runs unchanged on a GPU.

    Args:
        x: real floating-point tensor. Values below :math:`-1/e` give ``nan``, ``inf`` gives ``inf``,
            ``W(0) = 0`` and ``W(-1/e) = -1`` exactly.
        iterations: fourth-order corrections after the initial guess (2 reach float64 precision away
            from the branch point, where the function itself is ill-conditioned:
            ``dW/dx ~ 1/sqrt(x + 1/e)``).

    Returns:
        A tensor of the same shape and dtype.

    Example:
        >>> w = lambertw(torch.tensor([0.0, 1.0, math.e, -1 / math.e], dtype=torch.float64))
        >>> [round(v, 12) for v in w.tolist()]
        [0.0, 0.56714329041, 1.0, -1.0]
    """
    _check_float(x)
    # log1p needs x > -1; the clamp only moves x < -1/e, which is nan'ed at the end.
    lg = torch.log1p(x.clamp(min=-_INV_E))
    guess = lg * (1 - torch.log1p(lg) / (2 + lg))
    p = torch.sqrt((2 * (math.e * x + 1)).clamp(min=0))
    branch = -1 + p * (1 + p * (-1.0 / 3 + p * (11.0 / 72 + p * (-43.0 / 540 + p * (769.0 / 17280 - p * (221.0 / 8505))))))
    w = torch.where(x < -0.2, branch, guess)
    # The correction divides by w (0 at x = 0) and by 1 + w (0 at the branch point): run it on a
    # harmless x there and put the exact values back afterwards.
    tiny = x.abs() < torch.finfo(x.dtype).tiny  # zero and subnormals, where W(x) = x to rounding
    special = tiny | (p < 1e-5) | torch.isinf(x)
    one = torch.ones_like(x)
    w = _fsc(torch.where(special, one, x), torch.where(special, one * 0.5671432904097838, w), iterations)
    # Near the branch point the series is as accurate as the data (p < 1e-5: error ~ p^4).
    exact = torch.where(tiny | torch.isinf(x), x, -1 + p - p * p / 3)
    w = torch.where(special, exact, w)
    return torch.where(x < -_INV_E, torch.full_like(w, math.nan), w)


def lambertw_nonneg(x: torch.Tensor, *, iterations: int | None = None) -> torch.Tensor:
    """:func:`lambertw` for finite ``x >= 0`` only, in a third of the tensor passes (an optimizer's hot path).

    Winitzki's guess, then Newton's method on ``w + log(w) = log(x)``, which for ``x > 0`` is as well
    conditioned as the problem and costs six in-place passes per step:
    ``w <- w (1 + log(x / w)) / (1 + w)``. Quadratic: 2 % -> 1e-4 -> 3e-9 -> 4e-16, so three steps
    in float64 and two in lower precisions (2.5e-7, the float32 rounding of the formula).
    Negative, ``inf`` or ``nan`` inputs give unspecified results; ``W(0) = 0`` exactly.
    """
    _check_float(x)
    steps = (3 if x.dtype == torch.float64 else 2) if iterations is None else iterations
    tiny = torch.finfo(x.dtype).tiny
    xs = x.clamp(min=tiny)  # keeps the guess > 0 for the log
    lg = torch.log1p(xs)
    w = torch.log1p(lg).div_(lg + 2).neg_().add_(1).mul_(lg)  # l (1 - log(1 + l) / (2 + l))
    t = torch.empty_like(w)
    for _ in range(steps):
        torch.div(xs, w, out=t).log_().add_(1).mul_(w)  # w (1 + log(x / w))
        t.div_(w.add_(1))
        w, t = t, w  # two buffers for all the steps: fresh temporaries cost as much as the arithmetic
    return torch.where(x >= tiny, w, x)  # W(x) = x to rounding for zero and subnormals


def lambertw_nonneg_(x: torch.Tensor, *, iterations: int | None = None) -> torch.Tensor:
    """:func:`lambertw_nonneg` that may overwrite ``x``, with three temporaries from
    :func:`lrpilot.estimators.scratch.empty_like`; returns ``W(x)``, with ``W(0) = W(tiny)`` (the
    smallest normal number) instead of 0."""
    steps = (3 if x.dtype == torch.float64 else 2) if iterations is None else iterations
    x.clamp_(min=torch.finfo(x.dtype).tiny)
    lg = torch.log1p(x, out=scratch.empty_like(x))
    t = torch.log1p(lg, out=scratch.empty_like(x))
    w = torch.add(lg, 2.0, out=scratch.empty_like(x)).reciprocal_().mul_(t).neg_().add_(1.0).mul_(lg)  # Winitzki
    for _ in range(steps):
        torch.div(x, w, out=t).log_().add_(1.0).mul_(w)
        t.div_(w.add_(1.0))
        w, t = t, w
    return w


def _fsc(x: torch.Tensor, w: torch.Tensor, iterations: int) -> torch.Tensor:
    """Fritsch-Shafer-Crowley corrections of a guess ``w`` of ``W(x)`` (fourth order)."""
    for _ in range(iterations):
        z = torch.log(x / w) - w
        w1 = 1 + w
        q = 2 * w1 * (w1 + (2.0 / 3) * z) - z
        w = w * (1 + z / w1 * (q - z) / (q - 2 * z))
    return w


def _check_float(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"lambertw needs a floating-point tensor, got {x.dtype}")


def lambertw_reference(x: torch.Tensor) -> torch.Tensor:
    """``scipy.special.lambertw`` (principal branch, real part), the slow reference."""
    from scipy.special import lambertw as scipy_lambertw

    values = scipy_lambertw(x.detach().cpu().double().numpy())
    real = torch.as_tensor(values.real, dtype=x.dtype, device=x.device)
    # Below -1/e the principal branch is complex: nan, as lambertw gives.
    return torch.where(torch.as_tensor(values.imag != 0, device=x.device), torch.full_like(real, math.nan), real)
