"""AlgoPerf's scoring rules as pure functions over plain tables.

A *time table* maps ``submission -> task -> time`` (seconds, steps: any cost where less is better;
``inf`` = the target was never reached). Nothing here reads a store or a log file: the bench
(:mod:`lrpilot.bench.leaderboard`) and AlgoPerf's own logs (:mod:`lrpilot.bench.algoperf`) both build
time tables and hand them to :func:`benchmark_scores`.

The rules (Dahl et al. 2023, "Benchmarking Neural Network Training Algorithms", section 4.4; the
v0.5 scoring code of mlcommons/algorithmic-efficiency):

1. A run's time is that of the first evaluation whose validation metric reaches the target
   (:func:`time_to_target`); a task's time is the median over independent runs (:func:`median_time`).
2. A time above ``r_max`` times the fastest submission's time on that task becomes infinite
   (:func:`cut_slow`).
3. The performance ratio is ``r = time / fastest time`` on that task (:func:`performance_ratios`).
4. The performance profile ``rho(tau)`` is the fraction of tasks with ``r <= tau``, at ``num_points``
   evenly spaced ``tau`` from 1 to ``r_max`` (:func:`performance_profiles`).
5. The benchmark score is the trapezoidal integral of ``rho`` over ``tau`` divided by ``r_max - 1``:
   1 for a submission fastest on every task, 0 for one that never comes within ``r_max`` of the
   fastest (:func:`benchmark_scores`).

Example:
    >>> times = {"a": {"t1": 10.0, "t2": 20.0}, "b": {"t1": 20.0, "t2": float("inf")}}
    >>> {k: round(v, 4) for k, v in benchmark_scores(times).items()}
    {'a': 1.0, 'b': 0.1667}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "NUM_POINTS",
    "R_MAX",
    "benchmark_scores",
    "cut_slow",
    "median_time",
    "performance_profiles",
    "performance_ratios",
    "reaches",
    "task_names",
    "taus",
    "time_to_target",
]

#: AlgoPerf's cut-off: a time above ``R_MAX`` times the fastest counts as never reaching the target.
R_MAX = 4.0
#: Points of the performance profile between 1 and ``R_MAX`` (AlgoPerf v0.5 uses 100).
NUM_POINTS = 100

TimeTable = Mapping[str, Mapping[str, float]]

# numpy >= 2 names it trapezoid (trapz was removed in 2.4); numpy 1.x only has trapz.
_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")


def reaches(value: float | None, target: float, *, higher_is_better: bool) -> bool:
    """``value`` reaches ``target`` (``>=`` for accuracy-like metrics, ``<=`` for loss-like ones).

    A missing or non-finite value (a diverged evaluation) never reaches a target.
    """
    if value is None or not math.isfinite(value):
        return False
    return value >= target if higher_is_better else value <= target


def time_to_target(
    values: Sequence[float | None],
    times: Sequence[float],
    target: float,
    *,
    higher_is_better: bool,
) -> float:
    """The time of the first evaluation whose value reaches ``target``; ``inf`` if none does.

    Args:
        values: the validation metric at each evaluation, in order.
        times: the cost spent up to each evaluation (seconds, steps), same length as ``values``.
        target: the validation target.
        higher_is_better: the metric's direction.
    """
    if len(values) != len(times):
        raise ValueError(f"values and times must have the same length, got {len(values)} and {len(times)}")
    for value, time in zip(values, times):
        if reaches(value, target, higher_is_better=higher_is_better):
            return float(time)
    return math.inf


def median_time(times: Iterable[float]) -> float:
    """The median over runs, ``inf`` included (as ``np.median``: the mean of the middle two for an
    even count, so one infinite middle value makes the median infinite). No runs: ``inf``."""
    values = [float(t) for t in times]
    if not values:
        return math.inf
    if any(math.isnan(v) for v in values):
        raise ValueError(f"times must not be NaN (use inf for a target never reached), got {values}")
    return float(np.median(values))


def task_names(times: TimeTable) -> list[str]:
    """Every task of the table, in first-seen order."""
    seen: dict[str, None] = {}
    for row in times.values():
        for task in row:
            seen.setdefault(task, None)
    return list(seen)


def _fastest(times: TimeTable, task: str) -> float:
    return min((float(row.get(task, math.inf)) for row in times.values()), default=math.inf)


def cut_slow(times: TimeTable, r_max: float = R_MAX, tasks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Rule 2: every time above ``r_max`` times the fastest on its task becomes ``inf``.

    A task absent from a submission's row counts as ``inf`` (never reached).
    """
    _check_r_max(r_max)
    tasks = task_names(times) if tasks is None else list(tasks)
    fastest = {task: _fastest(times, task) for task in tasks}
    return {
        sub: {
            task: (t if (t := float(row.get(task, math.inf))) <= r_max * fastest[task] else math.inf)
            for task in tasks
        }
        for sub, row in times.items()
    }


