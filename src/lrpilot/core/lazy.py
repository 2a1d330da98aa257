"""Names a package exports without importing their modules until first use (PEP 562), so that importing
the package stays cheap: ``lrpilot`` (the families' classes) and ``lrpilot.estimators`` use it."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: Mapping[str, str], eager: Mapping[str, object]) -> tuple[
    Callable[[str], object], Callable[[], list[str]]
]:
    """``(__getattr__, __dir__)`` for ``package``: ``homes`` maps each lazy name to the module that defines
    it; ``eager`` is the package's ``globals()`` (listed by ``dir`` beside the lazy names)."""

    def getattr_(name: str) -> object:
        module = homes.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def dir_() -> list[str]:
        return sorted(set(eager) | set(homes))

    return getattr_, dir_
