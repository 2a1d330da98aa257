"""LipschitzLR (Yedida & Saha): the epoch-level pilot, the step-level AdaMo / Lipschitz RMSprop / Auto-Adam and their guard; records in ``register.py``."""

from lrpilot.pilots.lipschitz.guard import LipschitzGuard
from lrpilot.pilots.lipschitz.optimizers import BIAS_CORRECTIONS, AdaMo, AutoAdam, LipschitzRMSprop
from lrpilot.pilots.lipschitz.pilot import LastLayerLipschitz, LipschitzPilot

__all__ = ["AdaMo", "AutoAdam", "BIAS_CORRECTIONS", "LastLayerLipschitz", "LipschitzGuard", "LipschitzPilot", "LipschitzRMSprop"]
