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

# Method families register themselves on import, in the order the registry lists them; their public
# classes are exported lazily so that `import lrpilot` neither pays for them nor reorders the registry.
_LAZY = {
    "AdaMo": "lrpilot.pilots.lipschitz",
    "AutoAdam": "lrpilot.pilots.lipschitz",
    "LipschitzPilot": "lrpilot.pilots.lipschitz",
    "LipschitzRMSprop": "lrpilot.pilots.lipschitz",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lrpilot' has no attribute {name!r}")
    import importlib

    from lrpilot.registry import list_methods

    list_methods()  # load every family first, in the registry's order
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AdaMo",
    "AutoAdam",
    "BuildContext",
    "Decision",
    "EpochSignals",
    "History",
    "LARS",
    "LipschitzPilot",
    "LipschitzRMSprop",
    "Metric",
    "MethodInfo",
    "MethodParts",
    "Pilot",
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
