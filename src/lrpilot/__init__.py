"""lrpilot: learning-rate autopilots for PyTorch, and a bench that scores them side by side.

Practitioner's one line::

    history = lrpilot.fit(model, train_loader, val_loader, method="aalr", epochs=30)

``lrpilot list methods`` (or :func:`list_methods`) shows every method; ``docs/`` has a page per method.
"""

from lrpilot._version import __version__
from lrpilot.baselines.lars import LARS
from lrpilot.loop.data import TensorLoader
from lrpilot.loop.fit import Trainer, fit
from lrpilot.loop.history import History, load_record, save_record
from lrpilot.loop.metrics import Metric
from lrpilot.pilots.aalr import AALR
from lrpilot.pilots.base import Decision, EpochSignals, MethodParts, Pilot, StepSignals
from lrpilot.pilots.hypergradient import RTHPO, SGDHD, HypergradientSGD, SGDHDVal
from lrpilot.pilots.hyperreg import HyperRegularization
from lrpilot.pilots.safety_net import SafetyNet
from lrpilot.registry import BuildContext, MethodInfo, get_method, list_methods, register

__all__ = [
    "AALR",
    "BuildContext",
    "Decision",
    "EpochSignals",
    "History",
    "HypergradientSGD",
    "HyperRegularization",
    "LARS",
    "Metric",
    "MethodInfo",
    "MethodParts",
    "Pilot",
    "RTHPO",
    "SGDHD",
    "SGDHDVal",
    "SafetyNet",
    "StepSignals",
    "TensorLoader",
    "Trainer",
    "__version__",
    "fit",
    "get_method",
    "list_methods",
    "load_record",
    "register",
    "save_record",
]