def performance_ratios(times: TimeTable, tasks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Rule 3: ``time / fastest time`` on each task; ``inf`` where the time is, or where nobody reached
    the target. Ties share the ratio (two submissions equally fastest both get 1)."""
    tasks = task_names(times) if tasks is None else list(tasks)
    fastest = {task: _fastest(times, task) for task in tasks}
    out: dict[str, dict[str, float]] = {}
    for sub, row in times.items():
        out[sub] = {}
        for task in tasks:
            t, best = float(row.get(task, math.inf)), fastest[task]
            if math.isinf(t) or math.isinf(best):
                out[sub][task] = math.inf
            elif best == 0.0:  # reached before any cost was spent: only an equal time ties it
                out[sub][task] = 1.0 if t == 0.0 else math.inf
            else:
                out[sub][task] = t / best
    return out


def taus(r_max: float = R_MAX, num_points: int = NUM_POINTS) -> np.ndarray:
    """The ``tau`` grid of the performance profile: ``num_points`` evenly spaced from 1 to ``r_max``."""
    _check_r_max(r_max)
    if not (isinstance(num_points, int) and num_points >= 2):
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    return np.linspace(1.0, r_max, num_points)


def performance_profiles(
    times: TimeTable,
    *,
    r_max: float = R_MAX,
    num_points: int = NUM_POINTS,
    tasks: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rules 2-4: ``(tau, {submission: rho(tau)})``, ``rho`` the fraction of tasks with ``r <= tau``."""
    tasks = task_names(times) if tasks is None else list(tasks)
    grid = taus(r_max, num_points)
    if not tasks:
        return grid, {sub: np.zeros_like(grid) for sub in times}
    ratios = performance_ratios(cut_slow(times, r_max, tasks), tasks)
    profiles = {}
    for sub, row in ratios.items():
        r = np.array([row[task] for task in tasks])
        profiles[sub] = (r[None, :] <= grid[:, None]).mean(axis=1)
    return grid, profiles


def benchmark_scores(
    times: TimeTable,
    *,
    r_max: float = R_MAX,
    num_points: int = NUM_POINTS,
    tasks: Sequence[str] | None = None,
) -> dict[str, float]:
    """Rule 5: the area under each submission's performance profile divided by ``r_max - 1``.

    Args:
        times: ``submission -> task -> time`` (median over runs already taken; ``inf`` = never).
        r_max: the cut-off ratio (AlgoPerf: 4).
        num_points: points of the ``tau`` grid (AlgoPerf v0.5: 100).
        tasks: the tasks that count (default: every task in the table); a submission without a time on
            one of them counts as never reaching it.
    """
    grid, profiles = performance_profiles(times, r_max=r_max, num_points=num_points, tasks=tasks)
    return {sub: float(_trapezoid(rho, grid) / (r_max - 1.0)) for sub, rho in profiles.items()}


def _check_r_max(r_max: float) -> None:
    if not (isinstance(r_max, (int, float)) and math.isfinite(r_max) and r_max > 1):
        raise ValueError(f"r_max must be a finite number > 1, got {r_max!r}")
