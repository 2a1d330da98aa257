r"""Adversarial training and evaluation: FGSM on training batches, PGD on the validation split.

The AALR paper's adversarial setting (section 5.4, after Madry et al. 2018): train on the min-max
objective :math:`\min_\theta \mathbb{E}\,[\max_{\|\delta\|_\infty \le \epsilon} L(\theta, x + \delta, y)]`,
the inner maximum approximated by one FGSM step,

.. math::  x' = \Pi_{[lo, hi]}\big(x + \epsilon\,\mathrm{sign}(\nabla_x L(\theta, x, y))\big),

and score robustness by the accuracy under a white-box FGSM attack (the same single step on the
validation split, the paper's Table 3 and Table 4(B)) and under a white-box PGD attack of ``k`` steps of size
:math:`\alpha`, projected onto the :math:`\ell_\infty` ball of radius :math:`\epsilon` around ``x``
and onto the data range:

.. math::

    x^{t+1} = \Pi_{B_\epsilon(x) \cap [lo, hi]}\big(x^t + \alpha\,\mathrm{sign}(\nabla_x L(\theta, x^t, y))\big).

The paper's settings are :math:`\epsilon = 8/255`, :math:`\alpha = 2/255` for pixels in [0, 1] and
``k = 10`` for PGD (its Table 4(A)). Our inputs are standardised, so :math:`\epsilon` and :math:`\alpha` are
given in the raw data's units and multiplied by ``input_scale`` (one raw unit in model-input units), and
the bounds are the model-input values of the raw range's ends
(:class:`~lrpilot.bench.tasks.sources.TaskData`).

The loop knows nothing of attacks: :class:`FGSMTransform` is a ``train_transform`` (applied to every
training batch, and to the training-set pass that computes ``train_eval_loss``) and
:class:`AdversarialEval` an ``extra_eval`` (called after every validation evaluation, its values
recorded in each epoch's ``extra``). :func:`adversarial_hooks` builds both from one
:class:`AdversarialConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lrpilot.core.checks import is_number
from lrpilot.core.data import split_batch
from lrpilot.loop.metrics import Metric

__all__ = ["AdversarialConfig", "AdversarialEval", "FGSMTransform", "adversarial_hooks", "fgsm", "pgd"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Bounds = tuple[float, float] | None


@dataclass(frozen=True)
class AdversarialConfig:
    """The adversarial recipe; radii and steps are in the raw data's units (pixels in [0, 1]).

    Args:
        epsilon: :math:`\\ell_\\infty` radius of both attacks (default 8/255, the paper's).
        step: PGD step size :math:`\\alpha` (default 2/255, the paper's).
        pgd_steps: PGD iterations ``k`` (default 10, the paper's Table 4).
        random_start: PGD starts from a uniform random point of the ball (Madry et al.'s evaluation);
            drawn from a private generator seeded by ``seed``, so an evaluation is deterministic and
            leaves the run's random state alone.
        eval_samples: attack only the first N validation samples (``None``: all of them); PGD costs
            ``pgd_steps + 1`` forward and ``pgd_steps`` backward passes per sample.
        seed: seed of the PGD random start.
        fgsm_eval: also score the white-box FGSM attack (one input-gradient pass per sample, about a
            tenth of PGD-10's cost): the paper's main adversarial result (Table 3) is FGSM accuracy.
    """

    epsilon: float = 8 / 255
    step: float = 2 / 255
    pgd_steps: int = 10
    random_start: bool = True
    eval_samples: int | None = None
    seed: int = 0
    fgsm_eval: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"adversarial option {name} must be {what}, got {getattr(self, name)!r}")

        for name in ("epsilon", "step"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise bad(name, "a finite number >= 0 (raw data units)")
        if not _is_int(self.pgd_steps) or self.pgd_steps < 1:
            raise bad("pgd_steps", "an integer >= 1")
        if self.eval_samples is not None and (not _is_int(self.eval_samples) or self.eval_samples < 1):
            raise bad("eval_samples", "a positive integer or None")
        for name in ("random_start", "fgsm_eval"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "a non-negative integer")

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | bool | AdversarialConfig | None
    ) -> AdversarialConfig | None:
        """``None``/``False``: no adversarial training; ``True``: the defaults; a mapping: overrides."""
        if options is None or options is False:
            return None
        if options is True:
            return cls()
        if isinstance(options, AdversarialConfig):
            return options
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(
                f"unknown adversarial option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(valid))}"
            )
        return cls(**dict(options))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clamp(x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    return x if bounds is None else x.clamp(bounds[0], bounds[1])


def _input_grad(model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:math:`\\nabla_x L(\\theta, x, y)`, leaving every parameter's ``.grad`` untouched."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(
    model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor, epsilon: float, *, bounds: Bounds = None
) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): one signed-gradient step of size ``epsilon`` (model-input units).

    The model is used in whatever mode it is in (training mode during training, as in Madry et al.'s
    code; a BatchNorm layer's running statistics then also see the attack's forward pass).
    """
    if epsilon == 0:
        return x.detach().clone()
    grad = _input_grad(model, loss_fn, x, y)
    return _clamp(x.detach() + epsilon * grad.sign(), bounds).detach()


def pgd(
    model: nn.Module,
    loss_fn: Loss,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    step: float,
    steps: int,
    *,
    bounds: Bounds = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD (Madry et al. 2018): ``steps`` signed-gradient steps of size ``step``, each projected onto the
    :math:`\\ell_\\infty` ball of radius ``epsilon`` around ``x`` and onto ``bounds`` (model-input units)."""
    x = x.detach()
    if random_start and epsilon > 0:
        noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
        x_adv = _clamp(x + (2 * noise.to(x.device, x.dtype) - 1) * epsilon, bounds)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        grad = _input_grad(model, loss_fn, x_adv, y)
        x_adv = x_adv + step * grad.sign()
        x_adv = _clamp(x + (x_adv - x).clamp(-epsilon, epsilon), bounds).detach()
    return x_adv


class FGSMTransform:
    """A ``train_transform`` for :class:`~lrpilot.loop.fit.Trainer`: trains on FGSM examples.

    Args:
        loss_fn: the training loss (the attack ascends it).
        epsilon: radius in model-input units.
        bounds: model-input range to clip to, or ``None``.
    """

    def __init__(self, loss_fn: Loss, epsilon: float, bounds: Bounds = None) -> None:
        self.loss_fn = loss_fn
        self.epsilon = float(epsilon)
        self.bounds = bounds

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fgsm(model, self.loss_fn, x, y, self.epsilon, bounds=self.bounds), y


class AdversarialEval:
    """An ``extra_eval`` for :class:`~lrpilot.loop.fit.Trainer`: loss and metric under white-box attacks.

    Returns ``{"adv_val_loss": ..., "adv_val_metric": ...}`` under PGD and, with ``fgsm_eval`` (default),
    ``{"fgsm_val_loss": ..., "fgsm_val_metric": ...}`` under FGSM of radius ``epsilon`` (no random start),
    over the first ``samples`` validation samples (all when ``None``), in the task metric's units.
    Called by the loop with the model in evaluation mode; it never touches the parameters' gradients or
    the global random state.
    """

    def __init__(
        self,
        loss_fn: Loss,
        metric: Metric,
        *,
        epsilon: float,
        step: float,
        steps: int,
        bounds: Bounds = None,
        random_start: bool = True,
        samples: int | None = None,
        seed: int = 0,
        fgsm_eval: bool = True,
    ) -> None:
        self.loss_fn = loss_fn
        self.metric = metric
        self.epsilon, self.step, self.steps = float(epsilon), float(step), int(steps)
        self.bounds = bounds
        self.random_start = random_start
        self.samples = samples
        self.seed = seed
        self.fgsm_eval = bool(fgsm_eval)

    def __call__(self, model: nn.Module, loader: Any) -> dict[str, float]:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        # A fresh generator per evaluation: every epoch is attacked from the same random starts.
        generator = torch.Generator(device=device).manual_seed(self.seed) if self.random_start else None
        loss_sum, metric_sum, n = 0.0, 0.0, 0
        fgsm_loss_sum, fgsm_metric_sum = 0.0, 0.0
        for batch in loader:
            x, y = split_batch(batch, where="the adversarial evaluation loader")
            if self.samples is not None:
                if n >= self.samples:
                    break
                x, y = x[: self.samples - n], y[: self.samples - n]
            x, y = x.to(device), y.to(device)
            x_adv = pgd(model, self.loss_fn, x, y, self.epsilon, self.step, self.steps, bounds=self.bounds,
                        random_start=self.random_start, generator=generator)  # fmt: skip
            with torch.no_grad():
                out = model(x_adv)
                loss_sum += float(self.loss_fn(out, y)) * len(y)
                metric_sum += self.metric.batch_sum(out, y)
            if self.fgsm_eval:
                x_fgsm = fgsm(model, self.loss_fn, x, y, self.epsilon, bounds=self.bounds)
                with torch.no_grad():
                    out = model(x_fgsm)
                    fgsm_loss_sum += float(self.loss_fn(out, y)) * len(y)
                    fgsm_metric_sum += self.metric.batch_sum(out, y)
            n += len(y)
        if n == 0:
            raise ValueError("the adversarial evaluation loader yielded no batches")
        result = {"adv_val_loss": loss_sum / n, "adv_val_metric": metric_sum / n * self.metric.scale}
        if self.fgsm_eval:
            result.update(fgsm_val_loss=fgsm_loss_sum / n, fgsm_val_metric=fgsm_metric_sum / n * self.metric.scale)
        return result


def adversarial_hooks(
    config: AdversarialConfig,
    *,
    loss_fn: Loss,
    metric: Metric,
    input_scale: float = 1.0,
    input_bounds: Bounds = None,
) -> tuple[FGSMTransform, AdversarialEval]:
    """The ``(train_transform, extra_eval)`` pair of ``config`` for data whose raw unit spans
    ``input_scale`` model-input units and whose raw range maps to ``input_bounds``."""
    if not (math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite number > 0, got {input_scale!r}")
    eps = config.epsilon * input_scale
    transform = FGSMTransform(loss_fn, eps, input_bounds)
    evaluator = AdversarialEval(
        loss_fn,
        metric,
        epsilon=eps,
        step=config.step * input_scale,
        steps=config.pgd_steps,
        bounds=input_bounds,
        random_start=config.random_start,
        samples=config.eval_samples,
        seed=config.seed,
        fgsm_eval=config.fgsm_eval,
    )
    return transform, evaluator
