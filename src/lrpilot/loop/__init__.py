"""The thin training loop, its data helpers, telemetry and seeding."""

from lrpilot.core.data import TensorLoader
from lrpilot.loop.fit import Trainer, fit
from lrpilot.loop.history import History
from lrpilot.loop.metrics import Metric

__all__ = ["History", "Metric", "TensorLoader", "Trainer", "fit"]
