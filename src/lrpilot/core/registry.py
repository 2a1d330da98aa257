"""The method registry: one frozen record per method.

The CLI's choices, ``lrpilot list methods``, the bench suites and the contract tests
(``tests/test_contract.py``) are all generated from :func:`list_methods`, so a method registered here
is tested and runnable without touching any other file.

Each method family registers its records at import time in its ``register`` module; the families
are listed once, in :mod:`lrpilot.core.families`. They are imported lazily, on first lookup, so
``import lrpilot`` stays cheap and an optional dependency is only needed when its method is built.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from lrpilot.core.contract import MethodParts, TrainPass
from lrpilot.core.families import FAMILIES, register_module

__all__ = [
    "BuildContext",
    "MethodInfo",
    "MissingExtraError",
    "RANGE_TEST_TAG",
    "build_method",
    "defaults_of",
    "get_method",
    "list_methods",
    "method_names",
    "needs_decision_split",
    "register",
    "resolve_options",
]

# Modules that register methods, in the order `lrpilot list methods` shows them.
_FAMILY_MODULES: tuple[str, ...] = tuple(register_module(package) for package in FAMILIES)

#: The tag of methods whose LR bounds come from an LR range test that can run on its own
#: (``lrpilot range-test``).
RANGE_TEST_TAG = "range-test"

_REGISTRY: dict[str, MethodInfo] = {}
_ORIGIN: dict[str, str] = {}  # method name -> module that registered it
_loaded = False


class MissingExtraError(ImportError):
    """A method needs an optional dependency that is not installed."""


@dataclass
class BuildContext:
    """What a method factory may use to build its optimizer and pilot for one run.

    Args:
        model: the network being trained (already on ``device``).
        epochs: the run's budget in epochs.
        steps_per_epoch: optimizer steps per epoch.
        task_kind: ``"classification"``, ``"binary"`` or ``"regression"``.
        loss_fn: the training loss, ``loss_fn(outputs, targets) -> scalar``.
        train_loader, val_loader: the run's data (for methods that search or probe before training).
        seed: the run's seed.
        device: where the model lives.
        param_groups: explicit param groups from the user, or ``None`` for ``model.parameters()``.
    """

    model: torch.nn.Module
    epochs: int
    steps_per_epoch: int
    task_kind: str = "classification"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    train_loader: Any = None
    val_loader: Any = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    param_groups: list[dict[str, Any]] | None = None
    metric: Any = None
    trial_runner: Callable[..., Any] | None = None  # set by the training loop, see trial()
    data_pass: TrainPass | None = None  # set by the training loop, see train_pass()

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def trial(self, method: Any, *, epochs: int, seed: int | None = None, **options: Any) -> Any:
        """Train a copy of the model, from its initial weights, with ``method`` for ``epochs`` on this
        run's data, and return the finished :class:`~lrpilot.loop.fit.Trainer` (``.history``, ``.model``).

        For methods that search or probe before training (an LR range test, a grid search). The run's
        own model, optimizer and random state are left untouched; what the trials cost is the method's
        to report (``MethodParts.info``) so the bench can charge it.
        """
        if self.trial_runner is None:
            raise RuntimeError("trial runs need the training loop: build the method through lrpilot.fit or Trainer")
        return self.trial_runner(method, epochs=epochs, seed=seed, **options)

    def train_pass(self, fn: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Call ``fn(x, y)`` on every training batch, through the loop (see
        :data:`~lrpilot.core.contract.TrainPass`): for methods that need statistics of the data when built."""
        if self.data_pass is None:
            raise RuntimeError("a pass over the training data needs the training loop: build the method through lrpilot.fit or Trainer")
        self.data_pass(fn)

    def params(self) -> list[dict[str, Any]] | Iterable[torch.nn.Parameter]:
        """The parameters to optimise: the user's param groups, or every trainable parameter."""
        if self.param_groups is not None:
            return [dict(g) for g in self.param_groups]
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class MethodInfo:
    """A registered method.

    Args:
        name: registry name, e.g. ``"sgd-cosine"``.
        family: the file/paper family, e.g. ``"baseline"``, ``"aalr"``.
        description: one line, shown by ``lrpilot list methods``.
        build: ``build(ctx: BuildContext, **options) -> MethodParts``; receives every option of
            ``defaults``, resolved.
        defaults: every option the method accepts, with its default. Unknown options are rejected.
        lr_granularity: how often the LR moves: ``"constant"``, ``"epoch"`` or ``"step"`` (the run
            record stores a per-step LR trajectory for ``"step"``).
        kind: ``"optimizer"`` (a plain torch optimizer), ``"schedule"`` (optimizer + fixed schedule),
            ``"step-pilot"`` (an optimizer that sets its own LR) or ``"epoch-pilot"``.
        tags: free labels used by suites, e.g. ``"seed-method"``, ``"baseline"``, ``"peer"``, ``"tuned"``.
        extra: the pip extra that provides its dependencies (``pip install 'lrpilot[extra]'``).
        requires: import names that must be importable to build it.
        paper: short citation, or the file under ``shared/papers``.
        handles_nonfinite: the method recovers from a non-finite loss itself.
        decision_split: the method decides from validation signals (a validation loss or metric, validation
            batches, trials selected by a validation metric): ``True``, or a function of the resolved
            options. The loop then gives it a split of its own (``Trainer(hyper_loader=...)``, by default
            carved from the training data), never the split its results are scored on.
        test_options: options the contract tests use on their tiny task (e.g. a cheap setting).
        invalid_options: examples of bad options and a regex the error message must match; the
            contract tests check each raises ``ValueError``.
    """

    name: str
    family: str
    description: str
    build: Callable[..., MethodParts]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    lr_granularity: str = "constant"
    kind: str = "optimizer"
    tags: frozenset[str] = frozenset()
    extra: str | None = None
    requires: tuple[str, ...] = ()
    paper: str | None = None
    handles_nonfinite: bool = False
    decision_split: bool | Callable[[Mapping[str, Any]], bool] = False
    test_options: Mapping[str, Any] = field(default_factory=dict)
    invalid_options: tuple[tuple[Mapping[str, Any], str], ...] = ()

    def __post_init__(self) -> None:
        if self.lr_granularity not in ("constant", "epoch", "step"):
            raise ValueError(f"{self.name}: lr_granularity must be constant, epoch or step")
        if self.kind not in ("optimizer", "schedule", "step-pilot", "epoch-pilot"):
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "test_options", MappingProxyType(dict(self.test_options)))
        object.__setattr__(self, "tags", frozenset(self.tags))

    @property
    def available(self) -> bool:
        """All of :attr:`requires` can be imported."""
        return all(importlib.util.find_spec(mod) is not None for mod in self.requires)

    def check_available(self) -> None:
        missing = [mod for mod in self.requires if importlib.util.find_spec(mod) is None]
        if missing:
            how = f"pip install 'lrpilot[{self.extra}]'" if self.extra else f"pip install {' '.join(missing)}"
            raise MissingExtraError(
                f"method {self.name!r} needs {', '.join(missing)}, which is not installed: {how}"
            )


