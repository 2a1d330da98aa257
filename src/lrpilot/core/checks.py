"""The option validators every constructor and registry builder uses, so that one kind of mistake reads
the same everywhere: ``option lr of method 'aalr' must be a finite number > 0, got -1``.

Each ``require_*`` raises :class:`ValueError` naming the option, who owns it (``method='aalr'`` gives
"option x of method 'aalr'", ``owner='safety net'`` gives "safety net option x", neither gives "x"),
the rule and the value received. They return nothing: a validator only rejects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "is_number",
    "require_bool",
    "option_error",
    "require_in",
    "require_int",
    "require_positive",
    "require_range",
]


def is_number(value: Any) -> bool:
    """A finite real number (``bool`` is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _subject(name: str, method: str | None, owner: str | None) -> str:
    if method is not None:
        return f"option {name} of method {method!r}"
    if owner is not None:
        return f"{owner} option {name}"
    return name


def require_positive(
    name: str, value: Any, *, method: str | None = None, owner: str | None = None, allow_zero: bool = False
) -> None:
    """``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    if not (is_number(value) and (value >= 0 if allow_zero else value > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{_subject(name, method, owner)} must be a finite number {bound}, got {value!r}")


def require_in(
    name: str, value: Any, choices: Sequence[Any], *, method: str | None = None, owner: str | None = None
) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{_subject(name, method, owner)} must be one of {list(choices)}, got {value!r}")


def require_bool(name: str, value: Any, *, method: str | None = None, owner: str | None = None) -> None:
    """``value`` is ``True`` or ``False`` (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{_subject(name, method, owner)} must be True or False, got {value!r}")


def require_int(
    name: str, value: Any, *, minimum: int = 0, method: str | None = None, owner: str | None = None
) -> None:
    """``value`` is an integer (not a ``bool``) >= ``minimum``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{_subject(name, method, owner)} must be an integer >= {minimum}, got {value!r}")


def require_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
    method: str | None = None,
    owner: str | None = None,
) -> None:
    """``value`` is a number in the interval from ``low`` to ``high`` (either end may be infinite)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
        raise ValueError(f"{_subject(name, method, owner)} must be in {lo}{low}, {high}{hi}, got {value!r}")


def option_error(method: str, err: ValueError) -> ValueError:
    """A constructor's ``ValueError`` re-raised by a registry builder with the method's name in front."""
    return ValueError(f"method {method!r}: {err}")
