"""MI-driven LR decay (Vasudevan, Entropy 22(5) 560, 2020): Algorithm 1 and its LR range test (Algorithm 2).

Layout, from pure to wired:

* :func:`mi_decay_lr` -- Algorithm 1's LR rule for one epoch, a pure function of the ITY history.
* :func:`select_bounds` -- Algorithm 2's summary table ``D`` and its bounds, a pure function of the
  trial records; :func:`run_range_test` -- Algorithm 2's trial loop (crash, restart) over a ``trial``
  callable.
* :class:`MIDecayPilot` -- the epoch-level pilot: it samples the fixed MI subset once, receives the
  network's outputs (or every layer's) on it from the loop's ``PROBE`` signal, estimates ITY after
  every epoch and applies the rule per param group.
* ``mi-decay`` / ``mi-decay-layerwise`` registry entries, at the bottom. Their factory runs the range
  test first (through ``BuildContext.trial``) unless the bounds are given.

The MI estimators themselves live in :mod:`lrpilot.estimators.mi`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lrpilot import distributed as dist
from lrpilot.estimators.mi import label_entropy, mi_continuous, mi_continuous_discrete, mi_ratio
from lrpilot.pilots.base import PROBE, Decision, EpochSignals, MethodParts, Pilot, Probe, current_lrs
from lrpilot.registry import BuildContext, MethodInfo, register, require_in, require_positive

__all__ = [
    "DEFAULT_RRT_LRS",
    "MIDecayPilot",
    "MIProbeData",
    "RangeTestResult",
    "estimate_ceiling",
    "estimate_mi",
    "mi_decay_lr",
    "run_range_test",
    "sample_probe",
    "saturation",
    "select_bounds",
]

#: Candidate LRs of the range test: half decades from 1e-4 to 1 (the paper does not list its own; its
#: bounds, 1e-4 to 0.2, fall inside).
DEFAULT_RRT_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

_STARTS = ("top", "mi")
_TIME_DECAYS = ("epsilon", "epoch", "none")
_CEILINGS = ("auto", "entropy", "ksg")
_ATTRIBUTES = ("auto", "accuracy", "ity", "accuracy+ity")
_INITIALS = ("first-epoch", "pre-training")
_ON_CRASH = ("restart", "skip")
_BACKENDS = ("auto", "numpy", "torch")

# Floor of ITY in the denominator of d_s (an ITY <= 0 carries no information; keep the sign of the change).
_TINY = 1e-12


# ====================================================================================================
# Algorithm 1: the LR rule
# ====================================================================================================
def saturation(ity: Sequence[float], e: int) -> float:
    """Algorithm 1's saturation metric for epoch ``e`` (>= 2): ``d_s = (ITY_{e-1} - ITY_{e-2}) / ITY_{e-1}``.

    The denominator is floored at 1e-12 (a raw k-NN ITY can be <= 0): the sign of the change is kept.
    """
    if e < 2:
        return 1.0
    last, before = float(ity[e - 1]), float(ity[e - 2])
    return (last - before) / max(last, _TINY)


def mi_decay_lr(
    e: int,
    ity: Sequence[float],
    ixy: float,
    lr: float,
    *,
    lr_min: float,
    lr_max: float,
    lr_top: float,
    epsilon: float,
    epochs: int,
    start: str = "top",
    time_decay: str = "epsilon",
) -> tuple[float, dict[str, Any]]:
    r"""The LR of epoch ``e`` (1-based) under Algorithm 1, and the quantities that decided it.

    With ``r(x) = clip(x / IXY, 0, 1)`` (:func:`~lrpilot.estimators.mi.mi_ratio`):

    .. math::
        LR_1 &= LR_{top} \quad\text{or (start="mi")}\quad \max(r(ITY_0)\, LR_{max}, LR_{min}) \\
        d_p &= 1 - r(\max ITY_{0:e-1}), \qquad d_s = (ITY_{e-1} - ITY_{e-2}) / ITY_{e-1} \\
        LR_2 &= \max(d_p\, LR_{max}, LR_{min}) \\
        LR_e &= \max(d_p\, \tau_e\, LR_{max}, LR_{min}) \quad\text{if } d_s < \epsilon
                \text{, else } LR_{e-1} \quad (e > 2)

    with the time-decay factor ``tau_e = 1 - epsilon / E`` as printed in the paper (``time_decay=
    "epsilon"``), ``1 - e / E`` (``"epoch"``, the reading in which it is a time decay) or ``1``
    (``"none"``, which the paper says well-fitting models may use).

    Args:
        e: the epoch about to be trained, 1-based.
        ity: raw ITY estimates ``ITY_0 .. ITY_{e-1}`` (``ITY_0``: before training); at least ``e`` values.
        ixy: the ceiling IXY.
        lr: the LR in force (kept when the rule does not fire).
        lr_min, lr_max, lr_top, epsilon: Algorithm 2's output.
        epochs: the budget ``E``.
        start, time_decay: the variants above.

    Returns:
        ``(lr_e, info)`` with ``info = {"rule", "d_p", "d_s", "ratio", "tau"}``; ``rule`` is ``"start"``,
        ``"performance"`` (e = 2), ``"saturated"`` (e > 2, d_s < epsilon) or ``"keep"``.

    Example:
        >>> lr, info = mi_decay_lr(2, [0.1, 1.5], 2.0, 0.05, lr_min=1e-3, lr_max=0.2, lr_top=0.05,
        ...                        epsilon=0.01, epochs=10)
        >>> round(lr, 4), info["rule"]  # d_p = 1 - 1.5/2 = 0.25
        (0.05, 'performance')
    """
    if e < 1 or len(ity) < e:
        raise ValueError(f"epoch {e} needs ITY_0..ITY_{e - 1}, got {len(ity)} values")
    require_in("start", start, _STARTS, method="mi-decay")
    require_in("time_decay", time_decay, _TIME_DECAYS, method="mi-decay")
    if e == 1:
        ratio = mi_ratio(ity[0], ixy)
        new = lr_top if start == "top" else max(ratio * lr_max, lr_min)
        return new, {"rule": "start", "d_p": 1.0 - ratio, "d_s": 1.0, "ratio": ratio, "tau": 1.0}
    ratio = mi_ratio(max(ity[:e]), ixy)
    d_p = 1.0 - ratio
    d_s = saturation(ity, e)
    if e == 2:
        info = {"d_p": d_p, "d_s": d_s, "ratio": ratio, "tau": 1.0}
        return max(d_p * lr_max, lr_min), {"rule": "performance", **info}
    tau = max(0.0, {"epsilon": 1.0 - epsilon / epochs, "epoch": 1.0 - e / epochs, "none": 1.0}[time_decay])
    info = {"d_p": d_p, "d_s": d_s, "ratio": ratio, "tau": tau}
    if d_s < epsilon:
        return max(d_p * tau * lr_max, lr_min), {"rule": "saturated", **info}
    return lr, {"rule": "keep", **info}


# ====================================================================================================
# Algorithm 2: the LR range test
# ====================================================================================================
@dataclass
class RangeTestResult:
    """Algorithm 2's output: the bounds, the summary table ``D`` and every trial run.

    Attributes:
        lr_min, lr_max, lr_top, epsilon: the four values Algorithm 1 needs.
        attribute: the attribute the bounds were taken from (``accuracy`` or ``ity``).
        threshold: ``MAXVAL / C1``.
        table: ``D``, one row per candidate LR that completed at least one run (means over runs), with
            ``d1n`` and ``dnn`` for the chosen attribute.
        runs: every trial run (``lr``, ``trial``, ``status``, per-epoch ``records``, cost).
        notes: anything the selection had to fall back on.
    """

    lr_min: float
    lr_max: float
    lr_top: float
    epsilon: float
    attribute: str
    threshold: float
    c1: float
    c2: float
    table: list[dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def bounds(self) -> dict[str, float]:
        return {"lr_min": self.lr_min, "lr_max": self.lr_max, "lr_top": self.lr_top, "epsilon": self.epsilon}

    def to_dict(self, *, with_runs: bool = True) -> dict[str, Any]:
        out = {
            **self.bounds(),
            "attribute": self.attribute,
            "threshold": self.threshold,
            "c1": self.c1,
            "c2": self.c2,
            "table": self.table,
            "crashed": sorted({r["lr"] for r in self.runs if r["status"] != "completed"}),
            "notes": list(self.notes),
        }
        if with_runs:
            out["runs"] = self.runs
        return out


_TABLE_ATTRS = ("loss", "ity", "accuracy")


def _table(runs: Sequence[Mapping[str, Any]], initial: str) -> list[dict[str, Any]]:
    """``D``: per LR (ascending), the mean over completed runs of min(d_s) and initial/final attributes."""
    completed = [r for r in runs if r["status"] == "completed"]
    rows = []
    for lr in sorted({r["lr"] for r in completed}):
        mine = [r for r in completed if r["lr"] == lr]
        row: dict[str, Any] = {"lr": lr, "runs": len(mine), "crashed": sum(
            1 for r in runs if r["lr"] == lr and r["status"] != "completed")}
        row["min_d_s"] = float(np.mean([_min_ds(r) for r in mine]))
        for attr in _TABLE_ATTRS:
            first = [_initial_record(r, initial).get(attr) for r in mine]
            last = [r["records"][-1].get(attr) for r in mine]
            row[f"initial_{attr}"] = _mean_or_none(first)
            row[f"final_{attr}"] = _mean_or_none(last)
        rows.append(row)
    return rows


def _initial_record(run: Mapping[str, Any], initial: str) -> Mapping[str, Any]:
    records = run["records"]
    return records[0] if initial == "pre-training" else records[1]


def _min_ds(run: Mapping[str, Any]) -> float:
    """min(d_s) over the trained epochs of a run (the d_s each epoch was trained under)."""
    return min(rec["d_s"] for rec in run["records"][1:])


def _mean_or_none(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if len(vals) == len(values) and vals else None


def _bounds_for(rows: list[dict[str, Any]], attribute: str, c1: float) -> dict[str, Any]:
    """LR_min, LR_max, LR_top and the threshold from ``D`` for one attribute (higher is better)."""
    final = [row[f"final_{attribute}"] for row in rows]
    init = [row[f"initial_{attribute}"] for row in rows]
    if any(v is None for v in final + init):
        raise ValueError(
            f"range test: attribute {attribute!r} was not recorded for every LR (use 'ity' for regression)")
    maxval = max(final)
    if not maxval > 0:
        raise ValueError(f"range test: the best final {attribute} is {maxval:.4g}; no candidate LR learned anything")
    thresh = maxval / c1
    d1n = [f - i for f, i in zip(final, init)]
    dnn = [maxval - f for f in final]
    notes = []
    top = final.index(maxval)  # the first LR reaching MAXVAL
    # LR_min: the first LR from which the growth d1n reaches the threshold.
    grew = [i for i, v in enumerate(d1n) if v >= thresh]
    if grew:
        i_min = grew[0]
    else:
        i_min = 0
        notes.append(f"no LR grew {attribute} by MAXVAL/C1 = {thresh:.4g}; LR_min is the smallest LR")
    # LR_max: the first LR beyond which every LR falls short of MAXVAL by >= the threshold, i.e. the
    # last LR within the threshold of MAXVAL (LR_top is always within it).
    i_max = max(i for i, v in enumerate(dnn) if v < thresh)
    if i_min > i_max:
        notes.append(f"LR_min ({rows[i_min]['lr']:g}) above LR_max ({rows[i_max]['lr']:g}); LR_min set to LR_max")
        i_min = i_max
    return {
        "lr_min": rows[i_min]["lr"], "lr_max": rows[i_max]["lr"], "lr_top": rows[top]["lr"],
        "threshold": thresh, "maxval": maxval, "d1n": d1n, "dnn": dnn, "notes": notes,
    }


def select_bounds(
    runs: Sequence[Mapping[str, Any]],
    *,
    c1: float = 10.0,
    c2: float = 1.0,
    attribute: str = "accuracy",
    initial: str = "first-epoch",
) -> RangeTestResult:
    """Algorithm 2's selection from its trial runs.

    Each run is ``{"lr", "trial", "status": "completed"|"crashed", "records": [epoch 0, epoch 1, ...]}``
    where every record holds ``d_s`` (the saturation metric the epoch was trained under; 1.0 for epoch 1)
    and the attributes ``accuracy``, ``ity``, ``loss``. Only completed runs enter the table ``D`` (one
    row per LR, means over its runs). For the attribute (higher is better):

    * ``d1n = final - initial`` (``initial``: the first trained epoch, or ``"pre-training"``: epoch 0),
      ``MAXVAL = max final``, ``dnn = MAXVAL - final``, ``Thresh = MAXVAL / C1``;
    * ``LR_top``: the LR with the largest final value;
    * ``LR_min``: the first LR (ascending) with ``d1n >= Thresh``;
    * ``LR_max``: the first LR beyond which every LR has ``dnn >= Thresh`` (the last LR within the
      threshold of ``MAXVAL``);
    * ``epsilon = C2 * median`` of every completed run's ``min(d_s)``.

    ``attribute="accuracy+ity"`` takes the bounds of whichever attribute gives the larger LR_max (the
    paper's rule for several attributes; LR_top and the threshold follow it).
    """
    require_in("attribute", attribute, _ATTRIBUTES[1:], method="mi-decay range test")
    require_in("initial", initial, _INITIALS, method="mi-decay range test")
    require_positive("c1", c1, method="mi-decay range test")
    require_positive("c2", c2, method="mi-decay range test")
    completed = [r for r in runs if r["status"] == "completed"]
    if not completed:
        lrs = sorted({r["lr"] for r in runs})
        raise ValueError(f"range test: every run crashed (LRs {lrs}); try smaller candidate LRs (rrt_lrs)")
    rows = _table(runs, initial)
    candidates = ["accuracy", "ity"] if attribute == "accuracy+ity" else [attribute]
    chosen_attr, chosen = None, None
    for attr in candidates:
        b = _bounds_for(rows, attr, c1)
        if chosen is None or b["lr_max"] > chosen["lr_max"]:
            chosen_attr, chosen = attr, b
    assert chosen is not None and chosen_attr is not None
    for row, d1n, dnn in zip(rows, chosen["d1n"], chosen["dnn"]):
        row["d1n"], row["dnn"] = d1n, dnn
    epsilon = c2 * statistics.median(_min_ds(r) for r in completed)
    notes = list(chosen["notes"])
    if epsilon < 0:
        notes.append(f"median min(d_s) * C2 = {epsilon:.4g} < 0 (ITY fell in every run); epsilon set to 0")
        epsilon = 0.0
    return RangeTestResult(
        lr_min=chosen["lr_min"], lr_max=chosen["lr_max"], lr_top=chosen["lr_top"], epsilon=float(epsilon),
        attribute=chosen_attr, threshold=chosen["threshold"], c1=c1, c2=c2, table=rows, runs=list(runs),
        notes=notes,
    )


def run_range_test(
    trial: Callable[[float, int], Mapping[str, Any]],
    lrs: Sequence[float],
    *,
    trials: int = 2,
    on_crash: str = "restart",
    **select: Any,
) -> RangeTestResult:
    """Algorithm 2's loop: ``trials`` sweeps over the candidate LRs, then :func:`select_bounds`.

    ``trial(lr, t)`` trains from the saved initial model at ``lr`` for the trial's epochs and returns a
    run record (``status`` ``"completed"`` or ``"crashed"``, see :func:`select_bounds`). A crash ends the
    sweep: the next trial starts *from the crashed LR* (``on_crash="restart"``, the paper's "break and
    start a new trial from (current) candidate LR_i"), and a trial that completes its sweep lets the next
    one start from the first LR again. ``on_crash="skip"`` drops the crashed LR and carries on instead.
    """
    require_in("on_crash", on_crash, _ON_CRASH, method="mi-decay range test")
    if not (isinstance(trials, int) and trials >= 1):
        raise ValueError(f"option rrt_trials of method 'mi-decay' must be an integer >= 1, got {trials!r}")
    lrs = _check_lrs(lrs)
    runs: list[dict[str, Any]] = []
    start = 0
    for t in range(trials):
        i = start
        start = 0
        while i < len(lrs):
            run = dict(trial(lrs[i], t))
            run.setdefault("lr", lrs[i])
            run.setdefault("trial", t)
            runs.append(run)
            if run["status"] != "completed" and on_crash == "restart":
                start = i
                break
            i += 1
    return select_bounds(runs, **select)


def _check_lrs(lrs: Any) -> list[float]:
    try:
        values = [float(v) for v in lrs]
    except (TypeError, ValueError):
        raise ValueError(f"option rrt_lrs of method 'mi-decay' must be a sequence of LRs, got {lrs!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"option rrt_lrs of method 'mi-decay' must be positive finite LRs, got {lrs!r}")
    if values != sorted(values) or len(set(values)) != len(values):
        raise ValueError(f"option rrt_lrs of method 'mi-decay' must be strictly increasing, got {lrs!r}")
    return values


# ====================================================================================================
# the MI subset
# ====================================================================================================
@dataclass
class MIProbeData:
    """The fixed subset the MI is estimated on: inputs, targets, and the sampled training indices."""

    inputs: torch.Tensor
    targets: torch.Tensor
    indices: list[int] | None


def sample_probe(loader: Any, n: int, seed: int) -> MIProbeData:
    """``n`` training samples drawn once, without replacement, by a generator seeded with ``seed``.

    Works on an in-memory :class:`~lrpilot.loop.data.TensorLoader` (``inputs``/``targets``), a
    ``DataLoader`` over a map-style dataset, or (reservoir sampling over one pass) any iterable of
    ``(inputs, targets)`` batches. Fewer samples than ``n`` means all of them.
    """
    rng = np.random.default_rng(seed)
    inputs, targets = getattr(loader, "inputs", None), getattr(loader, "targets", None)
    if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):
        idx = np.sort(rng.choice(len(inputs), size=min(n, len(inputs)), replace=False))
        index = torch.as_tensor(idx, device=inputs.device)
        return MIProbeData(inputs[index], targets[index.to(targets.device)], idx.tolist())
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        idx = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
        items = [dataset[int(i)] for i in idx]
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.stack([torch.as_tensor(item[1]) for item in items])
        return MIProbeData(x, y, idx.tolist())
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    seen = 0
    for batch in loader:  # reservoir sampling (algorithm R) over one pass
        for x, y in zip(batch[0], batch[1]):
            if len(xs) < n:
                xs.append(x)
                ys.append(y)
            else:
                j = int(rng.integers(0, seen + 1))
                if j < n:
                    xs[j], ys[j] = x, y
            seen += 1
    if not xs:
        raise ValueError("the training loader yielded no samples for the MI subset")
    return MIProbeData(torch.stack(xs), torch.stack(ys), None)


# ====================================================================================================
# the pilot
# ====================================================================================================
class MIDecayPilot(Pilot):
    r"""Algorithm 1 of Vasudevan (2020): SGD whose LR follows the MI between the network and the labels.

    Before training it estimates the ceiling IXY on a fixed random subset of the training data (1000
    samples), then after every epoch the MI ``ITY`` between the network's output (``layerwise``: each
    layer's output) on that subset and the subset's targets, and sets the LR of the next epoch with
    :func:`mi_decay_lr`: ``LR_top`` first, then ``max(d_p LR_max, LR_min)``, then a further decay
    whenever ITY's relative gain ``d_s`` falls below ``epsilon``.

    ITY is Ross's k-NN estimate for classification (:func:`~lrpilot.estimators.mi.mi_continuous_discrete`)
    and KSG for regression (:func:`~lrpilot.estimators.mi.mi_continuous`), on the outputs the loop hands
    over in the ``PROBE`` signal (evaluation mode, forward hooks), with one fixed jitter seed so epoch-to-
    epoch changes are the network's, not the estimator's.

    Args:
        optimizer: the SGD optimizer (one param group per layer when ``modules`` has several entries).
        probe: the MI subset (:func:`sample_probe`).
        modules: per param group, the module whose output is that group's T (``""``: the model output).
        lr_min, lr_max, lr_top, epsilon: the range test's output.
        epochs: the budget E.
        task_kind: ``classification``, ``binary`` or ``regression``.
        ixy: the ceiling; ``None`` to estimate it before training, per ``ceiling``.
        ceiling: ``"entropy"`` (H(Y) of the subset labels), ``"ksg"`` (the k-NN estimate of I(X; Y) on
            the subset) or ``"auto"`` (entropy for classification, ksg for regression).
        start, time_decay: see :func:`mi_decay_lr`.
        k, mi_seed, mi_backend, device: the estimator's neighbours, jitter seed, backend and device.
        loss_fn: to report the loss on the subset.
        stop_on_crash, crash_drop: range-test trials stop when the subset's activations turn non-finite,
            or when every attribute drops dramatically: the subset loss above its best / ``crash_drop``,
            ITY and (classification) the subset accuracy below ``crash_drop`` x their best so far.
        info: a dict shared with ``MethodParts.info``; the pilot adds the ``mi`` entry (IXY and friends).

    Note:
        Deviations from the paper, each measured or explained in ``docs/methods/mi-decay.md``: for
        classification the ceiling defaults to H(Y) of the subset labels, not the KSG estimate of
        I(X; Y), which on raw pixels falls below the ITY of an *untrained* network and would pin the LR
        to LR_min from epoch 2 (``ceiling="ksg"`` restores it); ITY of a discrete Y uses Ross's k-NN
        estimator (the KSG construction for discrete labels); the ITY/IXY ratio is clamped to [0, 1].

    Example:
        >>> import torch, lrpilot
        >>> from lrpilot.loop.data import TensorLoader
        >>> x, y = torch.randn(256, 5), torch.randint(0, 3, (256,))
        >>> loader = TensorLoader(x, y, 32)
        >>> hist = lrpilot.fit(torch.nn.Linear(5, 3), loader, loader, method="mi-decay", epochs=3,
        ...                    lr_min=1e-3, lr_max=0.1, lr_top=0.05, epsilon=0.01, progress=False)
        >>> [d.reason for d in hist.decisions][:2]
        ['mi-start', 'mi-performance']

    References:
        Vasudevan, "Mutual Information Based Learning Rate Decay for Stochastic Gradient Descent Training
        of Deep Neural Networks", Entropy 22(5) 560 (2020), Algorithm 1.
    """

    needs = frozenset({PROBE})

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        probe: MIProbeData,
        *,
        modules: Sequence[str] = ("",),
        lr_min: float,
        lr_max: float,
        lr_top: float,
        epsilon: float,
        epochs: int,
        task_kind: str = "classification",
        ixy: float | None = None,
        ceiling: str = "auto",
        start: str = "top",
        time_decay: str = "epsilon",
        k: int = 3,
        mi_seed: int = 0,
        mi_backend: str = "numpy",
        device: Any = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        stop_on_crash: bool = False,
        crash_drop: float = 0.5,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(optimizer)
        if len(modules) != len(optimizer.param_groups):
            raise ValueError(f"{len(modules)} probe modules for {len(optimizer.param_groups)} param groups")
        self.modules = tuple(modules)
        self.data = probe
        self.probe = Probe(probe.inputs, modules=tuple(dict.fromkeys(("", *self.modules))))
        self.bounds = {"lr_min": lr_min, "lr_max": lr_max, "lr_top": lr_top, "epsilon": epsilon}
        self.epochs = epochs
        self.kind = task_kind
        self.classification = task_kind in ("classification", "binary")
        self.binary = task_kind == "binary"
        self.ceiling = ("entropy" if self.classification else "ksg") if ceiling == "auto" else ceiling
        if self.ceiling == "entropy" and not self.classification:
            raise ValueError("option ceiling='entropy' of method 'mi-decay' needs class labels; use 'ksg' "
                             "for regression")
        self.start = start
        self.time_decay = time_decay
        self.k = k
        self.mi_seed = mi_seed
        self.mi_backend = mi_backend
        self.device = device
        self.loss_fn = loss_fn
        self.stop_on_crash = stop_on_crash
        self.crash_drop = crash_drop
        self.info = info if info is not None else {}  # shared with MethodParts.info: lands in the run record
        self.labels = _labels(probe.targets, self.binary) if self.classification else None
        # State (what state_dict saves):
        self.ixy: float | None = ixy
        self.mi: dict[str, Any] = {}
        self.ity: list[list[float]] = [[] for _ in self.modules]
        self.records: list[dict[str, Any]] = []
        self._pending = {"d_p": 1.0, "d_s": 1.0}

    # -- MI ------------------------------------------------------------------------------------------
    def _estimate(self, t: torch.Tensor) -> float:
        """ITY of ``t`` on the subset: computed on rank 0 and broadcast, so every rank decides alike."""
        value = None
        if dist.is_main_process():
            target = self.labels if self.classification else self.data.targets
            value = estimate_mi(t, target, classification=self.classification, k=self.k, mi_seed=self.mi_seed,
                                mi_backend=self.mi_backend, device=self.device)
        return dist.broadcast_object(value)

    def _observe(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """ITY of every group, and the loss/accuracy on the subset, from the probe's outputs."""
        t0 = time.perf_counter()
        cache: dict[str, float] = {}
        for name in self.modules:
            if name not in cache:
                cache[name] = self._estimate(outputs[name])
        out = outputs[""]
        obs: dict[str, Any] = {"ity": [cache[name] for name in self.modules], "mi_s": time.perf_counter() - t0}
        targets = self.data.targets.to(out.device)
        if self.loss_fn is not None:
            obs["loss"] = float(self.loss_fn(out, targets))
        if self.classification:
            pred = (out.reshape(-1) > 0).long() if self.binary else out.argmax(dim=1)
            obs["accuracy"] = float((pred.cpu() == torch.as_tensor(self.labels)).double().mean())
        return obs

    # -- hooks ---------------------------------------------------------------------------------------
    def on_train_begin(self, signals: EpochSignals) -> Decision | None:  # type: ignore[override]
        if self.ixy is None:
            mi = None
            if dist.is_main_process():  # one rank estimates, every rank holds the same value
                mi = estimate_ceiling(self.data, kind=self.kind, ceiling=self.ceiling, k=self.k,
                                      mi_seed=self.mi_seed, mi_backend=self.mi_backend, device=self.device)
            self.mi = dist.broadcast_object(mi)
            self.ixy = self.mi["ixy"]
        self.info.setdefault("mi", self.mi or {"ixy": self.ixy, "ceiling": "given"})
        obs = self._observe(signals[PROBE])
        for hist, value in zip(self.ity, obs["ity"]):
            hist.append(value)
        lrs, infos = self._rule(1)
        self._pending = {"d_p": infos[0]["d_p"], "d_s": infos[0]["d_s"]}
        self.records.append({"epoch": 0, **obs, "lr": None, "d_p": None, "d_s": None})
        return Decision(reason="mi-start", lr=lrs, info=self._info(obs, infos))

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        e = signals.epoch
        if signals.nonfinite:
            self.records.append({"epoch": e, "lr": list(signals.lr), "nonfinite": True, **self._pending})
            return None  # the loop stops the run as diverged
        outputs = signals[PROBE]
        if not all(bool(torch.isfinite(v).all()) for v in outputs.values()):
            # Finite weights and loss, but activations overflowed on the subset: the network has diverged
            # and ITY is undefined. A range-test trial has crashed; a training run stops, saying why.
            self.records.append({"epoch": e, "lr": list(signals.lr), "nonfinite": True, **self._pending})
            reason = "rrt-crash" if self.stop_on_crash else "mi-nonfinite-activations"
            return Decision(reason=reason, stop=True, info={"nonfinite_modules": [
                name for name, v in outputs.items() if not bool(torch.isfinite(v).all())]})
        obs = self._observe(outputs)
        for hist, value in zip(self.ity, obs["ity"]):
            hist.append(value)
        record = {"epoch": e, **obs, "train_loss": signals.train_loss, "lr": list(signals.lr), **self._pending}
        self.records.append(record)
        if self.stop_on_crash and self._crashed():
            return Decision(reason="rrt-crash", stop=True, info={"ity": obs["ity"], "accuracy": obs.get("accuracy")})
        if e >= self.epochs:  # budget spent: log the last ITY, nothing to decide
            return Decision(reason="mi-final", info=self._info(obs, None))
        lrs, infos = self._rule(e + 1)
        self._pending = {"d_p": infos[0]["d_p"], "d_s": infos[0]["d_s"]}
        changed = any(i["rule"] != "keep" for i in infos)
        reasons = {i["rule"] for i in infos if i["rule"] != "keep"}
        reason = f"mi-{reasons.pop()}" if len(reasons) == 1 else ("mi-decay" if changed else "mi-keep")
        return Decision(reason=reason, lr=lrs if changed else None, info=self._info(obs, infos))

    def _rule(self, e: int) -> tuple[tuple[float, ...], list[dict[str, Any]]]:
        assert self.ixy is not None
        lrs, infos = [], []
        for hist, lr in zip(self.ity, current_lrs(self.optimizer)):
            new, info = mi_decay_lr(e, hist, self.ixy, lr, epochs=self.epochs, start=self.start,
                                    time_decay=self.time_decay, **self.bounds)
            lrs.append(new)
            infos.append(info)
        return tuple(lrs), infos

    def _info(self, obs: Mapping[str, Any], infos: list[dict[str, Any]] | None) -> dict[str, Any]:
        """Raw ITY and IXY (unclamped) beside the clamped ratio and the rule's quantities."""
        assert self.ixy is not None
        info: dict[str, Any] = {
            "ity": obs["ity"],
            "ixy": self.ixy,
            "ratio_raw": [v / self.ixy if self.ixy else math.inf for v in obs["ity"]],
            "mi_s": obs["mi_s"],
        }
        for key in ("accuracy", "loss"):
            if key in obs:
                info[f"subset_{key}"] = obs[key]
        if infos is not None:
            for key in ("rule", "d_p", "d_s", "ratio", "tau"):
                info[key] = [i[key] for i in infos]
        if len(self.modules) == 1:  # network-level: scalars read better
            info = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in info.items()}
        return info

    def _crashed(self) -> bool:
        """A sudden, dramatic drop in *every* attribute: the subset loss grew above its best /
        ``crash_drop``, and ITY (and, for classification, the subset accuracy) fell below ``crash_drop`` x
        its best, over the earlier trained epochs."""
        trained = [r for r in self.records if r["epoch"] >= 1 and not r.get("nonfinite")]
        if len(trained) < 2:
            return False
        last, earlier = trained[-1], trained[:-1]
        if "loss" in last:
            best_loss = min(r["loss"] for r in earlier)
            if not last["loss"] > best_loss / self.crash_drop:
                return False
        getters: list[Callable[[Mapping[str, Any]], float]] = [lambda r: r["ity"][0]]
        if self.classification:
            getters.append(lambda r: r["accuracy"])
        for get in getters:
            best = max(get(r) for r in earlier)
            if not (best > 0 and get(last) < self.crash_drop * best):
                return False
        return True

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "ixy": self.ixy,
            "mi": dict(self.mi),
            "bounds": dict(self.bounds),
            "ity": [list(h) for h in self.ity],
            "records": [dict(r) for r in self.records],
            "pending": dict(self._pending),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ixy = state["ixy"]
        self.mi = dict(state["mi"])
        self.bounds = dict(state["bounds"])
        self.ity = [list(h) for h in state["ity"]]
        self.records = [dict(r) for r in state["records"]]
        self._pending = dict(state["pending"])
        if self.mi:
            self.info["mi"] = dict(self.mi)


def _labels(targets: torch.Tensor, binary: bool) -> np.ndarray:
    y = targets.detach().cpu()
    if binary:
        y = y.reshape(-1)
    return y.numpy()


def estimate_mi(t: Any, target: Any, *, classification: bool, k: int = 3, mi_seed: int = 0,
                mi_backend: str = "numpy", device: Any = None) -> float:
    """I(T; Y) on the subset: Ross's estimator against labels, KSG against continuous targets."""
    kw = {"k": k, "seed": mi_seed, "backend": mi_backend, "device": device}
    if classification:
        return mi_continuous_discrete(t, target, **kw)
    return mi_continuous(t, target, **kw)


def estimate_ceiling(probe: MIProbeData, *, kind: str, ceiling: str = "auto", k: int = 3, mi_seed: int = 0,
                     mi_backend: str = "numpy", device: Any = None) -> dict[str, Any]:
    """IXY on the subset: the k-NN estimate of I(X; Y), H(Y) for classification, and the one used.

    Returns ``{"ixy", "ixy_ksg", "h_y", "ceiling", "samples", "ixy_s"}`` (``ixy_s``: seconds spent).
    """
    classification = kind in ("classification", "binary")
    if ceiling == "auto":
        ceiling = "entropy" if classification else "ksg"
    if ceiling == "entropy" and not classification:
        raise ValueError("ceiling 'entropy' needs class labels; use 'ksg' for regression")
    t0 = time.perf_counter()
    target = _labels(probe.targets, kind == "binary") if classification else probe.targets
    ksg = estimate_mi(probe.inputs, target, classification=classification, k=k, mi_seed=mi_seed,
                      mi_backend=mi_backend, device=device)
    h_y = label_entropy(target) if classification else None
    ixy = h_y if ceiling == "entropy" else ksg
    return {"ixy": ixy, "ixy_ksg": ksg, "h_y": h_y, "ceiling": ceiling, "samples": len(probe.inputs),
            "ixy_s": time.perf_counter() - t0}


# ====================================================================================================
# registry
# ====================================================================================================
_DEFAULTS: dict[str, Any] = {
    # Algorithm 1 (None: from the range test)
    "lr_min": None,
    "lr_max": None,
    "lr_top": None,
    "epsilon": None,
    "start": "top",
    "time_decay": "epsilon",
    # MI
    "ceiling": "auto",
    "ixy": None,
    "mi_samples": 1000,
    "mi_seed": None,
    "k": 3,
    "mi_backend": "auto",
    # SGD (the paper: momentum 0.9)
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    # Algorithm 2
    "rrt_lrs": DEFAULT_RRT_LRS,
    "rrt_trials": 2,
    "rrt_epochs": 3,
    "c1": 10.0,
    "c2": 1.0,
    "rrt_attribute": "auto",
    "rrt_initial": "first-epoch",
    "rrt_on_crash": "restart",
    "stop_on_crash": False,
    "crash_drop": 0.5,
    "reinit_seed": None,
}


def _check_options(name: str, o: Mapping[str, Any]) -> None:
    for key in ("lr_min", "lr_max", "lr_top"):
        if o[key] is not None:
            require_positive(key, o[key], method=name)
    if o["epsilon"] is not None:
        require_positive("epsilon", o["epsilon"], method=name, allow_zero=True)
    if o["lr_min"] is not None and o["lr_max"] is not None and o["lr_min"] > o["lr_max"]:
        raise ValueError(f"option lr_min of method {name!r} must be <= lr_max, got {o['lr_min']} > {o['lr_max']}")
    require_in("start", o["start"], _STARTS, method=name)
    require_in("time_decay", o["time_decay"], _TIME_DECAYS, method=name)
    require_in("ceiling", o["ceiling"], _CEILINGS, method=name)
    require_in("mi_backend", o["mi_backend"], _BACKENDS, method=name)
    require_in("rrt_attribute", o["rrt_attribute"], _ATTRIBUTES, method=name)
    require_in("rrt_initial", o["rrt_initial"], _INITIALS, method=name)
    require_in("rrt_on_crash", o["rrt_on_crash"], _ON_CRASH, method=name)
    if o["ixy"] is not None:
        require_positive("ixy", o["ixy"], method=name)
    for key in ("mi_samples", "k", "rrt_trials", "rrt_epochs"):
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"option {key} of method {name!r} must be a positive integer, got {v!r}")
    if o["rrt_epochs"] < 2:
        raise ValueError(f"option rrt_epochs of method {name!r} must be >= 2 (d_s needs two trained epochs)")
    for key in ("mi_seed", "reinit_seed"):
        if o[key] is not None and (isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 0):
            raise ValueError(f"option {key} of method {name!r} must be an integer >= 0 or None, got {o[key]!r}")
    require_positive("c1", o["c1"], method=name)
    require_positive("c2", o["c2"], method=name)
    require_positive("momentum", o["momentum"], method=name, allow_zero=True)
    require_positive("weight_decay", o["weight_decay"], method=name, allow_zero=True)
    if not 0 < o["crash_drop"] < 1:
        raise ValueError(f"option crash_drop of method {name!r} must be in (0, 1), got {o['crash_drop']!r}")
    _check_lrs(o["rrt_lrs"])


