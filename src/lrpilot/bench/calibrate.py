"""Validation targets, set the AlgoPerf way (``lrpilot calibrate``).

AlgoPerf fixes each workload's target from its tuned baselines: run the best configuration several
times and take the median over runs of the best validation metric each run reached. Here: every method
tagged ``tuned`` (grid-tuned baselines, e.g. ``sgd-cosine-tuned``, ``adam-cosine-tuned``) runs each task
at the task's default budget for every seed; per method, the median over seeds of the run's best
validation metric; the task's target is the best of these medians over the tuned methods.

While no method carries the ``tuned`` tag on an install (they come from the peers issue), calibration
falls back to :data:`FALLBACK_METHODS`, ``sgd-cosine`` and ``adam`` at their default LRs, with the same
rule (the best of their medians), and says so in the targets file, task by task. Both are needed:
SGD at 0.1 with momentum 0.9 leaves LeNet-5 on Fashion-MNIST at chance (10% accuracy) for all 10
epochs, while Adam trails SGD on the MNIST-1D MLP (0.65 against 0.76). Re-run ``lrpilot calibrate``
once the tuned baselines are registered.

The runs go through the bench (:func:`lrpilot.bench.runner.run_bench`) into a results store, so an
interrupted calibration resumes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrpilot.bench.executors import Executor
from lrpilot.bench.runner import run_bench
from lrpilot.bench.store import Store
from lrpilot.bench.suites import Plan, Suite, task_problem

__all__ = ["FALLBACK_METHODS", "TARGETS_FORMAT", "calibrate", "calibration_plan", "compute_targets", "default_targets_path"]

log = logging.getLogger("lrpilot.bench")

TARGETS_FORMAT = 1
#: What calibrates while no ``tuned`` method is registered (each at its default LR; the best median wins).
FALLBACK_METHODS = ("sgd-cosine", "adam")

HOW = (
    "AlgoPerf's rule: a task's target is the median over seeds of the best validation metric (over the run's "
    "epochs) reached by each tuned baseline (methods tagged `tuned`) at the task's default budget; with several "
    "tuned baselines, the best of their medians. Each task says which methods and seeds set it; `fallback` marks "
    "tasks calibrated before any tuned baseline was registered, from the better of sgd-cosine (LR 0.1) and adam "
    "(LR 1e-3) at their default LRs instead. "
    "Re-run `lrpilot calibrate` when the tuned baselines change."
)


def default_targets_path() -> Path:
    """The targets file shipped with lrpilot (``src/lrpilot/bench/data/targets.json`` in a checkout)."""
    return Path(__file__).resolve().parent / "data" / "targets.json"


def calibration_plan(
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] | None = None,
    *,
    data_dir: str | None = None,
) -> tuple[Plan, bool]:
    """The runs calibration needs, and whether it falls back (no ``tuned`` method registered).

    Args:
        tasks: the tasks (default: every registered task whose data is on this machine).
        seeds: the seeds per method and task.
        methods: the methods (default: every available method tagged ``tuned``, else the fallback).
    """
    from lrpilot.bench.tasks import task_names
    from lrpilot.core.registry import list_methods

    fallback = False
    if methods is None:
        methods = [m.name for m in list_methods(tags=["tuned"], available_only=True)]
        if not methods:
            fallback = True
            methods = list(FALLBACK_METHODS)
            log.warning("no method tagged 'tuned' is registered: calibrating from %s at their default LRs (fallback)",
                        " and ".join(methods))  # fmt: skip
    if tasks is None:
        tasks = [t for t in task_names() if task_problem(t, data_dir) is None]
    suite = Suite.from_json(
        {"name": "calibrate", "description": "validation targets, the AlgoPerf way", "seeds": list(seeds),
         "tasks": list(tasks), "methods": list(methods)},
        source="lrpilot calibrate",
    )  # fmt: skip
    return suite.resolve(data_dir=data_dir), fallback


def compute_targets(store: Store, plan: Plan, *, fallback: bool) -> dict[str, dict[str, Any]]:
    """Per task of ``plan``: the target and how it was computed, from the runs in ``store``."""
    from lrpilot._version import __version__

    wanted = {s.key: s for s in plan.specs}
    bests: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    meta: dict[str, dict[str, Any]] = {}
    for row in store.runs():
        spec = wanted.get(row["key"])
        if spec is None or row["status"] == "failed" or row["best_val_metric"] is None:
            continue
        bests[spec.task][spec.label].append((spec.seed, row["best_val_metric"]))
        meta[spec.task] = {"metric": row["metric"], "higher_is_better": bool(row["higher_is_better"]),
                           "epochs": spec.epochs, "batch_size": spec.batch_size}  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for task, per_method in bests.items():
        hib = meta[task]["higher_is_better"]
        medians = {m: float(np.median([v for _, v in sorted(vals)])) for m, vals in per_method.items()}
        chosen = (max if hib else min)(medians, key=lambda m: medians[m])
        seeds = sorted({s for vals in per_method.values() for s, _ in vals})
        out[task] = {
            "target": medians[chosen],
            **meta[task],
            "from": chosen,
            "methods": {m: {"median_best": medians[m], "best_per_seed": {str(s): v for s, v in sorted(vals)}}
                        for m, vals in per_method.items()},  # fmt: skip
            "seeds": seeds,
            "fallback": fallback,
            "lrpilot_version": __version__,
            "calibrated_at": time.strftime("%Y-%m-%d"),
        }
        missing = [s for s in plan.seeds if s not in seeds]
        if missing:
            out[task]["note"] = f"runs of seeds {missing} failed or are missing"
    return out


def calibrate(
    *,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] | None = None,
    store_dir: str | Path = "runs/calibrate",
    targets_path: str | Path | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
    data_dir: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the calibration runs (resumable) and write the targets file; returns its content.

    Tasks not recalibrated keep their entries in the file.
    """
    plan, fallback = calibration_plan(tasks, seeds, methods, data_dir=data_dir)
    if not plan.specs:
        raise ValueError("nothing to calibrate: no runnable task or method (see the warnings above)")
    run_bench(plan, store_dir, executor=executor, workers=workers, progress=progress, argv=["lrpilot", "calibrate"])
    with Store.open(store_dir) as store:
        computed = compute_targets(store, plan, fallback=fallback)
    path = Path(targets_path) if targets_path is not None else default_targets_path()
    current: dict[str, Any] = {}
    if path.exists():
        current = json.loads(path.read_text())
    tasks = dict(sorted({**current.get("tasks", {}), **computed}.items()))
    data: dict[str, Any] = {"format": TARGETS_FORMAT, "how": HOW}
    fallback_tasks = [t for t, e in tasks.items() if e.get("fallback")]
    if fallback_tasks:
        data["status"] = (
            f"FALLBACK for {', '.join(fallback_tasks)}: no method tagged `tuned` was registered when these targets "
            "were set, so they come from sgd-cosine and adam at their default LRs. Recalibrate (`lrpilot calibrate`) "
            "once the tuned baselines (sgd-cosine-tuned, adam-cosine-tuned) are registered."
        )
    data["tasks"] = tasks
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    uncovered = [s.task for s in plan.specs if s.task not in computed]
    if uncovered:
        log.warning("no finished run to calibrate %s", ", ".join(sorted(set(uncovered))))
    return data


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def describe_targets(data: Mapping[str, Any]) -> str:
    """One line per task: the target and where it came from."""
    lines = []
    for task, e in data.get("tasks", {}).items():
        if not _finite(e.get("target")):
            continue
        sign = ">=" if e.get("higher_is_better", True) else "<="
        src = f"{e.get('from')}{' (fallback)' if e.get('fallback') else ''}, seeds {e.get('seeds')}"
        lines.append(f"{task:<24} {e.get('metric', '')} {sign} {e['target']:.4f}   from {src}")
    return "\n".join(lines)
