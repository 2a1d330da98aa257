"""Validation metrics: each returns a *sum* over the batch so the loop can average over a whole split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Metric", "get_metric", "loss_metric", "METRICS"]


@dataclass(frozen=True)
class Metric:
    """A validation metric.

    Args:
        name: e.g. ``"accuracy"``.
        batch_sum: ``batch_sum(outputs, targets) -> float``, the metric summed over the batch's samples.
        higher_is_better: direction, used for "best" and for targets (accuracy up, MAE down).
        scale: multiplies the mean (e.g. a regression target's standard deviation, to report MAE in the
            original units when the model is trained on standardised targets).
    """

    name: str
    batch_sum: Callable[[torch.Tensor, torch.Tensor], float]
    higher_is_better: bool
    scale: float = 1.0

    def better(self, a: float, b: float) -> bool:
        """``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def with_scale(self, scale: float) -> Metric:
        return Metric(self.name, self.batch_sum, self.higher_is_better, float(scale))


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(dim=-1) == targets).sum())


def _binary_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    # One logit per sample: class 1 when the logit is positive.
    return float(((outputs > 0).to(targets.dtype) == targets).sum())


def _mae(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs - targets).abs().reshape(len(targets), -1).mean(dim=1).sum())


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(((outputs - targets) ** 2).reshape(len(targets), -1).mean(dim=1).sum())


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy, higher_is_better=True),
    "binary-accuracy": Metric("binary-accuracy", _binary_accuracy, higher_is_better=True),
    "mae": Metric("mae", _mae, higher_is_better=False),
    "mse": Metric("mse", _mse, higher_is_better=False),
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}") from None


def loss_metric(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Metric:
    """The validation loss itself as the metric (lower is better), when no other metric is given."""

    def batch_sum(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return float(loss_fn(outputs, targets)) * len(targets)

    return Metric("loss", batch_sum, higher_is_better=False)
