"""lrpilot: learning-rate autopilots for PyTorch, and a bench that scores them side by side.

Practitioner's one line::

    history = lrpilot.fit(model, train_loader, val_loader, method="aalr", epochs=30)

or, in a loop of your own, ``pilot = lrpilot.attach("aalr", model, ...)`` (:mod:`lrpilot.integrations`).

``lrpilot list methods`` (or :func:`list_methods`) shows every method; ``docs/`` has a page per method.
"""

from lrpilot._version import __version__
from lrpilot.core.contract import Decision, EpochSignals, MethodParts, Pilot, StepSignals
from lrpilot.core.data import TensorLoader
from lrpilot.core.families import PUBLIC_NAMES
from lrpilot.core.lazy import lazy_exports
from lrpilot.core.registry import BuildContext, MethodInfo, get_method, list_methods, register
from lrpilot.integrations.own_loop import AttachedPilot, attach
from lrpilot.loop.fit import Trainer, fit
from lrpilot.loop.history import History, load_record, save_record
from lrpilot.loop.metrics import Metric

# The method families' public classes load on first use, so that `import lrpilot` stays cheap (some
# families pull in SciPy); lrpilot.core.families lists them.


__getattr__, __dir__ = lazy_exports(__name__, PUBLIC_NAMES, globals())


__all__ = [
    "AttachedPilot",
    "BuildContext",
    "Decision",
    "EpochSignals",
    "History",
    "Metric",
    "MethodInfo",
    "MethodParts",
    "Pilot",
    "StepSignals",
    "TensorLoader",
    "Trainer",
    "__version__",
    "attach",
    "fit",
    "get_method",
    "list_methods",
    "load_record",
    "register",
    "save_record",
]
__all__ += sorted(PUBLIC_NAMES)
