"""Hyper-regularization (Xie et al.; reproducibility report): KL, reverse KL, Hellinger, chi-square x three algorithms; records in ``register.py``."""

from lrpilot.pilots.hyperreg.optimizer import HyperRegularization

__all__ = ["HyperRegularization"]
