"""The one list of method families: the only file to edit when a family is added.

A family is a package (``lrpilot.baselines``, ``lrpilot.pilots.<name>``) whose ``register.py`` holds its
registry records and builders, and whose ``__init__`` exports its public classes. The registry imports
each ``<package>.register`` on its first lookup, in this order (the order ``lrpilot list methods``
shows); ``import lrpilot`` resolves the public names below on first use, so that importing the library
stays cheap (some families pull in SciPy or optional packages). See docs/ARCHITECTURE.md, "Adding a
method family".
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["FAMILIES", "PUBLIC_NAMES", "register_module"]

#: family package -> the public names it exports at the top of ``lrpilot``.
FAMILIES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "lrpilot.baselines": ("LARS",),
        "lrpilot.pilots.aalr": ("AALR",),
        "lrpilot.pilots.mi_decay": ("MIDecayPilot",),
        "lrpilot.pilots.hypergradient": ("HypergradientSGD", "RTHPO", "SGDHD", "SGDHDVal"),
        "lrpilot.pilots.lipschitz": ("AdaMo", "AutoAdam", "LipschitzPilot", "LipschitzRMSprop"),
        "lrpilot.pilots.hyperreg": ("HyperRegularization",),
        "lrpilot.pilots.auto": (),
    }
)

#: Public name -> the module that defines it, for ``lrpilot.__getattr__``: the families' classes and
#: the safety net (a wrapper any method can use, not a family).
PUBLIC_NAMES: MappingProxyType[str, str] = MappingProxyType(
    {name: package for package, names in FAMILIES.items() for name in names}
    | {"SafetyNet": "lrpilot.pilots.safety_net"}
)


def register_module(package: str) -> str:
    """The module that registers ``package``'s methods."""
    return f"{package}.register"
