r"""Closed-form Lipschitz constants of a loss with respect to the last layer's weights.

Yedida & Saha, *LipschitzLR: Using theoretically computed adaptive learning rates for fast
convergence* (``shared/papers/003_8119a118a538bf06.txt``), sections 3-6. The paper bounds the largest
last-layer gradient entry (its eq. 6) as

.. math::
    \max_{i,j} \Bigl|\frac{\partial E}{\partial w^{[L]}_{ij}}\Bigr|
    \le \max_j \Bigl|\frac{\partial E}{\partial a^{[L]}_j}\Bigr| \cdot
        \max_j \Bigl|\frac{\partial a^{[L]}_j}{\partial z^{[L]}_j}\Bigr| \cdot K_z,

where :math:`K_z` is the norm of the penultimate activations, and evaluates the first two factors in
closed form for least squares (section 4), binary cross-entropy (5.1) and multi-class cross-entropy
(5.2), plus the L2/Tikhonov terms of 5.3. Its learning rate is :math:`1/L`.

Conventions (all from the authors' code, which fixes what the text leaves open):

* every norm is the Frobenius norm (``numpy.linalg.norm`` of a matrix);
* :math:`K_z` of a mini-batch is the Frobenius norm of its ``m x n`` matrix of penultimate
  activations, and over an epoch the largest such norm; for a classical model trained full-batch
  the penultimate activations are the data, so :math:`K_z = \lVert X \rVert`;
* ``m`` is the batch size (the paper insists on it for networks) and the number of rows for a
  full-batch classical model: in both cases the number of rows the loss averages over.

What these constants bound, precisely (``docs/methods/lipschitz.md`` has the derivations, and
``tests/test_lipschitz_estimators.py`` checks each statement on random networks):

* **Least squares, bound form** (``form="bound"``, the paper's eq. 8 with the sign of
  :math:`\lVert y \rVert` corrected to ``+``): a true bound on every last-layer gradient entry of the
  batch, given :math:`K_a \ge \lVert a^{[L]} \rVert`, and (linear regression) on the gradient norm over
  the ball :math:`\lVert w \rVert \le K`, i.e. a Lipschitz constant of the loss there.
* **Least squares, paper form** (``form="paper"``): the paper's printed ``K_a - ||y||``, which can be
  negative (the authors' code takes ``abs(1/L)``); not a bound.
* **Cross-entropy and binary cross-entropy** (the paper's :math:`(k-1)K_z/(km)` and
  :math:`K_z/(2m)`): the bound of *one example's* contribution to the mean gradient at the paper's
  limiting case (uniform predictions), where it is tight. It is *not* a bound on the batch gradient in
  general: confidently wrong predictions make the residual approach 1 and the ``m`` examples add up,
  so a gradient entry can reach :math:`K_z/\sqrt m` (the bound :func:`classification_gradient_bound`
  proves; a test attains it), :math:`\sqrt m\,k/(k-1)` times the paper's value.
* None of the paper's constants is a Lipschitz constant of the *gradient* (smoothness), which the
  paper says explicitly (section 3.1). Those are here too, as the textbook step :math:`1/\beta`:
  :func:`smoothness`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrpilot.core import distributed as dist

__all__ = [
    "GRAD_SQ_ESTIMATES",
    "LOSS_KINDS",
    "BatchStats",
    "LossSpec",
    "PenultimateMonitor",
    "binary_cross_entropy_lipschitz",
    "classical_lipschitz",
    "classification_gradient_bound",
    "cross_entropy_lipschitz",
    "estimate_weight_bound",
    "find_head",
    "grad_sq_estimate",
    "has_hidden_layer",
    "l2_lipschitz",
    "least_squares_lipschitz",
    "linear_regression_lipschitz",
    "logistic_regression_lipschitz",
    "max_weight_norm",
    "smoothness",
    "softmax_regression_lipschitz",
    "tikhonov_lipschitz",
]

#: The losses the paper derives constants for.
LOSS_KINDS = ("cross_entropy", "binary_cross_entropy", "least_squares")
#: The paper's estimates of ``max ||(grad)^2||`` (section 6.3), see :func:`grad_sq_estimate`.
GRAD_SQ_ESTIMATES = ("first", "second", "remedy")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _nonneg(name: str, value: Any) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# The paper's closed forms for networks (sections 4.2, 5.1, 5.2, 5.3)
# ----------------------------------------------------------------------------------------------------
def cross_entropy_lipschitz(k_z: float, m: int, num_classes: int) -> float:
    r"""Multi-class cross-entropy (softmax output), eq. 23: :math:`L = \frac{k-1}{km} K_z`.

    Example:
        >>> round(cross_entropy_lipschitz(206.695, 128, 10), 4)  # the paper's CIFAR-10 ResNet20, without L2
        1.4533
    """
    k = _positive_int("num_classes", num_classes)
    if k < 2:
        raise ValueError(f"num_classes must be at least 2 for cross-entropy, got {k}")
    return (k - 1) * _nonneg("k_z", k_z) / (k * _positive_int("m", m))


def binary_cross_entropy_lipschitz(k_z: float, m: int) -> float:
    r"""Binary cross-entropy (one sigmoid output), eq. 18: :math:`L = K_z / (2m)`."""
    return _nonneg("k_z", k_z) / (2 * _positive_int("m", m))


def least_squares_lipschitz(k_a: float, y_norm: float, k_z: float, m: int, *, form: str = "paper") -> float:
    r"""Least squares with a network, eq. 9: :math:`L = \frac1m (K_a - \lVert y\rVert) K_z`.

    Args:
        k_a: bound on the norm of the outputs :math:`a^{[L]}` over the batch.
        y_norm: :math:`\lVert y \rVert` over the batch.
        k_z: norm of the penultimate activations.
        m: rows of the batch.
        form: ``"paper"`` (the printed minus sign; may be negative or zero) or ``"bound"``
            (:math:`K_a + \lVert y\rVert`, what eq. 8's derivation actually gives, since
            :math:`\lVert a + b - 2y\rVert \le 2K_a + 2\lVert y\rVert`).
    """
    sign = _ls_sign(form)
    return (
        (_nonneg("k_a", k_a) + sign * _nonneg("y_norm", y_norm)) * _nonneg("k_z", k_z) / _positive_int("m", m)
    )


def _ls_sign(form: str) -> float:
    if form == "paper":
        return -1.0
    if form == "bound":
        return 1.0
    raise ValueError(f"form must be 'paper' or 'bound', got {form!r}")


def l2_lipschitz(weight_decay: float, weight_bound: float) -> float:
    r"""The L2 term of section 5.3: a regulariser :math:`\frac\lambda2\lVert w\rVert^2` adds :math:`\lambda K`.

    ``weight_decay`` is :math:`\lambda` as torch's ``weight_decay`` uses it (the gradient gains
    :math:`\lambda w`), ``weight_bound`` is :math:`K \ge \lVert w \rVert`.
    """
    return _nonneg("weight_decay", weight_decay) * _nonneg("weight_bound", weight_bound)


def tikhonov_lipschitz(gamma: torch.Tensor, weight_bound: float) -> float:
    r"""A Tikhonov regulariser :math:`\lVert\Gamma w\rVert^2` adds :math:`2K\lVert\Gamma^2\rVert` (section 5.3).

    The norm is the spectral norm of :math:`\Gamma^2` (for symmetric :math:`\Gamma`,
    :math:`\Gamma^T\Gamma = \Gamma^2`). The paper's L2 special case reads ":math:`\Gamma = \frac\lambda2 I`,
    so :math:`L = \lambda K`", which only holds for :math:`\Gamma^2 = \frac\lambda2 I`
    (:math:`\Gamma = \sqrt{\lambda/2}\,I`): with that reading this function equals :func:`l2_lipschitz`.
    """
    gamma = torch.as_tensor(gamma, dtype=torch.float64)
    if gamma.ndim != 2 or gamma.shape[0] != gamma.shape[1]:
        raise ValueError(f"gamma must be a square matrix, got shape {tuple(gamma.shape)}")
    g2 = gamma.T @ gamma
    return 2.0 * _nonneg("weight_bound", weight_bound) * float(torch.linalg.matrix_norm(g2, ord=2))


def grad_sq_estimate(
    loss_lipschitz: float, k_z: float, elementwise: float, weight_term: float, estimate: str
) -> float:
    r"""The paper's estimates of :math:`\max\lVert(\nabla_W L)^2\rVert` for Auto-Adam (section 6.3).

    With :math:`a` the loss's constant (e.g. :math:`\frac{k-1}{km}K_z`), :math:`b = \lambda\max\lVert w\rVert`
    and :math:`Q = \max\lVert A\circ A\rVert` the norm of the element-wise squared penultimate activations:

    * ``"first"``: :math:`(a + b)^2` ("set the learning rate high ... the model quickly diverged");
    * ``"second"``: :math:`(a/K_z)^2 Q + b^2 + 2ab` (an overestimate that "oscillated");
    * ``"remedy"``: :math:`(a/K_z)^2 Q + 2ab`, the second with its middle term removed ("worked quite
      well empirically").

    The paper writes :math:`\max K_z^2` where we put :math:`Q`; read literally, the second estimate would
    equal the first term by term. The authors' code computes that factor as ``norm(square(activations))``,
    i.e. :math:`Q`, the only reading under which the two estimates differ, so it is the one used here.
    """
    a, b = _nonneg("loss_lipschitz", loss_lipschitz), _nonneg("weight_term", weight_term)
    if estimate == "first":
        return (a + b) ** 2
    k_z = _nonneg("k_z", k_z)
    coef = a / k_z if k_z > 0 else 0.0
    squared = coef * coef * _nonneg("elementwise", elementwise)
    if estimate == "second":
        return squared + b * b + 2 * a * b
    if estimate == "remedy":
        return squared + 2 * a * b
    raise ValueError(f"estimate must be one of {list(GRAD_SQ_ESTIMATES)}, got {estimate!r}")


# ----------------------------------------------------------------------------------------------------
# Classical models (sections 4.1, 5.1, 5.2 and the estimate of K in 7.1)
# ----------------------------------------------------------------------------------------------------
def _as_matrix(x: torch.Tensor | Any, name: str = "x") -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (m, n) matrix, got shape {tuple(x.shape)}")
    return x


def linear_regression_lipschitz(
    x: torch.Tensor, y: torch.Tensor, weight_bound: float, *, form: str = "paper"
) -> float:
    r"""Linear regression with the loss :math:`\frac1{2m}\lVert Xw - y\rVert^2` (section 4.1).

    .. math:: L = \frac Km \lVert X^TX\rVert \mp \frac1m \lVert y^TX\rVert

    ``form="paper"`` is the printed minus sign (it can be negative: the authors' code then uses
    ``abs(1/L)``); ``form="bound"`` the plus sign, a true bound on :math:`\lVert\nabla g(w)\rVert` for
    :math:`\lVert w\rVert \le K`. Include a column of ones in ``x`` for a bias, as the paper does.
    """
    x = _as_matrix(x)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(len(x), -1)
    m = x.shape[0]
    gram = float(torch.linalg.matrix_norm(x.T @ x))
    cross = float(torch.linalg.matrix_norm(y.T @ x))
    return (_nonneg("weight_bound", weight_bound) * gram + _ls_sign(form) * cross) / m


def logistic_regression_lipschitz(x: torch.Tensor) -> float:
    r"""Logistic regression (section 5.1): :math:`L = \lVert X\rVert / (2m)`."""
    x = _as_matrix(x)
    return float(torch.linalg.matrix_norm(x)) / (2 * x.shape[0])


def softmax_regression_lipschitz(x: torch.Tensor, num_classes: int) -> float:
    r"""Softmax regression (section 5.2): :math:`L = \frac{k-1}{km}\lVert X\rVert`."""
    x = _as_matrix(x)
    return cross_entropy_lipschitz(float(torch.linalg.matrix_norm(x)), x.shape[0], num_classes)


def estimate_weight_bound(x: torch.Tensor) -> float:
    r"""The paper's estimate of the weight bound :math:`K` from the data (section 7.1).

    .. math::
        a = \frac1m\sum_{j=1}^n\sum_{i=1}^m x^{(i)}_j, \qquad
        b = \frac1n\sum_{j=1}^n \max_i x^{(i)}_j, \qquad K = \frac{a+b}2

    (``a`` is the sum of the column means, ``b`` the mean of the column maxima). Meant for data scaled
    so that each feature sums to 1, as in the paper's experiments.
    """
    x = _as_matrix(x)
    a = float(x.sum()) / x.shape[0]
    b = float(x.max(dim=0).values.mean())
    return (a + b) / 2


def classical_lipschitz(
    x: torch.Tensor,
    y: torch.Tensor | None,
    kind: str,
    *,
    num_classes: int | None = None,
    weight_bound: float | None = None,
    form: str = "paper",
) -> float:
    """The paper's constant of a classical model trained full-batch on ``(x, y)``.

    ``kind`` is one of :data:`LOSS_KINDS`; cross-entropy needs ``num_classes``, least squares ``y``
    and ``weight_bound`` (default: :func:`estimate_weight_bound` of ``x``). ``x`` must include the
    column of ones if the model has a bias, as in the paper.
    """
    if kind == "cross_entropy":
        if num_classes is None:
            raise ValueError("cross_entropy needs num_classes")
        return softmax_regression_lipschitz(x, num_classes)
    if kind == "binary_cross_entropy":
        return logistic_regression_lipschitz(x)
    if kind == "least_squares":
        if y is None:
            raise ValueError("least_squares needs the targets y")
        k = estimate_weight_bound(x) if weight_bound is None else weight_bound
        return linear_regression_lipschitz(x, y, k, form=form)
    raise ValueError(f"kind must be one of {list(LOSS_KINDS)}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------
# Rigorous companions (not in the paper): what does bound the gradient, and the smoothness constant
# ----------------------------------------------------------------------------------------------------
def classification_gradient_bound(
    k_z: float, m: int, *, norm: str = "entry", spec: LossSpec | None = None
) -> float:
    r"""A true bound on the last-layer gradient of the *mean* (binary) cross-entropy of a batch, for every weight.

    With residuals :math:`r_{ip} = p_{ip} - y_{ip} \in (-1, 1)` the gradient is
    :math:`\frac1m R^TA`, so

    * ``norm="entry"``: :math:`|\partial E/\partial W_{pj}| \le \frac1m\sum_i|a_{ij}| \le K_z/\sqrt m`;
    * ``norm="frobenius"``: :math:`\lVert\nabla_W E\rVert_F \le \frac1m\lVert R\rVert_F K_z
      \le c\,K_z/\sqrt m` with :math:`c = \sqrt2` (softmax: :math:`\lVert p - e_y\rVert^2 \le 2`) or
      :math:`\sqrt d` (``d`` sigmoid outputs), i.e. a Lipschitz constant of the loss in every direction,
      what the paper set out to compute.

    Both exceed the paper's constant by a factor of order :math:`\sqrt m`: its derivation bounds one
    example's term and divides by ``m`` as if the ``m`` terms could not add up. ``spec`` (default: the
    paper's cross-entropy) gives the loss's ``scale`` and kind; least squares has no global bound.
    """
    spec = LossSpec("cross_entropy", 2) if spec is None else spec
    if spec.kind == "least_squares":
        raise ValueError(
            "least squares has no weight-independent gradient bound: use least_squares_lipschitz(form='bound')"
        )
    base = spec.scale * _nonneg("k_z", k_z) / math.sqrt(_positive_int("m", m))
    if norm == "entry":
        return base
    if norm == "frobenius":
        return base * (math.sqrt(2.0) if spec.kind == "cross_entropy" else math.sqrt(spec.num_outputs))
    raise ValueError(f"norm must be 'entry' or 'frobenius', got {norm!r}")


def smoothness(kind: str, k_z: float, m: int, *, num_outputs: int = 1, scale: float = 1.0) -> float:
    r"""A Lipschitz constant :math:`\beta` of the last layer's *gradient* (the classical GD step is 1/beta).

    For the mean loss over ``m`` rows with penultimate activations :math:`A` (append a column of ones
    for the bias), the Hessian with respect to the last layer is :math:`\frac1m\sum_i H_i\otimes
    a_ia_i^T` with :math:`H_i \preceq \frac12 I` (softmax), :math:`\frac14 I` (sigmoid) or :math:`I`
    (identity, for the paper's :math:`\frac1{2m}` least squares), so

    .. math:: \beta \le c\,\frac{\lVert A\rVert_2^2}{m} \le c\,\frac{K_z^2}{m},
              \qquad c = \tfrac12,\ \tfrac14,\ 1

    times ``scale`` (how much the loss in use differs from the paper's form, see :class:`LossSpec`).
    With the Frobenius :math:`K_z` it is an upper bound of the spectral one. Not in the paper: it is
    the constant the descent lemma needs, offered as ``constant="smoothness"``.
    """
    c = {"cross_entropy": 0.5, "binary_cross_entropy": 0.25, "least_squares": 1.0}.get(kind)
    if c is None:
        raise ValueError(f"kind must be one of {list(LOSS_KINDS)}, got {kind!r}")
    del num_outputs  # the per-output loss scale is already in `scale`
    return _nonneg("scale", scale) * c * _nonneg("k_z", k_z) ** 2 / _positive_int("m", m)


# ----------------------------------------------------------------------------------------------------
# Losses as torch computes them
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    """Which closed form applies to a loss, and how the loss in use is scaled against the paper's.

    Args:
        kind: one of :data:`LOSS_KINDS`.
        num_outputs: outputs of the last layer (``k`` classes for cross-entropy).
        scale: the loss in use is ``scale`` times the paper's form (section 4.1: "the Lipschitz
            constant changes if the cost function is considered with a factor other than 1/(2m)").
            Torch's ``MSELoss`` averages over the ``d`` outputs too and has no 1/2: ``scale = 2/d``;
            ``BCEWithLogitsLoss`` with ``d`` outputs averages over them: ``scale = 1/d``;
            ``CrossEntropyLoss`` is the paper's eq. 19: ``scale = 1``.
    """

    kind: str
    num_outputs: int = 1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {list(LOSS_KINDS)}, got {self.kind!r}")
        _positive_int("num_outputs", self.num_outputs)
        if self.kind == "cross_entropy" and self.num_outputs < 2:
            raise ValueError("cross-entropy needs a last layer with at least 2 outputs")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r}")

    @classmethod
    def from_loss(cls, loss_fn: Any, num_outputs: int) -> LossSpec:
        """The spec of a torch loss module (mean reduction); anything else raises naming what is supported."""
        supported = "nn.CrossEntropyLoss, nn.BCEWithLogitsLoss or nn.MSELoss with reduction='mean'"
        reduction = getattr(loss_fn, "reduction", None)
        if (
            isinstance(loss_fn, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.MSELoss))
            and reduction != "mean"
        ):
            raise ValueError(
                f"the Lipschitz constants assume a mean over the batch; got reduction={reduction!r} ({supported})"
            )
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            return cls("cross_entropy", num_outputs, 1.0)
        if isinstance(loss_fn, nn.BCEWithLogitsLoss):
            return cls("binary_cross_entropy", num_outputs, 1.0 / num_outputs)
        if isinstance(loss_fn, nn.MSELoss):
            return cls("least_squares", num_outputs, 2.0 / num_outputs)
        raise ValueError(
            f"no closed-form Lipschitz constant for loss {type(loss_fn).__name__}: the paper covers {supported}"
        )

    def lipschitz(
        self, k_z: float, m: int, *, k_a: float = 0.0, y_norm: float = 0.0, form: str = "paper"
    ) -> float:
        """The paper's constant of this loss (without a regulariser) for one batch's statistics."""
        if self.kind == "cross_entropy":
            value = cross_entropy_lipschitz(k_z, m, self.num_outputs)
        elif self.kind == "binary_cross_entropy":
            value = binary_cross_entropy_lipschitz(k_z, m)
        else:
            value = least_squares_lipschitz(k_a, y_norm, k_z, m, form=form)
        return self.scale * value

    def smoothness(self, k_z: float, m: int) -> float:
        """:func:`smoothness` of this loss."""
        return smoothness(self.kind, k_z, m, num_outputs=self.num_outputs, scale=self.scale)


# ----------------------------------------------------------------------------------------------------
# Collecting K_z with a forward hook
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchStats:
    """What the closed forms need from the forward passes of one batch (or the max over an epoch).

    Attributes:
        k_z: Frobenius norm of the penultimate activations (the last layer's input), with the column of
            ones for the bias when the monitor counts it.
        elementwise: Frobenius norm of the element-wise squared activations (Auto-Adam's ``Q``).
        k_a: Frobenius norm of the last layer's outputs (least squares' :math:`K_a`).
        rows: rows of the batch, ``m``.
        batches: how many batches the statistics cover.
    """

    k_z: float
    elementwise: float
    k_a: float
    rows: int
    batches: int = 1


_ZERO = torch.zeros(())
_COMPACT_AT = 4096  # per-batch norms kept before they are folded into their maximum


def _elementwise_norm(a: torch.Tensor, dtype: torch.dtype, ones: int) -> torch.Tensor:
    r""":math:`\lVert A\circ A\rVert_F = (\sum a^4)^{1/2}`, scaled by the largest entry so the fourth powers
    cannot overflow (they would for activations above 1e9 in float32); ``ones`` columns of ones added."""
    if a.dtype is not dtype:  # (the check is cheaper than a no-op .to() on every training batch)
        a = a.to(dtype)
    top = a.abs().amax().clamp_min(torch.finfo(dtype).tiny)
    value = torch.linalg.vector_norm(a.div(top).square_()) * top.square()  # square_: one temporary less
    return (value.square() + ones).sqrt() if ones else value


def find_head(model: nn.Module) -> nn.Linear:
    """The last layer: ``model.head`` if it is an ``nn.Linear``, else the last ``nn.Linear`` registered."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"the Lipschitz methods read the input of the model's last nn.Linear layer, and "
            f"{type(model).__name__} has none: end the model with an nn.Linear (ideally named `head`)"
        )
    return linears[-1]


def has_hidden_layer(model: nn.Module, head: nn.Module | None = None) -> bool:
    """Whether the model has trainable parameters outside its last layer (else it is a classical model)."""
    head = find_head(model) if head is None else head
    own = {id(p) for p in head.parameters()}
    return any(p.requires_grad and id(p) not in own for p in model.parameters())


def max_weight_norm(params: Any, *, include_1d: bool = True) -> float:
    """The paper's :math:`\\max\\lVert w\\rVert`: the largest Frobenius norm over parameter tensors."""
    norms = [p.detach().norm() for p in params if include_1d or p.ndim > 1]
    if not norms:
        return 0.0
    return float(torch.stack(norms).max())


class PenultimateMonitor:
    """A forward hook on the last linear layer that records the statistics of each training batch.

    Nothing is recomputed: the hook reads the tensors the forward pass already made (the paper's
    section 8 suggests exactly this instead of its Keras "partial forward propagation"). Batches run in
    evaluation mode are ignored (validation passes), unless inside :meth:`recording`.

    Args:
        model: the network.
        layer: the last layer (default: :func:`find_head`).
        include_bias: count the bias as a weight on a constant input 1, i.e. use
            :math:`\\lVert[A, 1]\\rVert`; the paper does this for classical models (a column of ones in
            ``X``) and not for networks (its code reads the penultimate layer's output).
        elementwise: also record :math:`\\lVert A\\circ A\\rVert` (Auto-Adam's and RMSprop's estimates need it).
        outputs: also record :math:`K_a = \\lVert a^{[L]}\\rVert` (least squares needs it).
        (Statistics not recorded read as 0; each costs a few reductions per step.)

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> mon = PenultimateMonitor(net)
        >>> _ = net(torch.ones(5, 3))
        >>> mon.last().rows
        5
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | None = None,
        *,
        include_bias: bool = False,
        elementwise: bool = True,
        outputs: bool = True,
    ) -> None:
        self.layer = find_head(model) if layer is None else layer
        self.include_bias = bool(include_bias) and getattr(self.layer, "bias", None) is not None
        self.elementwise = bool(elementwise)
        self.outputs = bool(outputs)
        self._forced = False
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self._epoch: dict[str, Any] = {}
        self.reset()
        self._handle = self.layer.register_forward_hook(self._hook)

    # -- collection --------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # Runs on every training forward pass: one reduction per statistic on detached tensors (no graph),
        # no device sync; the epoch's maxima are taken when read. Kept lean: on a small MLP a step is
        # ~0.5 ms and every microsecond here is visible.
        if not (module.training or self._forced):
            return
        a = inputs[0].detach()
        if a.ndim != 2:
            a = a.reshape(-1, a.shape[-1])
        rows = a.shape[0]
        if a.dtype is torch.float32 or a.dtype is torch.float64:
            k_z = torch.linalg.vector_norm(a)
        else:  # half precision would overflow the sum of squares
            k_z = torch.linalg.vector_norm(a, dtype=torch.float32)
        if self.include_bias:
            k_z = (k_z.square() + rows).sqrt()
        e = self._epoch
        e["k_z"].append(k_z)
        elem = k_a = _ZERO
        if self.elementwise:
            elem = _elementwise_norm(a, k_z.dtype, rows if self.include_bias else 0)
            e["elementwise"].append(elem)
        if self.outputs:
            k_a = torch.linalg.vector_norm(output.detach(), dtype=k_z.dtype)
            e["k_a"].append(k_a)
        self._last = (k_z, elem, k_a, rows)
        e["rows"] = max(e["rows"], rows)
        e["batches"] += 1
        if len(e["k_z"]) >= _COMPACT_AT:  # nobody reset the epoch (standalone use): keep the maxima only
            for key in ("k_z", "elementwise", "k_a"):
                if e[key]:
                    e[key] = [torch.stack(e[key]).max()]

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record batches even in evaluation mode (for a probe pass)."""
        self._forced = True
        try:
            yield
        finally:
            self._forced = False

    # -- reading -----------------------------------------------------------------------------------
    def last(self) -> BatchStats:
        """Statistics of the most recent recorded batch."""
        if self._last is None:
            raise RuntimeError("no training batch went through the monitored layer yet")
        k_z, elem, k_a, rows = self._last
        if dist.is_distributed():
            # Each rank saw its shard of the batch: the whole batch's Frobenius norms are the root of the
            # summed squares, and m is the global batch size (one small collective per step).
            sq = dist.all_reduce_sum([float(k_z) ** 2, float(elem) ** 2, float(k_a) ** 2, rows])
            return BatchStats(math.sqrt(sq[0]), math.sqrt(sq[1]), math.sqrt(sq[2]), int(sq[3]))
        # One device-to-host read for the three statistics (not one per statistic): the step-level
        # optimizers call this every step.
        present = [t for t in (k_z, elem, k_a) if t is not _ZERO]
        values = iter(torch.stack(present).tolist() if len(present) > 1 else [float(k_z)])
        k_z_v = next(values)
        elem_v = 0.0 if elem is _ZERO else next(values)
        k_a_v = 0.0 if k_a is _ZERO else next(values)
        return BatchStats(k_z_v, elem_v, k_a_v, rows)

    def epoch(self) -> BatchStats | None:
        """The maxima over the batches recorded since :meth:`reset` (``None`` if there were none).

        ``rows`` is the largest batch, i.e. the nominal batch size: a smaller last batch neither
        lowers ``m`` nor, having a smaller norm, raises ``K_z``.
        """
        e = self._epoch
        if not e["k_z"]:
            return None

        distributed = dist.is_distributed()

        def top(values: list[torch.Tensor]) -> float:
            if not values:
                return 0.0
            norms = torch.stack([v.to(values[0].device) for v in values])
            if distributed:  # per-batch norms of this rank's shards -> of the global batches
                squares = norms.double().square()
                dist.all_reduce_sum_([squares])
                norms = squares.sqrt()
            return float(norms.max())

        rows = int(dist.all_reduce_sum([e["rows"]])[0]) if distributed else e["rows"]
        return BatchStats(top(e["k_z"]), top(e["elementwise"]), top(e["k_a"]), rows, e["batches"])

    def reset(self) -> None:
        """Start a new epoch's maxima."""
        self._epoch = {"k_z": [], "elementwise": [], "k_a": [], "rows": 0, "batches": 0}

    def remove(self) -> None:
        """Unregister the hook."""
        self._handle.remove()

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        stats = self.epoch()
        return {"epoch": None if stats is None else stats.__dict__.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        saved = state.get("epoch")
        if saved:

            def as_list(key: str) -> list[torch.Tensor]:
                return [torch.tensor(saved[key], dtype=torch.float64)] if saved[key] else []

            self._epoch = {
                "k_z": as_list("k_z"),
                "elementwise": as_list("elementwise"),
                "k_a": as_list("k_a"),
                "rows": saved["rows"],
                "batches": saved["batches"],
            }
