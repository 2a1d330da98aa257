"""Algorithm 2 of the MI paper: the LR range test (trial loop, summary table D, bounds)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lrpilot.core.checks import require_in, require_positive
from lrpilot.core.progress import Progress

__all__ = ["DEFAULT_RRT_LRS", "RangeTestResult", "run_range_test", "select_bounds"]


#: Candidate LRs of the range test: half decades from 1e-4 to 1 (the paper does not list its own; its
#: bounds, 1e-4 to 0.2, fall inside).
DEFAULT_RRT_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

ATTRIBUTES = ("auto", "accuracy", "ity", "accuracy+ity")
INITIALS = ("first-epoch", "pre-training")
ON_CRASH = ("restart", "skip")

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
    require_in("attribute", attribute, ATTRIBUTES[1:], method="mi-decay range test")
    require_in("initial", initial, INITIALS, method="mi-decay range test")
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
    require_in("on_crash", on_crash, ON_CRASH, method="mi-decay range test")
    if not (isinstance(trials, int) and trials >= 1):
        raise ValueError(f"option rrt_trials of method 'mi-decay' must be an integer >= 1, got {trials!r}")
    lrs = check_lrs(lrs)
    runs: list[dict[str, Any]] = []
    start = 0
    # At most trials * len(lrs) runs (fewer when a crash restarts a sweep part-way): a bar on a
    # terminal, a log line per run otherwise (the test costs about twice a training budget).
    with Progress(trials * len(lrs), "mi-decay range test") as progress:
        for t in range(trials):
            i = start
            start = 0
            while i < len(lrs):
                run = dict(trial(lrs[i], t))
                run.setdefault("lr", lrs[i])
                run.setdefault("trial", t)
                runs.append(run)
                progress.update(f"trial {t} lr {lrs[i]:g}: {run['status']}")
                if run["status"] != "completed" and on_crash == "restart":
                    start = i
                    break
                i += 1
    return select_bounds(runs, **select)


def check_lrs(lrs: Any) -> list[float]:
    try:
        values = [float(v) for v in lrs]
    except (TypeError, ValueError):
        raise ValueError(f"option rrt_lrs of method 'mi-decay' must be a sequence of LRs, got {lrs!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"option rrt_lrs of method 'mi-decay' must be positive finite LRs, got {lrs!r}")
    if values != sorted(values) or len(set(values)) != len(values):
        raise ValueError(f"option rrt_lrs of method 'mi-decay' must be strictly increasing, got {lrs!r}")
    return values


