"""Hypergradient LR adaptation: SGD-HD (Baydin et al.), its validation variant and RT-HPO (Majumder et al.); records in ``register.py``."""

from lrpilot.pilots.hypergradient.optimizers import RTHPO, SGDHD, HypergradientSGD, SGDHDVal

__all__ = ["HypergradientSGD", "RTHPO", "SGDHD", "SGDHDVal"]