def _task_kind(ctx: BuildContext, probe: MIProbeData) -> str:
    if ctx.task_kind in ("classification", "binary", "regression"):
        return ctx.task_kind
    integral = not torch.is_floating_point(probe.targets) or bool((probe.targets == probe.targets.round()).all())
    return "classification" if integral and probe.targets.ndim == 1 else "regression"


def _layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Modules that own trainable parameters directly, in definition order: the layers of layer-wise MI."""
    layers = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            layers.append((name, params))
    return layers


def _reinitialise(model: nn.Module, seed: int) -> None:
    """New initial weights: ``reset_parameters()`` of every module that has one, from ``seed``.

    Torch's default initialisation: a model with a custom one (e.g. ResNet-20's Kaiming normal) gets
    the default instead, and parameters of modules without ``reset_parameters`` keep their values.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def _build(ctx: BuildContext, *, layerwise: bool, **o: Any) -> MethodParts:
    name = "mi-decay-layerwise" if layerwise else "mi-decay"
    _check_options(name, o)
    if o["reinit_seed"] is not None:
        _reinitialise(ctx.model, o["reinit_seed"])
    mi_seed = ctx.seed if o["mi_seed"] is None else o["mi_seed"]
    backend = o["mi_backend"]
    if backend == "auto":
        backend = "torch" if torch.device(ctx.device).type == "cuda" else "numpy"
    # Every rank must probe the same subset: rank 0's (a sharded loader's reservoir would differ).
    probe = dist.broadcast_object(sample_probe(ctx.train_loader, o["mi_samples"], mi_seed))
    kind = _task_kind(ctx, probe)
    if kind == "regression" and o["rrt_attribute"] in ("accuracy", "accuracy+ity"):
        raise ValueError(
            f"option rrt_attribute of method {name!r} cannot be 'accuracy' on a regression task; use 'ity'")
    if kind == "regression" and o["ceiling"] == "entropy":
        raise ValueError(f"option ceiling of method {name!r} cannot be 'entropy' on a regression task; use 'ksg'")

    if layerwise:
        if ctx.param_groups is not None:
            raise ValueError(f"method {name!r} makes one param group per layer itself; do not pass param_groups")
        layers = _layers(ctx.model)
        groups = [{"params": params, "layer": layer} for layer, params in layers]
        modules = [layer for layer, _ in layers]
    else:
        groups = ctx.params()
        modules = None
    sgd = {"momentum": o["momentum"], "nesterov": o["nesterov"], "weight_decay": o["weight_decay"]}
    info: dict[str, Any] = {}
    mi_kw = {"k": o["k"], "mi_seed": mi_seed, "mi_backend": backend, "device": ctx.device}

    needed = ["lr_min", "lr_max", "epsilon"] + (["lr_top"] if o["start"] == "top" else [])
    given = {key: o[key] for key in ("lr_min", "lr_max", "lr_top", "epsilon") if o[key] is not None}
    ixy = o["ixy"]
    if all(key in given for key in needed):
        bounds = {"lr_top": given.get("lr_top", given["lr_max"]), **given}
        info["bounds"] = {**bounds, "source": "given"}
    else:
        # Algorithm 2 first. IXY is its first step; every trial reuses it and the subset.
        mi = {"ixy": ixy, "ceiling": "given"}
        if ixy is None:
            mi = estimate_ceiling(probe, kind=kind, ceiling=o["ceiling"], k=o["k"], mi_seed=mi_seed,
                                  mi_backend=backend, device=ctx.device)
        ixy = mi["ixy"]
        info["mi"] = mi
        result = _range_test(ctx, o, ixy=ixy, mi_seed=mi_seed, kind=kind, sgd=sgd)
        bounds = {**result.bounds(), **given}
        info["bounds"] = {**bounds, "source": "range-test" if not given else "range-test+given"}
        info["range_test"] = result.to_dict(with_runs=False)
        info["search"] = _search_cost(result.runs, mi.get("ixy_s", 0.0))
    if bounds["lr_min"] > bounds["lr_max"]:
        raise ValueError(
            f"method {name!r}: lr_min {bounds['lr_min']} > lr_max {bounds['lr_max']} after the range test")

    optimizer = torch.optim.SGD(groups, lr=bounds["lr_top"], **sgd)
    if modules is None:
        modules = [""] * len(optimizer.param_groups)
    pilot = MIDecayPilot(
        optimizer, probe, modules=modules, epochs=ctx.epochs, task_kind=kind, ixy=ixy, ceiling=o["ceiling"],
        start=o["start"], time_decay=o["time_decay"], loss_fn=ctx.loss_fn, stop_on_crash=o["stop_on_crash"],
        crash_drop=o["crash_drop"], info=info, **mi_kw, **bounds,
    )
    return MethodParts(optimizer, pilot, info=info)


