"""AALR (Kumar et al.): optimistic binary LR exploration with checkpoint rollback; records in ``register.py``."""

from lrpilot.pilots.aalr.pilot import AALR, BEST_TAG, INITIAL_TAG, REASONS

__all__ = ["AALR", "BEST_TAG", "INITIAL_TAG", "REASONS"]
