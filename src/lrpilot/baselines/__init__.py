"""Registry entries for the usual schedules and optimizers, and for peer LR-free optimizers."""

from lrpilot.baselines.lars import LARS

__all__ = ["LARS"]
