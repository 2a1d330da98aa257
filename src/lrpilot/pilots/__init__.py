"""Learning-rate pilots: one module per method family (see ``docs/ARCHITECTURE.md``)."""

from lrpilot.pilots.base import Decision, EpochSignals, MethodParts, Pilot, StepSignals

__all__ = ["Decision", "EpochSignals", "MethodParts", "Pilot", "StepSignals"]