def _range_test(ctx: BuildContext, o: Mapping[str, Any], *, ixy: float, mi_seed: int, kind: str,
                sgd: Mapping[str, Any]) -> RangeTestResult:
    """Algorithm 2 through ``ctx.trial``: each trial is network-level ``mi-decay`` pinned at one LR."""
    attribute = o["rrt_attribute"]
    if attribute == "auto":
        attribute = "accuracy" if kind in ("classification", "binary") else "ity"

    def trial(lr: float, t: int) -> dict[str, Any]:
        # LR_min = LR_max = LR_top = lr pins Algorithm 1 at lr: the trial is Algorithm 1's bookkeeping
        # (ITY, d_p, d_s every epoch) at a constant LR, as Algorithm 2 prescribes. Trial 0 starts from the
        # run's own initial weights; every later trial from new ones ("Initialize and save initial model").
        seed = ctx.seed + t
        trainer = ctx.trial(
            "mi-decay", epochs=o["rrt_epochs"], seed=seed, lr_min=lr, lr_max=lr, lr_top=lr, epsilon=0.0,
            ixy=ixy, mi_samples=o["mi_samples"], mi_seed=mi_seed, k=o["k"], mi_backend=o["mi_backend"],
            stop_on_crash=True, crash_drop=o["crash_drop"], reinit_seed=None if t == 0 else seed, **sgd,
        )
        hist = trainer.history
        crashed = hist.status == "diverged" or (hist.status == "stopped" and hist.status_reason == "rrt-crash")
        records = []
        for rec in trainer.pilot.records:
            ity = rec.get("ity")
            records.append({
                "epoch": rec["epoch"], "d_p": rec.get("d_p"), "d_s": rec.get("d_s"),
                "ity": ity[0] if ity else None, "accuracy": rec.get("accuracy"), "loss": rec.get("loss"),
                "train_loss": rec.get("train_loss"),
            })
        return {
            "lr": lr, "trial": t, "seed": seed, "status": "crashed" if crashed else "completed",
            "reason": hist.status_reason if crashed else "", "epochs": len(hist.epochs), "steps": hist.steps,
            "train_s": hist.epochs[-1].train_s if hist.epochs else 0.0, "records": records,
        }

    return run_range_test(trial, o["rrt_lrs"], trials=o["rrt_trials"], on_crash=o["rrt_on_crash"],
                          c1=o["c1"], c2=o["c2"], attribute=attribute, initial=o["rrt_initial"])


