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
from lrpilot.pilots.base import Decision, EpochSignals, MethodParts, Pilot, StepSignals
from lrpilot.registry import BuildContext, MethodInfo, get_method, list_methods, register

# The method families' public classes load on first use, so that `import lrpilot` stays cheap (some
# families pull in SciPy); the registry lists methods in its own order whatever is imported first.
_LAZY = {
    "AALR": "lrpilot.pilots.aalr",
    "AdaMo": "lrpilot.pilots.lipschitz",
    "AutoAdam": "lrpilot.pilots.lipschitz",
    "HyperRegularization": "lrpilot.pilots.hyperreg",
    "HypergradientSGD": "lrpilot.pilots.hypergradient",
    "LipschitzPilot": "lrpilot.pilots.lipschitz",
    "LipschitzRMSprop": "lrpilot.pilots.lipschitz",
    "MIDecayPilot": "lrpilot.pilots.mi_decay",
    "RTHPO": "lrpilot.pilots.hypergradient",
    "SGDHD": "lrpilot.pilots.hypergradient",
    "SGDHDVal": "lrpilot.pilots.hypergradient",
    "SafetyNet": "lrpilot.pilots.safety_net",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lrpilot' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AALR",
    "AdaMo",
    "AutoAdam",
    "BuildContext",
    "Decision",
    "EpochSignals",
    "History",
    "HyperRegularization",
    "HypergradientSGD",
    "LARS",
    "LipschitzPilot",
    "LipschitzRMSprop",
    "MIDecayPilot",
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