def defaults_of(fn: Callable[..., Any], *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The keyword defaults of ``fn``'s signature, in order, less ``exclude``: a record takes the defaults
    of the class it builds from its constructor, so each default is written once.

    >>> def pilot(optimizer, *, patience=10, objective="train-eval"): ...
    >>> defaults_of(pilot)
    {'patience': 10, 'objective': 'train-eval'}
    """
    skip = set(exclude)
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in skip
    }


def needs_decision_split(info: MethodInfo, options: Mapping[str, Any]) -> bool:
    """Whether ``info`` built with ``options`` decides from validation signals (:attr:`MethodInfo.decision_split`)."""
    flag = info.decision_split
    return bool(flag(resolve_options(info, options))) if callable(flag) else bool(flag)


def register(info: MethodInfo, *, replace: bool = False) -> MethodInfo:
    """Add a method to the registry. Registering a name twice is an error unless ``replace``."""
    if info.name in _REGISTRY and not replace:
        raise ValueError(f"method {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    # Remember which module registered it, so listings follow _FAMILY_MODULES whatever the import
    # order (``import lrpilot`` imports some families eagerly, before the lazy load).
    _ORIGIN[info.name] = sys._getframe(1).f_globals.get("__name__", "")
    return info


def _listing_key(name: str) -> int:
    origin = _ORIGIN.get(name, "")
    return _FAMILY_MODULES.index(origin) if origin in _FAMILY_MODULES else len(_FAMILY_MODULES)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def list_methods(pattern: str = "*", *, tags: Iterable[str] = (), available_only: bool = False) -> list[MethodInfo]:
    """Registered methods whose name matches the fnmatch ``pattern`` and that carry all ``tags``."""
    _ensure_loaded()
    wanted = set(tags)
    ordered = sorted(_REGISTRY.values(), key=lambda info: _listing_key(info.name))  # stable sort
    return [
        info
        for info in ordered
        if fnmatch.fnmatch(info.name, pattern)
        and wanted <= info.tags
        and (info.available or not available_only)
    ]


def method_names() -> list[str]:
    return [info.name for info in list_methods()]


def get_method(name: str) -> MethodInfo:
    """The record of ``name``; an unknown name raises with the list of valid ones."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(_REGISTRY)}") from None


def resolve_options(info: MethodInfo, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method's defaults overridden by ``options``, after checks every method shares.

    Unknown option names and a non-positive or non-finite ``lr`` raise ``ValueError`` naming the method
    and the valid options; everything else is checked by the method's own constructor.
    """
    unknown = sorted(set(options) - set(info.defaults))
    if unknown:
        raise ValueError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for method "
            f"{info.name!r}; valid options: {', '.join(info.defaults) or '(none)'}"
        )
    resolved = {**info.defaults, **options}
    if "lr" in resolved and resolved["lr"] is not None:
        lr = resolved["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"option lr of method {info.name!r} must be a positive finite number, got {lr!r}")
        resolved["lr"] = float(lr)
    return resolved


def build_method(name: str, ctx: BuildContext, options: Mapping[str, Any] | None = None) -> MethodParts:
    """Build method ``name`` for one run; returns its :class:`MethodParts`."""
    info = get_method(name)
    info.check_available()
    resolved = resolve_options(info, options or {})
    parts = info.build(ctx, **resolved)
    if not isinstance(parts, MethodParts):
        raise TypeError(f"factory of method {name!r} returned {type(parts).__name__}, not MethodParts")
    return parts