def _search_cost(runs: Sequence[Mapping[str, Any]], ixy_s: float) -> dict[str, Any]:
    """The range test's cost in the bench's common ``search`` shape (IXY's estimate counted as training)."""
    return {
        "runs": [dict(r) for r in runs],
        "total_epochs": sum(r["epochs"] for r in runs),
        "total_steps": sum(r["steps"] for r in runs),
        "total_train_s": sum(r["train_s"] for r in runs) + ixy_s,
    }


def _register_all() -> None:
    paper = "Vasudevan, Entropy 22(5) 560 (2020)"
    test_options = {"lr_min": 0.01, "lr_max": 0.5, "lr_top": 0.2, "epsilon": 0.05, "mi_samples": 96}
    invalid = (
        ({"c1": 0}, r"c1"),
        ({"start": "low"}, r"start"),
        ({"lr_min": 0.5, "lr_max": 0.1}, r"lr_min"),
        ({"rrt_lrs": (0.1, 0.01)}, r"rrt_lrs"),
        ({"ceiling": "h"}, r"ceiling"),
    )
    common = {"defaults": _DEFAULTS, "lr_granularity": "epoch", "kind": "epoch-pilot", "paper": paper,
              "test_options": test_options, "invalid_options": invalid}
    register(MethodInfo(
        "mi-decay", "mi-decay",
        "SGD whose LR decays with the MI between network output and labels, after an LR range test (Vasudevan 2020)",
        lambda ctx, **o: _build(ctx, layerwise=False, **o), tags=frozenset({"seed-method"}), **common))
    register(MethodInfo(
        "mi-decay-layerwise", "mi-decay",
        "MI-driven LR decay with one LR per layer from each layer's MI with the labels (Vasudevan 2020)",
        lambda ctx, **o: _build(ctx, layerwise=True, **o), tags=frozenset({"seed-method"}), **common))


_register_all()
