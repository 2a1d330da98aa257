"""Grid-tuned baselines: what a learning-rate autopilot must beat, with the cost of tuning on the bill.

``sgd-cosine-tuned`` and ``adam-cosine-tuned`` choose their LR the way a practitioner with compute to
spare would: for every LR of a grid, train the base method (``sgd-cosine``, ``adam-cosine``) from the run's
own initial weights on the run's data for the whole budget (:meth:`BuildContext.trial`, which trains a
copy of the model and leaves the run's model and random state alone), keep the LR whose run reached the
best validation metric without diverging, then train with it.

The search is part of the method's cost. The run record carries it under ``info.method.search``::

    {"base": "sgd-cosine", "criterion": "best_val_metric", "search_epochs": 30,
     "grid": [0.003, ...], "chosen": {"lr": 0.1, "best_val_metric": ..., "final_val_metric": ...},
     "at_edge": false,
     "runs": [{"lr", "best_val_metric", "final_val_metric", "epochs", "steps", "train_s", "wall_s", "status"}, ...],
     "total_epochs": ..., "total_steps": ..., "total_train_s": ..., "total_wall_s": ...}

``total_*`` sum the grid runs only (the main run is in the record's own summary), so the bench charges a
tuned baseline ``total_steps`` / ``total_train_s`` on top of its run.

With the default full-budget protocol the main run repeats the chosen grid run exactly (same initial
weights, data order and seed): its numbers equal that run's. ``search_epochs`` gives a cheaper protocol
(every grid run a full cosine over fewer epochs); a shorter cosine tends to favour a larger LR than the
budget's, so the cheap protocol is an approximation, documented as such in ``docs/methods/peers.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from lrpilot.core.checks import require_in
from lrpilot.core.progress import Progress
from lrpilot.core.registry import BuildContext

__all__ = ["DEFAULT_GRIDS", "grid_search"]

log = logging.getLogger("lrpilot")

#: Default LR grids: half-decade steps (1-3-10) around each base method's usual LR, two decades and a
#: half wide, six full-budget runs each.
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd-cosine": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
    "adam-cosine": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
}

_CRITERIA = {"best": "best_val_metric", "final": "final_val_metric"}


def _check_grid(grid: Any, method: str) -> tuple[float, ...]:
    ok = isinstance(grid, (tuple, list)) and len(grid) > 0
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in grid
    )
    if not ok:
        raise ValueError(f"option grid of method {method!r} must be a non-empty list of positive LRs, got {grid!r}")
    values = tuple(float(v) for v in grid)
    if len(set(values)) != len(values):
        raise ValueError(f"option grid of method {method!r} lists an LR twice: {list(values)}")
    return values


def grid_search(
    ctx: BuildContext,
    base: str,
    grid: Sequence[float],
    *,
    search_epochs: int | None = None,
    criterion: str = "best",
    method: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train ``base`` once per LR of ``grid`` (via ``ctx.trial``) and return the search record.

    Args:
        ctx: the run's build context.
        base: registry name of the method tuned.
        grid: the LRs tried, in order (ties go to the earliest).
        search_epochs: epochs of every grid run (default: the run's budget).
        criterion: ``"best"`` (best validation metric over the run) or ``"final"`` (at its end).
        method: name used in error messages.
        **options: the base method's other options, shared by every grid run.

    Returns:
        the dict documented in this module (``grid``, ``chosen``, ``runs``, ``total_*`` ...).

    Raises:
        ValueError: every grid run diverged (or never produced a finite metric).
    """
    method = method or f"{base}-tuned"
    grid = _check_grid(grid, method)
    require_in("criterion", criterion, tuple(_CRITERIA), method=method)
    epochs = ctx.epochs if search_epochs is None else search_epochs
    if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0):
        raise ValueError(f"option search_epochs of method {method!r} must be a positive integer or None, got {epochs!r}")

    runs: list[dict[str, Any]] = []
    higher_is_better = True
    with Progress(len(grid), f"{method} search") as progress:
        for lr in grid:
            trial = ctx.trial(base, epochs=epochs, lr=lr, **options)
            hist = trial.history
            higher_is_better = hist.higher_is_better
            summary = hist.summary()
            runs.append(
                {
                    "lr": lr,
                    "best_val_metric": summary["best_val_metric"],
                    "final_val_metric": summary["final_val_metric"],
                    "epochs": summary["epochs"],
                    "steps": summary["steps"],
                    "train_s": summary["train_s"],
                    "wall_s": summary["wall_s"],
                    "status": summary["status"],
                }
            )
            progress.update(f"lr {lr:g} -> {_CRITERIA[criterion]} {summary[_CRITERIA[criterion]]:.4g} ({summary['status']})")

    key = _CRITERIA[criterion]
    eligible = [r for r in runs if r["status"] != "diverged" and math.isfinite(r[key])]
    if not eligible:
        raise ValueError(
            f"method {method!r}: every LR of the grid {list(grid)} diverged or never produced a finite "
            f"validation metric; try a grid of smaller LRs (option grid)"
        )
    sign = 1.0 if higher_is_better else -1.0
    best = max(eligible, key=lambda r: sign * r[key])  # max() keeps the first of equals: grid order
    at_edge = len(grid) > 1 and best["lr"] in (min(grid), max(grid))
    if at_edge:
        log.warning("%s: the chosen LR %g is at the edge of the grid %s; the best LR may lie outside it",
                    method, best["lr"], list(grid))
    return {
        "base": base,
        "criterion": key,
        "search_epochs": epochs,
        "grid": list(grid),
        "chosen": {"lr": best["lr"], "best_val_metric": best["best_val_metric"],
                   "final_val_metric": best["final_val_metric"]},
        "at_edge": at_edge,
        "runs": runs,
        "total_epochs": sum(r["epochs"] for r in runs),
        "total_steps": sum(r["steps"] for r in runs),
        "total_train_s": sum(r["train_s"] for r in runs),
        "total_wall_s": sum(r["wall_s"] for r in runs),
    }
